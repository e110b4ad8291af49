"""The quiet console silences exactly the listed library messages; everything else still shows.
(tests/test_readme.py runs the quickstart and fails on any warning in its console.)"""
from __future__ import annotations

import logging
import warnings

import torch
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from timm.scheduler import CosineLRScheduler
from torch.utils.data import DataLoader, TensorDataset

from deit_train.run.console import quiet_console


def shown(message: str, category=UserWarning) -> bool:
    with warnings.catch_warnings(record=True) as caught:  # keeps the filters quiet_console installed
        warnings.warn(message, category)
    return bool(caught)


def test_listed_warnings_are_silenced_and_others_kept(caplog):
    quiet_console()
    quiet_console()  # once per process: a second call adds nothing
    assert sum(1 for f in warnings.filters if f[0] == "ignore" and f[1] is not None
               and f[1].pattern.startswith("Found \\d+ module")) == 1
    lightning_messages = [
        "Found 295 module(s) in eval mode at the start of training. This may lead to unexpected behavior",
        "The `srun` command is available on your system but is not used. HINT: If your intention is ...",
        "The number of training batches (4) is smaller than the logging interval Trainer(log_every_n_steps=10).",
        "It is recommended to use `self.log('train/loss', ..., sync_dist=True)` when logging on epoch level",
    ]
    assert not any(shown(m, PossibleUserWarning) for m in lightning_messages)
    assert not shown("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
    # the same warnings about what users do choose still show
    assert shown("It is recommended to use `self.log('val/top1', ..., sync_dist=True)` when logging", PossibleUserWarning)
    assert shown("The dataloader does not have many workers which may be a bottleneck.", PossibleUserWarning)

    if not torch.cuda.is_available():  # torch's own pin_memory warning, for real
        with warnings.catch_warnings(record=True) as caught:
            next(iter(DataLoader(TensorDataset(torch.zeros(2, 1)), pin_memory=True)))
        assert not [w for w in caught if "pin_memory" in str(w.message)]

    with caplog.at_level(logging.WARNING):  # timm's one-step cosine schedule, for real
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        CosineLRScheduler(optimizer, t_initial=1)
        logging.getLogger("timm.scheduler.cosine_lr").warning("a real problem")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("timm")] == ["a real problem"]

    with caplog.at_level(logging.WARNING):  # torch.compile's C++ build on a machine without CUDA (its exact line)
        cpp_extension = logging.getLogger("torch.utils.cpp_extension")
        cpp_extension.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local'")
        cpp_extension.warning("Error checking compiler version for c++")
    assert [r.getMessage() for r in caplog.records if r.name == cpp_extension.name] == [
        "Error checking compiler version for c++"]
