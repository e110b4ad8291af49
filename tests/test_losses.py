"""The distillation objectives against values computed by hand (numbers typed in, not re-derived in code)."""
import math

import pytest
import torch

from deit_train.errors import ConfigError
from deit_train.losses import DistillationLoss

CLS = torch.tensor([[2.0, 0.0, 0.0]])
DIST = torch.tensor([[0.0, 1.0, 0.0]])
TEACHER = torch.tensor([[0.0, 0.0, 3.0]])
Y = torch.tensor([0])


def ce(logits, k):
    return math.log(sum(math.exp(v) for v in logits)) - logits[k]


def test_none_is_cross_entropy_on_class_head():
    loss = DistillationLoss("none")(CLS, Y)
    # log(e^2 + 2) - 2
    assert loss.item() == pytest.approx(math.log(math.exp(2) + 2) - 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.2395447, abs=1e-6)


def test_hard_distillation_uses_teacher_argmax_on_dist_head():
    loss = DistillationLoss("hard", alpha=0.5)(CLS, Y, DIST, TEACHER)
    expected = 0.5 * ce([2, 0, 0], 0) + 0.5 * ce([0, 1, 0], 2)  # teacher argmax = class 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * 0.2395447 + 0.5 * 1.5514448, abs=1e-6)


def test_hard_alpha_generalises():
    loss = DistillationLoss("hard", alpha=0.25)(CLS, Y, DIST, TEACHER)
    assert loss.item() == pytest.approx(0.75 * 0.2395447 + 0.25 * 1.5514448, abs=1e-6)


def test_soft_distillation_with_temperature():
    tau, alpha = 2.0, 0.3
    loss = DistillationLoss("soft", alpha=alpha, tau=tau)(CLS, Y, DIST, TEACHER)
    # p_t = softmax([0,0,1.5]), p_s = softmax([0,0.5,0]); KL(p_t || p_s) = sum p_t log(p_t / p_s)
    zt = [math.exp(v) for v in (0, 0, 1.5)]
    zs = [math.exp(v) for v in (0, 0.5, 0)]
    pt = [v / sum(zt) for v in zt]
    ps = [v / sum(zs) for v in zs]
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    expected = (1 - alpha) * 0.2395447 + alpha * tau**2 * kl
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_soft_kl_reduction_mean_divides_by_batch_times_classes():
    batch = torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), torch.randn(4, 5), torch.randn(4, 5)
    per_sample = DistillationLoss("soft", alpha=1.0, tau=1.0, kl_reduction="batchmean")(*batch)
    official = DistillationLoss("soft", alpha=1.0, tau=1.0, kl_reduction="mean")(*batch)
    assert official.item() == pytest.approx(per_sample.item() / 5, rel=1e-6)


def test_soft_targets_use_soft_cross_entropy():
    target = torch.tensor([[0.7, 0.3, 0.0]])
    loss = DistillationLoss("none", label_smoothing=0.1)(CLS, target)  # smoothing lives in soft targets
    assert loss.item() == pytest.approx(0.7 * ce([2, 0, 0], 0) + 0.3 * ce([2, 0, 0], 1), abs=1e-6)


def test_label_smoothing_on_hard_targets():
    loss = DistillationLoss("none", label_smoothing=0.3)(CLS, Y)
    # target = 0.8 on class 0, 0.1 elsewhere
    assert loss.item() == pytest.approx(0.8 * ce([2, 0, 0], 0) + 0.2 * ce([2, 0, 0], 1), abs=1e-6)


def test_teacher_gets_no_gradient():
    teacher = TEACHER.clone().requires_grad_(True)
    dist = DIST.clone().requires_grad_(True)
    DistillationLoss("soft", tau=2.0)(CLS, Y, dist, teacher).backward()
    assert teacher.grad is None and dist.grad is not None


@pytest.mark.parametrize("kwargs", [dict(distill_type="medium"), dict(alpha=1.5), dict(tau=0.0),
                                    dict(kl_reduction="sum")])
def test_bad_options_are_config_errors(kwargs):
    with pytest.raises(ConfigError, match="distill\\."):
        DistillationLoss(**kwargs)
