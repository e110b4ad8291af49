"""The comparison's numbers: one summary row per run, the config keys in which runs differ, runs grouped by
seed (or by ``--group-by``), mean / std / 95 % t interval per group and Welch's t-test against a baseline group."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from deit_train.compare.runs import Run, flatten, is_number, shared_overrides
from deit_train.errors import ConfigError
from deit_train.run.loggers import kept_overrides

# val top-1 of the prediction (mean of the heads when distilled) and of each head; column name in the table
HEADS = {"val/top1": "top-1", "val/top1_cls": "cls", "val/top1_dist": "dist"}
TEACHER = "teacher/val_top1"
# config keys that say where or how a run was stored or displayed, not what was trained
_IGNORED_CONFIG_PREFIXES = ("paths.", "hydra.", "logger.", "callbacks.", "trainer.default_root_dir",
                            "trainer.enable_progress_bar", "optim/total_steps", "params/", "run_dir", "ckpt_path",
                            # the module's copies of the model / distill / optim / teacher / augment groups
                            "module.student.", "module.criterion.", "module.optim.", "module.teacher.",
                            "module.mixup.recipe.")


def config_differences(runs: list[Run]) -> dict[str, list[object]]:
    """Config keys (flattened, ``model.hidden_size``) whose values differ between runs."""
    flat = [flatten(r.config) for r in runs]
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
        return [v for v in (run_metrics(r).get(metric) for r in self.runs) if is_number(v)]


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
    return {k: v for k, v in metrics.items() if is_number(v)}


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
    flat = [flatten(r.config) for r in runs]
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
        return baseline in run.overrides or _text(flatten(run.config).get(key, object())) == value

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
