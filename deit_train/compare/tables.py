"""The comparison printed as tables: per run, per group (with the statistics) and the test disagreement."""
from __future__ import annotations

from itertools import combinations

from deit_train.compare.runs import Run
from deit_train.compare.statistics import RunGroup, Stats, config_differences, group_statistics, summary_rows
from deit_train.modules.disagreement import CLASSIFIERS, metric_name


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
