"""The comparison's figures: val top-1 curves per run, and per group (mean ± std, test top-1 with its interval)."""
from __future__ import annotations

import textwrap
from pathlib import Path

from deit_train.compare.runs import Run
from deit_train.compare.statistics import HEADS, TEACHER, RunGroup, describe
from deit_train.run.plots import save_figure


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


def _wrapped(name: str, width: int) -> str:
    """A group name over lines of about ``width`` characters, broken only between its key=value parts."""
    return "\n".join(textwrap.wrap(name, width, break_long_words=False))


def plot_groups(groups: list[RunGroup], out: Path) -> Path:
    """Left: val top-1 of the prediction per epoch, mean over each group's runs with a ± std band. Right: each
    group's test top-1 (val top-1 final without a test) as mean with its 95 % confidence interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    metric = "test top-1" if any(g.values("test top-1") for g in groups) else "top-1 final"
    # long names (--group-by's key=value per key) do not fit under the bars: there they are numbered, and the legend
    # says which number is which group
    numbered = any(len(g.name) > 30 for g in groups)
    tags = [f"{i + 1}. " if numbered else "" for i in range(len(groups))]
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
            label = f"{tags[index]}{_wrapped(group.name, 60)} (n={len(group.runs)})"
            curves.plot(epochs, mean, color=color, label=label)
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
    # below the curves, not on them: --group-by names (key=value per key) are long, and a sweep has many groups
    curves.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0.0, -0.2), ncol=2 if len(groups) > 4 else 1)
    labels = [str(i + 1) for i in range(len(groups))] if numbered else [g.name for g in groups]
    bars.set_xticks(range(len(groups)), labels, rotation=0 if numbered else 30, ha="center" if numbered else "right",
                    fontsize="small")
    bars.set(ylabel=metric, title=f"{metric}: mean, 95 % CI, runs (dots)")
    bars.grid(alpha=0.3, axis="y")
    return save_figure(fig, out)
