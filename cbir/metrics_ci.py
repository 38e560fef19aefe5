"""95 % bootstrap confidence intervals that resample queries by patient.

Each replicate draws the query patients with replacement (all images of a drawn patient come along, as often
as the patient was drawn) and recomputes the metric with those multiplicities as weights; the interval is the
2.5th and 97.5th percentile of the replicates (the percentile bootstrap). Resampling patients, not images,
keeps the images of one patient together, as they are not independent.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Bootstrap:
    """Patient-resampling weights, (replicates, queries): how often each query's patient was drawn."""

    weights: np.ndarray

    @classmethod
    def by_group(cls, groups: Sequence[object] | np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> Bootstrap:
        keys = np.asarray([str(g) for g in groups], dtype=object)
        uniques, inverse = np.unique(keys, return_inverse=True)
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, len(uniques), size=(n_boot, len(uniques))) if len(uniques) else \
            np.zeros((n_boot, 0), dtype=np.int64)
        counts = np.stack([np.bincount(row, minlength=len(uniques)) for row in draws]) if len(uniques) else \
            np.zeros((n_boot, 0))
        return cls(counts[:, inverse].astype(np.float64))

    def interval(self, statistic: Callable[[np.ndarray], float], level: float = LEVEL) -> list[float] | None:
        """[low, high] of `statistic(weights)` over the replicates (replicates where it is undefined are
        dropped); None when fewer than half of them define it."""
        values = np.array([statistic(w) for w in self.weights], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size < max(1, len(self.weights) // 2):
            return None
        tail = (1 - level) / 2 * 100
        low, high = np.percentile(values, [tail, 100 - tail])
        return [float(low), float(high)]


def weighted_mean(values: np.ndarray, w: np.ndarray) -> float:
    """Σ w·v / Σ w over the finite values (`nan` when their weights sum to 0)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    total = w[ok].sum()
    return float((w[ok] * v[ok]).sum() / total) if total > 0 else float("nan")


def weighted_balanced_accuracy(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> float:
    """Mean over the classes present (with weight) of the weighted recall."""
    recalls = []
    for c in np.unique(y):
        mask = y == c
        total = w[mask].sum()
        if total > 0:
            recalls.append((w[mask] * (pred[mask] == c)).sum() / total)
    return float(np.mean(recalls)) if recalls else float("nan")


def weighted_auc(y: np.ndarray, scores: np.ndarray, w: np.ndarray) -> float:
    """ROC-AUC with sample weights (ties count 1/2): the weighted Mann–Whitney statistic."""
    levels, level_of = np.unique(np.asarray(scores, dtype=np.float64), return_inverse=True)
    pos = np.asarray(y).astype(bool)
    w_pos = np.bincount(level_of[pos], w[pos], len(levels))
    w_neg = np.bincount(level_of[~pos], w[~pos], len(levels))
    total = w_pos.sum() * w_neg.sum()
    if total <= 0:
        return float("nan")
    below = np.cumsum(w_neg) - w_neg
    return float((w_pos * (below + 0.5 * w_neg)).sum() / total)
