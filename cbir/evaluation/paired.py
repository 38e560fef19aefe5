"""Two models on the same queries: the paired difference of each measure, with a 95 % bootstrap interval that
resamples the query patients once for both.

Two intervals that overlap do not show that two models are level: each carries the spread of the patients
drawn, which both share. The paired interval takes it out: each replicate draws the patients once and
recomputes A's measure minus B's on the same draw (`cbir.metrics_ci.Bootstrap`). A difference whose interval
lies above 0 is better beyond the noise, below 0 worse, and otherwise level.

The inputs are `evaluate_collection`'s `per_query` dicts (per_query.json), one per fold for a cross-validation
(joined as `cbir.evaluation.pooled.Outcomes` joins them). A's and B's must hold the same queries in the same order:
the same targets and patient groups, fold by fold, which two evaluations of one split and one dataset do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cbir.evaluation.pooled import Outcomes
from cbir.metrics_ci import Bootstrap, weighted_auc, weighted_balanced_accuracy, weighted_mean

#: Measure key → its name in tables.
MEASURES: dict[str, str] = {
    "roc_auc": "stage-1 ROC-AUC", "model_balanced_accuracy": "model balanced accuracy",
    "knn_balanced_accuracy": "kNN balanced accuracy", "vote_balanced_accuracy": "vote balanced accuracy",
    "map_at_k": "mAP@k",
}


class NotPaired(ValueError):
    """The two sets of per-query outcomes do not hold the same queries."""


def statistics(o: Outcomes) -> dict[str, Callable[[np.ndarray], float]]:
    """Measure key → its value under bootstrap weights, for the measures `o` can give (not the AUC with one
    class, nor the vote of a per_query.json written before it)."""
    y = o.target
    out: dict[str, Callable[[np.ndarray], float]] = {}
    if len(np.unique(y)) == 2:
        out["roc_auc"] = lambda w: weighted_auc(y, o.probability, w)
    out["model_balanced_accuracy"] = lambda w: weighted_balanced_accuracy(y, o.model_prediction, w)
    out["knn_balanced_accuracy"] = lambda w: weighted_balanced_accuracy(y, o.knn_vote, w)
    if o.vote is not None:
        vote = o.vote
        out["vote_balanced_accuracy"] = lambda w: weighted_balanced_accuracy(y, vote, w)
    if np.isfinite(o.ap).any():
        out["map_at_k"] = lambda w: weighted_mean(o.ap, w)
    return out


def check_paired(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]]) -> None:
    """`NotPaired` (saying how) unless `a` and `b` hold the same queries: as many evaluations, and in each the
    same targets and patient groups in the same order, and the same k where both files record it."""
    if not a or not b:
        raise NotPaired("no evaluations to compare")
    if len(a) != len(b):
        raise NotPaired(f"{len(a)} evaluations against {len(b)}")
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        where = f" (fold {i + 1})" if len(a) > 1 else ""
        if len(x["target"]) != len(y["target"]):
            raise NotPaired(f"{len(x['target'])} queries against {len(y['target'])}{where}")
        if x.get("k", y.get("k")) != y.get("k", x.get("k")):
            raise NotPaired(f"k = {x['k']} against {y['k']}{where}")
        if list(x["target"]) != list(y["target"]) or list(x["group"]) != list(y["group"]):
            raise NotPaired(f"the queries' labels or patients differ{where}")


def verdict(interval: list[float] | None) -> str:
    """'better' (the paired interval above 0), 'worse' (below) or 'level'; 'n/a' without an interval."""
    if interval is None:
        return "n/a"
    return "better" if interval[0] > 0 else "worse" if interval[1] < 0 else "level"


def _minus(fa: Callable[[np.ndarray], float], fb: Callable[[np.ndarray], float]
           ) -> Callable[[np.ndarray], float]:
    return lambda w: fa(w) - fb(w)


def paired_difference(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], seed: int = 0
                      ) -> dict[str, Any]:
    """A's and B's pooled measures and A − B with its paired 95 % interval, for every measure both can give:
    {"n_queries", "n_patients", "measures": {key: {"a", "b", "difference", "interval", "verdict"}}}.
    `NotPaired` when they do not hold the same queries (`check_paired`)."""
    check_paired(a, b)
    first, second = Outcomes.join(a), Outcomes.join(b)
    boot = Bootstrap.by_group(first.group, seed=seed)
    ones = np.ones(first.target.size)
    stats_a, stats_b = statistics(first), statistics(second)
    measures: dict[str, Any] = {}
    for key in MEASURES:
        if key not in stats_a or key not in stats_b:
            continue
        fa, fb = stats_a[key], stats_b[key]
        interval = boot.interval(_minus(fa, fb))
        measures[key] = {"a": fa(ones), "b": fb(ones), "difference": fa(ones) - fb(ones), "interval": interval,
                         "verdict": verdict(interval)}
    return {"n_queries": int(first.target.size), "n_patients": int(len(set(first.group.tolist()))),
            "measures": measures}
