"""Reading runs: local run directories (``csv/metrics.csv``, ``csv/hparams.yaml``, ``results.json``), offline W&B
runs (``<run dir>/wandb/offline-run-*/run-*.wandb``) and the W&B API; finding runs on disk and naming them."""
from __future__ import annotations

import csv
import json
import math
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from deit_train.run.loggers import kept_overrides

_NOT_RUN_DIRS = {"checkpoints", "csv", "wandb", ".hydra", ".submitit", "__pycache__"}


@dataclass
class Run:
    name: str
    source: str
    config: dict = field(default_factory=dict)
    # one row per validated epoch (the last record when an interrupted epoch was trained again)
    epochs: dict[int, dict[str, float]] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)
    # the command-line overrides that made it (Hydra's .hydra/overrides.yaml, or the W&B logger's copy)
    overrides: list[str] = field(default_factory=list)

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        points = [(e, row[key]) for e, row in sorted(self.epochs.items()) if is_number(row.get(key))]
        return [e for e, _ in points], [v for _, v in points]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """Nested config keys joined by dots (``model.hidden_size``)."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _add_epoch_row(run: Run, row: dict) -> None:
    """Keep validation records per epoch; a later record of the same epoch (resumed run) replaces the earlier."""
    if not is_number(row.get("val/top1")) or not is_number(row.get("epoch")):
        return
    run.epochs[int(row["epoch"])] = {k: v for k, v in row.items() if is_number(v)}


def _throughput(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


_CONFIG_FACTS = ("params/student", "params/teacher", "optim/lr", "optim/global_batch")


def _final_metrics(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith(("test/", "teacher/test")) and is_number(v)}


def _finish(run: Run, throughput: list[float]) -> Run:
    """Copy the config facts the table shows into the summary (unless measured) and add the throughput."""
    for key in _CONFIG_FACTS:
        if key not in run.summary and is_number(run.config.get(key)):
            run.summary[key] = run.config[key]
    if throughput:
        run.summary["train/throughput"] = _throughput(throughput)
    return run


# ---- local run directories (CSV logger) -----------------------------------------------------------------------
def load_local_run(run_dir: Path, name: str | None = None) -> Run:
    run = Run(name=name or run_dir.name, source=str(run_dir))
    hparams = run_dir / "csv" / "hparams.yaml"
    hydra_config = run_dir / ".hydra" / "config.yaml"
    if hparams.is_file():  # the resolved config + parameter counts + the resolved lr
        run.config = yaml.safe_load(hparams.read_text()) or {}
    elif hydra_config.is_file():
        run.config = yaml.safe_load(hydra_config.read_text()) or {}
    run.overrides = _hydra_overrides(run_dir)
    throughput = []
    metrics = run_dir / "csv" / "metrics.csv"
    if metrics.is_file():
        with open(metrics, newline="") as handle:
            for record in csv.DictReader(handle):
                row = {k: _number(v) for k, v in record.items()}
                _add_epoch_row(run, row)
                if is_number(row.get("train/throughput")):
                    throughput.append(row["train/throughput"])
                run.summary.update(_final_metrics(row))
    results = run_dir / "results.json"
    if results.is_file():
        run.summary.update({k: v for k, v in json.loads(results.read_text()).items() if is_number(v)})
    return _finish(run, throughput)


# ---- offline W&B runs ------------------------------------------------------------------------------------------
_WANDB_BLOCK = 32768  # the .wandb file is a LevelDB-style log of protobuf records in 32 KiB blocks
_WANDB_HEADER = 7  # ":W&B", magic 0xBEE1, version
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> Iterator:
    """The ``wandb_internal_pb2.Record`` messages of an offline run file (what ``wandb sync`` uploads)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = _WANDB_HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = _WANDB_BLOCK - pos % _WANDB_BLOCK
        if left_in_block < 7:  # a block tail too short for a record header is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zero padding up to the next block
            pos += left_in_block
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (_FIRST, _MIDDLE):
            pending = chunk if kind == _FIRST else pending + chunk
            continue
        payload, pending = (pending + chunk, b"") if kind == _LAST else (chunk, b"")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        yield record


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def load_wandb_offline(run_path: Path, name: str | None = None) -> Run:
    """``run_path``: an ``offline-run-*`` directory or its ``run-*.wandb`` file."""
    files = [run_path] if run_path.is_file() else sorted(run_path.glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"no run-*.wandb file in {run_path}")
    run = Run(name=name or run_path.name, source=str(run_path))
    throughput = []
    for record in read_wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.name = name or record.run.display_name or record.run.run_id
            run.config.update({"wandb.group": record.run.run_group, "wandb.tags": list(record.run.tags)})
        elif kind == "config":
            run.config.update({_item_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            row = {_item_key(i): json.loads(i.value_json) for i in record.history.item}
            _add_epoch_row(run, row)
            if is_number(row.get("train/throughput")):
                throughput.append(row["train/throughput"])
            run.summary.update(_final_metrics(row))
            if is_number(row.get("_runtime")):
                run.summary["wall_time_s"] = row["_runtime"]
    run.overrides = _wandb_overrides(run.config)
    return _finish(run, throughput)


# ---- the W&B API -----------------------------------------------------------------------------------------------
def load_wandb_online(project: str, group: str | None = None) -> list[Run]:
    """Runs of ``entity/project`` (one ``group`` when given) through the W&B API (needs WANDB_API_KEY)."""
    import wandb

    runs = []
    for remote in wandb.Api().runs(project, filters={"group": group} if group else None):
        run = Run(name=remote.name, source=f"{project}/{remote.id}", config=dict(remote.config))
        run.overrides = _wandb_overrides(run.config)
        throughput = []
        for row in remote.scan_history():
            _add_epoch_row(run, row)
            if is_number(row.get("train/throughput")):
                throughput.append(row["train/throughput"])
        summary = dict(remote.summary)
        run.summary.update(_final_metrics(summary))
        if is_number(summary.get("_runtime")):
            run.summary["wall_time_s"] = summary["_runtime"]
        runs.append(_finish(run, throughput))
    return runs


# ---- finding runs on disk --------------------------------------------------------------------------------------
def find_runs(paths: Iterable[Path], source: str = "auto") -> list[Run]:
    """Every run under ``paths`` (run dirs, sweep dirs, output folders; nested stage/teacher runs included).

    ``source``: ``csv`` (local logs), ``wandb`` (offline W&B files) or ``auto`` (CSV when the run has it).
    """
    found: list[tuple[Path, Path | None]] = []  # (run dir, offline W&B run or None)
    for root in paths:
        root = Path(root)
        if (root.is_file() and root.suffix == ".wandb") or root.name.startswith("offline-run-"):
            found.append((root, root))
            continue
        for run_dir in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
            if set(run_dir.relative_to(root).parts) & _NOT_RUN_DIRS:
                continue
            has_csv = (run_dir / "csv" / "metrics.csv").is_file()
            offline = sorted((run_dir / "wandb").glob("offline-run-*"))
            if offline and (source == "wandb" or (source == "auto" and not has_csv)):
                found.extend((run_dir, o) for o in offline[-1:])
            elif has_csv and source != "wandb":
                found.append((run_dir, None))
    base = _common_parent([d for d, _ in found])
    shared = shared_overrides([_hydra_overrides(d) for d, _ in found])
    runs = []
    for run_dir, offline in found:
        name = _readable_name(run_dir, base, shared)
        runs.append(load_wandb_offline(offline, name) if offline else load_local_run(run_dir, name))
    return runs


def _hydra_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in yaml.safe_load(path.read_text()) or []] if path.is_file() else []


def _wandb_overrides(config: dict) -> list[str]:
    overrides = flatten(config).get("logger.wandb.overrides")
    return [str(o) for o in overrides] if isinstance(overrides, list) else []


def shared_overrides(overrides: list[list[str]]) -> set[str]:
    """The overrides every run that has some was given (a sweep's fixed ones); none when fewer than two have some."""
    known = [set(kept_overrides(o)) for o in overrides if o]
    return set.intersection(*known) if len(known) > 1 else set()


def _readable_name(run_dir: Path, base: Path | None, shared: set[str] = frozenset()) -> str:
    """The run's path below ``base``, with each multirun job number (``3``) replaced by the overrides that
    made the job and vary between the runs (``distill=hard seed=1``)."""
    if not base or run_dir.resolve() == base:
        kept = kept_overrides(_hydra_overrides(run_dir)) if run_dir.name.isdigit() else []
        return " ".join(kept) or run_dir.name
    parts, current = [], base
    for part in run_dir.resolve().relative_to(base).parts:
        current = current / part
        kept = kept_overrides(_hydra_overrides(current)) if part.isdigit() else []
        varying = [o for o in kept if o not in shared]
        parts.append(" ".join(varying) if varying else part)
    return "/".join(parts)


def _common_parent(dirs: list[Path]) -> Path | None:
    if len(dirs) < 2:
        return dirs[0].parent if dirs else None
    parts = [d.resolve().parts for d in dirs]
    common = [p[0] for p in zip(*parts) if len(set(p)) == 1]
    return Path(*common) if common else None
