"""Calibrate a collection on its validation images: the vote (`cbir.search.vote`) and how close a query's
nearest case usually is (`nearest`), stored in the collection metadata under `calibration`.

Every validation point queries the training points (its own patient's left out), as a test query later
queries the archive. Nothing here looks at test points.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cbir.console import QUIET, Reporter
from cbir.index.base import UNKNOWN_TARGET, Filter, Index
from cbir.search import vote

#: A query whose nearest neighbour is less similar than this quantile of the validation queries' nearest
#: neighbours is flagged: the archive holds no close case.
NEAR_QUANTILE = 0.01
MIN_VALIDATION = 20


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


def calibrate(index: Index, collection: str, k: int = 10, reporter: Reporter = QUIET,
              store: bool = True) -> dict[str, Any] | None:
    """Fit (and with `store`, store) the calibration; None with fewer than MIN_VALIDATION val points."""
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
    body: dict[str, Any] = {
        "k": k, "vote": fitted.to_dict(),
        "nearest": {"threshold": float(np.quantile(nearest, NEAR_QUANTILE)), "quantile": NEAR_QUANTILE,
                    "median": float(np.median(nearest)), "n": int(nearest.size)},
        "from": "validation images queried against training images"}
    if store:
        meta = index.get_meta(collection)
        meta["calibration"] = body
        index.set_meta(collection, meta)
    reporter.log(f"calibrated the vote on {len(val)} validation images (τ = {fitted.temperature:g}, "
                 f"nearest-case threshold {body['nearest']['threshold']:.3f})")
    return body
