"""Which checkpoint a run resumes from (preemption-safe restarts in the same run directory), and the guards that
keep a resumed run the same experiment (same trained config, same architecture, same run directory).

A Slurm job that is preempted, hits its time limit or is requeued (``scontrol requeue``) starts again with the
same command and the same run directory. It continues from the newest of

- ``<checkpoint dir>/last.ckpt``: written after every epoch (``configs/callbacks/last_checkpoint.yaml``);
- ``<default_root_dir>/hpc_ckpt_<n>.ckpt``: written by Lightning's SLURM auto-requeue handler when the job gets
  ``SIGUSR1`` shortly before its time limit (``#SBATCH --signal=SIGUSR1@90``).

Lightning alone only looks for the second kind (and always prefers it, even when an older one sits beside a newer
``last.ckpt``); a requeue without warning signal only leaves the first.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import yaml
from hydra.experimental.callback import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from deit_train.errors import ConfigError
from deit_train.run.checkpoints import atomic_write_text, load_checkpoint_file
from deit_train.run.launch import is_global_zero
from deit_train.run.trained_model import CHECKPOINT_KEY

log = logging.getLogger(__name__)


def resume_checkpoint(trainer: L.Trainer, ckpt_path: str | None) -> str | None:
    """``ckpt_path`` when given, else the newest last/HPC checkpoint of this run directory, else ``None``.

    A damaged newest checkpoint (a copy cut short, a full disk) is passed over for the newest readable checkpoint
    of the run (its checkpoint folders' and HPC ones; said in one line, the damaged file left as it is); without
    one, one line names it."""
    if ckpt_path:
        return str(ckpt_path)
    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    candidates = [Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}" for cb in callbacks]
    hpc = list(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"))
    existing = [path for path in [*candidates, *hpc] if path.is_file()]
    if not existing:
        return None
    newest = max(existing, key=lambda path: path.stat().st_mtime)
    damage = unreadable_checkpoint(newest)
    if damage is None:
        log.info("resuming from %s (newest checkpoint in the run directory; ckpt_path=... picks another)", newest)
        return str(newest)
    others = {path for cb in callbacks for path in Path(cb.dirpath).glob(f"*{cb.FILE_EXTENSION}")}
    for other in sorted((others | set(hpc)) - {newest}, key=lambda path: path.stat().st_mtime, reverse=True):
        if unreadable_checkpoint(other) is None:
            if trainer.is_global_zero:
                log.warning("%s cannot be read (%s): resuming from %s, the newest readable checkpoint of the run "
                            "(the damaged file is left as it is)", newest, damage, other)
            return str(other)
    raise ConfigError(f"{newest} (the newest checkpoint of run directory {trainer.default_root_dir}, resumed from "
                      f"automatically) cannot be read ({damage}) and the run has no other readable checkpoint: "
                      "move it away to start the run over, or pass ckpt_path=<a readable checkpoint>")


def unreadable_checkpoint(path: str | Path) -> str | None:
    """Why ``path`` is not a Lightning training checkpoint that can be resumed from (damaged, foreign), or None."""
    try:
        checkpoint = load_checkpoint_file("ckpt_path", path)
    except ConfigError as exc:
        cause = exc.__cause__
        return f"{type(cause).__name__}: truncated or not a checkpoint" if cause is not None else str(exc)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "loops" not in checkpoint:
        return "not a Lightning training checkpoint"
    return None


# What a run trains; a resumed run must agree on all of it (trainer length, loggers, paths and workers may change).
TRAINED_SECTIONS = ("model", "teacher", "distill", "data", "augment", "optim", "module")
_NOT_TRAINED_KEYS = ("data.num_workers", "data.pin_memory", "data.uint8_workers", "teacher.cache_verify_every")
# Model options that do not change the weights' shapes: a checkpoint of another value still fits.
_SHAPE_FREE_MODEL_KEYS = ("init_from", "pretrained", "drop_path_rate")


def stored_config_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / ".hydra" / "config.yaml"


def run_dir_of(ckpt_path: str | Path) -> Path | None:
    """``<run>`` for ``<run>/checkpoints/<name>.ckpt`` of a run of this framework (it has ``.hydra/config.yaml``)."""
    path = Path(ckpt_path).expanduser().resolve()
    run_dir = path.parent.parent
    return run_dir if path.parent.name == "checkpoints" and stored_config_path(run_dir).is_file() else None


def _flat(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def _resolved(cfg: DictConfig, key: str, unresolved: object) -> object:
    """``key``'s value as the run used it (``${seed}``, ``${paths.cache_dir}/...`` resolved), or the text itself
    where it cannot be resolved here (e.g. ``${hydra:...}`` outside a Hydra run)."""
    try:
        value = OmegaConf.select(cfg, key)
        return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
    except Exception:  # noqa: BLE001 -- any resolver's failure (a key missing here): compare the text instead
        return unresolved


def _trained(cfg: DictConfig) -> dict[str, object]:
    flat = _flat({k: OmegaConf.to_container(cfg[k], resolve=False) if isinstance(cfg.get(k), DictConfig)
                  else cfg.get(k) for k in TRAINED_SECTIONS})
    return {k: _resolved(cfg, k, v) for k, v in flat.items() if not k.startswith(_NOT_TRAINED_KEYS)}


def trained_record_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / ".hydra" / "trained.yaml"


def trained_values(cfg: DictConfig) -> dict[str, object]:
    """What the run trains, resolved: the values :func:`check_same_experiment` compares."""
    return _trained(cfg)


def record_trained_config(trained: dict[str, object], run_dir: str | Path) -> None:
    """Write the resolved trained values into ``<run>/.hydra/trained.yaml`` once, at the run's first start: the
    stored config keeps ``${oc.env:DEIT_TRAIN_CACHE}``-style text, which a later start would resolve with its own
    environment (a moved cache directory would look unchanged)."""
    path = trained_record_path(run_dir)
    if path.is_file():
        return
    atomic_write_text(path, yaml.safe_dump(trained, sort_keys=True))


def _differences(stored: dict, asked: dict, limit: int = 6) -> str:
    keys = sorted(k for k in stored.keys() | asked.keys() if stored.get(k, "<unset>") != asked.get(k, "<unset>"))
    shown = [f"{k}: {stored.get(k, '<unset>')} -> {asked.get(k, '<unset>')}" for k in keys[:limit]]
    return ", ".join(shown) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_same_experiment(cfg: DictConfig, run_dir: str | Path) -> None:
    """Refuse to continue a run directory whose stored config trains something else (the stored config is the
    run's record and is never rewritten: see :class:`KeepStoredRunConfig`). Values are compared resolved, as the
    run used them: ``data.seed: ${seed}`` is the same text for every seed.

    Only global rank 0 decides: the other processes of a multi-task start (srun, submitit) may look while rank 0
    writes the record, and rank 0's refusal stops them (``srun --kill-on-bad-exit``, or the DDP rendezvous)."""
    stored_path = stored_config_path(run_dir)
    if not is_global_zero() or not stored_path.is_file():
        return
    record = trained_record_path(run_dir)
    stored = yaml.safe_load(record.read_text()) if record.is_file() else _trained(OmegaConf.load(stored_path))
    diff = _differences(stored, _trained(cfg))
    if diff:
        raise ConfigError(f"run directory {run_dir} holds a run with another config ({diff}): pass a new "
                          "hydra.run.dir for a new experiment, or the run's own settings to continue it")


def check_checkpoint_fits(ckpt_path: str | Path, cfg: DictConfig) -> None:
    """``ckpt_path`` must be a readable Lightning checkpoint of the model this run builds; one line otherwise."""
    checkpoint = load_checkpoint_file("ckpt_path", ckpt_path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "loops" not in checkpoint:
        raise ConfigError(f"ckpt_path={ckpt_path} is not a Lightning training checkpoint: to start from its weights "
                          f"use model.init_from={ckpt_path} instead")
    stored = (checkpoint.get(CHECKPOINT_KEY) or {}).get("model")
    if not stored or "model" not in cfg:
        return
    asked = OmegaConf.to_container(cfg.model, resolve=True)
    differing = [k for k in sorted(stored.keys() & asked.keys())  # a key the file lacks predates its option
                 if k not in _SHAPE_FREE_MODEL_KEYS and stored[k] != asked[k]]
    if differing:
        trained = ", ".join(f"model.{k}={stored.get(k)}" for k in differing)
        wanted = ", ".join(str(asked.get(k)) for k in differing)
        raise ConfigError(f"ckpt_path={ckpt_path}: checkpoint was trained with {trained}, this run asks for {wanted}: "
                          "resume with the checkpoint's model settings (or use model.init_from to fine-tune)")


# The run directory whose record the current start wrote (rank 0; None when the record was there before it).
_record_written_by_this_start: Path | None = None


def withdraw_unused_record(run_dir: str | Path) -> None:
    """Take back the record a refused start wrote, as long as the run directory holds no checkpoint: the corrected
    command then starts there, instead of being refused as "another config" by its own typo's record. A record
    that was there before this start, or that a checkpoint belongs to, stays."""
    run_dir = Path(run_dir)
    if _record_written_by_this_start != run_dir or any(run_dir.rglob("*.ckpt")):
        return
    record = stored_config_path(run_dir)  # first: without config.yaml the directory holds no record
    beside = [record.with_name(name) for name in ("hydra.yaml", "overrides.yaml")]
    for path in (record, trained_record_path(run_dir), *beside):
        path.unlink(missing_ok=True)


class KeepStoredRunConfig(Callback):
    """Hydra callback: a run directory's stored ``.hydra/config.yaml`` is its record, written once and never
    overwritten.

    - ``ckpt_path=<run>/checkpoints/<name>.ckpt`` without ``hydra.run.dir`` continues in ``<run>`` (its CSV,
      curves and ``results.json`` continue), as a requeued job does;
    - Hydra's own writer is off (``hydra.output_subdir: null``): it writes in place, in every process of a
      multi-task launch. Here global rank 0 alone writes ``config.yaml``, ``hydra.yaml`` and ``overrides.yaml``
      atomically, when the run directory has no record yet; :func:`check_same_experiment` then compares a stored
      record with the asked config before anything trains.
    """

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        with read_write(config), open_dict(config):
            hydra_overrides = list(config.hydra.overrides.hydra)
            ckpt_path = config.get("ckpt_path")
            if ckpt_path and not any(o.startswith("hydra.run.dir=") for o in hydra_overrides):
                run_dir = run_dir_of(ckpt_path)
                if run_dir is not None:
                    config.hydra.run.dir = str(run_dir)

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        global _record_written_by_this_start
        run_dir = config.hydra.runtime.output_dir
        _record_written_by_this_start = None
        if not is_global_zero() or stored_config_path(run_dir).is_file():
            return
        _record_written_by_this_start = Path(run_dir)
        record = stored_config_path(run_dir).parent
        task = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
        # what Hydra's own writer writes; config.yaml last, so that its presence means a complete record
        atomic_write_text(record / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.masked_copy(config, ["hydra"])))
        atomic_write_text(record / "overrides.yaml", OmegaConf.to_yaml(config.hydra.overrides.task))
        atomic_write_text(record / "config.yaml", OmegaConf.to_yaml(task))
