"""``data.train_fraction``: a seeded, class-balanced subset of a training split (the data-efficiency sweeps)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from deit_train.errors import ConfigError


def check_fraction(fraction: float) -> float:
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"data.train_fraction={fraction} must lie in (0, 1]: e.g. 0.1 keeps 10 % of each class")
    return float(fraction)


def balanced_subset(labels: Sequence[int] | np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices keeping ``round(fraction x n_c)`` (at least 1) images of each class ``c``, drawn with
    ``seed``: the same labels, fraction and seed give the same subset on any machine."""
    labels = np.asarray(labels)
    if check_fraction(fraction) == 1.0:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    kept = []
    for label in np.unique(labels):  # sorted: the draw does not depend on the order classes first appear in
        members = np.flatnonzero(labels == label)
        kept.append(rng.permutation(members)[:max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(kept))


def subset_tag(fraction: float, seed: int) -> str:
    """File-name suffix of what was trained on a subset (the bootstrapped teacher's cache); empty for all data."""
    return "" if float(fraction) == 1.0 else f"_train{float(fraction):g}_seed{int(seed)}"
