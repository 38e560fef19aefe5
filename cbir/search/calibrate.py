"""Fit a collection's calibration on its validation images: the vote (`cbir.search.vote`) and how close a query's
nearest case usually is (`nearest`). `cbir.app.calibrate` stores it in the collection metadata under
`calibration`; this module only reads the index.

Every validation point queries the training points (its own patient's left out), as a test query later
queries the archive. Nothing here looks at test points.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import numpy as np

from cbir.search import vote
from cbir.store.base import UNKNOWN_TARGET, Filter, Index

#: A query whose nearest neighbour is less similar than this quantile of the validation queries' nearest
#: neighbours is flagged: the archive holds no close case.
NEAR_QUANTILE = 0.01
MIN_VALIDATION = 20
#: Filter fields that only choose which archived images are searched the way calibration did (it searched the
#: training split): a filter on any other field changes who can be a neighbour, and so what the vote means.
NEUTRAL_FILTER_FIELDS = frozenset({"split"})


def mismatch(body: dict[str, Any] | None, k: int, flt: Filter | None = None, prefilter: int | None = None,
             hamming_radius: int | None = None) -> str | None:
    """Why a query's vote is not calibrated although the collection holds a calibration (`body`): its k, filter
    or Hamming prefilter differ from what the calibration was fitted with; None when they agree (or there is no
    calibration: then the vote says `calibrated: false` anyway)."""
    if not body:
        return None
    conditions = body.get("conditions") or {"k": body.get("k"), "filter": [], "prefilter": None,
                                            "hamming_radius": None}
    why = []
    if conditions.get("k") is not None and int(conditions["k"]) != int(k):
        why.append(f"k = {k} (calibrated at k = {conditions['k']})")
    fields = sorted({*(flt.must if flt else {}), *(flt.must_not if flt else {})} - NEUTRAL_FILTER_FIELDS)
    if fields:
        why.append(f"a filter on {', '.join(fields)} (calibrated without one)")
    if prefilter is not None or hamming_radius is not None:
        why.append("a Hamming prefilter (calibrated without one)")
    return "; ".join(why) or None


def neighbour_table(index: Index, collection: str, queries: list[Any], archive: Filter, k: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, targets), each (Q, k), of `queries` (points) searched in `archive`; short lists are NaN / -1."""
    scores = np.full((len(queries), k), np.nan)
    targets = np.full((len(queries), k), -1, dtype=np.int64)
    for row, point in enumerate(queries):
        pseudonym = point.payload.get("pseudonym")
        flt = Filter(must=dict(archive.must),
                     must_not={**archive.must_not, **({"pseudonym": pseudonym} if pseudonym else {})})
        hits = index.search(collection, point.embedding, k, flt=flt)
        scores[row, :len(hits)] = [float(h.score) for h in hits]
        targets[row, :len(hits)] = [int(h.payload.get("target", 0)) for h in hits]
    return scores, targets


def fit_calibration(index: Index, collection: str, k: int = 10) -> dict[str, Any] | None:
    """The calibration's stored form, fitted now; None with fewer than MIN_VALIDATION validation points."""
    val = [p for p in index.scroll(collection, Filter(must={"split": "val"}), with_vectors=True)
           if p.payload.get("target") in (0, 1)]
    train = Filter(must={"split": "train"}, must_not={"target": UNKNOWN_TARGET})  # unknown labels never vote
    n_train = index.count(collection, train)
    if len(val) < MIN_VALIDATION or n_train == 0:   # the query says so: vote.calibrated is false
        return None
    prior = index.count(collection, Filter(must={"split": "train", "target": 1})) / n_train
    scores, targets = neighbour_table(index, collection, val, train, k)
    y = np.array([int(p.payload["target"]) for p in val])
    fitted = vote.fit(scores, targets, y, prior)
    nearest = scores[:, 0][np.isfinite(scores[:, 0])]
    return {
        "k": k, "vote": fitted.to_dict(),
        "conditions": {"k": k, "filter": [], "prefilter": None, "hamming_radius": None, "archive": "split=train",
                       "prior": prior, "n": len(val), "at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
        "nearest": {"threshold": float(np.quantile(nearest, NEAR_QUANTILE)), "quantile": NEAR_QUANTILE,
                    "median": float(np.median(nearest)), "n": int(nearest.size)},
        "from": "validation images queried against training images"}


def describe(body: dict[str, Any]) -> str:
    """One line for a user: what was fitted, on how many images, and what its numbers mean."""
    temperature = vote.VoteCalibration.from_dict(body.get("vote")).temperature
    weighting = ("the k neighbours count equally" if math.isinf(temperature)
                 else f"neighbours weighted by similarity, temperature {temperature:g}")
    return (f"calibrated the vote on {body['conditions']['n']} validation images ({weighting}); a query whose "
            f"nearest case is less similar than {body['nearest']['threshold']:.3f} is flagged \"no close case\"")
