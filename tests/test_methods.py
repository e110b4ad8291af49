"""Distillation methods (deit_train.losses): each loss against an independent implementation of its paper's / official
code's formula on random logits and features (float64, 1e-6); the interface's plumbing in real runs (the student
follows the method, the epoch reaches the method, a projector is trained, saved, resumed and not exported); teacher
ensembles; what the teacher-logit cache serves; the bad inputs, one line each."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from conftest import FAST_DIGITS, compose_config, run_cli_in_process, train_preempted_then_resumed
from deit_train.errors import ConfigError
from deit_train.losses import (ClassHeadDistillation, CrossEntropyLabels, DecoupledDistillation, DeiTDistillation,
                               FeatureDistillation, StudentOutputs, TeacherOutputs)
from deit_train.models.deit import forward_student
from deit_train.teacher import FrozenTeacher, TeacherEnsemble
from deit_train.teacher.cache import TeacherLogitCache, build_teacher
from deit_train.train import train

# float64 throughout: the brief asks 1e-6; the methods reach ~1e-14, so 1e-10 also catches a silent cast to float32
B, C, TOL = 16, 10, 1e-10
SHORT = ["experiment=quickstart", *FAST_DIGITS, "trainer.max_epochs=2", "trainer.limit_train_batches=3",
         "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
         "test=false", "teacher.min_val_top1=0"]


# ---- independent formulas, written out from probabilities (no log_softmax / kl_div / cross_entropy) -----------
def probs(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def ce_smoothed(z, y, eps):
    """-(1 - eps) log p_y - eps / C sum_c log p_c, averaged over the batch."""
    logp = torch.log(probs(z))
    return (-(1 - eps) * logp[torch.arange(len(y)), y] - eps / z.shape[1] * logp.sum(1)).mean()


def hinton(zs, zt, tau, per="batch"):
    """tau^2 sum_c p_t (log p_t - log p_s), summed over the batch, divided by B (per="batch") or B x C."""
    pt, ps = probs(zt / tau), probs(zs / tau)
    kl = (pt * (torch.log(pt) - torch.log(ps))).sum()
    return tau**2 * kl / (zs.shape[0] if per == "batch" else zs.numel())


def official_dkd(logits_student, logits_teacher, target, alpha, beta, temperature):
    """mdistiller/distillers/DKD.py's dkd_loss, transcribed op for op (cat_mask, the -1000 x gt_mask trick)."""
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.unsqueeze(1), 1).bool()
    other_mask = torch.ones_like(logits_student).scatter_(1, target.unsqueeze(1), 0).bool()

    def cat_mask(t):
        return torch.cat([(t * gt_mask).sum(dim=1, keepdims=True), (t * other_mask).sum(1, keepdims=True)], dim=1)

    pred_student = cat_mask(F.softmax(logits_student / temperature, dim=1))
    pred_teacher = cat_mask(F.softmax(logits_teacher / temperature, dim=1))
    tckd = F.kl_div(torch.log(pred_student), pred_teacher, reduction="sum") * temperature**2 / target.shape[0]
    pred_teacher_part2 = F.softmax(logits_teacher / temperature - 1000.0 * gt_mask, dim=1)
    log_pred_student_part2 = F.log_softmax(logits_student / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_pred_student_part2, pred_teacher_part2, reduction="sum") * temperature**2 / target.shape[0]
    return alpha * tckd + beta * nckd


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    cls, dist, teacher = (3 * torch.randn(3, B, C, generator=g, dtype=torch.float64)).unbind(0)
    return cls, dist, teacher, torch.randint(0, C, (B,), generator=g)


def loss(method, cls, target, dist=None, teacher=None, features=None, teacher_features=None):
    return method(StudentOutputs(cls, dist, features), target, TeacherOutputs(teacher, teacher_features))


# ---- the losses against their formulas --------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (0.3, 4.0)])
def test_kd_is_hintons_loss_on_the_class_head(batch, alpha, tau):
    cls, _, teacher, y = batch
    method = ClassHeadDistillation("kd", alpha=alpha, tau=tau, label_loss=CrossEntropyLabels(0.1))
    expected = (1 - alpha) * ce_smoothed(cls, y, 0.1) + alpha * hinton(cls, teacher, tau)
    assert abs(loss(method, cls, y, None, teacher) - expected).item() < TOL


def test_kd_hard_is_the_teachers_argmax_on_the_class_head(batch):
    cls, _, teacher, y = batch
    method = ClassHeadDistillation("kd_hard", alpha=0.25, label_loss=CrossEntropyLabels(0.1))
    expected = 0.75 * ce_smoothed(cls, y, 0.1) + 0.25 * ce_smoothed(cls, teacher.argmax(1), 0.0)
    assert abs(loss(method, cls, y, None, teacher) - expected).item() < TOL


@pytest.mark.parametrize("name,kwargs,teacher_term", [
    ("soft", dict(alpha=0.5, tau=1.0), lambda d, t: hinton(d, t, 1.0)),
    ("soft", dict(alpha=0.1, tau=3.0, kl_reduction="mean"), lambda d, t: hinton(d, t, 3.0, per="element")),  # soft_paper
    ("hard", dict(alpha=0.5), lambda d, t: ce_smoothed(d, t.argmax(1), 0.0)),
])
def test_deit_token_methods_are_unchanged(batch, name, kwargs, teacher_term):
    cls, dist, teacher, y = batch
    method = DeiTDistillation(name, label_loss=CrossEntropyLabels(0.1), **kwargs)
    expected = (1 - kwargs["alpha"]) * ce_smoothed(cls, y, 0.1) + kwargs["alpha"] * teacher_term(dist, teacher)
    assert abs(loss(method, cls, y, dist, teacher) - expected).item() < TOL


@pytest.mark.parametrize("epoch,factor", [(0, 1 / 20), (9, 10 / 20), (19, 1.0), (40, 1.0)])
def test_dkd_is_the_official_loss_with_its_warmup(batch, epoch, factor):
    cls, _, teacher, y = batch
    method = DecoupledDistillation(alpha=1.0, beta=8.0, tau=4.0, warmup_epochs=20, label_loss=CrossEntropyLabels(0.0))
    method.set_epoch(epoch)
    expected = ce_smoothed(cls, y, 0.0) + factor * official_dkd(cls, teacher, y, 1.0, 8.0, 4.0)
    terms = method.terms(StudentOutputs(cls), y, TeacherOutputs(teacher))
    assert set(terms) == {"labels", "tckd", "nckd"}
    assert abs(sum(terms.values()) - expected).item() < TOL
    # alpha and beta weigh TCKD and NCKD apart
    other = DecoupledDistillation(alpha=2.0, beta=0.5, tau=2.0, warmup_epochs=0, label_loss=CrossEntropyLabels(0.0))
    assert abs(loss(other, cls, y, None, teacher) - ce_smoothed(cls, y, 0.0)
               - official_dkd(cls, teacher, y, 2.0, 0.5, 2.0)).item() < TOL


def test_dkd_with_mixup_targets_decouples_at_the_targets_argmax(batch):
    cls, _, teacher, y = batch
    soft = 0.7 * F.one_hot(y, C).double() + 0.3 * F.one_hot((y + 1) % C, C).double()
    method = DecoupledDistillation(warmup_epochs=0)
    kd = method.terms(StudentOutputs(cls), soft, TeacherOutputs(teacher))
    assert abs(kd["tckd"] + kd["nckd"] - official_dkd(cls, teacher, y, 1.0, 8.0, 4.0)).item() < TOL


@pytest.mark.parametrize("regression", ["mse", "smooth_l1"])
def test_feature_regresses_the_projected_student_features_onto_the_teachers(batch, regression):
    cls, _, _, y = batch
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(B, 32, generator=g, dtype=torch.float64), torch.randn(B, 48, generator=g, dtype=torch.float64)
    method = FeatureDistillation(weight=2.0, regression=regression)
    method.bind(_Width(32), _Width(48))
    method.double()
    w, b = method.projector.weight.detach(), method.projector.bias.detach()
    d = fs @ w.T + b - ft
    per_element = d**2 if regression == "mse" else torch.where(d.abs() < 1, 0.5 * d**2, d.abs() - 0.5)
    terms = method.terms(StudentOutputs(cls, None, fs), y, TeacherOutputs(None, ft))
    assert set(terms) == {"labels", "feature"}
    assert abs(terms["feature"] - 2.0 * per_element.mean()).item() < TOL
    assert abs(terms["labels"] - ce_smoothed(cls, y, 0.0)).item() < TOL


class _Width(nn.Module):
    """A network that only says how wide its pooled features are."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.num_features = width


def test_feature_term_equals_timms_feature_distillation_task():
    """timm's FeatureDistillationTask on the same student, teacher and projector: the same feature and task loss."""
    from timm.task.distillation import FeatureDistillationTask

    torch.manual_seed(0)
    student = timm.create_model("deit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=1,
                                num_heads=2, num_classes=10).double()
    teacher = timm.create_model("regnetx_002", num_classes=10).double().eval()
    task = FeatureDistillationTask(student, teacher, criterion=nn.CrossEntropyLoss(), distill_loss_weight=2.0,
                                   task_loss_weight=1.0, device=torch.device("cpu"), dtype=torch.float64,
                                   verbose=False)
    x, y = torch.randn(4, 3, 16, 16, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    timm_out = task(x, y)
    method = FeatureDistillation(weight=2.0)
    method.bind(student, teacher)
    method.double().projector.load_state_dict(task.trainable_module.projection.state_dict())
    cls, dist, features = forward_student(student, x, with_features=True)
    with torch.no_grad():
        teacher_features = teacher.forward_head(teacher.forward_features(x), pre_logits=True)
    terms = method.terms(StudentOutputs(cls, dist, features), y, TeacherOutputs(teacher(x), teacher_features))
    assert abs(terms["feature"] - 2.0 * timm_out["kd_loss"]).item() < TOL
    assert abs(terms["labels"] - timm_out["task_loss"]).item() < TOL


def test_frozen_teacher_features_are_timms_pre_logits(spread_teacher_net, tmp_path):
    torch.save(spread_teacher_net.state_dict(), tmp_path / "t.pth")
    teacher = FrozenTeacher("regnetx_002", checkpoint=str(tmp_path / "t.pth"), precision="fp32", lean=False)
    x = torch.randn(4, 3, 32, 32)
    logits, features = teacher(x, features=True)
    with torch.no_grad():
        expected = spread_teacher_net.forward_head(spread_teacher_net.forward_features(x), pre_logits=True)
        assert torch.allclose(features, expected, atol=1e-5) and torch.allclose(logits, spread_teacher_net(x), atol=1e-5)
    assert features.shape == (4, teacher.num_features) == (4, 368)


def test_feature_composes_with_a_logit_method(batch):
    cls, dist, teacher, y = batch
    fs = ft = torch.zeros(B, 8, dtype=torch.float64)
    for logit in (ClassHeadDistillation("kd", alpha=0.3, tau=2.0), DeiTDistillation("hard")):
        method = FeatureDistillation(logit=logit)
        method.bind(_Width(8), _Width(8))
        assert method.projector is None  # same widths: no projector, as timm
        total = loss(method, cls, y, dist, teacher, fs, ft)
        assert abs(total - loss(logit, cls, y, dist, teacher)).item() < TOL  # zero feature error: the logit loss
    assert method.student_needs == {"features", "dist"} and method.teacher_needs == {"features", "logits"}


# ---- the student follows the method; the old spelling of KD is refused ---------------------------------------------
@pytest.mark.parametrize("overrides,distilled", [
    (["distill=none"], False), (["distill=soft"], True), (["distill=hard"], True), (["distill=soft_paper"], True),
    (["distill=kd"], False), (["distill=kd_hard"], False), (["distill=dkd"], False), (["distill=feature"], False),
    (["distill=feature", "distill@distill.logit=hard"], True), (["distill=feature", "distill@distill.logit=kd"], False),
])
def test_the_student_has_a_distillation_token_exactly_when_its_method_trains_one(tmp_path, overrides, distilled):
    cfg = compose_config(["experiment=quickstart", *overrides], tmp_path)
    assert cfg.model.distilled is distilled


@pytest.mark.parametrize("overrides,message", [
    (["distill=soft", "model.distilled=false"], "distill=soft trains the distillation token but model.distilled=false"
                                                 ": drop model.distilled=false (the student follows the method), or use "
                                                 "distill=kd"),
    (["distill=hard", "model.distilled=false"], "or use distill=kd_hard"),
    (["distill=kd", "model.distilled=true"], "model.distilled=true but distill=kd does not train the distillation head"),
    (["distill=feature", "distill.student_dim=50"], "distill.student_dim=50 but the student's pooled features have 32 "
                                                    "channels: set distill.student_dim=32 or null"),
    (["distill=feature", "distill.teacher_dim=50"], "distill.teacher_dim=50 but the teacher's pooled features have 368"),
    (["distill=dkd", "teacher.cache_dir=CACHE", "teacher.cache_topk=5"],
     "distill=dkd needs every class's teacher logit but teacher.cache_topk=5 keeps 5 of 10: set teacher.cache_topk=10"),
    (["distill=feature", "teacher.cache_dir=CACHE"], "distill=feature reads the teacher's pooled features, which "
                                                     "teacher.cache_dir does not store"),
    (["teacher=[regnetx_002_digits,regnetx_002_digits]"], "for an ensemble use teacher=ensemble "
     "teacher@teacher.members.0=regnetx_002_digits teacher@teacher.members.1=regnetx_002_digits"),
])
def test_a_method_it_cannot_serve_stops_before_training_in_one_line(tmp_path, digits_teacher_file, overrides, message):
    overrides = [o.replace("CACHE", str(tmp_path / "cache")) for o in overrides]
    proc = run_cli_in_process([*SHORT, f"teacher.checkpoint={digits_teacher_file}", *overrides], tmp_path / "run",
                              tmp_path / "home")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def test_the_cache_serves_logit_methods_as_before(tmp_path):
    cache = TeacherLogitCache.__new__(TeacherLogitCache)
    cache.topk = 1
    for method in (DeiTDistillation("hard"), ClassHeadDistillation("kd"), DeiTDistillation("soft")):
        cache.check_serves(method, 10)  # top-k logits: the argmax exact, the soft target the renormalised top-k
    cache.topk = 10
    cache.check_serves(DecoupledDistillation(), 10)
    cache.topk = 9
    with pytest.raises(ConfigError, match="teacher.cache_topk=9 keeps 9 of 10"):
        cache.check_serves(DecoupledDistillation(), 10)


# ---- the epoch and the trainable parts through real runs ------------------------------------------------------------
def test_the_epoch_reaches_the_method_dkd_warms_up_per_epoch(tmp_path, digits_teacher_file, monkeypatch):
    seen = []
    terms = DecoupledDistillation.terms
    monkeypatch.setattr(DecoupledDistillation, "terms",
                        lambda self, *a: (seen.append((self.training, self.warmup())), terms(self, *a))[1])
    train(compose_config([*SHORT, f"teacher.checkpoint={digits_teacher_file}", "distill=dkd",
                          "distill.warmup_epochs=4"], tmp_path / "run"))
    trained = [w for training, w in seen if training]
    assert trained == [0.25] * 3 + [0.5] * 3  # epochs 1, 2 of the official count: 1/4, 2/4


def test_the_projector_is_trained_saved_resumed_and_not_exported(tmp_path, digits_teacher_file, monkeypatch):
    from deit_train.run.trained_model import load_trained_model

    overrides = [*SHORT, f"teacher.checkpoint={digits_teacher_file}", "distill=feature"]
    train_preempted_then_resumed(overrides, tmp_path, monkeypatch)
    whole = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=False)
    resumed = torch.load(tmp_path / "requeued" / "checkpoints" / "last.ckpt", weights_only=False)
    assert whole["state_dict"]["criterion.projector.weight"].shape == (368, 32)
    assert whole["state_dict"].keys() == resumed["state_dict"].keys()
    assert all(torch.equal(whole["state_dict"][k], resumed["state_dict"][k]) for k in whole["state_dict"])
    student = [k for k in whole["state_dict"] if k.startswith("student.")]
    state = whole["optimizer_states"][0]["state"]
    assert len(state) == len(student) + 2  # the student's parameters and the projector's weight and bias
    projector_steps = [s["exp_avg"].abs().sum() for s in list(state.values())[-2:]]
    assert all(step > 0 for step in projector_steps)  # it received gradients
    model = load_trained_model(tmp_path / "whole" / "checkpoints" / "last.ckpt").model
    assert not any("projector" in k for k in model.state_dict())


# ---- ensembles --------------------------------------------------------------------------------------------------
@pytest.fixture
def two_teacher_files(tmp_path, spread_teacher_net):
    torch.save(spread_teacher_net.state_dict(), tmp_path / "a.pth")
    torch.manual_seed(3)
    other = timm.create_model("regnetx_002", num_classes=10)
    with torch.no_grad():
        other.head.fc.weight.mul_(100)
    torch.save(other.state_dict(), tmp_path / "b.pth")
    torch.save(timm.create_model("regnetx_002", num_classes=5).state_dict(), tmp_path / "five.pth")
    return tmp_path / "a.pth", tmp_path / "b.pth", tmp_path / "five.pth"


def _member(path, **kwargs):
    return FrozenTeacher("regnetx_002", checkpoint=str(path), precision="fp32", **kwargs)


@pytest.mark.parametrize("combine", ["probs", "logits"])
def test_an_ensemble_targets_the_mean_of_its_members_each_with_its_own_identity(two_teacher_files, combine):
    a, b, _ = two_teacher_files
    members = [_member(a), _member(b, image_size=24, mean=(0.4, 0.4, 0.4), std=(0.2, 0.2, 0.2))]
    ensemble = TeacherEnsemble({"0": members[0], "1": members[1]}, combine=combine)
    x = torch.randn(4, 3, 32, 32)
    za, zb = members[0](x), members[1](x)
    assert not torch.allclose(zb, _member(b)(x), atol=1e-3)  # the second member resizes and renormalises its input
    out = ensemble(x)
    if combine == "probs":
        assert torch.allclose(probs(out.double()), (probs(za.double()) + probs(zb.double())) / 2, atol=1e-6)
    else:
        assert torch.allclose(out, (za + zb) / 2, atol=1e-6)


def test_an_ensembles_fingerprint_covers_every_member(two_teacher_files):
    a, b, _ = two_teacher_files
    ab = TeacherEnsemble([_member(a), _member(b)]).fingerprint()
    aa = TeacherEnsemble([_member(a), _member(a)]).fingerprint()
    by_logits = TeacherEnsemble([_member(a), _member(b)], combine="logits").fingerprint()
    resized = TeacherEnsemble([_member(a), _member(b, image_size=24)]).fingerprint()
    assert len({str(f) for f in (ab, aa, by_logits, resized)}) == 4
    assert ab["members"]["1"] == _member(b).fingerprint()


def test_ensemble_members_that_disagree_on_classes_are_refused(two_teacher_files):
    a, _, five = two_teacher_files
    with pytest.raises(ConfigError, match=r"^the ensemble's members predict different class counts \(teacher.members.0: "
                                          r"10, teacher.members.1: 5\)"):
        TeacherEnsemble({"0": _member(a), "1": _member(five)})


def test_teacher_ensemble_config_builds_members_from_the_teacher_group(tmp_path, two_teacher_files):
    a, b, _ = two_teacher_files
    cfg = compose_config(["experiment=quickstart", "distill=kd", "teacher=ensemble",
                          "teacher@teacher.members.0=regnetx_002_digits", "teacher@teacher.members.1=regnetx_002_digits",
                          f"teacher.members.0.checkpoint={a}", f"teacher.members.1.checkpoint={b}",
                          "teacher.members.1.image_size=24", "teacher.combine=logits"], tmp_path)
    ensemble = build_teacher(cfg.teacher)
    assert isinstance(ensemble, TeacherEnsemble) and ensemble.combine == "logits"
    assert [m.image_size for m in ensemble.members] == [None, 24]
    assert ensemble.fingerprint()["members"]["0"]["weights_sha256"] != ensemble.fingerprint()["members"]["1"][
        "weights_sha256"]


def test_an_ensemble_distils_through_the_cache(tmp_path, two_teacher_files):
    a, b, _ = two_teacher_files
    ensemble = ["teacher=ensemble", "teacher@teacher.members.0=regnetx_002_digits",
                "teacher@teacher.members.1=regnetx_002_digits", f"teacher.members.0.checkpoint={a}",
                f"teacher.members.1.checkpoint={b}", "teacher.min_val_top1=0", "distill=kd",
                f"teacher.cache_dir={tmp_path / 'cache'}", "teacher.cache_topk=10", "teacher.cache_dtype=float32"]
    live = train(compose_config([*SHORT, *ensemble[:-3]], tmp_path / "live"))
    cached = train(compose_config([*SHORT, *ensemble], tmp_path / "write"))
    assert cached["last_epoch/val/top1"] == live["last_epoch/val/top1"]
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    fingerprint = (entry / "fingerprint.json").read_text()
    assert '"ensemble": "probs"' in fingerprint and fingerprint.count('"weights_sha256"') == 2
