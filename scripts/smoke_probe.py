"""``python -m deit_train`` with what scripts/gpu_smoke.py measures inside the training process; writes it as JSON
when the process exits (rank 0 under DDP):

    python scripts/smoke_probe.py <out.json> <compare> <deit_train arguments...>

- peak memory: CUDA's max allocated, else the process's peak RSS;
- host syncs per training step: each training-loop step (Lightning's ``_TrainingEpochLoop.advance``: the batch's
  transfer and device stage, forward, backward, optimizer step, hooks) after the first ones runs under
  ``torch.cuda.set_sync_debug_mode("warn")``, and the "synchronizing CUDA operation" warnings it raises are counted
  (CUDA only; on the CPU there is nothing to synchronise with: null);
- ``compare=stage``: the device stage's output (``DeviceFinish``) of the first batches against the same stage run on
  the CPU copy of the same batch and draws (the CPU path's arithmetic, bit-identical to the worker path for the
  uint8 path): max difference in grey levels;
- ``compare=decode``: for the first ``--decode-steps`` batches, the device-decoded crops (``DeviceFinish.decode``,
  nvJPEG on CUDA) against the CPU decode (libjpeg-turbo) of the same bytes and draws, while training runs: the
  snapshot is taken on the training stream, after the queued work of the previous step, so a decode that wrote
  into memory that work still used shows as a large difference (nvJPEG and libjpeg-turbo differ by a few levels).
"""
from __future__ import annotations

import atexit
import json
import resource
import runpy
import sys
import warnings

import torch

COMPARED_STAGE_BATCHES = 2  # compare=stage: batches compared (their steps are not counted for syncs)
WARM_STEPS = 1  # steps before the sync count starts (first-step allocations, cudnn autotuning)


def main() -> None:
    out, compare = sys.argv.pop(1), sys.argv.pop(1)
    decode_steps = int(sys.argv.pop(1)) if compare == "decode" else 0
    cuda = torch.cuda.is_available()
    stats = {"steps": 0, "sync_steps": 0, "syncs": 0, "compared": 0, "max_diff": None, "compare": compare}
    atexit.register(_write, out, stats)
    _count_syncs(stats, cuda, skip=WARM_STEPS + (COMPARED_STAGE_BATCHES if compare == "stage" else 0),
                 enabled=compare != "decode")
    if compare == "stage":
        _compare_stage(stats)
    elif compare == "decode":
        _compare_decode(stats, decode_steps)
    runpy.run_module("deit_train", run_name="__main__", alter_sys=True)


def _write(path: str, stats: dict) -> None:
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10)
    syncs = stats["syncs"] / stats["sync_steps"] if cuda and stats["sync_steps"] else None
    with open(path, "w") as handle:
        json.dump({"peak_mb": peak, "kind": "cuda" if cuda else "rss", "syncs_per_step": syncs, **stats}, handle)


def _count_syncs(stats: dict, cuda: bool, skip: int, enabled: bool) -> None:
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    advance = _TrainingEpochLoop.advance

    def counted(self, data_fetcher):
        step = stats["steps"]
        stats["steps"] += 1
        if not (cuda and enabled and step >= skip):
            return advance(self, data_fetcher)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return advance(self, data_fetcher)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                stats["sync_steps"] += 1
                stats["syncs"] += sum("synchroniz" in str(w.message) for w in caught)

    _TrainingEpochLoop.advance = counted


def _grey_levels(difference: torch.Tensor, std) -> float:
    """Normalised difference (N, 3, H, W) -> its largest absolute value in grey levels (0-255)."""
    scale = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
    return float((difference.abs() * scale).max()) if difference.numel() else 0.0


def _compare_stage(stats: dict) -> None:
    from deit_train.data.device_augment import DeviceFinish, DeviceImages

    call = DeviceFinish.__call__

    def compared(self, batch):
        images = call(self, batch)
        if stats["compared"] < COMPARED_STAGE_BATCHES:
            on_cpu = call(self, DeviceImages(batch.image.cpu(), batch.params))  # same draws: numpy on the host
            difference = _grey_levels(images.float().cpu() - on_cpu, self.std)
            stats["max_diff"] = max(stats["max_diff"] or 0.0, difference)
            stats["compared"] += 1
        return images

    DeviceFinish.__call__ = compared


def _compare_decode(stats: dict, steps: int) -> None:
    from deit_train.data.device_augment import DeviceFinish

    decode = DeviceFinish.decode

    def compared(self, jpegs, decoded, names, crops, flips, device):
        crops_out = decode(self, jpegs, decoded, names, crops, flips, device)
        if stats["compared"] < steps:
            snapshot = crops_out.clone()  # queued on the training stream, after the previous step's work
            reference = decode(self, jpegs, decoded, names, crops, flips, torch.device("cpu"))
            difference = int((snapshot.cpu().int() - reference.int()).abs().max()) if reference.numel() else 0
            stats["max_diff"] = max(stats["max_diff"] or 0, difference)
            stats["compared"] += 1
        return crops_out

    DeviceFinish.decode = compared


if __name__ == "__main__":
    main()
