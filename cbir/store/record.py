"""A collection's record: what it holds and what its numbers mean, typed, versioned and checked on every write.

The record is stored as the collection's metadata (a JSON object). `CollectionRecord` is its typed view: every
field that cbir reads has a type here, and `check` refuses, in one line, a record whose field has another type
(a hand-edited or damaged record) before it is written. Every change goes through `Index.update_meta`, one
read-modify-write under the index's lock, with `revision` counting the writes, so that concurrent writers
(threads of one process; ingest parts on a server) do not lose each other's updates (`cbir.store.base`).

`RECORD_VERSION` 1 adds, to what earlier collections hold: `label_space` (`cbir.labels`), `probability`
(what the payloads' `probability` is: `cbir.models.calibration`), `revision` and `record_version`. Migration
0003 (`cbir migrate`) writes them into older collections; `upgraded` derives them where a collection has not
been migrated yet, so reading an old collection never needs the migration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from cbir.errors import CbirError, IndexError_, ModelMismatchError
from cbir.labels import LabelSpace

T = TypeVar("T")

RECORD_VERSION = 1
#: Fields and their JSON types (None allowed for every one: older collections lack most of them).
FIELDS: dict[str, tuple[type, ...]] = {
    "schema_version": (int,), "record_version": (int,), "revision": (int,),
    "model_fingerprint": (str,), "model_path": (str,), "backbone": (str,), "task": (str,),
    "image_size": (int,), "dim": (int,), "bits": (int,),
    "target": (str,), "negative_label": (str,), "label_space": (dict,), "probability": (dict,),
    "key_fingerprint": (str,), "roots": (dict,), "splits": (dict,), "calibration": (dict,),
    "codes": (str,), "itq": (dict,), "shards": (int,), "replicas": (int,), "team": (str,), "paths": (str,),
    "thumbnails": (dict,), "created": (str,), "point_ids": (str,),
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


#: `point_ids` in a collection's record: point IDs of DICOM images made from the keyed instance key.
KEYED_POINT_IDS = "keyed"
#: `paths` in a collection's record: how its payloads name their image files (see `cbir.store.files`).
PSEUDONYM_PATHS, PLAIN_PATHS = "pseudonym", "plain"


class _Field(Generic[T]):
    """A plain field of the record, read as `T` (None when it is not recorded); named by the attribute."""

    def __init__(self, kind: Callable[[Any], T]) -> None:
        self.kind = kind

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = name

    def __get__(self, record: CollectionRecord, owner: type | None = None) -> T | None:
        value = record.meta.get(self.key)
        return None if value is None else self.kind(value)


@dataclass(frozen=True)
class CollectionRecord:
    """The typed view of a collection's record (`meta`, checked and upgraded). Readers use its properties;
    writers change the stored record only through `Index.update_meta` (with `add_root` and `record_split` below
    for the fields that need a rule). `meta` is the whole record, for the code that copies it (snapshots,
    reindexing)."""

    name: str
    meta: dict[str, Any]

    @classmethod
    def of(cls, meta: dict[str, Any], name: str, model_labels: tuple[str, ...] | list[str] = ()) -> CollectionRecord:
        """The checked view of `meta`; a record older than `RECORD_VERSION` is upgraded as it is read, its label
        space derived with the model's label names (`model_labels`) where it has none."""
        check(meta, name)
        return cls(name, upgraded(meta, model_labels))

    @classmethod
    def new(cls, name: str) -> CollectionRecord:
        """The record of a collection that does not exist yet (nothing recorded)."""
        return cls.of({}, name)

    # --- the model the points were embedded with ---------------------------------------------------
    model_fingerprint = _Field(str)
    model_path = _Field(str)
    backbone = _Field(str)
    task = _Field(str)
    image_size = _Field(int)
    dim = _Field(int)
    bits = _Field(int)

    def check_model(self, fingerprint: str, dim: int, described: str) -> None:
        """Refuse a model (its `fingerprint`, embedding `dim`, and `described` for the message) other than the one
        the collection was built with, naming both."""
        if self.model_fingerprint != fingerprint or self.dim != dim:
            raise ModelMismatchError(
                f"collection {self.name!r} was built with model {self.model_fingerprint} ({self.backbone}, dim "
                f"{self.dim}, at {self.model_path}) but model {fingerprint} ({described}) was given; use the "
                "collection's model or ingest into a new collection")

    # --- what the labels and probabilities mean ----------------------------------------------------
    @property
    def label_space(self) -> LabelSpace:
        return LabelSpace.from_meta(self.meta)

    target = _Field(str)
    negative_label = _Field(str)

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

    # --- the datasets it holds ---------------------------------------------------------------------
    @property
    def roots(self) -> dict[str, list[str]]:
        """Dataset id → the folders its images were ingested from, oldest first (a single string in records
        written before it became a list)."""
        roots = self.meta.get("roots") or {}
        return {str(k): [v] if isinstance(v, str) else list(v) for k, v in roots.items() if v}

    def dataset_roots(self, dataset: str | None = None) -> list[str]:
        """The folders of one dataset's images (of all, when `dataset` is None)."""
        roots = self.roots
        return list(roots.get(str(dataset), [])) if dataset is not None else [r for v in roots.values() for r in v]

    @property
    def splits(self) -> dict[str, dict[str, Any]]:
        """Dataset id → how its images were split (`cbir.data.splits`)."""
        return {str(k): v for k, v in (self.meta.get("splits") or {}).items() if isinstance(v, dict)}

    def split(self, dataset: str) -> dict[str, Any] | None:
        """The split record of `dataset`'s images (None: ingested before splits were recorded, or not held)."""
        return self.splits.get(str(dataset))

    def archive_file(self, dataset: str | None, relpath: str | None) -> Path | None:
        """The archived image of a payload's `dataset` and relative path (`cbir.store.files.LocalFiles`): the first
        recorded root that holds it, never a file outside the roots."""
        if not relpath:
            return None
        for root in self.dataset_roots(dataset):
            base = Path(root).resolve()
            path = (base / relpath).resolve()
            if path.is_relative_to(base) and path.is_file():
                return path
        return None

    # --- how points are stored ---------------------------------------------------------------------
    key_fingerprint = _Field(str)

    def check_key(self, fingerprint: str) -> None:
        """Refuse a pseudonym key other than the one the collection's pseudonyms were made with."""
        if self.key_fingerprint and self.key_fingerprint != fingerprint:
            raise CbirError(
                f"collection {self.name!r} holds pseudonyms made with key {self.key_fingerprint}, but the current key "
                f"is {fingerprint}; set $CBIR_PSEUDONYM_KEY to the shared key")

    @property
    def path_mode(self) -> str:
        """"pseudonym" (payload `file`, the path only in the local file map) or "plain" (payload `path`:
        `--keep-paths`, and every collection made before paths were pseudonymised)."""
        return PSEUDONYM_PATHS if self.meta.get("paths") == PSEUDONYM_PATHS else PLAIN_PATHS

    @property
    def code_source(self) -> str:
        """Where the points' binary codes come from: "model" or "itq" (`cbir.embed.codes`)."""
        return str(self.meta.get("codes") or "model")

    @property
    def itq(self) -> dict[str, Any] | None:
        """The fitted ITQ parameters (None until the first ingest of an ITQ collection has fitted them)."""
        return self.meta.get("itq") or None

    @property
    def thumbnails(self) -> dict[str, Any] | None:
        """How thumbnails are stored in the payloads (None: no thumbnails)."""
        return self.meta.get("thumbnails") or None

    @property
    def keyed_point_ids(self) -> bool:
        """Whether the points' IDs come from their keyed instance keys (`Pseudonymizer.instance`); collections made
        before keep the plain hash of the SOPInstanceUID, so that their points are found again."""
        return self.meta.get("point_ids") == KEYED_POINT_IDS

    team = _Field(str)
    shards = _Field(int)
    replicas = _Field(int)

    @property
    def revision(self) -> int:
        return int(self.meta.get("revision") or 0)


#: Fields of a record that name this machine's folders (the ingest roots, the model's folder): they stay with the
#: index that holds them, never travel in a snapshot (`shareable`).
LOCAL_FIELDS = ("roots", "model_path")


def shareable(meta: dict[str, Any]) -> dict[str, Any]:
    """The record as it may leave this machine (a snapshot): without `LOCAL_FIELDS`; the model stays named by its
    fingerprint, and whoever imports it passes their own copy of that model with --model."""
    return {key: value for key, value in meta.items() if key not in LOCAL_FIELDS}


# --- the writers: rules applied to the stored record inside `Index.update_meta` ------------------------

def add_root(meta: dict[str, Any], dataset: str, root: str) -> bool:
    """Record that `dataset` images were ingested from `root`; returns whether `meta` changed."""
    known = CollectionRecord("", meta).dataset_roots(dataset)
    if root in known:
        return False
    meta["roots"] = {**(meta.get("roots") or {}), dataset: [*known, root]}
    return True
