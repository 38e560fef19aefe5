"""Pool the per-query outcomes of several evaluations (the folds of a cross-validation) into one set of
figures with 95 % bootstrap intervals by patient. Every patient is a query in exactly one fold, so the pooled
set is each patient once; the stage-1 AUC then ranks probabilities of k different models together, which is
the usual pooled cross-validation AUC (the per-fold mean ± sd is reported beside it)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cbir import metrics
from cbir.metrics_ci import Bootstrap, weighted_auc, weighted_balanced_accuracy, weighted_mean


@dataclass(frozen=True)
class Outcomes:
    """Per-query outcomes of one or more evaluations (the folds of a cross-validation), joined in order."""

    target: np.ndarray
    group: np.ndarray           # "evaluation:group", so the patients of different folds stay apart
    probability: np.ndarray
    model_prediction: np.ndarray  # the probability read at its fold's operating point
    knn_vote: np.ndarray
    vote: np.ndarray | None     # the calibrated vote (None for per_query.json files written before it)
    ap: np.ndarray              # AP@k (nan where the query has no relevant case)
    majority: np.ndarray        # the majority baseline's label

    @classmethod
    def join(cls, per_query: Sequence[dict[str, Any]]) -> Outcomes:
        """`evaluate_collection`'s `per_query` dicts, joined; `ValueError` when there are none."""
        if not per_query:
            raise ValueError("no evaluations to join")

        def joined(key: str, dtype: Any) -> np.ndarray:
            return np.concatenate([np.asarray(p[key], dtype=dtype) for p in per_query])

        prob = joined("probability", np.float64)
        # each fold's model says "target" from its own operating point (`cbir.models.calibration`); 0.5 for
        # folds written before it was recorded
        points = np.concatenate([np.full(len(p["target"]), float(p.get("operating_point", 0.5)))
                                 for p in per_query])
        voted = all("weighted_vote" in p for p in per_query)
        return cls(target=joined("target", np.int64),
                   group=np.concatenate([[f"{i}:{g}" for g in p["group"]] for i, p in enumerate(per_query)]),
                   probability=prob, model_prediction=(prob >= points).astype(np.int64),
                   knn_vote=joined("vote", np.int64), vote=joined("weighted_vote", np.int64) if voted else None,
                   ap=np.concatenate([np.array([np.nan if a is None else a for a in p["ap"]], dtype=np.float64)
                                      for p in per_query]),
                   majority=np.concatenate([np.full(len(p["target"]), p.get("majority_label", 0))
                                            for p in per_query]))


def pool_queries(per_query: list[dict[str, Any]], k: int) -> dict[str, Any]:
    """Pooled stage-1/stage-2 figures and their intervals from `evaluate_collection`'s `per_query` dicts."""
    if not per_query:
        return {}
    o = Outcomes.join(per_query)
    y, prob, vote, ap, model_pred = o.target, o.probability, o.knn_vote, o.ap, o.model_prediction
    boot = Bootstrap.by_group(o.group)
    correct = (vote == y).astype(np.float64)
    base = (o.majority == y).astype(np.float64)
    return {
        "n_queries": int(y.size), "n_patients": int(len(set(o.group.tolist()))), "k": int(k),
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
        **_weighted(o, boot),
    }


def _weighted(o: Outcomes, boot: Bootstrap) -> dict[str, Any]:
    """The calibrated vote's pooled balanced accuracy and its paired difference from the model's (per_query.json
    files written before they held the vote: nothing)."""
    if o.vote is None:
        return {}
    y, vote, model_pred = o.target, o.vote, o.model_prediction

    def gain(w: np.ndarray) -> float:
        return weighted_balanced_accuracy(y, vote, w) - weighted_balanced_accuracy(y, model_pred, w)

    return {"vote_balanced_accuracy": metrics.balanced_accuracy(y, vote),
            "vote_balanced_accuracy_ci": boot.interval(lambda w: weighted_balanced_accuracy(y, vote, w)),
            "vote_minus_model_balanced_accuracy": gain(np.ones(y.size)),
            "vote_minus_model_balanced_accuracy_ci": boot.interval(gain), "vote": metrics.recalls(y, vote)}
