"""Figures a run saves: the PNG writer every plot uses, and the curve of a run without labels to score (SimMIM
pretraining: train and val loss per epoch)."""
from __future__ import annotations

import csv
import warnings
from pathlib import Path


def save_figure(fig, out: Path) -> Path:
    """Write a matplotlib figure as a PNG (parents created) and free it."""
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # long run names in a legend: the layout stays as it is
        warnings.filterwarnings("ignore", message="Tight layout not applied")
        fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")  # legends placed outside the axes are kept in the PNG
    plt.close(fig)
    return out


def loss_per_epoch(metrics_csv: Path) -> dict[str, dict[int, float]]:
    """``{"val/loss": {epoch: value}, "train/loss_epoch": {...}}`` from Lightning's ``metrics.csv``; the last
    record of an epoch wins (a resumed run that trained an interrupted epoch again)."""
    curves: dict[str, dict[int, float]] = {"train/loss_epoch": {}, "val/loss": {}}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            for key, points in curves.items():
                if row.get(key) not in (None, "") and row.get("epoch") not in (None, ""):
                    points[int(float(row["epoch"]))] = float(row[key])
    return curves


def plot_loss_curve(metrics_csv: Path, out: Path, title: str = "reconstruction loss") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 5))
    for key, points in loss_per_epoch(metrics_csv).items():
        if points:
            epochs = sorted(points)
            ax.plot(epochs, [points[e] for e in epochs], "-" if key == "val/loss" else "--", marker="o",
                    markersize=3, label=key)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
