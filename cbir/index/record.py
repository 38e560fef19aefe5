"""A collection's record: what it holds and what its numbers mean, typed, versioned and checked on every write.

The record is stored as the collection's metadata (a JSON object). `CollectionRecord` is its typed view: every
field that cbir reads has a type here, and `check` refuses, in one line, a record whose field has another type
(a hand-edited or damaged record) before it is written. Every change goes through `Index.update_meta`, one
read-modify-write under the index's lock, with `revision` counting the writes, so that concurrent writers
(threads of one process; ingest parts on a server) do not lose each other's updates (`cbir.index.base`).

`RECORD_VERSION` 1 adds, to what earlier collections hold: `label_space` (`cbir.data.labels`), `probability`
(what the payloads' `probability` is: `cbir.models.calibration`), `revision` and `record_version`. Migration
0003 (`cbir migrate`) writes them into older collections; `upgraded` derives them where a collection has not
been migrated yet, so reading an old collection never needs the migration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cbir.data.labels import LabelSpace
from cbir.errors import IndexError_

RECORD_VERSION = 1
#: Fields and their JSON types (None allowed for every one: older collections lack most of them).
FIELDS: dict[str, tuple[type, ...]] = {
    "schema_version": (int,), "record_version": (int,), "revision": (int,),
    "model_fingerprint": (str,), "model_path": (str,), "backbone": (str,), "task": (str,),
    "image_size": (int,), "dim": (int,), "bits": (int,),
    "target": (str,), "negative_label": (str,), "label_space": (dict,), "probability": (dict,),
    "key_fingerprint": (str,), "roots": (dict,), "splits": (dict,), "calibration": (dict,),
    "codes": (str,), "itq": (dict,), "shards": (int,), "replicas": (int,), "team": (str,), "paths": (str,),
    "thumbnails": (dict,), "created": (str,),
}
#: What collections made before `probability` was recorded hold: the model's raw score, read at 0.5.
RAW_PROBABILITY = {"calibrated": False, "operating_point": 0.5}


def check(meta: dict[str, Any], collection: str) -> None:
    """Raise `IndexError_` (one line) when a field of the record has a type other than `FIELDS` says."""
    for key, types in FIELDS.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            raise IndexError_(f"collection {collection!r}: its record's {key!r} is a {type(value).__name__}, not a "
                              f"{' or '.join(t.__name__ for t in types)} (a damaged or hand-edited record); "
                              "restore it from a snapshot or --reindex the collection")
    probability = meta.get("probability") or {}
    if probability and not isinstance(probability.get("operating_point"), int | float):
        raise IndexError_(f"collection {collection!r}: its record's probability has no numeric operating_point")


def upgraded(meta: dict[str, Any], model_labels: tuple[str, ...] | list[str] = ()) -> dict[str, Any]:
    """`meta` with the fields of `RECORD_VERSION` filled in where they are missing (a copy)."""
    out = dict(meta)
    if not out.get("label_space") and out.get("target"):
        out["label_space"] = LabelSpace.from_meta(out, model_labels).to_dict()
    out.setdefault("probability", dict(RAW_PROBABILITY))
    out.setdefault("revision", 0)
    out["record_version"] = RECORD_VERSION
    return out


@dataclass(frozen=True)
class CollectionRecord:
    """The typed view of a collection's record (`meta`, checked and upgraded)."""

    name: str
    meta: dict[str, Any]

    @classmethod
    def of(cls, meta: dict[str, Any], name: str) -> CollectionRecord:
        check(meta, name)
        return cls(name, upgraded(meta))

    @property
    def label_space(self) -> LabelSpace:
        return LabelSpace.from_meta(self.meta)

    @property
    def calibrated_probability(self) -> bool:
        """Whether the payloads' `probability` is the model's calibrated probability (else its raw score)."""
        return bool(self.meta["probability"].get("calibrated"))

    @property
    def operating_point(self) -> float:
        """The probability from which the stored `probability` says "target"."""
        return float(self.meta["probability"]["operating_point"])

    @property
    def vote_calibration(self) -> dict[str, Any] | None:
        """The vote's calibration and the conditions it was fitted under (`cbir.search.calibrate`)."""
        return self.meta.get("calibration") or None

    @property
    def roots(self) -> dict[str, list[str]]:
        roots = self.meta.get("roots") or {}
        return {k: [v] if isinstance(v, str) else list(v) for k, v in roots.items()}

    @property
    def revision(self) -> int:
        return int(self.meta.get("revision") or 0)
