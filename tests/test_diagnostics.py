"""Token diagnostics (paper Sec. 5.1) and the disagreement table (paper Tab. 4) against hand-computed values."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from deit_train.run.diagnostics import TokenDiagnostics, head_weight_cosine, token_cosine
from deit_train.models import create_deit
from deit_train.modules.disagreement import disagreement_matrix, disagreement_table
from deit_train.modules.metrics import EvalMetrics


def test_cosine_of_identical_tokens_is_one_and_of_orthogonal_tokens_zero():
    identical = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [9.0, 9.0, 9.0]]])
    orthogonal = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 5.0, 0.0], [9.0, 9.0, 9.0]]])
    opposite = torch.tensor([[[1.0, 1.0, 0.0], [-2.0, -2.0, 0.0]]])
    assert token_cosine(identical).item() == pytest.approx(1.0)
    assert token_cosine(orthogonal).item() == pytest.approx(0.0)
    assert token_cosine(opposite).item() == pytest.approx(-1.0)


def _validate(callback, student, batches, epoch=0):
    logged = {}
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=epoch,
                              strategy=SimpleNamespace(reduce=lambda tensor, reduce_op: tensor))
    module = SimpleNamespace(student=student, device=torch.device("cpu"),
                             log=lambda name, value, **kw: logged.__setitem__(name, value))
    callback.on_validation_epoch_start(trainer, module)
    with torch.no_grad():
        for images in batches:
            student.forward_features(images)
    callback.on_validation_epoch_end(trainer, module)
    return logged


def test_hooks_capture_depth_plus_one_points_equal_to_a_manual_forward(tmp_path):
    torch.manual_seed(0)
    depth = 3
    student = create_deit(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=depth,
                          num_attention_heads=2, num_classes=10, distilled=True).eval()
    batches = [torch.randn(5, 3, 16, 16), torch.randn(3, 3, 16, 16)]
    callback = TokenDiagnostics(out_dir=str(tmp_path))
    logged = _validate(callback, student, batches)
    layers = sorted(k for k in logged if k.startswith("diag/cls_dist_cos/layer_"))
    assert layers == [f"diag/cls_dist_cos/layer_{i}" for i in range(depth + 1)]

    # the same numbers by walking the model by hand: embeddings, blocks 1..depth-1, the output norm
    per_sample = []
    with torch.no_grad():
        for images in batches:
            x = student.norm_pre(student._pos_embed(student.patch_embed(images)))
            points = [x]
            for block in student.blocks:
                x = block(x)
                points.append(x)
            points[-1] = student.norm(x)
            per_sample.append(torch.stack([F.cosine_similarity(p[:, 0], p[:, 1], dim=-1) for p in points]))
    expected = torch.cat(per_sample, dim=1).mean(dim=1)  # mean over all 8 images, not over batches
    assert [logged[k] for k in layers] == pytest.approx(expected.tolist(), abs=1e-5)

    weights = F.cosine_similarity(student.head.weight.flatten(), student.head_dist.weight.flatten(), dim=0)
    assert logged["diag/head_weight_cos"] == pytest.approx(weights.item()) == pytest.approx(head_weight_cosine(student))
    # the hooks record nothing after the epoch (a later forward changes nothing) and are gone at teardown
    student.forward_features(batches[0])
    assert callback.run_results()["cls_dist_cosine"] == pytest.approx(expected.tolist(), abs=1e-5)
    callback.teardown(SimpleNamespace(), SimpleNamespace(), "fit")
    assert not student.blocks[0]._forward_pre_hooks and not student.norm._forward_hooks

    callback.on_fit_end(SimpleNamespace(), SimpleNamespace())
    png = tmp_path / "cls_dist_cosine.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and callback.run_results()["cls_dist_cosine_plot"] == str(png)


def test_students_without_distillation_token_are_left_alone(tmp_path):
    student = create_deit(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_classes=10, distilled=False)
    callback = TokenDiagnostics(out_dir=str(tmp_path))
    assert _validate(callback, student, [torch.randn(2, 3, 16, 16)]) == {} and callback.run_results() == {}


def _one_hot_logits(classes):
    return F.one_hot(torch.tensor(classes), 3).float()


def test_disagreement_matrix_from_hand_made_logits():
    # four images; top-1 decisions per classifier
    teacher = _one_hot_logits([0, 1, 2, 0])
    cls = _one_hot_logits([0, 1, 1, 1])
    dist = _one_hot_logits([0, 1, 2, 2]) * 3  # confident: the averaged prediction follows it where they differ
    metrics = EvalMetrics("test", num_classes=3, distilled=True, with_teacher=True)
    metrics.update(torch.tensor([0, 1, 2, 0]), cls, dist, teacher)
    values = {name: m.compute().item() for name, m in metrics.loggable().items() if "disagree" in name}
    # prediction = (cls + dist) / 2 -> [0, 1, 2, 2]
    assert values == pytest.approx({
        "test/disagree_teacher_cls": 2 / 4, "test/disagree_teacher_dist": 1 / 4, "test/disagree_teacher_pred": 1 / 4,
        "test/disagree_cls_dist": 2 / 4, "test/disagree_cls_pred": 2 / 4, "test/disagree_dist_pred": 0.0})
    matrix = disagreement_matrix(values, "test")
    assert matrix[("cls", "teacher")] == matrix[("teacher", "cls")] == 0.5
    assert disagreement_table(values).row_count == 3  # teacher, cls, dist rows of the upper triangle


def test_disagreement_pairs_follow_the_classifiers_a_run_has():
    usual = EvalMetrics("val", num_classes=3, distilled=False, with_teacher=True)  # usual distillation
    assert [n for n in usual.loggable() if "disagree" in n] == ["val/disagree_teacher_cls"]
    plain = EvalMetrics("val", num_classes=3, distilled=False, with_teacher=False)
    assert not [n for n in plain.loggable() if "disagree" in n]
    assert disagreement_table({}) is None
