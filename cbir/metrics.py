"""Classification and retrieval metrics (numpy only).

Shared by training (Stage 1 validation AUC) and evaluation (Stage 2 kNN retrieval). Metrics that are
undefined for the given data (e.g. ROC-AUC with a single class, any mean over zero queries) return
`nan` rather than raising; malformed inputs (wrong shapes, non-binary labels, NaN scores, k out of
range) raise `ValueError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MajorityBaseline",
    "average_precision_at_k",
    "average_precisions_at_k",
    "balanced_accuracy",
    "knn_vote",
    "majority_baseline",
    "map_at_k",
    "map_at_k_hits",
    "per_class_auc",
    "precision_at_k",
    "precision_at_ks",
    "recalls",
    "roc_auc",
    "roc_curve",
]


# ---------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------


def _binary_labels(y_true: np.ndarray) -> np.ndarray:
    """`y_true` as a 1-D bool array; raises unless every value is 0/1 (or bool)."""
    y = np.asarray(y_true).ravel()
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError(f"binary labels must be 0/1, got values {np.unique(y)[:5].tolist()}")
    return y.astype(bool)


def _scores(scores: np.ndarray, n: int) -> np.ndarray:
    """`scores` as a finite 1-D float64 array of length `n`."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.shape != (n,):
        raise ValueError(f"scores has {s.size} values for {n} labels")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return s


def _check_k(k: int, width: int, what: str) -> int:
    k = int(k)
    if not 1 <= k <= width:
        raise ValueError(f"k={k} is outside 1..{width} ({what} has {width} columns)")
    return k


def _relevance(relevant: np.ndarray) -> np.ndarray:
    rel = np.asarray(relevant)
    if rel.ndim != 2:
        raise ValueError(f"relevant must be a Q×K array, got shape {rel.shape}")
    return rel.astype(bool)


# ---------------------------------------------------------------------------------------------------
# ROC
# ---------------------------------------------------------------------------------------------------


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`; tied values share the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.r_[0, np.flatnonzero(xs[1:] != xs[:-1]) + 1]
    ends = np.r_[starts[1:], xs.size]
    ranks = np.empty(xs.size, dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Binary ROC-AUC as the Mann–Whitney U statistic (ties count 1/2); `nan` if a class is absent."""
    y = _binary_labels(y_true)
    s = _scores(scores, y.size)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = _average_ranks(s)[y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points `(fpr, tpr, thresholds)`, one per distinct score, highest threshold first.

    Point i counts `scores >= thresholds[i]` as positive; the first point is `(0, 0)` at threshold
    `inf`. Every point is kept (sklearn's `drop_intermediate=False`). A rate whose class is absent is
    `nan`.
    """
    y = _binary_labels(y_true)
    s = _scores(scores, y.size)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # Index of the last item of each run of equal scores: one ROC point per distinct threshold.
    last_of_group = np.flatnonzero(np.r_[np.diff(s_sorted) != 0, s.size > 0])
    tps = np.r_[0, np.cumsum(y_sorted)[last_of_group]].astype(np.float64)
    fps = np.r_[0, last_of_group + 1].astype(np.float64) - tps
    thresholds = np.r_[np.inf, s_sorted[last_of_group]]
    n_pos, n_neg = tps[-1], fps[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = tps / n_pos if n_pos else np.full_like(tps, np.nan)
        fpr = fps / n_neg if n_neg else np.full_like(fps, np.nan)
    return fpr, tpr, thresholds


def per_class_auc(Y: np.ndarray, S: np.ndarray) -> list[float]:
    """ROC-AUC of each column of the N×C label matrix `Y` against scores `S` (`nan` where undefined)."""
    Y = np.asarray(Y)
    S = np.asarray(S)
    if Y.ndim != 2 or Y.shape != S.shape:
        raise ValueError(f"Y and S must be N×C arrays of the same shape, got {Y.shape} and {S.shape}")
    return [roc_auc(Y[:, c], S[:, c]) for c in range(Y.shape[1])]


# ---------------------------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------------------------


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in `y_true` (`nan` when `y_true` is empty)."""
    y = np.asarray(y_true).ravel()
    p = np.asarray(y_pred).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values, y_pred {p.size}")
    if y.size == 0:
        return float("nan")
    return float(np.mean([np.mean(p[y == c] == c) for c in np.unique(y)]))


@dataclass(frozen=True)
class MajorityBaseline:
    """Always predicting the archive's most common label.

    Unpacks as `(label, accuracy)`. `balanced_accuracy` is 1/(classes among the queries) when the
    label occurs among the queries (0.5 for a binary task with both classes), else 0.
    """

    label: int
    accuracy: float
    balanced_accuracy: float

    def __iter__(self) -> Iterator[int | float]:
        return iter((self.label, self.accuracy))


def majority_baseline(y_reference: np.ndarray, y_queries: np.ndarray) -> MajorityBaseline:
    """The majority label of the reference set (ties: the smallest label) scored on the queries."""
    ref = np.asarray(y_reference).ravel()
    if ref.size == 0:
        raise ValueError("the reference set is empty: no majority label")
    values, counts = np.unique(ref, return_counts=True)
    label = values[int(np.argmax(counts))].item()
    q = np.asarray(y_queries).ravel()
    pred = np.full(q.shape, label)
    accuracy = float(np.mean(q == label)) if q.size else float("nan")
    return MajorityBaseline(label, accuracy, balanced_accuracy(q, pred))


# ---------------------------------------------------------------------------------------------------
# Retrieval
# ---------------------------------------------------------------------------------------------------


def knn_vote(neighbor_labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Majority vote among the first `k` neighbours (columns in rank order) of each query.

    Returns `(pred, fraction)`: the winning label and the share of the k votes it got. A tie goes to
    the tied label whose first occurrence has the best rank.
    """
    labels = np.asarray(neighbor_labels)
    if labels.ndim != 2:
        raise ValueError(f"neighbor_labels must be a Q×K array, got shape {labels.shape}")
    k = _check_k(k, labels.shape[1], "neighbor_labels")
    top = labels[:, :k]
    # counts[q, j]: how many of the top k carry the label at rank j; argmax picks the first best rank.
    counts = np.stack([(top == top[:, [j]]).sum(axis=1) for j in range(k)], axis=1)
    winner = np.argmax(counts, axis=1)
    rows = np.arange(top.shape[0])
    return top[rows, winner], counts[rows, winner] / k


def precision_at_k(relevant: np.ndarray, k: int) -> float:
    """Mean over queries of the share of relevant items among the top `k` (`nan` with no queries)."""
    rel = _relevance(relevant)
    k = _check_k(k, rel.shape[1], "relevant")
    return float(rel[:, :k].mean()) if rel.shape[0] else float("nan")


def precision_at_ks(relevant: np.ndarray, ks: Iterable[int]) -> dict[int, float]:
    """`{k: precision_at_k(relevant, k)}` for each k in `ks` (a precision@k curve)."""
    return {int(k): precision_at_k(relevant, k) for k in ks}


def _ap_terms(relevant: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query: Σ_{i≤k} P@i · rel_i, and the number of hits in the top k."""
    top = relevant[:, :k]
    precision = np.cumsum(top, axis=1) / np.arange(1, k + 1)
    return (precision * top).sum(axis=1), top.sum(axis=1)


def _n_relevant(n_relevant: np.ndarray | int, queries: int) -> np.ndarray:
    r = np.broadcast_to(np.asarray(n_relevant, dtype=np.float64), (queries,))
    if (r < 0).any() or not np.isfinite(r).all():
        raise ValueError("n_relevant must be finite and non-negative")
    return r


def average_precisions_at_k(relevant: np.ndarray, k: int, n_relevant: np.ndarray | int) -> np.ndarray:
    """AP@k per query (the standard definition): `Σ_{i≤k} P@i · rel_i / min(k, R)`.

    `R` (`n_relevant`, per query or one number) is the number of relevant items in the whole archive that the
    ranking could return (same-patient items excluded). A query with R = 0 has no defined AP (`nan`). R must
    be at least the hits in the top k.
    """
    rel = _relevance(relevant)
    k = _check_k(k, rel.shape[1], "relevant")
    r = _n_relevant(n_relevant, rel.shape[0])
    sums, hits = _ap_terms(rel, k)
    if (hits > r).any():
        raise ValueError("n_relevant is smaller than the relevant items retrieved")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(r > 0, sums / np.minimum(k, r), np.nan)


def average_precision_at_k(relevant: np.ndarray, k: int, n_relevant: int) -> float:
    """AP@k of one ranked list (`average_precisions_at_k` for one query)."""
    return float(average_precisions_at_k(np.asarray(relevant).reshape(1, -1), k, n_relevant)[0])


def map_at_k(relevant: np.ndarray, k: int, n_relevant: np.ndarray | int) -> float:
    """Mean AP@k (standard, `average_precisions_at_k`) over the queries with R > 0 (`nan` if none)."""
    ap = average_precisions_at_k(relevant, k, n_relevant)
    defined = ap[~np.isnan(ap)]
    return float(defined.mean()) if defined.size else float("nan")


def map_at_k_hits(relevant: np.ndarray, k: int) -> float:
    """The hashing-literature variant of mAP@k (HashNet/DPSH evaluation code): each query's
    `Σ_{i≤k} P@i · rel_i` is divided by its hits in the top k instead of min(k, R), so it is 1 whenever every
    hit ranks above every miss, however few hits there are; a query with no hit scores 0. It measures the
    order of the top k only, not how many relevant items were found (`nan` with no queries)."""
    rel = _relevance(relevant)
    k = _check_k(k, rel.shape[1], "relevant")
    if rel.shape[0] == 0:
        return float("nan")
    sums, hits = _ap_terms(rel, k)
    return float(np.mean(sums / np.maximum(hits, 1)))


def recalls(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Sensitivity (recall of class 1) and specificity (recall of class 0) of binary predictions."""
    y = _binary_labels(y_true)
    p = _binary_labels(y_pred)
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values, y_pred {p.size}")
    return {"sensitivity": float(p[y].mean()) if y.any() else float("nan"),
            "specificity": float((~p[~y]).mean()) if (~y).any() else float("nan")}
