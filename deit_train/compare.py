"""Compare training runs: final/best val top-1 per head, teacher top-1, parameters, throughput, wall time, the config
keys in which the runs differ, and the val top-1 curves as a PNG.

Runs come from local run directories (``csv/metrics.csv``, ``csv/hparams.yaml``, ``results.json``), from offline
W&B runs (``<run dir>/wandb/offline-run-*/run-*.wandb``), or from the W&B API (``entity/project``, optionally one
group). ``scripts/compare_runs.py`` is the command line.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import struct
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# val top-1 of the prediction (mean of the heads when distilled) and of each head; column name in the table
HEADS = {"val/top1": "top-1", "val/top1_cls": "cls", "val/top1_dist": "dist"}
TEACHER = "teacher/val_top1"
# config keys that say where or how a run was stored or displayed, not what was trained
_IGNORED_CONFIG_PREFIXES = ("paths.", "hydra.", "logger.", "callbacks.", "trainer.default_root_dir",
                            "trainer.enable_progress_bar", "optim/total_steps", "params/", "run_dir", "ckpt_path",
                            # the module's copies of the model / distill / optim / teacher / augment groups
                            "module.student.", "module.criterion.", "module.optim.", "module.teacher.",
                            "module.mixup.recipe.")
_NOT_RUN_DIRS = {"checkpoints", "csv", "wandb", ".hydra", ".submitit", "__pycache__"}


@dataclass
class Run:
    name: str
    source: str
    config: dict = field(default_factory=dict)
    # one row per validated epoch (the last record when an interrupted epoch was trained again)
    epochs: dict[int, dict[str, float]] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)

    def curve(self, key: str) -> tuple[list[int], list[float]]:
        points = [(e, row[key]) for e, row in sorted(self.epochs.items()) if _is_number(row.get(key))]
        return [e for e, _ in points], [v for _, v in points]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _add_epoch_row(run: Run, row: dict) -> None:
    """Keep validation records per epoch; a later record of the same epoch (resumed run) replaces the earlier."""
    if not _is_number(row.get("val/top1")) or not _is_number(row.get("epoch")):
        return
    run.epochs[int(row["epoch"])] = {k: v for k, v in row.items() if _is_number(v)}


def _throughput(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


_CONFIG_FACTS = ("params/student", "params/teacher", "optim/lr", "optim/global_batch")


def _final_metrics(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith(("test/", "teacher/test")) and _is_number(v)}


def _finish(run: Run, throughput: list[float]) -> Run:
    """Copy the config facts the table shows into the summary (unless measured) and add the throughput."""
    for key in _CONFIG_FACTS:
        if key not in run.summary and _is_number(run.config.get(key)):
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
    throughput = []
    metrics = run_dir / "csv" / "metrics.csv"
    if metrics.is_file():
        with open(metrics, newline="") as handle:
            for record in csv.DictReader(handle):
                row = {k: _number(v) for k, v in record.items()}
                _add_epoch_row(run, row)
                if _is_number(row.get("train/throughput")):
                    throughput.append(row["train/throughput"])
                run.summary.update(_final_metrics(row))
    results = run_dir / "results.json"
    if results.is_file():
        run.summary.update({k: v for k, v in json.loads(results.read_text()).items() if _is_number(v)})
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
            if _is_number(row.get("train/throughput")):
                throughput.append(row["train/throughput"])
            run.summary.update(_final_metrics(row))
            if _is_number(row.get("_runtime")):
                run.summary["wall_time_s"] = row["_runtime"]
    return _finish(run, throughput)


# ---- the W&B API -----------------------------------------------------------------------------------------------
def load_wandb_online(project: str, group: str | None = None) -> list[Run]:
    """Runs of ``entity/project`` (one ``group`` when given) through the W&B API (needs WANDB_API_KEY)."""
    import wandb

    runs = []
    for remote in wandb.Api().runs(project, filters={"group": group} if group else None):
        run = Run(name=remote.name, source=f"{project}/{remote.id}", config=dict(remote.config))
        throughput = []
        for row in remote.scan_history():
            _add_epoch_row(run, row)
            if _is_number(row.get("train/throughput")):
                throughput.append(row["train/throughput"])
        summary = dict(remote.summary)
        run.summary.update(_final_metrics(summary))
        if _is_number(summary.get("_runtime")):
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
    runs = []
    for run_dir, offline in found:
        # base is resolved (a common parent of relative and absolute paths); so must the run dir be
        name = str(run_dir.resolve().relative_to(base)) if base and run_dir.resolve() != base else run_dir.name
        runs.append(load_wandb_offline(offline, name) if offline else load_local_run(run_dir, name))
    return runs


def _common_parent(dirs: list[Path]) -> Path | None:
    if len(dirs) < 2:
        return dirs[0].parent if dirs else None
    parts = [d.resolve().parts for d in dirs]
    common = [p[0] for p in zip(*parts) if len(set(p)) == 1]
    return Path(*common) if common else None


# ---- the comparison --------------------------------------------------------------------------------------------
def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_differences(runs: list[Run]) -> dict[str, list[object]]:
    """Config keys (flattened, ``model.hidden_size``) whose values differ between runs."""
    flat = [_flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    differences = {}
    for key in keys:
        if key.startswith(_IGNORED_CONFIG_PREFIXES) or key.startswith("wandb."):
            continue
        values = [f.get(key) for f in flat]
        if len({json.dumps(v, sort_keys=True, default=str) for v in values}) > 1:
            differences[key] = values
    return differences


def summary_rows(runs: list[Run]) -> list[dict[str, object]]:
    """One row per run: final and best val top-1 per head, teacher top-1, test top-1, params, throughput, time."""
    rows = []
    for run in runs:
        row: dict[str, object] = {"run": run.name, "epochs": len(run.epochs)}
        for key, label in HEADS.items():
            _, values = run.curve(key)
            row[f"{label} final"] = values[-1] if values else None
            row[f"{label} best"] = max(values) if values else None
        _, teacher = run.curve(TEACHER)
        row["teacher val"] = teacher[-1] if teacher else None
        row["teacher test"] = run.summary.get("teacher/test_top1")
        row["test top-1"] = run.summary.get("test/top1")
        row["params"] = run.summary.get("params/student")
        row["img/s"] = run.summary.get("train/throughput")
        row["wall s"] = run.summary.get("wall_time_s")
        rows.append(row)
    return rows


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) <= 1 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_comparison(runs: list[Run], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=200)
    rows = summary_rows(runs)
    columns = [c for c in rows[0] if any(r[c] is not None for r in rows)]
    table = Table(title="val top-1 (final / best per head), teacher, test, size, speed")
    for column in columns:
        table.add_column(column, justify="left" if column == "run" else "right")
    for row in rows:
        table.add_row(*[_cell(row[c]) for c in columns])
    console.print(table)
    differences = config_differences(runs)
    if differences:
        diff = Table(title="config differences")
        diff.add_column("key")
        for run in runs:
            diff.add_column(run.name)
        for key, values in differences.items():
            diff.add_row(key, *[_cell(v) for v in values])
        console.print(diff)
    elif len(runs) > 1:
        console.print("config differences: none")


def plot_curves(runs: list[Run], out: Path) -> Path:
    """Val top-1 per epoch: the prediction solid, the cls / dist heads dashed / dotted, the teacher dash-dotted,
    each run in its own colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"val/top1": "-", "val/top1_cls": "--", "val/top1_dist": ":", TEACHER: "-."}
    names = {**HEADS, TEACHER: "teacher"}
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        for key, style in styles.items():
            epochs, values = run.curve(key)
            if epochs:
                label = run.name if key == "val/top1" else f"{run.name} ({names[key]})"
                ax.plot(epochs, values, style, color=color, marker="o" if len(epochs) < 30 else None,
                        markersize=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1")
    ax.set_title("val top-1 (solid: prediction, dashed: cls head, dotted: dist head, dash-dot: teacher)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


DEFAULT_RUN_FOLDERS = (Path("outputs"), Path("multirun"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="compare_runs.py", description=__doc__.split("\n\n")[0],
        epilog="examples: compare_runs.py outputs/quickstart | compare_runs.py outputs/a outputs/b --out cmp.png | "
               "compare_runs.py --wandb my-team/deit_train --group quickstart")
    parser.add_argument("runs", nargs="*", type=Path, help="run dirs, sweep dirs or output folders (searched; "
                        "default: ./outputs and ./multirun)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from the W&B API instead")
    parser.add_argument("--group", help="with --wandb: only this group (= experiment)")
    parser.add_argument("--source", choices=("auto", "csv", "wandb"), default="auto",
                        help="local runs: CSV logs, offline W&B files, or auto (CSV when present)")
    parser.add_argument("--out", type=Path, default=Path("compare_runs.png"), help="PNG of the val top-1 curves")
    args = parser.parse_args(argv)
    if not args.runs and not args.wandb:  # where Hydra puts runs and sweeps when run from here
        args.runs = [p for p in DEFAULT_RUN_FOLDERS if p.is_dir()] or list(DEFAULT_RUN_FOLDERS)
    runs = load_wandb_online(args.wandb, args.group) if args.wandb else []
    runs += find_runs(args.runs, args.source)
    if not runs:
        print(f"error: no runs found in {' '.join(map(str, args.runs)) or args.wandb} (a run has csv/metrics.csv "
              "or wandb/offline-run-*)", file=sys.stderr)
        return 2
    print_comparison(runs)
    print(f"curves: {plot_curves(runs, args.out)}")
    return 0
