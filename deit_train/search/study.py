"""The study in its storage: opened (an Optuna RDB URL, or a journal file for a network file system), created or
continued with the same identity (space, objective, direction, fixed overrides), and its trials' records.

The storage is what the driver, its Slurm trials and a restarted search share: each trial looks the study up there
by name and reports its epochs to it (:mod:`deit_train.search.pruning`).
"""
from __future__ import annotations

import os
import random
import socket
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from deit_train.errors import ConfigError

# user attributes the search keeps on the study and its trials
SAMPLER_SEED, IDENTITY = "sampler_seed", "search_identity"
RUN_DIR, DRIVER, PRUNED_AT = "run_dir", "driver", "pruned_at_epoch"
PLAIN_RUN = "plain_run_overrides"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def open_storage(url: str) -> BaseStorage:
    """``url``: a SQLAlchemy URL (``sqlite:///<file>``; the file's folder is created) or a file path (Optuna's
    journal file storage, for file systems where SQLite's locks are unreliable)."""
    url = str(url)
    try:
        if "://" not in url:
            Path(url).expanduser().parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(Path(url).expanduser())))
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            Path(url.removeprefix("sqlite:///")).expanduser().parent.mkdir(parents=True, exist_ok=True)
        return RDBStorage(url)
    except Exception as exc:  # SQLAlchemy's, the file system's and the driver's errors alike
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"hydra.sweeper.storage={url} cannot be opened ({reason}): pass sqlite:///<writable "
                          "file> or a writable journal file path") from exc


def open_study(storage: BaseStorage, name: str, direction: str, identity: dict[str, Any],
               seed: int | None) -> optuna.Study:
    """The study ``name``: created with ``identity`` and its sampler seed (drawn when ``seed`` is None), or
    continued when it exists with the same identity."""
    if direction not in ("minimize", "maximize"):
        raise ConfigError(f"hydra.sweeper.direction={direction}: use maximize or minimize")
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=direction, load_if_exists=True)
    except ValueError as exc:  # another direction in a stored study of this name
        raise ConfigError(f"hydra.sweeper.study_name={name}: {exc}: use another study_name") from exc
    stored = study.user_attrs.get(IDENTITY)
    if stored is None:
        study.set_user_attr(IDENTITY, identity)
        study.set_user_attr(SAMPLER_SEED, seed if seed is not None else random.SystemRandom().randrange(2**31))
    elif stored != identity:
        differing = [key for key in sorted(identity.keys() | stored.keys()) if identity.get(key) != stored.get(key)]
        raise ConfigError(f"hydra.sweeper.study_name={name} in this storage is another search (differing in "
                          f"{' and '.join(differing)}): pass another hydra.sweeper.study_name (or storage) to "
                          "start a new study, or the same search to continue it")
    return study


def driver_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def abandoned(trial: FrozenTrial) -> bool:
    """A running trial whose driver (the process that launched it) is gone from this machine: a killed search."""
    host, _, pid = str(trial.user_attrs.get(DRIVER, ":")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():  # an earlier search in this process, finished before this one started
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def find_trial(study: optuna.Study, number: int) -> FrozenTrial:
    return next(t for t in study.get_trials(deepcopy=False) if t.number == number)


def set_trial_attr(study: optuna.Study, number: int, key: str, value: Any) -> None:
    """A user attribute of trial ``number`` (running), from any process that shares the storage."""
    optuna.Trial(study, find_trial(study, number)._trial_id).set_user_attr(key, value)
