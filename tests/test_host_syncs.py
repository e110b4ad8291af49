"""Host synchronisations per training step on the default distillation path, counted on CPU.

A GPU step must not make the host wait for the device: every read of a device tensor (``.item()``, ``bool()``,
``.tolist()``, ``.cpu()``, ...) drains the queue, and so does a pageable host-to-device copy. A CPU run has one
device for both, so :class:`DeviceSyncCounter` tracks which tensors would live on the accelerator -- the modules'
weights, the batch after its transfer, tensors made with an explicit ``device=`` and everything computed from them --
and counts, per training batch (one ``advance`` of Lightning's training epoch loop), the reads of such tensors and
the host-to-device copies. Logging's reads are aside, counted apart (Lightning's logger connector: it writes the
logged values every ``log_every_n_steps``, after the last step here, and turns a ``prog_bar`` value into a number
every step)."""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

from conftest import ROOT, compose_config

# the path of deit_small_distill at toy sizes: a distilled student, a frozen teacher, hard distillation, the DeiT
# augmentation recipe (RandAugment, random erasing, Mixup/CutMix) with uint8 workers and the device stage's
# normalisation and erasing; one loader worker, as every real run has (the main process only finishes batches)
DEFAULT_PATH = [
    "data=fake", "augment=deit", "trainer=cpu", "distill=hard", "teacher=regnetx_002_digits", "teacher.min_val_top1=0",
    "data.num_classes=10", "data.num_train=96", "data.num_val=16", "data.source_size=[24,24]", "data.batch_size=8",
    "data.num_workers=1", "model.image_size=16", "model.patch_size=4", "model.num_attention_heads=2",
    "model.hidden_size=32", "model.num_hidden_layers=1", "trainer.max_epochs=1", "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=50", "test=false", "optim.min_lr=1e-6", "augment.device=false"]
# factories whose device= makes a device tensor (torch.tensor/as_tensor copy host data to it)
_FACTORIES = ("zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint", "zeros_like", "ones_like",
              "full_like", "empty_like", "rand_like", "randn_like")
_COPIES = ("tensor", "as_tensor")


def _site() -> str:
    """The innermost frame outside torch (or in this project) that led here: where the sync is asked for."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename == __file__:
            continue
        if "/torch/" not in frame.filename or "deit_train" in frame.filename:
            return f"{frame.filename.split('site-packages/')[-1].split('deit_train/', 1)[-1]}:{frame.lineno}"
    return "?"


def _device_target(args, kwargs) -> bool:
    """Whether a ``.to(...)`` call names a device (not only a dtype)."""
    device = kwargs.get("device")
    for arg in args:
        if isinstance(arg, (str, torch.device)) or isinstance(arg, torch.Tensor):
            device = arg
    return device is not None


class DeviceSyncCounter(TorchDispatchMode):
    """Per training batch: ``reads`` of device tensors and host-to-device ``copies``, each by call site."""

    def __init__(self) -> None:
        super().__init__()
        self.device = WeakTensorKeyDictionary()
        self.steps: list[collections.Counter] = []
        self._counting = False
        self._patches: list[tuple[object, str, object]] = []

    def mark(self, *modules: torch.nn.Module) -> None:
        for module in modules:
            for tensor in [*module.parameters(), *module.buffers()]:
                self.device[tensor] = True

    def _is_device(self, value) -> bool:
        return isinstance(value, torch.Tensor) and value in self.device

    def _count(self, kind: str) -> None:
        if self._counting and self.steps:
            if kind == "read" and any("logger_connector" in frame.filename for frame in traceback.extract_stack()):
                kind = "logging read"  # Lightning turning logged tensors into numbers: logging's, aside
            self.steps[-1][kind, _site()] += 1

    def _mark_outputs(self, out) -> None:
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.device[value] = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = tree_flatten((args, kwargs))[0]
        if func is torch.ops.aten._local_scalar_dense.default and self._is_device(args[0]):
            self._count("read")  # .item(), bool(), int(), float() of a device tensor
        out = func(*args, **kwargs)
        if any(self._is_device(value) for value in inputs):
            self._mark_outputs(out)
        return out

    # ---- what does not reach the dispatcher: host reads without an op, copies to the device, factories ----------
    def _patch(self, owner, name: str, wrapper) -> None:
        original = getattr(owner, name)
        self._patches.append((owner, name, original))
        setattr(owner, name, functools.wraps(original)(wrapper(original)))

    def install(self) -> None:
        counter = self

        def host_read(original):
            def read(tensor, *args, **kwargs):
                if counter._is_device(tensor):
                    counter._count("read")
                return original(tensor, *args, **kwargs)
            return read

        def to(original):
            def moved(tensor, *args, **kwargs):
                out = original(tensor, *args, **kwargs)
                if not counter._is_device(tensor) and _device_target(args, kwargs):
                    counter._count("copy")  # host memory to the device
                    counter.device[out] = True
                elif counter._is_device(tensor) and ("cpu" in args or kwargs.get("device") == "cpu"):
                    counter._count("read")
                return out
            return moved

        def factory(original, copies: bool):
            def made(*args, **kwargs):
                out = original(*args, **kwargs)
                # torch's own calls make host tensors with device= (its optimizers' step counts, tensors rebuilt from
                # a loader worker's shared memory); Lightning's (a logged number), timm's and ours make device ones
                device = kwargs.get("device")  # "cpu" spelled out names the host (timm's erasing noise)
                if device not in (None, "cpu") and "/torch/" not in sys._getframe(1).f_code.co_filename:
                    if copies and not (args and counter._is_device(args[0])):
                        counter._count("copy")
                    counter.device[out] = True
                return out
            return made

        for name in ("tolist", "numpy", "cpu"):
            self._patch(torch.Tensor, name, host_read)
        self._patch(torch.Tensor, "to", to)
        for name in _FACTORIES:
            self._patch(torch, name, lambda original: factory(original, copies=False))
        for name in _COPIES:
            self._patch(torch, name, lambda original: factory(original, copies=True))
        original_advance = _TrainingEpochLoop.advance

        def advance(loop, data_fetcher):
            counter.steps.append(collections.Counter())
            counter._counting = True
            try:
                with counter:
                    return original_advance(loop, data_fetcher)
            finally:
                counter._counting = False

        self._patches.append((_TrainingEpochLoop, "advance", original_advance))
        _TrainingEpochLoop.advance = advance

    def uninstall(self) -> None:
        for owner, name, original in reversed(self._patches):
            setattr(owner, name, original)
        self._patches.clear()

    def per_step(self, kind: str) -> list[int]:
        return [sum(n for (k, _), n in step.items() if k == kind) for step in self.steps]


@contextlib.contextmanager
def counting() -> Iterator[DeviceSyncCounter]:
    """A counter installed for the block, the LightningModule's weights (student, teacher, EMA) its device's."""
    from deit_train.modules.classification import ClassificationModule

    counter = DeviceSyncCounter()
    original_setup = ClassificationModule.setup

    def setup(module, stage):
        original_setup(module, stage)
        counter.mark(module, *(m for m in (module.teacher, module.ema) if m is not None))

    ClassificationModule.setup = setup
    counter.install()
    try:
        yield counter
    finally:
        counter.uninstall()
        ClassificationModule.setup = original_setup


def count_default_path(tmp_path: Path, teacher_file: Path, *extra: str) -> DeviceSyncCounter:
    """Train the default path for 5 batches with the counter on."""
    from deit_train.train import train

    with counting() as counter:
        train(compose_config([*DEFAULT_PATH, f"teacher.checkpoint={teacher_file}", *extra], tmp_path / "run"))
    assert len(counter.steps) == 5  # every batch was counted
    return counter


def _report(counts: list[collections.Counter]) -> None:
    for step, step_counts in enumerate(counts):
        print(f"step {step}:", ", ".join(f"{n} {kind} {site}" for (kind, site), n in sorted(step_counts.items())))


def test_the_default_distillation_path_reads_the_device_at_most_twice_per_step(tmp_path, digits_teacher_file):
    counter = count_default_path(tmp_path, digits_teacher_file)
    reads = counter.per_step("read")
    sites = sorted({site for step in counter.steps for (kind, site) in step if kind == "read"})
    print(f"device reads per step {reads} (logging's {counter.per_step('logging read')}), host-to-device copies "
          f"per step {counter.per_step('copy')}")
    _report(counter.steps)
    assert max(reads) <= 2, (reads, sites)
    # none of them is the non-finite check's: it records on the device and is read before checkpoints
    assert not any("finite.py" in site for site in sites), sites


def test_two_processes_read_the_device_at_most_twice_per_step(tmp_path, digits_teacher_file):
    """The same path on 2 gloo processes of the CLI (tests/host_sync_count.py counts in each): Lightning's own
    per-step SIGTERM broadcast is one read, the rank-wide stop decision the other."""
    env = {**os.environ, "COUNT_DIR": str(tmp_path), "DEIT_TRAIN_CACHE": str(tmp_path / "cache"),
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "host_sync_count.py"), *DEFAULT_PATH,
                           f"teacher.checkpoint={digits_teacher_file}", "strategy=ddp_cpu", "trainer.devices=2",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        counted = json.loads((tmp_path / f"rank{rank}.json").read_text())
        print(f"rank {rank}: device reads per step {counted['read']} (logging's {counted['logging read']}), "
              f"host-to-device copies per step {counted['copy']}")
        print("\n".join(f"  step {step}: {sites}" for step, sites in enumerate(counted["sites"])))
        assert len(counted["read"]) == 5 and max(counted["read"]) <= 2, counted


def test_the_counter_sees_a_read_of_the_loss(tmp_path, digits_teacher_file, monkeypatch):
    """The counter itself: one ``.item()`` of the loss per step more is one read per step more."""
    from deit_train.losses import DeiTDistillation

    base = count_default_path(tmp_path / "base", digits_teacher_file).per_step("read")
    original = DeiTDistillation.terms

    def read_back(self, *args):
        terms = original(self, *args)
        next(iter(terms.values())).item()
        return terms

    monkeypatch.setattr(DeiTDistillation, "terms", read_back)
    more = count_default_path(tmp_path / "more", digits_teacher_file).per_step("read")
    assert more == [n + 1 for n in base]
