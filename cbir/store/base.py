"""The small interface every index backend implements.

A location string picks the backend (see `cbir.store.open_index`): a filesystem path is Qdrant Edge
on disk, `http(s)://…` a Qdrant server, and `local:PATH` / `:memory:` qdrant-client's local mode.

Each collection stores two named vectors per point:
  `embedding`  cosine, dimension `dim`
  `hash`       the K-bit binary code as 0/1, stored as uint8 (schema 2; float32 in schema 1), Manhattan
               distance, so Qdrant's distance is exactly the Hamming distance
and the packed code as hex in the payload field `hash`.

Thumbnails (`cbir ingest --thumbnails`) are the payload field `thumbnail` (`THUMBNAIL`, a few KB of base64
WebP), so that they travel with their points through every backend, snapshot and copy. Bulk reads leave them
out: `scroll` unless `with_thumbnails=True` (copies ask for them), and `search` always; `retrieve` returns
whole payloads, thumbnails included, for the few points a viewer or montage shows.

Names: every method takes a collection name or an alias. `cbir ingest` makes versioned collections
(`NAME__v1`, `NAME__v2`, …) behind the alias `NAME` (see `cbir.store.versions`); on a server the alias is a
Qdrant alias, on Qdrant Edge an entry of the index's `aliases.json` manifest. A move is atomic in both.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self is Python 3.11's

    from cbir.store.record import CollectionRecord

from cbir.errors import CbirError, IndexError_
from cbir.store.hamming import (  # noqa: F401 - re-exported: the codes' stored forms belong to the schema
    MIH_MAX_KEYS,
    MIH_WIDTH,
    hamming_to,
    mih_field,
    mih_keys,
    mih_matrix,
    mih_substrings,
    mih_widths,
    pack_code,
    pack_codes,
    radius_threshold,
    unpack_code,
)
from cbir.store.planner import Candidates, Costs, Request, Scope, SearchPlanner, check_vectors
from cbir.store.records import (  # noqa: F401 - re-exported
    SCHEMA_VERSION,
    UNKNOWN_TARGET,
    Filter,
    FilterValue,
    Hit,
    Point,
    Schema,
    has_label,
)

#: Schema versions this cbir reads and writes; older ones are converted by `cbir migrate` (0002).
READABLE_SCHEMAS = (1, 2)
EMBEDDING = "embedding"
HASH = "hash"
THUMBNAIL = "thumbnail"

#: The reserved collection that holds a server's (or local mode's) migration ledger in its metadata.
LEDGER_COLLECTION = "cbir_ledger"

#: Payload fields that get a keyword index (created before the bulk load).
INDEXED_FIELDS = ("labels", "dataset", "split", "view", "sex", "age_band", "pseudonym", "team")

#: A point id as `str(uuid.UUID(...))` writes it.
CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

#: Points sent to the engine per upsert request, and ids per retrieve request.
UPSERT_BATCH = 256
RETRIEVE_BATCH = 1024


#: How often `Index.update_meta` re-applies a change when another writer moved the record meanwhile.
META_TRIES = 5


def _meta_mutex(index: object) -> threading.RLock:
    """One re-entrant lock per index object (made on first use; `dict.setdefault` is atomic under the GIL):
    threads of one process update a record one at a time."""
    return vars(index).setdefault("_cbir_meta_mutex", threading.RLock())


class Index(ABC):
    """A set of named collections, and the search primitives the planner (`cbir.store.planner`) composes.

    Collection metadata is a JSON-able dict stored with the index. Subclasses translate the abstract methods
    into one engine's calls; validation, batching of reads and the search itself live here and in the planner.
    """

    location: str
    if TYPE_CHECKING:
        @property
        def costs(self) -> Costs:
            """The planner's constants: a class attribute, or a property (a server's, measured on first use)."""

    # --- collections, metadata, aliases and the migration ledger -------------------------------------

    @abstractmethod
    def list_collections(self) -> list[str]: ...

    @abstractmethod
    def create_collection(self, name: str, dim: int, bits: int, meta: dict[str, Any], shards: int = 1,
                          replicas: int = 1) -> None:
        """Create an empty collection with payload indexes; fails if it exists. `shards` and `replicas` are
        a server's distribution settings (the embedded index is one shard and refuses others)."""

    @abstractmethod
    def has_collection(self, name: str) -> bool:
        """Whether `name` is a collection or an alias of one."""

    @abstractmethod
    def delete_collection(self, name: str, wait: float = 0.0) -> None:
        """Delete a collection (not an alias). `wait` is how many seconds to wait for other processes that
        still read it (Qdrant Edge) before failing."""

    @abstractmethod
    def get_meta(self, name: str) -> dict[str, Any]:
        """The collection's metadata (raises `cbir.errors.IndexError_` for an unknown collection)."""

    def record(self, name: str, model_labels: tuple[str, ...] | list[str] = ()) -> CollectionRecord:
        """The collection's record, typed and checked (`cbir.store.record`): what every reader uses
        (`model_labels`: see `CollectionRecord.of`)."""
        from cbir.store.record import CollectionRecord
        return CollectionRecord.of(self.get_meta(name), name, model_labels)

    @abstractmethod
    def set_meta(self, name: str, meta: dict[str, Any]) -> None:
        """Replace the collection's metadata as it is; cbir changes it only through `update_meta`."""

    def update_meta(self, name: str, change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
        """The one way cbir changes a collection's record (`cbir.store.record`): read it, let `change` edit it
        in place (returning False when it changed nothing), check its types and write it with `revision` + 1,
        under this index's lock. If the stored revision moved while `change` ran (another writer: a server
        has no compare-and-swap on metadata, so this is checked, not locked), `change` is applied again to the
        newer record, up to `META_TRIES` times. Returns the record as written."""
        from cbir.store.record import check
        with _meta_mutex(self):
            for _ in range(META_TRIES):
                meta = self.get_meta(name)
                revision = int(meta.get("revision") or 0)
                if change(meta) is False:
                    return meta
                meta["revision"] = revision + 1
                check(meta, name)
                if int(self.get_meta(name).get("revision") or 0) != revision:
                    continue
                self.set_meta(name, meta)
                return meta
        raise IndexError_(f"collection {name!r}: its record kept changing under {META_TRIES} tries to update it "
                          "(other writers); try again")

    @abstractmethod
    def schema(self, name: str) -> Schema:
        """The vector sizes and schema version of the collection `name` stands for."""

    def schema_version(self, name: str) -> int:
        """The schema version a collection was written with (see `READABLE_SCHEMAS`)."""
        return self.schema(name).version

    @abstractmethod
    def list_aliases(self) -> dict[str, str]:
        """Alias → collection, for every alias of this index."""

    @abstractmethod
    def set_alias(self, alias: str, collection: str) -> None:
        """Point `alias` at `collection` (creating or moving it) in one atomic step."""

    @abstractmethod
    def delete_alias(self, alias: str) -> None: ...

    def resolve(self, name: str) -> str:
        """The collection that `name` (an alias or a collection) stands for."""
        return self.list_aliases().get(name, name)

    def shown_names(self) -> str:
        """The collections by the names users query them with (an alias, not its stored `NAME__vN` version), for
        messages; "none" when there are none."""
        aliases = self.list_aliases()
        behind = set(aliases.values())
        names = sorted({*aliases, *(c for c in self.list_collections() if c not in behind)})
        return ", ".join(names) or "none"

    def pin(self, name: str) -> str:
        """The name every step of one search uses (an engine that resolves aliases itself returns `name`)."""
        return self.resolve(name)

    @abstractmethod
    def get_ledger(self) -> list[dict[str, Any]]:
        """The migrations applied to this index, oldest first ([] for a new index)."""

    @abstractmethod
    def set_ledger(self, entries: list[dict[str, Any]]) -> None: ...

    # --- points ------------------------------------------------------------------------------------

    @abstractmethod
    def count(self, name: str, flt: Filter | Scope | None = None) -> int: ...

    def upsert(self, name: str, points: Sequence[Point]) -> None:
        """Write points; nothing is written if one of them is bad (a wrong id or vector size)."""
        self._check_writable()
        schema = self.schema(name)
        where = self._where(name)
        for point in points:
            check_point_id(where, point.id)
            check_vectors(f"{where}: point {point.id}", schema.dim, schema.bits, point.embedding, point.code)
        self._write(name, points)

    @abstractmethod
    def _write(self, name: str, points: Sequence[Point]) -> None:
        """Store checked points with `stored_payloads`."""

    def existing_ids(self, name: str, ids: Sequence[str]) -> set[str]:
        return {p.id for p in self._retrieve(name, ids, with_payload=False, with_vectors=False)}

    def retrieve(self, name: str, ids: Sequence[str], with_vectors: bool = False) -> list[Point]:
        """Points by id, in the order asked (missing ids are left out). Without vectors, embedding/code are
        empty arrays."""
        by_id = {p.id: p for p in self._retrieve(name, ids, with_payload=True, with_vectors=with_vectors)}
        return [by_id[i] for i in dict.fromkeys(ids) if i in by_id]

    def _retrieve(self, name: str, ids: Sequence[str], with_payload: bool, with_vectors: bool) -> list[Point]:
        self.schema(name)  # an unknown collection fails here
        for point_id in ids:
            check_point_id(self._where(name), point_id)
        out: list[Point] = []
        for start in range(0, len(ids), RETRIEVE_BATCH):
            out += self._fetch(name, list(ids[start:start + RETRIEVE_BATCH]), with_payload, with_vectors)
        return out

    @abstractmethod
    def _fetch(self, name: str, ids: list[str], with_payload: bool, with_vectors: bool) -> list[Point]:
        """One request for the points with these (checked) ids."""

    @abstractmethod
    def scroll(self, name: str, flt: Filter | None = None, with_vectors: bool = True,
               batch: int = 1024, with_thumbnails: bool = False) -> Iterator[Point]:
        """Every point matching `flt`, in id order; payloads without `thumbnail` unless `with_thumbnails`."""

    # --- search ------------------------------------------------------------------------------------

    @abstractmethod
    def nearest_by_vector(self, name: str, embedding: np.ndarray, limit: int, scope: Scope) -> list[Hit]:
        """Up to `limit` hits in `scope` by exact cosine, best first (payloads without `thumbnail`)."""

    @abstractmethod
    def nearest_by_code(self, name: str, code: np.ndarray, limit: int, scope: Scope) -> Candidates:
        """Up to `limit` points in `scope` by exact Hamming distance, nearest first."""

    def search(self, name: str, embedding: np.ndarray, k: int, flt: Filter | None = None,
               code: np.ndarray | None = None, prefilter: int | None = None,
               hamming_radius: int | None = None, plan: str | None = None) -> list[Hit]:
        """The k nearest points by exact cosine on `embedding`, best first, equal scores by id (payloads
        without `thumbnail`).

        With `code` and `prefilter=N`, only the N points nearest by Hamming distance (after `flt`, ties by id)
        are candidates; with `hamming_radius=R`, only points within Hamming distance R. Hits then carry
        their Hamming distance. `plan` forces one of `cbir.store.planner.PLANS` (tests).
        """
        request = Request(embedding, k, flt, code, prefilter, hamming_radius)
        return SearchPlanner(self, plan).search(name, request)

    # --- life cycle --------------------------------------------------------------------------------

    def release(self, name: str) -> None:  # noqa: B027 - a no-op unless the backend locks collections
        """Flush and close one collection so that other processes can read it (Qdrant Edge)."""

    def close(self) -> None:  # noqa: B027 - a no-op unless the backend holds resources
        """Release files and connections."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _where(self, name: str | None) -> str:
        return self.location if name is None else f"{self.location}: collection {name!r}"

    def _check_writable(self) -> None:
        if getattr(self, "_closed", False):
            raise IndexError_(f"{self.location}: the index has been closed")
        if not getattr(self, "writable", False):
            raise IndexError_(f"{self.location}: the index was opened read-only")

    @contextmanager
    def _errors(self, name: str | None, action: str) -> Iterator[None]:
        """Turn an engine exception into a one-line `IndexError_` naming the collection and the action."""
        try:
            yield
        except CbirError:
            raise
        except Exception as exc:
            raise IndexError_(f"{self._where(name)}: {action} failed: {self._detail(exc)}") from exc

    def _detail(self, exc: Exception) -> str:
        return first_line(exc)


# --- helpers shared by the backends (they keep the backends congruent) ---------------------------------

def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def as_scope(flt: Filter | Scope | None) -> Scope:
    return flt if isinstance(flt, Scope) else Scope(flt=flt or None)


def stored_payloads(points: Sequence[Point]) -> list[dict[str, Any]]:
    """The payloads as stored: each point's own fields, the packed code (`hash`) and the MIH substrings."""
    if not points:
        return []
    codes = np.stack([p.code for p in points])
    subs = mih_matrix(codes).tolist()
    fields = [mih_field(i) for i in range(len(subs[0]))]
    return [{**p.payload, HASH: packed, **dict(zip(fields, row, strict=True))}
            for p, packed, row in zip(points, pack_codes(codes), subs, strict=True)]


def public_payload(payload: dict[str, Any] | None) -> dict[str, Any]:
    """A stored payload without the MIH substrings (the packed `hash` stays: any client may read it)."""
    return {k: v for k, v in (payload or {}).items() if not k.startswith("mih_")}


def to_point(point_id: Any, vectors: Any, payload: dict[str, Any] | None, with_vectors: bool) -> Point:
    """A `Point` from an engine record's id, named vectors and stored payload."""
    if with_vectors and isinstance(vectors, dict) and vectors:
        embedding = np.asarray(vectors[EMBEDDING], dtype=np.float32)
        code = np.rint(vectors[HASH]).astype(np.uint8)
    else:
        embedding, code = np.empty(0, np.float32), np.empty(0, np.uint8)
    return Point(str(point_id), embedding, code, public_payload(payload))


def to_hit(point_id: Any, score: float, payload: dict[str, Any] | None, code: np.ndarray | None) -> Hit:
    """A `Hit` from an engine's scored point; with `code`, its Hamming distance from the payload's `hash`."""
    body = public_payload(payload)
    hamming = hamming_to(body[HASH], code) if code is not None and HASH in body else None
    return Hit(str(point_id), float(score), body, hamming)


def code_pairs(point_ids: Sequence[Any], scores: Sequence[float]) -> Candidates:
    """Candidates from an engine's Hamming query (Manhattan scores over 0/1 vectors are the distances)."""
    return Candidates([str(i) for i in point_ids], np.rint(np.asarray(scores, dtype=np.float64)).astype(np.int64))


def vector_lists(point: Point) -> dict[str, list[float]]:
    """A point's named vectors as Python lists (qdrant-client; Qdrant Edge takes memoryviews, `edge_convert`)."""
    return {EMBEDDING: np.asarray(point.embedding, dtype=np.float32).tolist(),
            HASH: np.asarray(point.code, dtype=np.float32).tolist()}


def check_point_id(where: str, point_id: str) -> None:
    """Raise `IndexError_` unless the id is a canonical (lower-case, hyphenated) UUID string, i.e. one that
    `str(uuid.UUID(point_id))` gives back unchanged (a regex: 0.4 instead of 3 µs per point on ingest)."""
    if not (isinstance(point_id, str) and CANONICAL_UUID.fullmatch(point_id)):
        raise IndexError_(f"{where}: point id {point_id!r} is not a canonical UUID string")
