"""Which weights a tool reads (``weights=student|ema``), the EMA in the run's own test phase and checkpoint choice,
and checkpoint averaging (``python -m deit_train.average``), on one short EMA run of the CLI."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from conftest import FAST_DIGITS, compose_config, run_cli_in_process
from deit_train import average as average_cli
from deit_train import eval as eval_cli
from deit_train import export as export_cli
from deit_train import predict as predict_cli
from deit_train.average import average_state_dicts
from deit_train.errors import ConfigError
from deit_train.eval import evaluate
from deit_train.models import create_deit, read_state_dict
from deit_train.predict import predict
from deit_train.run.cli import run_main
from deit_train.run.preflight import check_monitor

EPOCHS = 3


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, digits_teacher_file):
    """3 epochs with an EMA (decay 0.5: far from the student), the best checkpoint chosen by the EMA's val top-1,
    the 2 best and the 2 most recent epochs kept."""
    folder = tmp_path_factory.mktemp("ema_run")
    args = ["experiment=quickstart", f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0",
            f"trainer.max_epochs={EPOCHS}", *FAST_DIGITS, "optim.warmup_epochs=0", "trainer.limit_test_batches=1.0",
            "module.ema_decay=0.5", "callbacks.model_checkpoint.monitor=val_ema/top1",
            "callbacks.model_checkpoint.save_top_k=2", "callbacks.recent_checkpoints.save_top_k=2"]
    proc = run_cli_in_process(args, folder / "run", folder / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder / "run", proc


def _tool(tool, argv: list[str]) -> None:
    main = tool.main
    if tool is eval_cli:
        return main(argv)
    run_main(main, tool.DEFAULTS, tool.USAGE, argv=argv)


def _one_line_error(tool, argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        _tool(tool, argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def _prefixed(path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` of a checkpoint's state dict, read with torch alone (not our readers)."""
    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _network(path, prefix: str) -> torch.nn.Module:
    """The quickstart student at FAST_DIGITS' size with the checkpoint's ``prefix`` weights (``student.`` or
    ``ema.module.``)."""
    model = create_deit(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        mlp_ratio=2.0, num_classes=10, distilled=True, num_channels=3)
    model.load_state_dict(_prefixed(path, prefix))
    return model.eval()


# ---- the run's test phase and checkpoint choice --------------------------------------------------------------------
def test_test_phase_scores_student_and_ema_of_the_best_checkpoint(ema_run):
    run_dir, proc = ema_run
    results = json.loads((run_dir / "results.json").read_text())
    best = results["best_checkpoint"]
    for prefix, weights in (("test/", "student"), ("test_ema/", "ema")):
        scored = evaluate(best, weights=weights, device="cpu")
        for name in ("top1", "top5", "top1_cls", "top1_dist"):
            assert results[prefix + name] == pytest.approx(scored["test/" + name], abs=1e-6), (prefix, name)
    assert "EMA (prediction)" in proc.stdout and "student (prediction)" in proc.stdout
    # the two really are different networks
    assert not torch.equal(_prefixed(best, "student.")["head.weight"], _prefixed(best, "ema.module.")["head.weight"])


def test_monitor_val_ema_keeps_the_best_ema_and_recent_checkpoints_the_last_epochs(ema_run):
    run_dir, _ = ema_run
    results = json.loads((run_dir / "results.json").read_text())
    with open(run_dir / "csv" / "metrics.csv") as handle:
        ema_top1 = {int(row["epoch"]): float(row["val_ema/top1"]) for row in csv.DictReader(handle)
                    if row.get("val_ema/top1")}
    assert len(ema_top1) == EPOCHS
    assert results["best/val_ema/top1"] == pytest.approx(max(ema_top1.values()))
    best_epoch = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=False)["epoch"]
    assert ema_top1[best_epoch] == pytest.approx(max(ema_top1.values()))
    recent = sorted(p.name for p in (run_dir / "checkpoints").glob("recent-*.ckpt"))
    assert recent == [f"recent-epoch{EPOCHS - 2:03d}.ckpt", f"recent-epoch{EPOCHS - 1:03d}.ckpt"]


def test_monitoring_the_ema_without_one_is_one_line_before_training(tmp_path):
    cfg = compose_config(["experiment=quickstart", "callbacks.model_checkpoint.monitor=val_ema/top1"], tmp_path)
    with pytest.raises(ConfigError, match=r"^callbacks.model_checkpoint.monitor=val_ema/top1 but module.ema_decay=null"):
        check_monitor(cfg)
    check_monitor(compose_config(["experiment=quickstart", "callbacks.model_checkpoint.monitor=val_ema/top1",
                                  "module.ema_decay=0.9"], tmp_path))


# ---- weights=ema in eval, export, predict ---------------------------------------------------------------------
def test_export_of_the_ema_is_a_plain_timm_model_with_the_ema_weights(ema_run, tmp_path, capsys):
    run_dir, _ = ema_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    _tool(export_cli, [f"ckpt={ckpt}", "format=timm", f"out={tmp_path / 'timm'}", "weights=ema"])
    assert json.loads(capsys.readouterr().out)["weights"] == "ema"
    exported = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ema_logits = _network(ckpt, "ema.module.")(pixels)
        student_logits = _network(ckpt, "student.")(pixels)
        assert torch.allclose(exported(pixels), ema_logits, atol=1e-6)
        assert not torch.allclose(exported(pixels), student_logits, atol=1e-3)


def test_predict_and_eval_read_the_ema(ema_run, tmp_path, capsys):
    run_dir, _ = ema_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(image)
    record = predict(ckpt, [str(image)], top_k_count=10, out=None, weights="ema")[0]
    data = torch.load(ckpt, map_location="cpu", weights_only=False)["deit_train"]["data"]
    pixels = ((torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32) / 255).permute(2, 0, 1)
               - torch.tensor(data["mean"]).view(3, 1, 1)) / torch.tensor(data["std"]).view(3, 1, 1))[None]
    with torch.no_grad():
        probs = _network(ckpt, "ema.module.")(pixels)[0].softmax(-1)
    assert {r["index"]: r["probability"] for r in record["prediction"]} == pytest.approx(
        {i: float(p) for i, p in enumerate(probs)}, abs=1e-5)
    _tool(eval_cli, [f"ckpt={ckpt}", "weights=ema", "device=cpu"])
    captured = capsys.readouterr()
    assert json.loads(captured.out)["weights"] == "ema" and "weights: ema" in captured.err


def test_ema_of_a_checkpoint_without_one_is_one_line_and_writes_nothing(tmp_path, capsys):
    model = create_deit(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        num_classes=10, distilled=False, num_channels=3)
    config = {"_target_": "deit_train.models.create_deit", "image_size": 16, "patch_size": 4, "hidden_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_classes": 10, "distilled": False,
              "num_channels": 3}
    ckpt = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {f"student.{k}": v for k, v in model.state_dict().items()},
                "deit_train": {"model": config, "data": {"image_size": 16}, "class_names": list("0123456789")}}, ckpt)
    expected = (f"error: weights=ema: {ckpt} has no EMA weights (the run trained with module.ema_decay=null): use "
                "weights=student, or train with module.ema_decay=<decay> (e.g. 0.99996)")
    assert _one_line_error(eval_cli, [f"ckpt={ckpt}", "weights=ema"], capsys) == expected
    assert _one_line_error(export_cli, [f"ckpt={ckpt}", "format=timm", f"out={tmp_path / 'out'}", "weights=ema"],
                           capsys) == expected
    assert not (tmp_path / "out").exists()
    assert _one_line_error(predict_cli, [f"ckpt={ckpt}", f"images={ckpt}", "weights=ema"], capsys) == expected
    assert _one_line_error(eval_cli, [f"ckpt={ckpt}", "weights=best"], capsys) == \
        "error: weights=best is not one of student, ema"


def test_official_and_timm_training_checkpoints_give_their_ema(tmp_path):
    model, ema = (create_deit(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                              num_attention_heads=2, num_classes=3) for _ in range(2))
    for key in ("model_ema", "state_dict_ema"):  # the official DeiT main.py's, timm train.py's
        file = tmp_path / f"{key}.pth"
        torch.save({"model" if key == "model_ema" else "state_dict": model.state_dict(), key: ema.state_dict()}, file)
        read = read_state_dict(file, "ema")
        assert read.keys() == ema.state_dict().keys()
        assert all(torch.equal(read[k], v) for k, v in ema.state_dict().items())
        assert torch.equal(read_state_dict(file)["head.weight"], model.state_dict()["head.weight"])


# ---- averaging ----------------------------------------------------------------------------------------------------
def _run_copy(ema_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(ema_run[0], run_dir)  # the run moved: files are found by name in its checkpoints/
    return run_dir


def test_average_of_the_top_k_is_the_parameter_wise_mean_and_eval_reads_it(ema_run, tmp_path, capsys):
    run_dir = _run_copy(ema_run, tmp_path)
    _tool(average_cli, [f"run={run_dir}", "k=2", "by=top"])
    result = json.loads(capsys.readouterr().out)
    top = sorted(p for p in (run_dir / "checkpoints").glob("epoch*.ckpt"))  # model_checkpoint's files (save_top_k=2)
    assert sorted(result["files"]) == [str(p) for p in top] and result["monitor"] == "val_ema/top1"
    out = run_dir / "checkpoints" / "average-top2-student.ckpt"
    assert result["out"] == str(out)
    first, second = (_prefixed(p, "student.") for p in top)
    averaged = _prefixed(out, "student.")
    assert averaged.keys() == first.keys()
    for key in first:
        expected = (first[key].double() + second[key].double()) / 2
        assert torch.allclose(averaged[key].double(), expected, atol=1e-7, rtol=0), key
    assert result["test/top1"] == pytest.approx(evaluate(out, device="cpu")["test/top1"])
    # the average is a network of its own, not one of the two
    assert not torch.equal(averaged["head.weight"], first["head.weight"])


def test_average_of_the_last_k_emas(ema_run, tmp_path, capsys):
    run_dir = _run_copy(ema_run, tmp_path)
    out = tmp_path / "avg.ckpt"
    _tool(average_cli, [f"run={run_dir}", "k=2", "by=last", "weights=ema", f"out={out}", "test=false"])
    result = json.loads(capsys.readouterr().out)
    assert result["epochs"] == [EPOCHS - 1, EPOCHS - 2] and "test/top1" not in result
    newest = _prefixed(run_dir / "checkpoints" / "last.ckpt", "ema.module.")
    older = _prefixed(run_dir / "checkpoints" / f"recent-epoch{EPOCHS - 2:03d}.ckpt", "ema.module.")
    averaged = _prefixed(out, "student.")
    for key in newest:
        assert torch.allclose(averaged[key].double(), (newest[key].double() + older[key].double()) / 2, atol=1e-7)
    # the averaged EMA is the student of the new file: it has no EMA of its own
    with pytest.raises(ConfigError, match="weights=ema: .* has no EMA weights"):
        read_state_dict(out, "ema")


def test_average_bad_input_is_one_line_and_writes_nothing(ema_run, tmp_path, capsys):
    run_dir = _run_copy(ema_run, tmp_path)
    written = set((run_dir / "checkpoints").iterdir())
    line = _one_line_error(average_cli, [f"run={run_dir}", "k=3"], capsys)
    assert line == (f"error: k=3 but run={run_dir} kept 2 best checkpoint(s) by val_ema/top1: pass k<=2, or train "
                    "with callbacks.model_checkpoint.save_top_k=3")
    line = _one_line_error(average_cli, [f"run={run_dir}", "k=4", "by=last"], capsys)
    assert line.startswith(f"error: k=4 but run={run_dir} has 3 checkpoint(s) of distinct steps")
    # another run's checkpoint (saved to another folder)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for state in checkpoint["callbacks"].values():
        if isinstance(state, dict) and "dirpath" in state:
            state["dirpath"] = "/elsewhere/checkpoints"
    torch.save(checkpoint, tmp_path / "other.ckpt")
    line = _one_line_error(average_cli, [f"ckpts=[{run_dir / 'checkpoints' / 'last.ckpt'},{tmp_path / 'other.ckpt'}]",
                                         f"out={tmp_path / 'x.ckpt'}"], capsys)
    assert "are checkpoints of different runs" in line
    # the same run's record with weights of another shape
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    checkpoint["state_dict"]["student.head.weight"] = torch.zeros(7, 32)
    torch.save(checkpoint, tmp_path / "reshaped.ckpt")
    line = _one_line_error(average_cli, [f"ckpts=[{run_dir / 'checkpoints' / 'last.ckpt'},{tmp_path / 'reshaped.ckpt'}]",
                                         f"out={tmp_path / 'x.ckpt'}"], capsys)
    assert line.endswith("reshaped.ckpt differ in shape (['head.weight (10, 32) vs (7, 32)']): average checkpoints "
                         "of one run")
    assert set((run_dir / "checkpoints").iterdir()) == written and not (tmp_path / "x.ckpt").exists()


def test_average_state_dicts_in_float64_with_integer_buffers_from_the_newest():
    # summed in float32, 1 + 1e8 - 1e8 loses the 1 (the mean would be 0)
    states = [{"w": torch.tensor([1.0, 2.0]), "count": torch.tensor([3])},
              {"w": torch.tensor([1e8, 4.0]), "count": torch.tensor([5])},
              {"w": torch.tensor([-1e8, 6.0]), "count": torch.tensor([7])}]
    averaged = average_state_dicts(states, ["a", "b", "c"])
    assert averaged["w"].dtype == torch.float32
    assert averaged["w"].tolist() == [torch.tensor(1 / 3).item(), 4.0]
    assert averaged["count"].tolist() == [7]
    with pytest.raises(ConfigError, match=r"old and new differ in shape \(\['w \(3,\) vs \(2,\)'\]\)"):
        average_state_dicts([{"w": torch.zeros(3)}, {"w": torch.zeros(2)}], ["old", "new"])
