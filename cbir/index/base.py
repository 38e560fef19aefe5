"""The small interface every index backend implements.

A location string picks the backend (see `cbir.index.open_index`): a filesystem path is Qdrant Edge
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
(`NAME__v1`, `NAME__v2`, …) behind the alias `NAME` (see `cbir.index.versions`); on a server the alias is a
Qdrant alias, on Qdrant Edge an entry of the index's `aliases.json` manifest. A move is atomic in both.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cbir.errors import IndexError_

SCHEMA_VERSION = 2
#: Schema versions this cbir reads and writes; older ones are converted by `cbir migrate` (0002).
READABLE_SCHEMAS = (1, 2)
EMBEDDING = "embedding"
HASH = "hash"
THUMBNAIL = "thumbnail"

#: The reserved collection that holds a server's (or local mode's) migration ledger in its metadata.
LEDGER_COLLECTION = "cbir_ledger"

#: Payload `target` of an image whose label is unknown (plain layout); its `label` is None and `labels` [].
#: Such points are found and shown, but never vote and never enter an evaluation.
UNKNOWN_TARGET = -1

#: Payload fields that get a keyword index (created before the bulk load).
INDEXED_FIELDS = ("labels", "dataset", "split", "view", "sex", "age_band", "pseudonym", "team")

#: Multi-index hashing (schema 2): the code is cut into substrings of about `MIH_WIDTH` bits, stored as the
#: integer payload fields `mih_0`, `mih_1`, … with an integer index. A code within Hamming distance R of the
#: query's has at least one substring within ⌊R/m⌋ of the query's (pigeonhole), so a payload filter on those
#: substring neighbourhoods narrows a radius search to a superset of its answers, which the `hash` vector
#: then checks exactly. Measured on Qdrant Edge (docs/performance.md): at 100k points R=8 takes 3.7 ms
#: instead of 193 ms for the full scan, R=16 (10,068 filter values) 42 ms instead of 212 ms. Above
#: `MIH_MAX_KEYS` filter values the full scan is used.
MIH_WIDTH = 16
MIH_MAX_KEYS = 16384

FilterValue = str | int | bool | Sequence[str]


def has_label(payload: dict[str, Any]) -> bool:
    """Whether a payload's label is known (see `UNKNOWN_TARGET`)."""
    return payload.get("target") != UNKNOWN_TARGET


@dataclass(frozen=True)
class Filter:
    """Payload filter: every `must` condition holds and no `must_not` condition holds.

    A value matches a field exactly; a list matches any of its items. For list-valued payload fields
    (such as `labels`) a condition holds when any element matches.
    """

    must: dict[str, FilterValue] = field(default_factory=dict)
    must_not: dict[str, FilterValue] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.must or self.must_not)


@dataclass(frozen=True)
class Schema:
    """A collection's vector sizes and schema version."""

    dim: int
    bits: int
    version: int = SCHEMA_VERSION


@dataclass
class Point:
    id: str                      # UUID string
    embedding: np.ndarray        # float32 (dim,), L2-normalised
    code: np.ndarray             # uint8 (bits,) of 0/1
    payload: dict[str, Any]


@dataclass
class Hit:
    id: str
    score: float                 # cosine similarity to the query embedding
    payload: dict[str, Any]
    hamming: int | None = None   # Hamming distance of the codes, when the code was compared


class Index(ABC):
    """A set of named collections. Collection metadata is a JSON-able dict stored with the index."""

    location: str

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

    @abstractmethod
    def set_meta(self, name: str, meta: dict[str, Any]) -> None: ...

    @abstractmethod
    def count(self, name: str, flt: Filter | None = None) -> int: ...

    @abstractmethod
    def upsert(self, name: str, points: Sequence[Point]) -> None: ...

    @abstractmethod
    def existing_ids(self, name: str, ids: Sequence[str]) -> set[str]: ...

    @abstractmethod
    def retrieve(self, name: str, ids: Sequence[str], with_vectors: bool = False) -> list[Point]:
        """Points by id (missing ids are left out). Without vectors, embedding/code are empty arrays."""

    @abstractmethod
    def scroll(self, name: str, flt: Filter | None = None, with_vectors: bool = True,
               batch: int = 1024, with_thumbnails: bool = False) -> Iterator[Point]:
        """Every point matching `flt`, in id order; payloads without `thumbnail` unless `with_thumbnails`."""

    @abstractmethod
    def search(self, name: str, embedding: np.ndarray, k: int, flt: Filter | None = None,
               code: np.ndarray | None = None, prefilter: int | None = None,
               hamming_radius: int | None = None) -> list[Hit]:
        """The k nearest points by exact cosine on `embedding`, best first (payloads without `thumbnail`).

        With `code` and `prefilter=N`, only the N points nearest by Hamming distance (after `flt`) are
        candidates; with `hamming_radius=R`, only points within Hamming distance R. Hits then carry
        their Hamming distance.
        """

    # --- aliases: a stable name for a collection that can move atomically -----------------------------

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

    @abstractmethod
    def schema_version(self, name: str) -> int:
        """The schema version a collection was written with (see `READABLE_SCHEMAS`)."""

    @abstractmethod
    def get_ledger(self) -> list[dict[str, Any]]:
        """The migrations applied to this index, oldest first ([] for a new index)."""

    @abstractmethod
    def set_ledger(self, entries: list[dict[str, Any]]) -> None: ...

    def release(self, name: str) -> None:  # noqa: B027 - a no-op unless the backend locks collections
        """Flush and close one collection so that other processes can read it (Qdrant Edge)."""

    def close(self) -> None:  # noqa: B027 - a no-op unless the backend holds resources
        """Release files and connections."""

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pack_code(code: np.ndarray) -> str:
    """0/1 code → hex string (bit 0 is the most significant bit of the first byte)."""
    return np.packbits(np.asarray(code, dtype=np.uint8)).tobytes().hex()


def unpack_code(hexstr: str, bits: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(hexstr), dtype=np.uint8))[:bits]


# --- helpers shared by the backends (they keep the backends congruent) ---------------------------------

#: Points sent to the engine per upsert request.
UPSERT_BATCH = 256


def hamming_to(hexstr: str, code: np.ndarray) -> int:
    """Hamming distance between a payload `hash` hex string and a 0/1 code."""
    return int(np.count_nonzero(unpack_code(hexstr, len(code)) != np.asarray(code, dtype=np.uint8)))


def radius_threshold(radius: int) -> float:
    """Manhattan `score_threshold` that keeps exactly the codes within Hamming distance `radius`.

    Qdrant reports Manhattan scores as positive distances and keeps those strictly below the threshold
    (seen on Edge 0.9 and qdrant-client local mode); distances are integers, so +0.5 is exact whether
    an engine keeps the boundary or not.
    """
    return radius + 0.5


def nearest_by_hamming(query: Callable[[int], list[tuple[str, int]]], n: int) -> list[tuple[str, int]]:
    """The `n` (id, distance) pairs nearest by Hamming distance, ties broken by ascending id.

    `query(limit)` must return up to `limit` pairs in ascending distance from an exact search. Engines
    order equal distances arbitrarily, so the limit grows until every point tied with the n-th is seen.
    """
    limit = 2 * n + 16
    while True:
        found = query(limit)
        if len(found) < limit or found[-1][1] > found[n - 1][1]:
            return sorted(found, key=lambda pair: (pair[1], pair[0]))[:n]
        limit *= 4


def mih_widths(bits: int) -> list[int]:
    """Substring widths for a `bits`-bit code: ⌈bits/16⌉ pieces as equal as possible."""
    m = max(1, -(-bits // MIH_WIDTH))
    return [bits // m + (1 if i < bits % m else 0) for i in range(m)]


def mih_field(i: int) -> str:
    return f"mih_{i}"


def mih_substrings(code: np.ndarray) -> list[int]:
    """The code's substrings as unsigned integers (big-endian bits), one per `mih_widths` piece."""
    return [int(v) for v in mih_matrix(np.asarray(code)[None, :])[0]]


def mih_matrix(codes: np.ndarray) -> np.ndarray:
    """`mih_substrings` of every row of an (n, bits) 0/1 array, as an (n, m) int64 array."""
    codes = np.asarray(codes, dtype=np.int64)
    columns, start = [], 0
    for width in mih_widths(codes.shape[1]):
        columns.append(codes[:, start:start + width] @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64)))
        start += width
    return np.stack(columns, axis=1)


def mih_keys(code: np.ndarray, radius: int) -> list[list[int]] | None:
    """Per substring, every value within ⌊radius/m⌋ bits of the query's; None if that is over `MIH_MAX_KEYS`."""
    from itertools import combinations
    from math import comb

    widths = mih_widths(len(code))
    r = radius // len(widths)
    if sum(sum(comb(w, i) for i in range(r + 1)) for w in widths) > MIH_MAX_KEYS:
        return None
    keys = []
    for value, width in zip(mih_substrings(code), widths, strict=True):
        near = [value]
        for flips in range(1, r + 1):
            near += [value ^ sum(1 << b for b in bits) for bits in combinations(range(width), flips)]
        keys.append(near)
    return keys


def stored_payloads(points: Sequence[Point]) -> list[dict[str, Any]]:
    """The payloads as stored: each point's own fields, the packed code (`hash`) and the MIH substrings."""
    if not points:
        return []
    subs = mih_matrix(np.stack([p.code for p in points])).tolist()
    fields = [mih_field(i) for i in range(len(subs[0]))]
    return [{**p.payload, HASH: pack_code(p.code), **dict(zip(fields, row, strict=True))}
            for p, row in zip(points, subs, strict=True)]


def public_payload(payload: dict[str, Any] | None) -> dict[str, Any]:
    """A stored payload without the MIH substrings (the packed `hash` stays: any client may read it)."""
    return {k: v for k, v in (payload or {}).items() if not k.startswith("mih_")}


def check_vectors(where: str, dim: int, bits: int, embedding: np.ndarray, code: np.ndarray | None) -> None:
    """Raise `IndexError_` unless the embedding (and code, if any) fit the collection."""
    if np.shape(embedding) != (dim,):
        raise IndexError_(f"{where}: embedding has shape {np.shape(embedding)}, expected ({dim},)")
    if code is not None and np.shape(code) != (bits,):
        raise IndexError_(f"{where}: hash code has shape {np.shape(code)}, expected ({bits},)")


def check_point_id(where: str, point_id: str) -> None:
    """Raise `IndexError_` unless the id is a canonical (lower-case, hyphenated) UUID string."""
    try:
        ok = str(uuid.UUID(point_id)) == point_id
    except (ValueError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise IndexError_(f"{where}: point id {point_id!r} is not a canonical UUID string")
