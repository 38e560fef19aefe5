"""Give each collection the typed record of `cbir.store.record` (RECORD_VERSION 1).

Collections made before it get `label_space` (from their target and negative label), `probability` (the raw
score at 0.5: they were ingested before the model's probability was calibrated), `revision` and
`record_version`; a vote calibration gets the conditions it was fitted under (its k, no filter, no prefilter).
Points, vectors and payloads are not touched, so every query answers the same neighbours.
"""

from __future__ import annotations

from typing import Any

from cbir.store.record import RECORD_VERSION, upgraded


def _upgrade(meta: dict[str, Any]) -> bool:
    if meta.get("record_version") == RECORD_VERSION:
        return False
    calibration = meta.get("calibration")
    if calibration and "conditions" not in calibration:
        calibration["conditions"] = {"k": calibration.get("k"), "filter": [], "prefilter": None,
                                     "hamming_radius": None, "archive": "split=train"}
    meta.update(upgraded(meta))
    return True


def up(ctx) -> None:
    for name in ctx.collections():
        if ctx.index.get_meta(name).get("record_version") != RECORD_VERSION:
            ctx.index.update_meta(name, _upgrade)
            ctx.reporter.log(f"  {name}: typed record (version {RECORD_VERSION})")
