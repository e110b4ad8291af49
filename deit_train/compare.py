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
from itertools import combinations
from pathlib import Path

import yaml

from deit_train.errors import ConfigError
from deit_train.run.loggers import kept_overrides
from deit_train.run.plots import save_figure
from deit_train.modules.disagreement import CLASSIFIERS, metric_name

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
    # the command-line overrides that made it (Hydra's .hydra/overrides.yaml, or the W&B logger's copy)
    overrides: list[str] = field(default_factory=list)

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
    run.overrides = _hydra_overrides(run_dir)
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
    overrides = _flatten(config).get("logger.wandb.overrides")
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
    return save_figure(fig, out)


# ---- seed-aware comparison -------------------------------------------------------------------------------------
# what is averaged over seeds: the test top-1 of the prediction, each head and the teacher (results.json), and the
# final / best val top-1 of the prediction and each head (the curves)
TEST_METRICS = {"test top-1": "test/top1", "test cls": "test/top1_cls", "test dist": "test/top1_dist",
                "teacher test": "teacher/test_top1"}
VAL_METRICS = [f"{label} {which}" for label in HEADS.values() for which in ("final", "best")]


@dataclass
class RunGroup:
    """Runs that differ only in their seed (or share the values of ``--group-by``)."""
    name: str
    runs: list[Run]

    def values(self, metric: str) -> list[float]:
        return [v for v in (run_metrics(r).get(metric) for r in self.runs) if _is_number(v)]


@dataclass
class Stats:
    """``n`` values: mean, sample standard deviation, 95 % t confidence interval of the mean, and the Welch
    t-test p-value against the baseline group (``None`` where it is undefined: n < 2, or no baseline)."""
    n: int
    mean: float
    std: float | None
    ci: tuple[float, float] | None
    p_vs_baseline: float | None = None


def run_metrics(run: Run) -> dict[str, float]:
    row = summary_rows([run])[0]
    metrics = {label: run.summary.get(key) for label, key in TEST_METRICS.items()}
    metrics.update({label: row[label] for label in VAL_METRICS})
    return {k: v for k, v in metrics.items() if _is_number(v)}


def describe(values: list[float]) -> Stats:
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Stats(n, mean, None, None)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
    return Stats(n, mean, std, (mean - half, mean + half))


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided Welch t-test p-value (unequal variances, Welch-Satterthwaite degrees of freedom); ``None`` when a
    group has < 2 runs or neither group varies."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        return None
    (sa, sb) = describe(a), describe(b)
    va, vb = sa.std**2 / sa.n, sb.std**2 / sb.n
    if va + vb == 0:  # no spread to test against
        return None
    t = (sa.mean - sb.mean) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
    return float(2 * stats.t.sf(abs(t), df))


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _seed_free(overrides: list[str], shared: set[str]) -> tuple[str, ...]:
    return tuple(o for o in kept_overrides(overrides) if not o.startswith("seed=") and o not in shared)


def group_runs(runs: list[Run], group_by: list[str] | None = None) -> list[RunGroup]:
    """Runs whose configs differ only in ``seed`` form a group; ``group_by`` (config keys such as
    ``distill.distill_type``) groups by those values instead. Groups keep the order of their first run."""
    flat = [_flatten(r.config) for r in runs]
    # data.seed is the run's seed handed to the data stream (${seed}), not a setting of its own
    keys = group_by or [k for k in config_differences(runs) if k not in ("seed", "data.seed")]
    if group_by and "task_name" not in keys and len({c.get("task_name") for c in flat}) > 1:
        # runs of different experiments never share a group: a sweep's bootstrapped teacher (experiment
        # quickstart_teacher, distill none) would otherwise count as one more seed of the students' distill=none
        keys = [*keys, "task_name"]
    groups: dict[tuple, RunGroup] = {}
    for run, config in zip(runs, flat):
        values = tuple(_text(config.get(k)) for k in keys)
        if values not in groups:
            groups[values] = RunGroup(name="", runs=[])
        groups[values].runs.append(run)
    shared = shared_overrides([r.overrides for r in runs])
    for values, group in groups.items():
        overrides = {_seed_free(r.overrides, shared) for r in group.runs}
        if group_by:
            group.name = " ".join(f"{k}={v}" for k, v in zip(keys, values))
        elif len(overrides) == 1 and next(iter(overrides)):  # the overrides the group's runs were made with
            group.name = " ".join(next(iter(overrides)))
        elif len(group.runs) == 1:  # e.g. a quickstart's bootstrapped teacher, found inside the first job
            group.name = group.runs[0].name
        else:
            group.name = " ".join(f"{k}={v}" for k, v in zip(keys, values)) or "all runs"
    return list(groups.values())


def find_baselines(groups: list[RunGroup], baseline: str) -> dict[str, RunGroup]:
    """Group name -> the group it is tested against: among the groups whose runs all have ``KEY=VALUE`` (in their
    overrides or config), the one sharing most of the group's other settings (a sweep over ``distill`` and
    ``data.train_fraction`` tests each fraction against its own ``distill=none``). Baseline groups map to nothing."""
    key, sep, value = baseline.partition("=")
    if not sep:
        raise ConfigError(f"--baseline {baseline!r} is not KEY=VALUE: e.g. --baseline distill=none")

    def matches(run: Run) -> bool:
        return baseline in run.overrides or _text(_flatten(run.config).get(key, object())) == value

    candidates = [g for g in groups if all(matches(r) for r in g.runs)]
    if not candidates:
        raise ConfigError(f"--baseline {baseline}: no group of runs has it; groups: "
                          f"{'; '.join(g.name for g in groups)}")
    chosen = {}
    for group in groups:
        if group in candidates:
            continue
        shared = [len(set(group.name.split()) & set(c.name.split())) for c in candidates]
        best = [c for c, n in zip(candidates, shared) if n == max(shared)]
        if len(best) > 1:
            raise ConfigError(f"--baseline {baseline}: {len(best)} groups ({', '.join(c.name for c in best)}) fit "
                              f"{group.name} equally: use --group-by, or compare fewer runs at a time")
        chosen[group.name] = best[0]
    return chosen


def group_statistics(groups: list[RunGroup], baselines: dict[str, RunGroup] | None = None
                     ) -> dict[str, dict[str, Stats]]:
    """Group name -> metric -> :class:`Stats` (p-value against the group's baseline, :func:`find_baselines`)."""
    table = {}
    for group in groups:
        metrics = {}
        baseline = (baselines or {}).get(group.name)
        for metric in [*TEST_METRICS, *VAL_METRICS]:
            values = group.values(metric)
            if not values:
                continue
            metrics[metric] = describe(values)
            if baseline is not None:
                metrics[metric].p_vs_baseline = welch_p(values, baseline.values(metric))
        table[group.name] = metrics
    return table


def _stats_cells(stats: Stats) -> list[str]:
    spread = f" ± {stats.std:.4f}" if stats.std is not None else ""
    ci = f"[{stats.ci[0]:.4f}, {stats.ci[1]:.4f}]" if stats.ci else ""
    p = f"{stats.p_vs_baseline:.3f}" if stats.p_vs_baseline is not None else ""
    return [str(stats.n), f"{stats.mean:.4f}{spread}", ci, p]


def print_group_comparison(groups: list[RunGroup], baselines: dict[str, RunGroup] | None = None,
                           console=None) -> None:
    """One row per group and metric: n, mean ± std, 95 % CI, Welch p-value against the group's baseline."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=200)
    title = "per group: n, mean ± std, 95 % t confidence interval"
    title += ", Welch t-test p against the baseline group" if baselines is not None else ""
    table = Table(title=title)
    columns = ["group", "metric", "n", "mean ± std", "95 % CI"] + (["p", "baseline"] if baselines is not None else [])
    for column in columns:
        table.add_column(column, justify="left" if column in ("group", "metric", "baseline") else "right")
    for name, metrics in group_statistics(groups, baselines).items():
        baseline = (baselines or {}).get(name)
        for row, (metric, stats) in enumerate(metrics.items()):
            cells = _stats_cells(stats)[:len(columns) - 2]
            if baselines is not None:
                cells.append(baseline.name if baseline and row == 0 else ("baseline" if row == 0 else ""))
            table.add_row(name if row == 0 else "", metric, *cells, end_section=row == len(metrics) - 1)
    console.print(table)


def print_disagreement(groups: list[RunGroup], console=None) -> None:
    """The test disagreement table (paper Tab. 4) per group (mean over its runs), when the runs logged one."""
    from rich.console import Console
    from rich.table import Table

    pairs = [(a, b) for a, b in combinations(CLASSIFIERS, 2)
             if any(metric_name("test", a, b) in r.summary for g in groups for r in g.runs)]
    if not pairs:
        return
    table = Table("group", "n", *[f"{a}-{b}" for a, b in pairs],
                  title="test disagreement (fraction of images, paper Tab. 4), mean over the group's runs")
    for group in groups:
        cells = []
        for a, b in pairs:
            values = [r.summary[metric_name("test", a, b)] for r in group.runs if metric_name("test", a, b) in r.summary]
            cells.append(f"{sum(values) / len(values):.4f}" if values else "")
        table.add_row(group.name, str(len(group.runs)), *cells)
    (console or Console(width=200)).print(table)


def plot_groups(groups: list[RunGroup], out: Path) -> Path:
    """Left: val top-1 of the prediction per epoch, mean over each group's runs with a ± std band. Right: each
    group's test top-1 (val top-1 final without a test) as mean with its 95 % confidence interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    metric = "test top-1" if any(g.values("test top-1") for g in groups) else "top-1 final"
    for index, group in enumerate(groups):
        color = f"C{index % 10}"
        per_epoch: dict[int, list[float]] = {}
        for run in group.runs:
            for epoch, value in zip(*run.curve("val/top1")):
                per_epoch.setdefault(epoch, []).append(value)
        epochs = sorted(e for e, v in per_epoch.items() if len(v) == len(group.runs))  # epochs every run reached
        if epochs:
            mean = [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs]
            std = [describe(per_epoch[e]).std or 0.0 for e in epochs]
            curves.plot(epochs, mean, color=color, label=f"{group.name} (n={len(group.runs)})")
            curves.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                color=color, alpha=0.2)
        values = group.values(metric)
        if values:
            stats = describe(values)
            low, high = stats.ci if stats.ci else (stats.mean, stats.mean)
            bars.errorbar([index], [stats.mean], yerr=[[stats.mean - low], [high - stats.mean]], fmt="o",
                          color=color, capsize=6)
            bars.plot([index] * len(values), values, ".", color=color, alpha=0.5)
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.set(xlabel="epoch", ylabel="val top-1", title="val top-1: mean ± std over seeds")
    curves.grid(alpha=0.3)
    curves.legend(fontsize="small")
    bars.set_xticks(range(len(groups)), [g.name for g in groups], rotation=30, ha="right", fontsize="small")
    bars.set(ylabel=metric, title=f"{metric}: mean, 95 % CI, runs (dots)")
    bars.grid(alpha=0.3, axis="y")
    return save_figure(fig, out)


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
    parser.add_argument("--group-by", metavar="KEY[,KEY]",
                        help="config keys that form the groups (default: runs differing only in seed form one)")
    parser.add_argument("--baseline", metavar="KEY=VALUE",
                        help="the group the others are tested against (Welch t-test), e.g. distill=none")
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
    groups = group_runs(runs, args.group_by.split(",") if args.group_by else None)
    print_disagreement(groups)
    if args.group_by or args.baseline or any(len(g.runs) > 1 for g in groups):
        try:
            baselines = find_baselines(groups, args.baseline) if args.baseline else None
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print_group_comparison(groups, baselines)
        print(f"groups: {plot_groups(groups, args.out.with_name(f'{args.out.stem}_groups.png'))}")
    return 0
