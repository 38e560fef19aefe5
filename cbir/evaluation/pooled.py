"""Pool the per-query outcomes of several evaluations (the folds of a cross-validation) into one set of
figures with 95 % bootstrap intervals by patient. Every patient is a query in exactly one fold, so the pooled
set is each patient once; the stage-1 AUC then ranks probabilities of k different models together, which is
the usual pooled cross-validation AUC (the per-fold mean ± sd is reported beside it)."""

from __future__ import annotations

from typing import Any

import numpy as np

from cbir import metrics
from cbir.metrics_ci import Bootstrap, weighted_auc, weighted_balanced_accuracy, weighted_mean


def pool_queries(per_query: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """Pooled stage-1/stage-2 figures and their intervals from `evaluate_collection`'s `per_query` dicts."""
    if not per_query:
        return {}
    y = np.concatenate([np.asarray(p["target"], dtype=np.int64) for p in per_query])
    prob = np.concatenate([np.asarray(p["probability"], dtype=np.float64) for p in per_query])
    vote = np.concatenate([np.asarray(p["vote"], dtype=np.int64) for p in per_query])
    ap = np.concatenate([np.array([np.nan if a is None else a for a in p["ap"]], dtype=np.float64)
                         for p in per_query])
    majority = np.concatenate([np.full(len(p["target"]), p.get("majority_label", 0)) for p in per_query])
    groups = np.concatenate([[f"{i}:{g}" for g in p["group"]] for i, p in enumerate(per_query)])
    boot = Bootstrap.by_group(groups)
    # each fold's model says "target" from its own operating point (`cbir.models.calibration`); 0.5 for folds
    # written before it was recorded
    points = np.concatenate([np.full(len(p["target"]), float(p.get("operating_point", 0.5))) for p in per_query])
    model_pred = (prob >= points).astype(np.int64)
    correct = (vote == y).astype(np.float64)
    base = (majority == y).astype(np.float64)
    return {
        "n_queries": int(y.size), "n_patients": int(len(set(groups.tolist()))), "k": int(k),
        "roc_auc": metrics.roc_auc(y, prob), "roc_auc_ci": boot.interval(lambda w: weighted_auc(y, prob, w)),
        "model_balanced_accuracy": metrics.balanced_accuracy(y, model_pred),
        "model_balanced_accuracy_ci": boot.interval(lambda w: weighted_balanced_accuracy(y, model_pred, w)),
        "knn_accuracy": float(correct.mean()), "knn_accuracy_ci": boot.interval(lambda w: weighted_mean(correct, w)),
        "balanced_accuracy": metrics.balanced_accuracy(y, vote),
        "balanced_accuracy_ci": boot.interval(lambda w: weighted_balanced_accuracy(y, vote, w)),
        "map_at_k": float(np.nanmean(ap)) if np.isfinite(ap).any() else None,
        "map_at_k_ci": boot.interval(lambda w: weighted_mean(ap, w)),
        "majority_accuracy": float(base.mean()),
        "majority_accuracy_ci": boot.interval(lambda w: weighted_mean(base, w)),
        "knn": metrics.recalls(y, vote), "model": metrics.recalls(y, model_pred),
        **_weighted(per_query, y, model_pred, boot),
    }


def _weighted(per_query: list[dict[str, Any]], y: np.ndarray, model_pred: np.ndarray, boot: Bootstrap
              ) -> dict[str, Any]:
    """The calibrated vote's pooled balanced accuracy and its paired difference from the model's (per_query.json
    files written before they held the vote: nothing)."""
    if not all("weighted_vote" in p for p in per_query):
        return {}
    vote = np.concatenate([np.asarray(p["weighted_vote"], dtype=np.int64) for p in per_query])

    def gain(w: np.ndarray) -> float:
        return weighted_balanced_accuracy(y, vote, w) - weighted_balanced_accuracy(y, model_pred, w)

    return {"vote_balanced_accuracy": metrics.balanced_accuracy(y, vote),
            "vote_balanced_accuracy_ci": boot.interval(lambda w: weighted_balanced_accuracy(y, vote, w)),
            "vote_minus_model_balanced_accuracy": gain(np.ones(y.size)),
            "vote_minus_model_balanced_accuracy_ci": boot.interval(gain), "vote": metrics.recalls(y, vote)}
