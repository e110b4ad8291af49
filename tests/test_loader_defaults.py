"""Loader defaults: workers = the task's granted CPUs / ranks sharing them; pinned memory on CUDA; persistent workers."""
from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from omegaconf import OmegaConf

from conftest import ROOT
from deit_train.data.device_augment import collate
from deit_train.data.fake import FakeDataModule
from deit_train.data.workers import default_num_workers, granted_cpus, ranks_per_task


def test_granted_cpus_prefer_slurm_then_affinity():
    assert granted_cpus({"SLURM_CPUS_PER_TASK": "10"}) == 10
    assert granted_cpus({}) == len(os.sched_getaffinity(0))
    assert granted_cpus({"SLURM_CPUS_PER_TASK": "zero"}) == len(os.sched_getaffinity(0))


def test_workers_share_the_task_among_its_ranks():
    # slurm/train.sbatch: 8 tasks per node, 10 CPUs each, one rank per task -> 10 workers per rank
    assert default_num_workers(8, {"SLURM_CPUS_PER_TASK": "10", "SLURM_NTASKS_PER_NODE": "8"}) == 10
    # one task holding all 8 ranks of the node (Lightning's launcher): 96 CPUs / 8 ranks
    assert default_num_workers(8, {"SLURM_CPUS_PER_TASK": "96"}) == 12
    assert ranks_per_task(8, {"SLURM_NTASKS_PER_NODE": "2"}) == 4
    # never fewer than one worker
    assert default_num_workers(8, {"SLURM_CPUS_PER_TASK": "4"}) == 1


def _attached(module, device: str, devices: int):
    module.trainer = SimpleNamespace(num_devices=devices, world_size=devices, global_rank=0,
                                     strategy=SimpleNamespace(root_device=torch.device(device)))
    return module


def test_null_options_resolve_at_loader_time(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE", raising=False)
    dm = FakeDataModule(num_classes=3, num_train=8, num_val=4, source_size=(8, 8), image_size=8, batch_size=2)
    dm.setup("fit")
    on_gpu = _attached(dm, "cuda", 2).loader_options()
    assert on_gpu == {"num_workers": 3, "pin_memory": True, "persistent_workers": True, "collate_fn": collate}
    dm.num_workers, dm.pin_memory = 0, None
    assert _attached(dm, "cpu", 1).loader_options() == {"num_workers": 0, "pin_memory": False,
                                                        "persistent_workers": False, "collate_fn": collate}
    dm.num_workers, dm.pin_memory = 2, False
    loader = _attached(dm, "cuda", 1).val_dataloader()
    assert (loader.num_workers, loader.pin_memory, loader.persistent_workers) == (2, False, True)


def test_configs_default_to_granted_cpus_and_device_pinning():
    for source in ("imagefolder", "fake", "cifar10", "hf", "shards"):
        data = OmegaConf.load(ROOT / "configs" / "data" / f"{source}.yaml")
        assert data.num_workers is None and data.pin_memory is None, source
