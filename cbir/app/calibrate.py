"""The calibrate use-case: fit a collection's calibration on its validation images and store it with the
collection, so that every query and evaluation reads the same vote. Every ingest ends with it
(`cbir.app.ingest.ingest_records`), and `cbir index calibrate` runs it alone, e.g. at another k."""

from __future__ import annotations

from typing import Any

from cbir.console import QUIET, Reporter
from cbir.search.calibrate import describe, fit_calibration
from cbir.store.base import Index


def calibrate(index: Index, collection: str, k: int = 10, reporter: Reporter = QUIET) -> dict[str, Any] | None:
    """Fit and store the calibration; None (nothing stored) with fewer than `MIN_VALIDATION` validation images."""
    body = fit_calibration(index, collection, k)
    if body is None:   # the query says so (`vote.calibrated: false`); `cbir index calibrate` explains why
        return None
    index.update_meta(collection, lambda meta: meta.update(calibration=body))
    reporter.log(describe(body))
    return body
