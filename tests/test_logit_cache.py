"""Teacher-logit cache: exact (write-through and reading runs train on the same numbers, equal to the live run for
hard distillation and for soft at k = classes in fp32), fingerprinted, checksummed, guarded against drift."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import FAST_DIGITS, ROOT, compose_config
from deit_train.errors import ConfigError
from deit_train.teacher.cache import CacheEntry, TeacherLogitCache, build_teacher, dense_logits, run_fingerprint
from deit_train.losses import DeiTDistillation
from deit_train.teacher_cache import fill_cache
from deit_train.train import train

# 2 epochs x 3 steps of the quickstart at 16 px, no test pass: the cache is about training steps
SHORT = [*(a for a in FAST_DIGITS if not a.startswith(("trainer.limit_train", "trainer.limit_val"))),
         "experiment=quickstart", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
         "trainer.limit_val_batches=1",
         "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
         "test=false"]
STEPS = 6


def _config(tmp_path, name, teacher_file, *extra):
    return compose_config([*SHORT, f"teacher.checkpoint={teacher_file}", "teacher.min_val_top1=0", *extra], tmp_path / name)


def _run(tmp_path, name, teacher_file, *extra) -> tuple[list[float], dict]:
    """Per-step train losses (csv) and the final student weights of an in-process run."""
    train(_config(tmp_path, name, teacher_file, *extra))
    with open(tmp_path / name / "csv" / "metrics.csv", newline="") as handle:
        losses = [float(row["train/loss_step"]) for row in csv.DictReader(handle) if row.get("train/loss_step")]
    weights = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return losses, weights


def _same(a, b) -> None:
    assert len(a[0]) == STEPS and a[0] == pytest.approx(b[0], abs=1e-6, rel=0)
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def _entry(cache_dir):
    (entry,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    return entry


def test_dense_logits_is_the_renormalised_top_k():
    torch.manual_seed(0)
    logits = torch.randn(4, 10) * 3
    values, indices = logits.topk(10, dim=-1)
    assert torch.equal(dense_logits(values, indices, 10), logits)  # k = classes: the logits themselves
    values, indices = logits.topk(3, dim=-1)
    rebuilt = dense_logits(values, indices, 10)
    assert torch.equal(rebuilt.argmax(-1), logits.argmax(-1)) and torch.isfinite(rebuilt).all()
    expected = torch.zeros(4, 10).scatter_(1, indices, torch.softmax(values, -1))  # by hand: top-3, renormalised
    assert torch.allclose(torch.softmax(rebuilt / 3.0, -1), torch.zeros(4, 10).scatter_(
        1, indices, torch.softmax(values / 3.0, -1)), atol=1e-7)
    assert torch.allclose(torch.softmax(rebuilt, -1), expected, atol=1e-7)
    kl = F.kl_div(F.log_softmax(torch.randn(4, 10), -1), F.log_softmax(rebuilt, -1), reduction="sum", log_target=True)
    assert torch.isfinite(kl)  # -inf fill values would give 0 x inf = NaN here


def test_hard_distillation_from_the_cache_equals_the_live_run(tmp_path, digits_teacher_file, teacher_calls):
    cache = [f"teacher.cache_dir={tmp_path / 'cache'}", "teacher.cache_topk=1"]
    live = _run(tmp_path, "live", digits_teacher_file)
    assert teacher_calls() == STEPS
    written = _run(tmp_path, "write", digits_teacher_file, *cache)
    assert teacher_calls() == 2 * STEPS
    read = _run(tmp_path, "read", digits_teacher_file, *cache, "teacher.cache_verify_every=2")
    assert teacher_calls() == 2 * STEPS + 3  # only the drift guard: read steps 0, 2, 4
    _same(written, live)
    _same(read, live)
    entry = _entry(tmp_path / "cache")
    assert sorted(p.name for p in entry.iterdir()) == [
        "epoch0000-rank000.indices.npy", "epoch0000-rank000.json", "epoch0000-rank000.values.npy",
        "epoch0001-rank000.indices.npy", "epoch0001-rank000.json", "epoch0001-rank000.values.npy", "fingerprint.json"]
    values = np.load(entry / "epoch0000-rank000.values.npy")
    assert values.shape == (3, 16, 1) and values.dtype == np.float16


def test_soft_distillation_with_all_classes_in_fp32_equals_the_live_run(tmp_path, digits_teacher_file, teacher_calls):
    soft = ["distill=soft", "distill.tau=2.0"]
    cache = [f"teacher.cache_dir={tmp_path / 'cache'}", "teacher.cache_topk=10", "teacher.cache_dtype=float32"]
    live = _run(tmp_path, "live", digits_teacher_file, *soft)
    written = _run(tmp_path, "write", digits_teacher_file, *soft, *cache)
    read = _run(tmp_path, "read", digits_teacher_file, *soft, *cache, "teacher.cache_verify_every=0")
    assert teacher_calls() == 2 * STEPS + 1
    _same(written, live)
    _same(read, live)


@pytest.fixture
def written_cache(tmp_path, digits_teacher_file):
    """A default cache (k=10, fp16) written by a soft-distillation run, and that run's losses and weights."""
    run = _run(tmp_path, "write", digits_teacher_file, "distill=soft", f"teacher.cache_dir={tmp_path / 'cache'}")
    return tmp_path / "cache", run


@pytest.mark.parametrize("damage", ["flip_byte", "truncate"])
def test_damaged_shard_is_recomputed_not_trusted(tmp_path, digits_teacher_file, written_cache, teacher_calls,
                                                 damage, caplog):
    cache, written = written_cache
    stem = _entry(cache) / "epoch0001-rank000"
    original = {part: (stem.parent / f"{stem.name}.{part}.npy").read_bytes() for part in ("values", "indices")}
    if damage == "flip_byte":
        path = stem.parent / f"{stem.name}.values.npy"
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x40
        path.write_bytes(bytes(data))
    else:
        path = stem.parent / f"{stem.name}.indices.npy"
        path.write_bytes(path.read_bytes()[:-7])
    calls_before = teacher_calls()
    with caplog.at_level(logging.WARNING, logger="deit_train.teacher.cache"):
        again = _run(tmp_path, "again", digits_teacher_file, "distill=soft", f"teacher.cache_dir={cache}")
    assert teacher_calls() - calls_before == 1 + 3  # epoch 0 read (verified once), epoch 1 recomputed
    assert any("checksum mismatch" in r.getMessage() and stem.name in r.getMessage() for r in caplog.records)
    _same(again, written)
    for part, content in original.items():  # rewritten as it was
        assert (stem.parent / f"{stem.name}.{part}.npy").read_bytes() == content


def test_drift_guard_stops_on_a_cache_that_disagrees_with_the_teacher(tmp_path, digits_teacher_file, written_cache):
    cache, _ = written_cache
    stem = _entry(cache) / "epoch0000-rank000"
    values = np.load(f"{stem}.values.npy")
    np.save(f"{stem}.values.npy", values + np.float16(1.0))  # a consistent shard with wrong numbers
    manifest = json.loads(stem.with_suffix(".json").read_text())
    manifest["values_sha256"] = hashlib.sha256((stem.parent / f"{stem.name}.values.npy").read_bytes()).hexdigest()
    stem.with_suffix(".json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=rf"teacher cache .*{_entry(cache).name} disagrees with the live teacher "
                                          r"at epoch 0 step 0 \(rank 0\)"):
        train(_config(tmp_path, "drift", digits_teacher_file, "distill=soft", f"teacher.cache_dir={cache}"))


def test_interrupted_epoch_leaves_no_shard_and_is_computed_later(tmp_path, digits_teacher_file, monkeypatch):
    cache = tmp_path / "cache"
    original, calls = DeiTDistillation.terms, []

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 5:  # epoch 1, step 0 (after 3 training steps and 1 validation batch)
            raise RuntimeError("preempted")
        return original(self, *args)

    monkeypatch.setattr(DeiTDistillation, "terms", failing)
    with pytest.raises(RuntimeError, match="preempted"):
        train(_config(tmp_path, "killed", digits_teacher_file, f"teacher.cache_dir={cache}"))
    monkeypatch.setattr(DeiTDistillation, "terms", original)
    entry = _entry(cache)
    assert sorted(p.name for p in entry.iterdir()) == [  # epoch 0 committed; of epoch 1 nothing, no temporary files
        "epoch0000-rank000.indices.npy", "epoch0000-rank000.json", "epoch0000-rank000.values.npy", "fingerprint.json"]
    _run(tmp_path, "rerun", digits_teacher_file, f"teacher.cache_dir={cache}")
    assert (entry / "epoch0001-rank000.json").is_file()


def test_other_seed_recipe_or_teacher_is_another_entry_reported_in_one_line(tmp_path, digits_teacher_file, caplog):
    other_teacher = tmp_path / "other.pth"
    torch.manual_seed(1)
    torch.save(timm.create_model("regnetx_002", num_classes=10).state_dict(), other_teacher)

    def entry(*extra) -> CacheEntry:
        cfg = _config(tmp_path, "cfg", digits_teacher_file, f"teacher.cache_dir={tmp_path / 'cache'}", *extra)
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        return CacheEntry(cfg.teacher.cache_dir, run_fingerprint(cfg, datamodule, build_teacher(cfg.teacher), 1,
                                                                 10, "float16"))

    base = entry()
    base.open()
    # what a sweep varies: the student, the distillation type and weight -- same entry
    sweep = entry("distill=soft", "distill.alpha=0.3", "model.hidden_size=48", "optim.base_lr=1e-3")
    assert sweep.digest == base.digest
    # another seed is a seed sweep's expected miss (information); anything else may surprise the user (a warning)
    for extra, differs, level in ((["seed=43"], "seed", logging.INFO), (["augment=none"], "augment.", logging.WARNING),
                                  ([f"teacher.checkpoint={other_teacher}"], "teacher.weights_sha256", logging.WARNING),
                                  (["data.batch_size=8"], "per_device_batch", logging.WARNING)):
        caplog.clear()
        other = entry(*extra)
        assert other.digest != base.digest
        with caplog.at_level(logging.INFO, logger="deit_train.teacher.cache"):
            other.open()
        (record,) = [r for r in caplog.records if r.name == "deit_train.teacher.cache" and "no entry" in r.getMessage()]
        line = record.getMessage()
        assert f"the nearest, {base.digest}, differs in " in line and differs in line and "not used" in line
        assert record.levelno == level, line
        shutil.rmtree(other.path)


def test_teacher_only_pass_writes_the_training_runs_shards_and_resumes(tmp_path, digits_teacher_file):
    hard = ["teacher.cache_topk=1"]
    _run(tmp_path, "write", digits_teacher_file, *hard, f"teacher.cache_dir={tmp_path / 'trained'}")
    cfg = _config(tmp_path, "pass", digits_teacher_file, *hard, f"teacher.cache_dir={tmp_path / 'pass'}")
    first = fill_cache(cfg, progress=False)
    assert (first["computed"], first["cached"]) == (2, 0)
    trained, passed = _entry(tmp_path / "trained"), _entry(tmp_path / "pass")
    assert trained.name == passed.name  # same fingerprint
    for path in trained.glob("*.npy"):
        assert (passed / path.name).read_bytes() == path.read_bytes(), path.name
    (passed / "epoch0001-rank000.json").unlink()  # as if the pass had been stopped during epoch 1
    again = fill_cache(cfg, progress=False)
    assert (again["computed"], again["cached"]) == (1, 1)
    assert again["bytes_per_epoch"] == sum(p.stat().st_size for p in trained.glob("epoch0000-*.npy"))


def test_teacher_only_pass_cli(tmp_path, digits_teacher_file):
    args = [sys.executable, "-m", "deit_train.teacher_cache", "experiment=quickstart",
            f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0", *FAST_DIGITS, "trainer.max_epochs=1",
            "trainer.limit_train_batches=1", f"hydra.run.dir={tmp_path / 'run'}",
            f"teacher.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run(args, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "teacher cache" in proc.stderr and "1/1" in proc.stderr  # the progress bar
    assert "1 shard(s) computed, 0 already there" in proc.stdout and str(tmp_path / "cache") in proc.stdout


def test_teacher_only_pass_without_cache_dir_is_one_line(tmp_path, digits_teacher_file):
    with pytest.raises(ConfigError, match=r"^nothing to cache: set teacher.cache_dir=<dir>"):
        fill_cache(_config(tmp_path, "pass", digits_teacher_file))


def test_epoch_restarted_mid_way_runs_the_teacher_live_and_writes_nothing(tmp_path, digits_teacher_file):
    cfg = _config(tmp_path, "cfg", digits_teacher_file, f"teacher.cache_dir={tmp_path / 'cache'}")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    teacher = build_teacher(cfg.teacher)
    cache = TeacherLogitCache.from_run_config(cfg)
    cache.attach(teacher, datamodule, world_size=1)
    images = torch.randn(16, 3, 16, 16)
    cache.start_epoch(0, 0, steps=3, batch=16)
    for step in (1, 2):  # a loader restarted by a mid-epoch checkpoint: batch_idx goes on from 1
        cache.at_step(step)
        assert torch.equal(cache(images), teacher(images))  # the live logits, not a stored top-k
    assert not cache.finish_epoch() and not list(cache.entry.path.glob("epoch*"))
    cache.start_epoch(1, 0, steps=3, batch=16)  # the next epoch is whole again: written
    for step in range(3):
        cache.at_step(step)
        cache(images)
    assert cache.finish_epoch() and (cache.entry.path / "epoch0001-rank000.json").is_file()
