"""End-to-end runs through the CLI, as a user types them (short settings)."""
import json

import pytest
import timm
import torch
from hydra.utils import instantiate

from conftest import FAST_DIGITS, compose_config, run_cli_in_process


def _quick(tmp_path, trained_run, *extra, name="run"):
    """The session's trained run again, changed by ``extra``, in this process."""
    return run_cli_in_process([*trained_run.args, *extra], tmp_path / name, tmp_path / "cache")


def test_short_run_writes_checkpoints_results_and_config(trained_run):
    proc, run = trained_run.process, trained_run.dir
    results = json.loads((run / "results.json").read_text())
    for key in ("test/top1", "test/top5", "test/top1_cls", "test/top1_dist", "teacher/test_top1", "test/agreement"):
        assert 0.0 <= results[key] <= 1.0, key
    regnet = timm.create_model("regnetx_002", num_classes=10)
    assert results["params/teacher"] == sum(p.numel() for p in regnet.parameters())
    assert results["params/student"] == results["params/student_trainable"] > 0
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 0 and any(k.startswith("student.") for k in last["state_dict"])
    assert not any(k.startswith("teacher.") for k in last["state_dict"])  # reloaded from teacher.checkpoint
    assert results["best_checkpoint"].startswith(str(run / "checkpoints"))
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "csv" / "metrics.csv").is_file()
    assert "train/throughput" in (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "student (prediction)" in proc.stdout and str(run) in proc.stdout
    assert (run / "val_top1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and results["curves"] == str(run / "val_top1.png")


def test_resume_continues_from_checkpoint(tmp_path, trained_run):
    ckpt = trained_run.dir / "checkpoints" / "last.ckpt"  # the first run's
    steps_first = torch.load(ckpt, weights_only=False)["global_step"]
    resumed = _quick(tmp_path, trained_run, f"ckpt_path={ckpt}", "trainer.max_epochs=2", name="second")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 1 and last["global_step"] == 2 * steps_first
    epochs = {line.split(",")[0] for line in (tmp_path / "second" / "csv" / "metrics.csv").read_text().splitlines()}
    header = (tmp_path / "second" / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in
            (tmp_path / "second" / "csv" / "metrics.csv").read_text().splitlines()[1:]]
    assert {r["epoch"] for r in rows if r.get("train/loss_epoch")} == {"1"}  # epoch 0 was not trained again
    assert epochs


def test_same_seed_same_result(tmp_path, trained_run):
    a = trained_run.dir  # trained in a process of its own; b in this one, with the same seed
    b = _quick(tmp_path, trained_run, name="b")
    assert b.returncode == 0, b.stderr[-3000:]
    ra, rb = (json.loads((run / "results.json").read_text()) for run in (a, tmp_path / "b"))
    assert {k: v for k, v in ra.items() if k.startswith("test/")} == {k: v for k, v in rb.items() if k.startswith("test/")}
    wa, wb = (torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"] for run in (a, tmp_path / "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_quickstart_trains_its_teacher_on_first_use_then_reuses_it(tmp_path):
    limits = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
              "trainer.limit_test_batches=1"]
    tiny = [*limits, "model.hidden_size=48", "model.num_hidden_layers=1", "teacher.min_val_top1=0",  # a 2-batch
            f"teacher_recipe_overrides=[{','.join(map(repr, limits))}]"]  # teacher recognises nothing yet
    first = run_cli_in_process(["experiment=quickstart", *tiny], tmp_path / "first", tmp_path / "cache")
    assert first.returncode == 0, first.stderr[-3000:]
    cached = tmp_path / "cache" / "teachers" / "regnetx_002_digits.pth"
    assert cached.is_file() and (tmp_path / "first" / "teacher" / "results.json").is_file()
    cached_file = torch.load(cached, weights_only=True)  # the RegNet's weights and its identity
    assert "head.fc.weight" in cached_file["state_dict"]
    assert cached_file["deit_train_teacher"] == {"architecture": "regnetx_002", "mean": (0.5, 0.5, 0.5),
                                                 "std": (0.5, 0.5, 0.5), "image_size": 32, "interpolation": None,
                                                 "class_names": [str(i) for i in range(10)]}
    second = run_cli_in_process(["experiment=quickstart", *tiny], tmp_path / "second", tmp_path / "cache")
    assert second.returncode == 0, second.stderr[-3000:]
    assert not (tmp_path / "second" / "teacher").exists()
    # training the teacher first does not shift the student's random stream: same seed, same student
    metrics = [{k: v for k, v in json.loads((tmp_path / n / "results.json").read_text()).items()
                if k.startswith(("test/", "teacher/test"))} for n in ("first", "second")]
    assert metrics[0] == metrics[1] and "test/top1" in metrics[0]


@pytest.mark.parametrize("args,message", [
    (["experiment=deit_small_distill"], "error: data.root is not set: pass data.root="),
    (["experiment=quickstart", "model.image_size=30"], "error: model.image_size=30 is not divisible by model.patch_size=4"),
    (["experiment=quickstart", "teacher_recipe=null", "teacher.checkpoint=/nonexistent/t.pth"], "error: teacher.checkpoint=/nonexistent/t.pth does not exist"),
])
def test_bad_input_is_one_clear_line(tmp_path, digits_teacher_file, args, message):
    if not any(a.startswith("teacher.checkpoint=") for a in args):  # no teacher bootstrap before the error
        args = [*args, f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0"]
    proc = run_cli_in_process(args, tmp_path / "run", tmp_path / "cache")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert lines[-1].startswith(message), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("experiment", ["deit_base_384_finetune", "simmim_finetune"])
def test_fine_tune_experiments_require_a_checkpoint(tmp_path, experiment):
    for split in ("train", "val"):
        (tmp_path / "imagenet" / split / "n01440764").mkdir(parents=True)
    proc = run_cli_in_process([f"experiment={experiment}", f"data.root={tmp_path / 'imagenet'}"], tmp_path / "run",
                              tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: model.init_from is not set: pass model.init_from=")


def test_teacher_with_other_classes_stops_before_training(tmp_path):
    torch.save(timm.create_model("regnetx_002", num_classes=5).state_dict(), tmp_path / "five.pth")
    proc = run_cli_in_process(["experiment=quickstart", f"teacher.checkpoint={tmp_path / 'five.pth'}"],
                              tmp_path / "run", tmp_path / "cache")
    assert proc.returncode == 2 and "the teacher predicts 5 classes but the data has 10" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fine_tune_cls_only_checkpoint_with_distillation(tmp_path, trained_run):
    """The paper's second fine-tuning mode from a checkpoint: CLS-only run -> CLS + dist head with a teacher."""
    cls_only = run_cli_in_process(["experiment=quickstart", "distill=none", "~teacher", "teacher_recipe=null",
                                   "trainer.max_epochs=1", *FAST_DIGITS], tmp_path / "cls_only", tmp_path / "cache")
    assert cls_only.returncode == 0, cls_only.stderr[-3000:]
    source = tmp_path / "cls_only" / "checkpoints" / "last.ckpt"
    assert "test/top1_dist" not in json.loads((tmp_path / "cls_only" / "results.json").read_text())
    tuned = _quick(tmp_path, trained_run, f"model.init_from={source}", "module.ema_decay=0.9", name="tuned")
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    results = json.loads((tmp_path / "tuned" / "results.json").read_text())
    assert {"test/top1_dist", "teacher/test_top1", "test/agreement"} <= results.keys()
    header = (tmp_path / "tuned" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "val_ema/top1" in header  # the EMA copy is evaluated too
    # the model that run built started from the CLS-only weights
    cfg = compose_config(["experiment=quickstart", *FAST_DIGITS, f"model.init_from={source}"], tmp_path / "cfg")
    model = instantiate(cfg.model)
    start = torch.load(source, weights_only=False)["state_dict"]
    assert model.dist_token is not None
    assert torch.equal(model.blocks[1].attn.qkv.weight, start["student.blocks.1.attn.qkv.weight"])
