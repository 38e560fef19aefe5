"""Qdrant Edge backend: the index is a directory, each collection one embedded `EdgeShard`.

Layout::

    <location>/.lock                          flock: exclusive for a writer, shared for readers
    <location>/collections/<name>/shard/      the EdgeShard (WAL off, see below)
    <location>/collections/<name>/meta.json   {"schema_version", "dim", "bits", "meta"}, written last and
                                              atomically, so a collection exists once it is complete

Search is always exact (`SearchParams(exact=True)`), so results equal a brute-force scan. Hamming
prefiltering: `prefilter=N` asks for the Hamming-nearest ids first (ties broken by id, see
`base.nearest_by_hamming`) and then ranks those by cosine under a `HasIdCondition`; `hamming_radius`
alone is one query whose `Prefetch` on the `hash` vector has a distance threshold.

Qdrant Edge 0.9.0 quirks handled here:

* Loading a shard rewrites some of its files, even when the load then fails; a process that has the
  shard open for writing then fails on its next flush ("tracker journal ... is shorter than expected").
  So readers take a shared lock too: an index is read by any number of processes or written by one.
* With the WAL on, a second load of a shard fails (`WouldBlock`) even for readers, so the WAL is off:
  an update is durable once `flush()` returns. A flush costs tens of milliseconds, so `upsert` flushes
  once `FLUSH_POINTS` points or `FLUSH_SECONDS` have gone by since the last flush, and `close()` always
  does: a killed writer loses at most those last points (re-running the ingest restores them).
* `MatchValue(True)` is converted to the integer 1; bool filter values are passed as `numpy.bool_`.
* Ids come back as `uuid.UUID` objects; Manhattan scores are positive distances and `score_threshold`
  keeps the ones strictly below it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from cbir.errors import CbirError, IndexError_
from cbir.index.base import (
    EMBEDDING,
    HASH,
    INDEXED_FIELDS,
    SCHEMA_VERSION,
    UPSERT_BATCH,
    Filter,
    Hit,
    Index,
    Point,
    Schema,
    check_point_id,
    check_vectors,
    hamming_to,
    nearest_by_hamming,
    pack_code,
    radius_threshold,
)

META_FILE = "meta.json"
FLUSH_POINTS = 4096
FLUSH_SECONDS = 5.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_EXACT = qe.SearchParams(exact=True)
_SHARE_HINT = "use a Qdrant server to share an index"


class EdgeIndex(Index):
    """Collections as Qdrant Edge shards under one directory; shards are opened lazily and cached."""

    def __init__(self, path: str | os.PathLike[str], writable: bool = False, create: bool = False) -> None:
        if create and not writable:
            raise ValueError("create=True needs writable=True")
        self.location = str(path)
        self.writable = writable
        self._root = Path(path)
        self._collections = self._root / "collections"
        self._shards: dict[str, qe.EdgeShard] = {}
        self._schemas: dict[str, Schema] = {}
        self._unflushed: dict[str, tuple[int, float]] = {}  # points upserted since, time of, the last flush
        self._lock_fd: int | None = None
        self._closed = False
        self._prepare(create)
        self._lock()

    # --- opening and closing -----------------------------------------------------------------------

    def _prepare(self, create: bool) -> None:
        if self._collections.is_dir():
            return
        if not create:
            raise IndexError_(f"{self.location}: no index here (run `cbir ingest` first)")
        if self._root.exists() and not self._root.is_dir():
            raise IndexError_(f"{self.location}: not a directory, cannot create an index here")
        self._collections.mkdir(parents=True, exist_ok=True)

    def _lock(self) -> None:
        """Exclusive flock for a writer, shared for a reader (see the module docstring for why)."""
        flags = (os.O_RDWR if self.writable else os.O_RDONLY) | os.O_CREAT
        try:
            fd = os.open(self._root / ".lock", flags, 0o644)
        except OSError as exc:
            if self.writable:
                raise IndexError_(f"{self.location}: cannot open the lock file: {exc.strerror}") from exc
            return  # read-only media: nobody can be writing there either
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if self.writable else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if self.writable:
                raise IndexError_(f"{self.location}: the index is in use by another process "
                                  f"(Qdrant Edge allows one writer and no readers meanwhile); {_SHARE_HINT}"
                                  ) from None
            raise IndexError_(f"{self.location}: the index is being written by another process; "
                              f"try again when it has finished, or {_SHARE_HINT}") from None
        self._lock_fd = fd

    def close(self) -> None:
        """Flush (writer) and close every open shard, then release the lock. Safe to call twice."""
        try:
            for name in list(self._shards):
                self._close_shard(name)
        finally:
            self._closed = True
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

    def _close_shard(self, name: str) -> None:
        shard = self._shards.pop(name)
        self._unflushed.pop(name, None)
        with self._errors(name, "closing the shard"):
            if self.writable:
                shard.flush()
            shard.close()

    # --- collections -------------------------------------------------------------------------------

    def list_collections(self) -> list[str]:
        return sorted(p.name for p in self._collections.iterdir() if (p / META_FILE).is_file())

    def has_collection(self, name: str) -> bool:
        return bool(_NAME.fullmatch(name)) and (self._collections / name / META_FILE).is_file()

    def create_collection(self, name: str, dim: int, bits: int, meta: dict[str, Any], shards: int = 1,
                          replicas: int = 1) -> None:
        self._check_writable()
        if shards != 1 or replicas != 1:
            raise IndexError_(f"{self.location}: the embedded index is one shard on one machine; --shards and "
                              "--replicas need a Qdrant server (--index http://host:6333)")
        if not _NAME.fullmatch(name):
            raise IndexError_(f"{self.location}: invalid collection name {name!r} "
                              "(letters, digits, '_', '-', '.'; at most 128 characters)")
        if self.has_collection(name):
            raise IndexError_(f"{self._where(name)}: the collection already exists")
        record = {"schema_version": SCHEMA_VERSION, "dim": int(dim), "bits": int(bits), "meta": meta}
        text = json.dumps(record, indent=2)  # fail on a non-JSON meta before anything is written
        folder = self._collections / name
        shutil.rmtree(folder, ignore_errors=True)  # what an interrupted create left behind
        with self._errors(name, "creating the shard"):
            shard = qe.EdgeShard.create(str(folder / "shard"), _config(dim, bits))
            for field_name in INDEXED_FIELDS:
                shard.update(qe.UpdateOperation.create_field_index(field_name, qe.PayloadSchemaType.Keyword))
            shard.flush()
        self._shards[name] = shard
        _write_atomic(folder / META_FILE, text)
        self._schemas[name] = Schema(int(dim), int(bits))

    def delete_collection(self, name: str) -> None:
        self._check_writable()
        self._require(name)
        if name in self._shards:
            self._close_shard(name)
        self._schemas.pop(name, None)
        folder = self._collections / name
        (folder / META_FILE).unlink()
        shutil.rmtree(folder)

    def get_meta(self, name: str) -> dict[str, Any]:
        return self._read_record(name)["meta"]

    def get_ledger(self) -> list[dict[str, Any]]:
        path = self._root / LEDGER_FILE
        if not path.is_file():
            return []
        try:
            return list(json.loads(path.read_text())["applied"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise IndexError_(f"{path}: unreadable migration ledger ({exc})") from None

    def set_ledger(self, entries: list[dict[str, Any]]) -> None:
        self._check_writable()
        _write_atomic(self._root / LEDGER_FILE, json.dumps({"applied": entries}, indent=2))

    def set_meta(self, name: str, meta: dict[str, Any]) -> None:
        self._check_writable()
        record = self._read_record(name)
        record["meta"] = meta
        _write_atomic(self._collections / name / META_FILE, json.dumps(record, indent=2))

    # --- points ------------------------------------------------------------------------------------

    def count(self, name: str, flt: Filter | None = None) -> int:
        shard = self._shard(name)
        with self._errors(name, "count"):
            return shard.count(qe.CountRequest(exact=True, filter=_filter(flt)))

    def upsert(self, name: str, points: Sequence[Point]) -> None:
        """Write points in batches of `UPSERT_BATCH`; nothing is written if one is bad. Flushes now and
        then (see the module docstring) and always on `close()`."""
        self._check_writable()
        schema = self._schema(name)
        for point in points:
            check_point_id(self._where(name), point.id)
            check_vectors(f"{self._where(name)}: point {point.id}", schema.dim, schema.bits,
                          point.embedding, point.code)
        shard = self._shard(name)
        with self._errors(name, "upsert"):
            for start in range(0, len(points), UPSERT_BATCH):
                batch = [_edge_point(p) for p in points[start:start + UPSERT_BATCH]]
                shard.update(qe.UpdateOperation.upsert_points(batch))
            pending, since = self._unflushed.get(name, (0, time.monotonic()))
            pending += len(points)
            if pending >= FLUSH_POINTS or time.monotonic() - since >= FLUSH_SECONDS:
                shard.flush()
                pending, since = 0, time.monotonic()
            self._unflushed[name] = (pending, since)

    def existing_ids(self, name: str, ids: Sequence[str]) -> set[str]:
        return {str(rec.id) for rec in self._retrieve(name, ids, with_payload=False, with_vectors=False)}

    def retrieve(self, name: str, ids: Sequence[str], with_vectors: bool = False) -> list[Point]:
        records = self._retrieve(name, ids, with_payload=True, with_vectors=with_vectors)
        by_id = {str(rec.id): _to_point(rec, with_vectors) for rec in records}
        return [by_id[i] for i in dict.fromkeys(ids) if i in by_id]

    def _retrieve(self, name: str, ids: Sequence[str], with_payload: bool,
                  with_vectors: bool) -> list[qe.Record]:
        shard = self._shard(name)
        for point_id in ids:
            check_point_id(self._where(name), point_id)
        out: list[qe.Record] = []
        with self._errors(name, "retrieve"):
            for start in range(0, len(ids), 1024):
                out += shard.retrieve(list(ids[start:start + 1024]), with_payload=with_payload,
                                      with_vector=with_vectors)
        return out

    def scroll(self, name: str, flt: Filter | None = None, with_vectors: bool = True,
               batch: int = 1024) -> Iterator[Point]:
        """Every point matching `flt`, in id order."""
        shard = self._shard(name)
        offset: Any = None
        while True:
            request = qe.ScrollRequest(offset=offset, limit=batch, filter=_filter(flt), with_payload=True,
                                       with_vector=with_vectors)
            with self._errors(name, "scroll"):
                records, offset = shard.scroll(request)
            yield from (_to_point(rec, with_vectors) for rec in records)
            if offset is None:
                return

    def search(self, name: str, embedding: np.ndarray, k: int, flt: Filter | None = None,
               code: np.ndarray | None = None, prefilter: int | None = None,
               hamming_radius: int | None = None) -> list[Hit]:
        if code is None and (prefilter is not None or hamming_radius is not None):
            raise ValueError("prefilter and hamming_radius need the query's hash code")
        schema = self._schema(name)
        check_vectors(f"{self._where(name)}: query", schema.dim, schema.bits, embedding, code)
        if k <= 0 or (prefilter is not None and prefilter <= 0) or (hamming_radius or 0) < 0:
            return []
        request = self._search_request(name, embedding, k, flt, code, prefilter, hamming_radius)
        if request is None:
            return []
        with self._errors(name, "search"):
            scored = self._shard(name).query(request)
        return [_to_hit(p, code) for p in scored]

    def _search_request(self, name: str, embedding: np.ndarray, k: int, flt: Filter | None,
                        code: np.ndarray | None, prefilter: int | None,
                        radius: int | None) -> qe.QueryRequest | None:
        """Exact cosine query, over the Hamming candidates when asked; None when there are none."""
        condition, prefetches = _filter(flt), None
        if prefilter is not None:
            candidates = nearest_by_hamming(lambda limit: self._hash_query(name, code, flt, limit, radius),
                                            prefilter)
            if not candidates:
                return None
            condition = qe.Filter(must=[qe.HasIdCondition({point_id for point_id, _ in candidates})])
        elif radius is not None:
            population = self.count(name, flt)
            if population == 0:
                return None
            prefetches = [qe.Prefetch(limit=population, query=_hash_nearest(code), filter=condition,
                                      score_threshold=radius_threshold(radius), params=_EXACT)]
            condition = None
        query = qe.Query.Nearest(np.asarray(embedding, dtype=np.float32), using=EMBEDDING)
        return qe.QueryRequest(limit=k, query=query, prefetches=prefetches, filter=condition,
                               with_payload=True, params=_EXACT)

    def _hash_query(self, name: str, code: np.ndarray, flt: Filter | None, limit: int,
                    radius: int | None) -> list[tuple[str, int]]:
        """(id, Hamming distance) of the `limit` nearest codes, nearest first."""
        threshold = None if radius is None else radius_threshold(radius)
        request = qe.QueryRequest(limit=limit, query=_hash_nearest(code), filter=_filter(flt),
                                  score_threshold=threshold, with_payload=False, params=_EXACT)
        with self._errors(name, "Hamming search"):
            scored = self._shard(name).query(request)
        return [(str(p.id), int(round(p.score))) for p in scored]

    # --- internals ---------------------------------------------------------------------------------

    def _where(self, name: str) -> str:
        return f"{self.location}: collection {name!r}"

    def _check_writable(self) -> None:
        if self._closed:
            raise IndexError_(f"{self.location}: the index has been closed")
        if not self.writable:
            raise IndexError_(f"{self.location}: the index was opened read-only")

    def _require(self, name: str) -> None:
        if not self.has_collection(name):
            known = ", ".join(self.list_collections()) or "none"
            raise IndexError_(f"{self.location}: no collection {name!r} (collections: {known})")

    def _read_record(self, name: str) -> dict[str, Any]:
        self._require(name)
        path = self._collections / name / META_FILE
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise IndexError_(f"{path}: unreadable collection metadata ({exc})") from exc
        if record.get("schema_version") != SCHEMA_VERSION:
            raise IndexError_(f"{path}: schema version {record.get('schema_version')!r}, this cbir "
                              f"reads version {SCHEMA_VERSION}")
        return record

    def _schema(self, name: str) -> Schema:
        if name not in self._schemas:
            record = self._read_record(name)
            self._schemas[name] = Schema(int(record["dim"]), int(record["bits"]))
        return self._schemas[name]

    def _shard(self, name: str) -> qe.EdgeShard:
        if self._closed:
            raise IndexError_(f"{self.location}: the index has been closed")
        if name not in self._shards:
            self._require(name)
            with self._errors(name, "opening the shard"):
                self._shards[name] = qe.EdgeShard.load(str(self._collections / name / "shard"))
        return self._shards[name]

    @contextmanager
    def _errors(self, name: str, action: str) -> Iterator[None]:
        """Turn an Edge exception (a bare `Exception`) into a one-line `IndexError_`."""
        try:
            yield
        except CbirError:
            raise
        except Exception as exc:
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise IndexError_(f"{self._where(name)}: {action} failed: {detail}") from exc


LEDGER_FILE = "ledger.json"


def _config(dim: int, bits: int) -> qe.EdgeConfig:
    """Cosine `embedding`; Manhattan `hash` without an HNSW graph (m=0): it is only scanned exactly."""
    no_graph = qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000)
    return qe.EdgeConfig(
        vectors={
            EMBEDDING: qe.EdgeVectorParams(size=int(dim), distance=qe.Distance.Cosine),
            HASH: qe.EdgeVectorParams(size=int(bits), distance=qe.Distance.Manhattan, hnsw_config=no_graph),
        },
        wal_enabled=False,
    )


def _match(value: Any) -> qe.MatchValue | qe.MatchAny:
    if isinstance(value, (list, tuple, set, frozenset)):
        return qe.MatchAny(list(value))
    if isinstance(value, bool):
        return qe.MatchValue(np.bool_(value))  # a Python bool would become the integer 0/1
    return qe.MatchValue(value)


def _filter(flt: Filter | None) -> qe.Filter | None:
    if not flt:
        return None
    must = [qe.FieldCondition(key, match=_match(v)) for key, v in flt.must.items()]
    must_not = [qe.FieldCondition(key, match=_match(v)) for key, v in flt.must_not.items()]
    return qe.Filter(must=must or None, must_not=must_not or None)


def _hash_nearest(code: np.ndarray) -> qe.Query:
    return qe.Query.Nearest(np.asarray(code, dtype=np.float32), using=HASH)


def _edge_point(point: Point) -> qe.Point:
    vectors = {EMBEDDING: np.asarray(point.embedding, dtype=np.float32),
               HASH: np.asarray(point.code, dtype=np.float32)}
    return qe.Point(point.id, vectors, {**point.payload, HASH: pack_code(point.code)})


def _to_point(record: qe.Record, with_vectors: bool) -> Point:
    if with_vectors and record.vector:
        embedding = np.asarray(record.vector[EMBEDDING], dtype=np.float32)
        code = np.rint(record.vector[HASH]).astype(np.uint8)
    else:
        embedding, code = np.empty(0, np.float32), np.empty(0, np.uint8)
    return Point(str(record.id), embedding, code, dict(record.payload or {}))


def _to_hit(point: qe.ScoredPoint, code: np.ndarray | None) -> Hit:
    payload = dict(point.payload or {})
    hamming = hamming_to(payload[HASH], code) if code is not None and HASH in payload else None
    return Hit(str(point.id), float(point.score), payload, hamming)


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and `os.replace`, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
