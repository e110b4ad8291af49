"""One rank's stop is every rank's: a check that fails on one DDP process (a teacher-cache shard that disagrees with
the teacher, a corrupt image in a loader worker) stops all of them on the same decision, with the same one line and
exit status 2, instead of leaving the others to die of a closed socket (gloo) or to wait for the process-group
timeout (NCCL). The last good checkpoint stays as it was. Each run is 2 gloo processes of the CLI, as a user starts
them (`strategy=ddp_cpu trainer.devices=2`)."""
from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST_DIGITS, compose_config, run_cli
from test_shards import _digits_folder

# 2 gloo processes, 2 epochs of 3 steps, validation of 1 batch: epoch 0 ends with last.ckpt, the fault is in epoch 1
DDP = ["strategy=ddp_cpu", "trainer.devices=2", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
       "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "test=false"]
QUICK = ["experiment=quickstart", *(a for a in FAST_DIGITS if not a.startswith(("trainer.limit_train",
                                                                                  "trainer.limit_val"))), *DDP]
# the whole run, with the start of two interpreters and the gloo rendezvous on a loaded 2-core machine; the stop
# itself must come within 60 s of the fault (measured from the epoch-0 checkpoint, written just before it)
RUN_TIMEOUT = 240


def _stopped_as_one(proc, line_pattern: str, run_dir: Path, checkpoint: bool = True) -> None:
    """Exit status 2, one distinct ``error:`` line (each rank may print it) matching ``line_pattern``, no traceback or
    other error anywhere; with ``checkpoint``, within 60 s of the epoch-0 checkpoint, and last.ckpt is epoch 0's,
    whole and loadable (without, the fault came before any checkpoint and none was written)."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    errors = {line for line in proc.stderr.splitlines() if line.startswith("error:")}
    assert len(errors) == 1, output[-3000:]
    assert re.fullmatch(line_pattern, errors.pop()), output[-3000:]
    rest = "\n".join(line for line in output.splitlines() if not line.startswith("error:"))
    for sign in ("Traceback", "Connection closed", "Error", "Exception"):
        assert sign not in rest, output[-3000:]
    if not checkpoint:
        assert not list(run_dir.rglob("*.ckpt"))
        return
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=False, map_location="cpu")
    assert saved["epoch"] == 0 and saved["global_step"] == 3
    assert time.time() - last.stat().st_mtime < 60


def test_a_cache_shard_only_rank_1_reads_wrong_stops_both_ranks_with_its_line(tmp_path, digits_teacher_file):
    cache = tmp_path / "cache"
    args = [*QUICK, f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0", "distill=soft",
            f"teacher.cache_dir={cache}", "teacher.cache_verify_every=3"]  # read steps 0 and 3: epochs 0 and 1
    written = run_cli(args, tmp_path / "write", tmp_path / "home", timeout=RUN_TIMEOUT)
    assert written.returncode == 0, written.stderr[-3000:]
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    stem = entry / "epoch0001-rank001"  # rank 1's epoch 1: a consistent shard with wrong numbers
    np.save(f"{stem}.values.npy", np.load(f"{stem}.values.npy") + np.float16(1.0))
    manifest = json.loads(stem.with_suffix(".json").read_text())
    manifest["values_sha256"] = hashlib.sha256(Path(f"{stem}.values.npy").read_bytes()).hexdigest()
    stem.with_suffix(".json").write_text(json.dumps(manifest))

    proc = run_cli(args, tmp_path / "read", tmp_path / "home", timeout=RUN_TIMEOUT)
    _stopped_as_one(proc, rf"error: teacher cache {re.escape(str(entry))} disagrees with the live teacher at epoch 1 "
                          r"step 0 \(rank 1\): .*", tmp_path / "read")


def _rank_shares(args: list[str], run_dir: Path, epochs: int, steps: int, batch: int) -> dict[int, set[str]]:
    """The image files each rank of 2 trains on in ``epochs`` x ``steps``, as the run's own sampler deals them."""
    cfg = compose_config(args, run_dir)
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    dataset = datamodule.train_set
    while not hasattr(dataset, "samples"):
        dataset = dataset.dataset
    shares: dict[tuple[int, int], set[str]] = {}
    for rank in (0, 1):
        sampler = datamodule.train_loader(2, rank).sampler
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            shares[rank, epoch] = {dataset.samples[i][0] for i, _ in list(sampler)[:steps * batch]}
    return shares


@pytest.mark.parametrize("decode", ["worker", "device"])
def test_a_corrupt_image_only_rank_1_loads_stops_both_ranks_with_its_line(tmp_path, digits_teacher_file, decode):
    root = _digits_folder(tmp_path / "jpegs", {"train": 8, "val": 3}, "jpg")
    # (without repeated augmentation: its copies of an image go to both ranks)
    device = (["augment=deit", "augment.repeated_aug=1", "augment.device=true", "augment.device_decode=true"]
              if decode == "device" else [])
    args = [*QUICK, f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0", "data=imagefolder",
            f"data.root={root}", "data.batch_size=8", "data.num_workers=1", *device]
    shares = _rank_shares(args, tmp_path / "shares", epochs=2, steps=3, batch=8)
    # a file rank 1 loads in epoch 1 and that no other (rank, epoch) loads before or beside it
    (broken, *_) = sorted(shares[1, 1] - shares[0, 0] - shares[0, 1] - shares[1, 0])
    data = bytearray(Path(broken).read_bytes())
    if decode == "worker":
        data = data[:60]  # truncated mid-scan: the worker's decode fails
        line = (rf"error: cannot decode image {re.escape(broken)} \(.*\): delete or replace the file, or pass "
                r"data.skip_corrupt=true to skip unreadable files")
    else:
        data[data.index(b"\xff\xc4") + 4] = 0xFF  # a bogus Huffman table index: the header reads, the data does not
        line = (rf"error: cannot decode image {re.escape(broken)} on the device \(.*\): delete or replace the file, "
                r"or decode in the workers \(augment.device_decode=false, which data.skip_corrupt=true can skip\)")
    Path(broken).write_bytes(bytes(data))

    proc = run_cli(args, tmp_path / "run", tmp_path / "home", timeout=RUN_TIMEOUT)
    _stopped_as_one(proc, line, tmp_path / "run")


def test_a_corrupt_validation_image_only_rank_1_loads_stops_both_ranks_with_its_line(tmp_path, digits_teacher_file):
    from torch.utils.data import DistributedSampler

    root = _digits_folder(tmp_path / "jpegs", {"train": 8, "val": 3}, "jpg")
    args = [*QUICK, f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0", "data=imagefolder",
            f"data.root={root}", "data.batch_size=8", "data.num_workers=1"]
    cfg = compose_config(args, tmp_path / "files")
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    files = [path for path, _ in datamodule.val_set.samples]
    # the validation batch of each rank, as Lightning's DistributedSampler deals them (limit_val_batches=1)
    first = {rank: {files[i] for i in list(DistributedSampler(files, 2, rank, shuffle=False))[:8]} for rank in (0, 1)}
    (broken, *_) = sorted(first[1] - first[0])
    Path(broken).write_bytes(Path(broken).read_bytes()[:60])

    proc = run_cli(args, tmp_path / "run", tmp_path / "home", timeout=RUN_TIMEOUT)
    _stopped_as_one(proc, rf"error: cannot decode image {re.escape(broken)} \(.*\): delete or replace the file, or "
                          r"pass data.skip_corrupt=true to skip unreadable files", tmp_path / "run", checkpoint=False)
