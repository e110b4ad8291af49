"""The distillation objectives against values computed by hand (numbers typed in, not re-derived in code)."""
import math

import pytest
import torch

from deit_train.errors import ConfigError
from deit_train.losses import ClassHeadDistillation, CrossEntropyLabels, DeiTDistillation, StudentOutputs, TeacherOutputs
from deit_train.models import is_distilled

CLS = torch.tensor([[2.0, 0.0, 0.0]])
DIST = torch.tensor([[0.0, 1.0, 0.0]])
TEACHER = torch.tensor([[0.0, 0.0, 3.0]])
Y = torch.tensor([0])


def loss_of(method, cls, target, dist=None, teacher=None):
    """The method's loss on the heads and teacher logits (the interface's dataclasses)."""
    return method(StudentOutputs(cls, dist), target, None if teacher is None else TeacherOutputs(teacher))


def ce(logits, k):
    return math.log(sum(math.exp(v) for v in logits)) - logits[k]


def test_none_is_cross_entropy_on_class_head():
    loss = loss_of(DeiTDistillation("none"), CLS, Y)
    # log(e^2 + 2) - 2
    assert loss.item() == pytest.approx(math.log(math.exp(2) + 2) - 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.2395447, abs=1e-6)


def test_hard_distillation_uses_teacher_argmax_on_dist_head():
    loss = loss_of(DeiTDistillation("hard", alpha=0.5), CLS, Y, DIST, TEACHER)
    expected = 0.5 * ce([2, 0, 0], 0) + 0.5 * ce([0, 1, 0], 2)  # teacher argmax = class 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * 0.2395447 + 0.5 * 1.5514448, abs=1e-6)


def test_hard_alpha_generalises():
    loss = loss_of(DeiTDistillation("hard", alpha=0.25), CLS, Y, DIST, TEACHER)
    assert loss.item() == pytest.approx(0.75 * 0.2395447 + 0.25 * 1.5514448, abs=1e-6)


def _kl_by_hand(teacher_logits, student_logits) -> float:
    """KL(p_t || p_s) = sum p_t log(p_t / p_s), with p = softmax(logits), in plain Python."""
    zt, zs = [math.exp(v) for v in teacher_logits], [math.exp(v) for v in student_logits]
    pt, ps = [v / sum(zt) for v in zt], [v / sum(zs) for v in zs]
    return sum(a * math.log(a / b) for a, b in zip(pt, ps))


def test_soft_distillation_with_temperature():
    tau, alpha = 2.0, 0.3
    loss = loss_of(DeiTDistillation("soft", alpha=alpha, tau=tau), CLS, Y, DIST, TEACHER)
    kl = _kl_by_hand((0, 0, 1.5), (0, 0.5, 0))  # teacher and dist head at temperature 2
    expected = (1 - alpha) * 0.2395447 + alpha * tau**2 * kl
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_soft_kl_reduction_mean_divides_by_batch_times_classes():
    batch = torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), torch.randn(4, 5), torch.randn(4, 5)
    per_sample = loss_of(DeiTDistillation("soft", alpha=1.0, tau=1.0, kl_reduction="batchmean"), *batch)
    official = loss_of(DeiTDistillation("soft", alpha=1.0, tau=1.0, kl_reduction="mean"), *batch)
    assert official.item() == pytest.approx(per_sample.item() / 5, rel=1e-6)


def test_soft_targets_use_soft_cross_entropy():
    target = torch.tensor([[0.7, 0.3, 0.0]])
    # smoothing lives in the soft targets
    loss = loss_of(DeiTDistillation("none", label_loss=CrossEntropyLabels(0.1)), CLS, target)
    assert loss.item() == pytest.approx(0.7 * ce([2, 0, 0], 0) + 0.3 * ce([2, 0, 0], 1), abs=1e-6)


def test_label_smoothing_on_hard_targets():
    loss = loss_of(DeiTDistillation("none", label_loss=CrossEntropyLabels(0.3)), CLS, Y)
    # target = 0.8 on class 0, 0.1 elsewhere
    assert loss.item() == pytest.approx(0.8 * ce([2, 0, 0], 0) + 0.2 * ce([2, 0, 0], 1), abs=1e-6)


def test_teacher_gets_no_gradient():
    teacher = TEACHER.clone().requires_grad_(True)
    dist = DIST.clone().requires_grad_(True)
    loss_of(DeiTDistillation("soft", tau=2.0), CLS, Y, dist, teacher).backward()
    assert teacher.grad is None and dist.grad is not None


@pytest.mark.parametrize("kwargs", [dict(distill_type="medium"), dict(alpha=1.5), dict(tau=0.0),
                                    dict(kl_reduction="sum")])
def test_bad_options_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match="distill\\."):
        DeiTDistillation(**kwargs)


def test_usual_hard_distillation_without_token_trains_the_class_head_on_both_targets():
    """Paper Tab. 3 "hard distillation" without distillation token (distill=kd_hard): the class head learns y and
    argmax teacher."""
    loss = loss_of(ClassHeadDistillation("kd_hard", alpha=0.5), CLS, Y, None, TEACHER)
    # CE([2,0,0], 0) = 0.2395447, CE([2,0,0], 2) = log(e^2 + 2) = 2.2395447
    assert loss.item() == pytest.approx(0.5 * 0.2395447 + 0.5 * 2.2395447, abs=1e-6)


def test_usual_soft_distillation_without_token_matches_hinton_kd_on_the_class_head():
    tau, alpha = 2.0, 0.3
    loss = loss_of(ClassHeadDistillation("kd", alpha=alpha, tau=tau), CLS, Y, None, TEACHER)
    kl = _kl_by_hand((0, 0, 1.5), (1.0, 0, 0))  # teacher and the class head at temperature 2
    assert loss.item() == pytest.approx((1 - alpha) * 0.2395447 + alpha * tau**2 * kl, abs=1e-6)


def test_distillation_without_teacher_logits_is_refused():
    with pytest.raises(ValueError, match="teacher logits"):
        loss_of(DeiTDistillation("hard"), CLS, Y, DIST, None)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_usual_distillation_run_config_builds_a_token_free_student_learning_from_the_teacher(tmp_path,
                                                                                         digits_teacher_file):
    from hydra.utils import instantiate

    from conftest import FAST_DIGITS, compose_config

    cfg = compose_config(["experiment=quickstart", "distill=kd", *FAST_DIGITS,
                          f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0"], tmp_path)
    module = instantiate(cfg.module)
    assert not is_distilled(module.student) and module.teacher is not None
    images, target = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    loss = module.training_step((images, target), 0)
    cls = module.student(images)
    teacher = module.teacher(images)
    by_hand = 0.5 * torch.nn.functional.cross_entropy(cls, target, label_smoothing=0.1) + 0.5 * torch.nn.functional.kl_div(
        cls.log_softmax(-1), teacher.softmax(-1), reduction="batchmean")
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_terms_are_the_weighted_parts_of_the_loss_and_log_by_name():
    method = DeiTDistillation("hard", alpha=0.25)
    terms = method.terms(StudentOutputs(CLS, DIST), Y, TeacherOutputs(TEACHER))
    assert set(terms) == {"labels", "teacher"}
    assert terms["labels"].item() == pytest.approx(0.75 * 0.2395447, abs=1e-6)
    assert terms["teacher"].item() == pytest.approx(0.25 * 1.5514448, abs=1e-6)
    assert set(DeiTDistillation("none").terms(StudentOutputs(CLS), Y, None)) == {"labels"}


def test_label_smoothing_out_of_range_names_the_loss_option():
    with pytest.raises(ConfigError, match="loss.label_smoothing"):
        CrossEntropyLabels(1.0)


def test_prediction_averages_the_heads():
    prediction = DeiTDistillation("hard").predict(StudentOutputs(CLS, DIST))
    assert prediction.tolist() == [[1.0, 0.5, 0.0]]
