"""Average a run's checkpoints, as timm's ``avg_checkpoints.py`` does:
``python -m deit_train.average run=<run_dir> [k=3] [by=top|last] [weights=student|ema] [out=<file>]``.

- ``by=top``: the ``k`` best checkpoints by the run's monitored metric, the ones Lightning's ``ModelCheckpoint`` kept
  (``callbacks.model_checkpoint.save_top_k=k`` when training; ``monitor`` and ``mode`` are the run's).
- ``by=last``: the ``k`` newest checkpoints of the run (distinct optimizer steps); training with
  ``callbacks.recent_checkpoints.save_top_k=k`` keeps those of the last ``k`` epochs.
- ``ckpts=[a.ckpt,b.ckpt]`` instead of ``run=``: exactly these files (of one run).
- ``weights=ema`` averages the EMA copies the run kept (``module.ema_decay``) instead of the students.

The state dicts are summed in float64 and divided by their number, then cast back to each tensor's dtype; integer
and boolean buffers are taken from the newest checkpoint (an average of counters or indices means nothing). The
result is written atomically as a checkpoint of this framework (the student's weights and the run's stored model /
data config), which ``eval``, ``export``, ``predict`` and ``model.init_from`` read; it cannot resume training (no
optimizer state). Its test top-1 is printed (``test=false`` skips it).
"""
from __future__ import annotations

import ast
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

from deit_train.errors import ConfigError
from deit_train.models.checkpoint import check_weights, read_state_dict
from deit_train.run.checkpoints import atomic_torch_save, load_checkpoint_file
from deit_train.run.cli import run_main
from deit_train.run.trained_model import CHECKPOINT_KEY

USAGE = """usage: python -m deit_train.average run=<run_dir> [k=3] [by=top|last] [weights=student|ema]
  [out=<run_dir>/checkpoints/average-<by><k>-<weights>.ckpt] [test=true] [device=auto]
  or: python -m deit_train.average ckpts=[a.ckpt,b.ckpt,...] out=<file> [weights=student|ema]"""
DEFAULTS = {"run": None, "ckpts": None, "k": 3, "by": "top", "weights": "student", "out": None, "test": True,
            "device": "auto"}
AVERAGED_KEY = "averaged"  # what an averaged file was made of; such files are never averaged again
_STATE_PREFIX = "ModelCheckpoint"  # Lightning's key of a ModelCheckpoint's state: ModelCheckpoint{'monitor': ...}


@dataclass
class Source:
    """One checkpoint file to average and what its Lightning record says about it."""

    path: Path
    epoch: int
    global_step: int
    run_config: dict  # the model/data config and class names the run stored (StoreRunConfig)
    callbacks: dict  # the ModelCheckpoint states: key -> state


def read_source(path: Path, option: str, checkpoint: dict | None = None) -> Source:
    checkpoint = load_checkpoint_file(option, path) if checkpoint is None else checkpoint
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint:
        raise ConfigError(f"{option}={path} is not a checkpoint of a `python -m deit_train` run: only those are "
                          "averaged (they say their run and architecture)")
    if AVERAGED_KEY in checkpoint:
        raise ConfigError(f"{option}={path} is itself an average: pass the run's own checkpoints")
    callbacks = {k: v for k, v in (checkpoint.get("callbacks") or {}).items() if str(k).startswith(_STATE_PREFIX)}
    return Source(path, int(checkpoint.get("epoch", -1)), int(checkpoint.get("global_step", -1)),
                  dict(checkpoint[CHECKPOINT_KEY]), callbacks)


def _settings(state_key: str) -> dict:
    """``{'monitor': ..., 'mode': ...}`` from Lightning's state key of a ModelCheckpoint."""
    try:
        return ast.literal_eval(state_key[len(_STATE_PREFIX):])
    except (ValueError, SyntaxError):
        return {}


def run_checkpoints(run_dir: Path) -> list[Source]:
    """The run's checkpoint files (earlier averages left out)."""
    folder = run_dir / "checkpoints"
    sources = []
    for path in sorted(folder.glob("*.ckpt")) if folder.is_dir() else []:
        checkpoint = load_checkpoint_file("run", path)  # memory-mapped: only the records are read here
        if not (isinstance(checkpoint, dict) and AVERAGED_KEY in checkpoint):
            sources.append(read_source(path, "run", checkpoint))
    if not sources:
        raise ConfigError(f"run={run_dir} has no checkpoints in {folder}: pass the run directory of a "
                          "`python -m deit_train` run (the folder with .hydra/ and checkpoints/)")
    return sources


def newest(sources: Sequence[Source]) -> Source:
    return max(sources, key=lambda s: (s.global_step, s.epoch, s.path.stat().st_mtime))


def top_k(run_dir: Path, sources: Sequence[Source], k: int) -> tuple[list[Source], dict]:
    """The ``k`` best checkpoints by the run's monitored metric, as its ModelCheckpoint kept them (read from the
    newest checkpoint's record of that callback), best first; and ``{"monitor", "mode", "scores"}``."""
    latest = newest(sources)
    metric = {key: state for key, state in latest.callbacks.items()
              if state.get("monitor") not in (None, "epoch", "step") and state.get("best_k_models")}
    if len(metric) != 1:
        raise ConfigError(f"run={run_dir}: {latest.path.name} records {len(metric)} checkpoint callbacks that keep the "
                          "best by a metric, not one: pass the files as ckpts=[...]")
    key, state = next(iter(metric.items()))
    mode = _settings(key).get("mode", "max")
    kept = sorted(state["best_k_models"].items(), key=lambda item: float(item[1]), reverse=mode == "max")
    if k > len(kept):
        raise ConfigError(f"k={k} but run={run_dir} kept {len(kept)} best checkpoint(s) by {state['monitor']}: pass "
                          f"k<={len(kept)}, or train with callbacks.model_checkpoint.save_top_k={k}")
    by_name = {s.path.name: s for s in sources}
    chosen = []
    for saved, _ in kept[:k]:
        name = Path(saved).name  # the run directory may have moved since: the file is found by its name
        if name not in by_name:
            raise ConfigError(f"run={run_dir}: the top-k checkpoint {name} is missing from {run_dir / 'checkpoints'}")
        chosen.append(by_name[name])
    return chosen, {"monitor": state["monitor"], "mode": mode, "scores": [float(v) for _, v in kept[:k]]}


def last_k(run_dir: Path, sources: Sequence[Source], k: int) -> list[Source]:
    """The ``k`` newest checkpoints with distinct optimizer steps (last.ckpt and a top-k file of the same epoch are
    the same weights), newest first."""
    distinct: dict[int, Source] = {}
    for source in sorted(sources, key=lambda s: (s.global_step, s.path.name != "last.ckpt")):
        distinct.setdefault(source.global_step, source)
    ordered = sorted(distinct.values(), key=lambda s: s.global_step, reverse=True)
    if k > len(ordered):
        raise ConfigError(f"k={k} but run={run_dir} has {len(ordered)} checkpoint(s) of distinct steps: pass "
                          f"k<={len(ordered)}, or train with callbacks.recent_checkpoints.save_top_k={k}")
    return ordered[:k]


def check_one_run(sources: Sequence[Source]) -> None:
    """Checkpoints of one run only: the same checkpoint folder recorded by their callbacks (a resumed run keeps its
    folder; the weights' names and shapes are checked as they are averaged)."""
    def folders(source: Source) -> set:
        return {state.get("dirpath") for state in source.callbacks.values() if state.get("dirpath")}

    first = sources[0]
    for other in sources[1:]:
        if folders(first) != folders(other):
            raise ConfigError(f"ckpts: {first.path} and {other.path} are checkpoints of different runs (saved to "
                              f"{sorted(folders(first))} and {sorted(folders(other))}): average one run's checkpoints")


def average_state_dicts(states: Sequence[dict[str, Tensor]], names: Sequence[str]) -> dict[str, Tensor]:
    """The parameter-wise mean of ``states`` (oldest first), summed in float64 and cast back to each tensor's dtype;
    integer and boolean tensors from the newest (the last). ``names``: the files, for messages."""
    reference = states[-1]
    for state, name in zip(states, names):
        if state.keys() != reference.keys():
            diff = sorted(state.keys() ^ reference.keys())
            raise ConfigError(f"ckpts: {name} and {names[-1]} hold different weights ({diff[:4]}): average checkpoints "
                              "of one run")
        shapes = [f"{k} {tuple(v.shape)} vs {tuple(reference[k].shape)}" for k, v in state.items()
                  if v.shape != reference[k].shape]
        if shapes:
            raise ConfigError(f"ckpts: {name} and {names[-1]} differ in shape ({shapes[:3]}): average checkpoints "
                              "of one run")
    averaged = {}
    for key, newest_value in reference.items():
        if not newest_value.is_floating_point():
            averaged[key] = newest_value.clone()
            continue
        total = torch.zeros_like(newest_value, dtype=torch.float64)
        for state in states:
            total += state[key].to(torch.float64)
        averaged[key] = (total / len(states)).to(newest_value.dtype)
    return averaged


def average(run: str | Path | None = None, ckpts: Sequence[str | Path] | None = None, k: int = 3, by: str = "top",
            weights: str = "student", out: str | Path | None = None) -> dict:
    """Average, write ``out`` atomically; returns what was averaged (files, epochs, scores) and where it went."""
    check_weights(weights)
    if (run is None) == (not ckpts):
        raise ConfigError(f"pass either run=<run_dir> or ckpts=[a.ckpt,b.ckpt,...]\n{USAGE}")
    record: dict = {"weights": weights}
    if ckpts:
        sources = [read_source(Path(p).expanduser(), "ckpts") for p in ckpts]
        if len(sources) < 2:
            raise ConfigError("ckpts: pass two or more checkpoints to average")
        record["by"] = "files"
        if out is None:
            raise ConfigError("out is not set: pass out=<file to write> with ckpts=[...]")
    else:
        run_dir = Path(run).expanduser()
        if by not in ("top", "last"):
            raise ConfigError(f"by={by} is not one of top, last")
        if k < 1:
            raise ConfigError(f"k={k}: pass k>=1")
        available = run_checkpoints(run_dir)
        if by == "top":
            sources, ranking = top_k(run_dir, available, k)
            record.update(ranking)
        else:
            sources = last_k(run_dir, available, k)
        record.update(by=by, k=k)
        out = out or run_dir / "checkpoints" / f"average-{by}{k}-{weights}.ckpt"
    check_one_run(sources)
    ordered = sorted(sources, key=lambda s: (s.global_step, s.epoch))  # the newest last: its integer buffers
    states = [read_state_dict(s.path, weights) for s in ordered]
    if "mask_token" in states[-1]:
        raise ConfigError("these are SimMIM pretraining checkpoints: average classifiers (fine-tuned checkpoints)")
    averaged = average_state_dicts(states, [str(s.path) for s in ordered])
    record.update(files=[str(s.path) for s in sources], epochs=[s.epoch for s in sources],
                  global_steps=[s.global_step for s in sources])
    latest = ordered[-1]
    out = Path(out).expanduser()
    atomic_torch_save({"state_dict": {f"student.{k}": v for k, v in averaged.items()},
                       CHECKPOINT_KEY: latest.run_config, AVERAGED_KEY: record,
                       "epoch": latest.epoch, "global_step": latest.global_step}, out)
    return {**record, "out": str(out)}


def main(cfg: DictConfig) -> None:
    ckpts = None if cfg.ckpts is None else ([cfg.ckpts] if isinstance(cfg.ckpts, str) else list(cfg.ckpts))
    result = average(cfg.run, ckpts, int(cfg.k), cfg.by, cfg.weights, cfg.out)
    if cfg.test:
        from deit_train.eval import evaluate

        result["test/top1"] = evaluate(result["out"], split="test", device=cfg.device)["test/top1"]
    print(json.dumps(result, indent=2))


def cli() -> None:
    """The command line: ``deit-average`` or ``python -m deit_train.average``."""
    run_main(main, DEFAULTS, USAGE)


if __name__ == "__main__":
    cli()
