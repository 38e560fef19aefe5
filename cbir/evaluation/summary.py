"""The evaluation report dict: Stage 1 (classifier) and Stage 2 (kNN retrieval) metrics on a query set.

Schema (every value plain JSON; an undefined metric, e.g. ROC-AUC with one class, is `None`):

    task        str     the binary target (label 1), e.g. "Pneumonia"
    k           int     neighbours that vote
    n_queries   int
    n_archive   int     size of the reference archive
    stage1      roc_auc, roc_auc_ci; operating_point (the model's: `LoadedModel.operating_point`, the
                prevalence its calibrated probability is calibrated to, or 0.5 for a raw score) and accuracy,
                balanced_accuracy, sensitivity, specificity at it; accuracy_at_0.5 (at 0.5, whatever the
                operating point); n_positive, n_negative (queries)
    stage2      knn_accuracy, balanced_accuracy, sensitivity, specificity (of the kNN vote),
                precision_at_k, map_at_k (standard AP@k: Σ P@i·rel_i / min(k, R), R = relevant archive
                items, same-patient items excluded), map_at_k_hits (divided by the hits in the top k
                instead, the hashing-literature variant), and knn_accuracy_ci, balanced_accuracy_ci,
                map_at_k_ci; precision_curve {"1": p, …, "K": p} (str keys so JSON round-trips),
                vote_auc (ROC-AUC of the positive share of the k votes),
                confusion [[tn, fp], [fn, tp]] (rows: true 0/1, columns: kNN prediction 0/1)
    ci          how the `*_ci` intervals were made: level, replicates, resampling unit (patients)
    baseline    majority_label, majority_accuracy, majority_balanced_accuracy (always predicting the
                archive's majority label), archive_positive_rate
    …           keys of `extra`, merged one level deep; they may add keys but never replace a metric.
                `cbir.app.evaluate` adds stage2.hamming_map_at_k, stage2.prefilter_knn_accuracy and
                stage2.prefilter_size (every collection), unknown_labels {queries_skipped, archive_skipped}
                (images whose label is unknown, left out of every metric), and for multilabel models
                stage2.map_at_k_any_finding and stage1.per_class_auc {label: auc}
"""

from __future__ import annotations

import math
from pathlib import PurePath
from typing import Any

import numpy as np

from cbir import metrics
from cbir.metrics_ci import N_BOOT, Bootstrap, weighted_auc, weighted_balanced_accuracy, weighted_mean


def summarize(
    task: str,
    y_query: np.ndarray,
    prob_query: np.ndarray,
    neighbor_y: np.ndarray,
    archive_y: np.ndarray,
    k: int,
    relevant: np.ndarray | None = None,
    extra: dict | None = None,
    n_relevant: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    n_boot: int = N_BOOT,
    operating_point: float = 0.5,
) -> dict[str, Any]:
    """Compute the evaluation report dict (schema in the module docstring).

    `y_query` (Q,) and `archive_y` are binary labels, `prob_query` (Q,) the Stage 1 probability of
    label 1, `neighbor_y` (Q×K, K ≥ k) the labels of each query's neighbours in rank order, and
    `relevant` (Q×K bool) which neighbours count as relevant (default: same label as the query).
    `n_relevant` (Q,) is R, the relevant archive items of each query (default: the archive items with the
    query's label). `groups` (Q,) names each query's patient, the unit the bootstrap resamples (default:
    every query its own patient). `operating_point`: the probability from which Stage 1 says label 1.
    """
    y, prob, nbr = _check_inputs(y_query, prob_query, neighbor_y, k)
    archive = np.asarray(archive_y).ravel().astype(int)
    rel = nbr == y[:, None] if relevant is None else np.asarray(relevant, dtype=bool)
    if rel.ndim != 2 or rel.shape[0] != y.size:
        raise ValueError(f"relevant must be a {y.size}×K array, got shape {rel.shape}")
    if n_relevant is None:
        n_relevant = np.array([int((archive == label).sum()) for label in y], dtype=np.int64)
    boot = Bootstrap.by_group(np.arange(y.size) if groups is None else groups, n_boot)
    base = metrics.majority_baseline(archive, y)
    report: dict[str, Any] = {
        "task": str(task),
        "k": int(k),
        "n_queries": int(y.size),
        "n_archive": int(archive.size),
        "stage1": _stage1(y, prob, boot, operating_point),
        "stage2": _stage2(y, nbr, rel, int(k), np.asarray(n_relevant), boot),
        "ci": {"level": 0.95, "replicates": int(n_boot), "resampled": "query patients",
               "method": "percentile bootstrap"},
        "baseline": {
            "majority_label": int(base.label),
            "majority_accuracy": base.accuracy,
            "majority_balanced_accuracy": base.balanced_accuracy,
            "archive_positive_rate": float(archive.mean()),
        },
    }
    _merge_extra(report, extra or {})
    return to_json_safe(report)


def _check_inputs(
    y_query: np.ndarray, prob_query: np.ndarray, neighbor_y: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(y_query).ravel()
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_query must hold binary 0/1 labels")
    prob = np.asarray(prob_query, dtype=np.float64).ravel()
    nbr = np.asarray(neighbor_y)
    if prob.shape != y.shape:
        raise ValueError(f"prob_query has {prob.size} values for {y.size} queries")
    if nbr.ndim != 2 or nbr.shape[0] != y.size:
        raise ValueError(f"neighbor_y must be a {y.size}×K array, got shape {nbr.shape}")
    if not 1 <= int(k) <= nbr.shape[1]:
        raise ValueError(f"k={k} is outside 1..{nbr.shape[1]} (neighbours per query)")
    return y.astype(int), prob, nbr.astype(int)


def _stage1(y: np.ndarray, prob: np.ndarray, boot: Bootstrap, operating_point: float = 0.5) -> dict[str, Any]:
    pred = (prob >= operating_point).astype(int)
    return {
        "roc_auc": metrics.roc_auc(y, prob),
        "roc_auc_ci": boot.interval(lambda w: weighted_auc(y, prob, w)) if y.size else None,
        "operating_point": float(operating_point),
        "accuracy": float(np.mean(pred == y)) if y.size else math.nan,
        "accuracy_at_0.5": float(np.mean((prob >= 0.5) == y)) if y.size else math.nan,
        "balanced_accuracy": metrics.balanced_accuracy(y, pred),
        **metrics.recalls(y, pred),
        "n_positive": int(y.sum()),
        "n_negative": int(y.size - y.sum()),
    }


def _stage2(y: np.ndarray, nbr: np.ndarray, rel: np.ndarray, k: int, n_relevant: np.ndarray,
            boot: Bootstrap) -> dict[str, Any]:
    pred, _ = metrics.knn_vote(nbr, k)
    positive_share = (nbr[:, :k] == 1).mean(axis=1)
    curve = metrics.precision_at_ks(rel, range(1, rel.shape[1] + 1))
    ap = metrics.average_precisions_at_k(rel, k, n_relevant)
    correct = (pred == y).astype(np.float64)
    has_queries = bool(y.size)
    return {
        "knn_accuracy": float(np.mean(correct)) if has_queries else math.nan,
        "knn_accuracy_ci": boot.interval(lambda w: weighted_mean(correct, w)) if has_queries else None,
        "balanced_accuracy": metrics.balanced_accuracy(y, pred),
        "balanced_accuracy_ci": boot.interval(lambda w: weighted_balanced_accuracy(y, pred, w))
        if has_queries else None,
        **metrics.recalls(y, pred),
        "precision_at_k": metrics.precision_at_k(rel, k),
        "map_at_k": metrics.map_at_k(rel, k, n_relevant),
        "map_at_k_ci": boot.interval(lambda w: weighted_mean(ap, w)) if has_queries else None,
        "map_at_k_hits": metrics.map_at_k_hits(rel, k),
        "precision_curve": {str(i): p for i, p in curve.items()},
        "vote_auc": metrics.roc_auc(y, positive_share),
        "confusion": [[int(np.sum((y == t) & (pred == p))) for p in (0, 1)] for t in (0, 1)],
    }


def vote_summary(y: np.ndarray, prob_query: np.ndarray, vote: np.ndarray, vote_probability: np.ndarray,
                 groups: np.ndarray | None = None, n_boot: int = N_BOOT, operating_point: float = 0.5
                 ) -> dict[str, Any]:
    """The weighted, prior-corrected vote (`cbir.search.vote`) beside the model: its balanced accuracy (CI),
    sensitivity, specificity, the ROC-AUC of its calibrated probability, its Brier score, `agreement`, the
    share of queries where the vote's label is the model's prediction (at the model's `operating_point`), and
    its balanced accuracy minus the model's, with a paired interval."""
    y, vote = np.asarray(y).astype(int), np.asarray(vote).astype(int)
    p = np.asarray(vote_probability, dtype=np.float64)
    boot = Bootstrap.by_group(np.arange(y.size) if groups is None else groups, n_boot)
    model = (np.asarray(prob_query) >= operating_point).astype(int)
    agree = (vote == model).astype(np.float64)
    has = bool(y.size)

    def gain(w: np.ndarray) -> float:
        return weighted_balanced_accuracy(y, vote, w) - weighted_balanced_accuracy(y, model, w)

    return {
        "accuracy": float(np.mean(vote == y)) if has else math.nan,
        "balanced_accuracy": metrics.balanced_accuracy(y, vote),
        "balanced_accuracy_ci": boot.interval(lambda w: weighted_balanced_accuracy(y, vote, w)) if has else None,
        # stage 2 against stage 1 on the same queries: the vote's balanced accuracy minus the model's,
        # with a paired interval (one bootstrap of patients for both)
        "minus_model_balanced_accuracy": metrics.balanced_accuracy(y, vote) - metrics.balanced_accuracy(y, model),
        "minus_model_balanced_accuracy_ci": boot.interval(gain) if has else None,
        **metrics.recalls(y, vote),
        "probability_auc": metrics.roc_auc(y, p),
        "brier": float(np.mean((p - y) ** 2)) if has else math.nan,
        "agreement_with_model": float(agree.mean()) if has else math.nan,
        "agreement_with_model_ci": boot.interval(lambda w: weighted_mean(agree, w)) if has else None,
    }


def _merge_extra(report: dict[str, Any], extra: dict) -> None:
    """Add `extra` to `report`, merging nested dicts one level deep; never overwrite a computed value."""
    for key, value in extra.items():
        current = report.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            clash = sorted(set(current) & set(value))
            if clash:
                raise ValueError(f"extra would overwrite computed metrics {key}.{clash}")
            current.update(value)
        elif key in report:
            raise ValueError(f"extra would overwrite the computed key {key!r}")
        else:
            report[key] = value


def to_json_safe(value: Any) -> Any:
    """Plain JSON types: numpy to Python, NaN/inf to None, tuples to lists, paths to str."""
    if isinstance(value, dict):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_json_safe(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
