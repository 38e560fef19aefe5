"""Qdrant Edge backend: the index is a directory, each collection one embedded `EdgeShard`.

Layout::

    <location>/aliases.json                   {"aliases": {alias: collection}, "retired": [...]}, the manifest
    <location>/ledger.json                    applied migrations (see `cbir.index.migrate`)
    <location>/.manifest.lock                 flock held while aliases.json or ledger.json is rewritten
    <location>/collections/<name>/.lock       flock: exclusive while a process writes the collection, shared
                                              while a process reads it
    <location>/collections/<name>/shard/      the EdgeShard (WAL off, see below)
    <location>/collections/<name>/meta.json   {"schema_version", "dim", "bits", "meta"}, written last and
                                              atomically, so a collection exists once it is complete

Locks are per collection, so one process can build `rsna__v2` while others query `rsna__v1` through the
alias `rsna`; moving the alias is one atomic rewrite of `aliases.json`, which readers re-read (when it
changed) before every operation, closing the shard the alias left so that its lock is released.

Search is always exact (`SearchParams(exact=True)`), so results equal a brute-force scan. Hamming
prefiltering: `prefilter=N` asks for the Hamming-nearest ids first (ties broken by id, see
`base.nearest_by_hamming`) and then ranks those by cosine under a `HasIdCondition`; `hamming_radius`
alone is one query whose `Prefetch` on the `hash` vector has a distance threshold.

Qdrant Edge 0.9.0 quirks handled here:

* Loading a shard rewrites some of its files, even when the load then fails; a process that has the
  shard open for writing then fails on its next flush ("tracker journal ... is shorter than expected").
  So readers take a shared lock on the collection: it is read by any number of processes or written by
  one, and a process that starts writing a collection it was reading reloads the shard.
* With the WAL on, a second load of a shard fails (`WouldBlock`) even for readers, so the WAL is off:
  an update is durable once `flush()` returns. A flush costs tens of milliseconds, so `upsert` flushes
  once `FLUSH_POINTS` points or `FLUSH_SECONDS` have gone by since the last flush, and `close()` always
  does: a killed writer loses at most those last points (re-running the ingest restores them).
* `MatchValue(True)` is converted to the integer 1; bool filter values are passed as `numpy.bool_`.
* Ids come back as `uuid.UUID` objects; Manhattan scores are positive distances and `score_threshold`
  keeps the ones strictly below it.

One `EdgeIndex` may be shared by threads: every engine call runs under one mutex.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tarfile
import threading
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
    READABLE_SCHEMAS,
    SCHEMA_VERSION,
    THUMBNAIL,
    UPSERT_BATCH,
    Filter,
    Hit,
    Index,
    Point,
    Schema,
    check_point_id,
    check_vectors,
    hamming_to,
    mih_field,
    mih_keys,
    mih_widths,
    nearest_by_hamming,
    public_payload,
    radius_threshold,
    stored_payloads,
)

META_FILE = "meta.json"
ALIASES_FILE = "aliases.json"
LEDGER_FILE = "ledger.json"
FLUSH_POINTS = int(os.environ.get("CBIR_EDGE_FLUSH_POINTS", "4096"))  # at most this many points lost to a kill
FLUSH_SECONDS = float(os.environ.get("CBIR_EDGE_FLUSH_SECONDS", "5"))
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_EXACT = qe.SearchParams(exact=True)
_NO_THUMBNAIL = qe.PayloadSelector.Exclude([THUMBNAIL])
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
        self._locks: dict[str, tuple[int | None, bool]] = {}   # collection → (lock fd, exclusive)
        self._schemas: dict[str, Schema] = {}
        self._unflushed: dict[str, tuple[int, float]] = {}  # points upserted since, time of, the last flush
        self._aliases: dict[str, str] = {}
        self._aliases_stamp: tuple[int, int, int] | None = None
        self._mutex = threading.RLock()
        self._closed = False
        self._prepare(create)

    # --- opening and closing -----------------------------------------------------------------------

    def _prepare(self, create: bool) -> None:
        if self._collections.is_dir():
            return
        if not create:
            raise IndexError_(f"{self.location}: no index here (run `cbir ingest` first)")
        if self._root.exists() and not self._root.is_dir():
            raise IndexError_(f"{self.location}: not a directory, cannot create an index here")
        self._collections.mkdir(parents=True, exist_ok=True)

    def _acquire(self, name: str, exclusive: bool) -> None:
        """Take the collection's flock (exclusive to write, shared to read), without waiting."""
        held = self._locks.get(name)
        if held is not None and (held[1] or not exclusive):
            return
        if held is not None:  # shared → exclusive: release and retake, then reload (see the module docstring)
            self._close_shard(name)
            fd = held[0]
        else:
            try:
                fd = os.open(self._collections / name / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                if exclusive:
                    raise IndexError_(f"{self._where(name)}: cannot open the lock file: {exc.strerror}") from exc
                self._locks[name] = (None, False)  # read-only media: nobody can be writing there either
                return
        if fd is None:
            raise IndexError_(f"{self._where(name)}: the index is on read-only storage")
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            if held is not None and _relock_shared(fd):
                raise IndexError_(self._in_use_message(name, exclusive)) from None
            os.close(fd)
            self._locks.pop(name, None)
            raise IndexError_(self._in_use_message(name, exclusive)) from None
        self._locks[name] = (fd, exclusive)

    def _in_use_message(self, name: str, exclusive: bool) -> str:
        if exclusive:
            return (f"{self._where(name)}: the collection is in use by another process (Qdrant Edge allows one "
                    f"writer and no readers meanwhile); {_SHARE_HINT}")
        return (f"{self._where(name)}: the collection is being written by another process; try again when it "
                f"has finished, or {_SHARE_HINT}")

    def release(self, name: str) -> None:
        """Flush and close the collection and drop its lock, so that other processes can read it."""
        with self._mutex:
            self._release(self.resolve(name))

    def _release(self, name: str) -> None:
        self._close_shard(name)
        fd, _ = self._locks.pop(name, (None, False))
        if fd is not None:
            os.close(fd)  # releases the flock

    def close(self) -> None:
        """Flush (writer) and close every open shard, then release the locks. Safe to call twice."""
        with self._mutex:
            try:
                for name in list(self._shards):
                    self._close_shard(name)
            finally:
                self._closed = True
                for name in list(self._locks):
                    self._release(name)

    def _close_shard(self, name: str) -> None:
        shard = self._shards.pop(name, None)
        self._unflushed.pop(name, None)
        if shard is None:
            return
        with self._errors(name, "closing the shard"):
            if self.writable and self._locks.get(name, (None, False))[1]:
                shard.flush()
            shard.close()

    # --- aliases -----------------------------------------------------------------------------------

    def list_aliases(self) -> dict[str, str]:
        with self._mutex:
            return dict(self._read_aliases())

    def resolve(self, name: str) -> str:
        with self._mutex:
            return self._read_aliases().get(name, name)

    def set_alias(self, alias: str, collection: str) -> None:
        self._check_writable()
        if not _NAME.fullmatch(alias):
            raise IndexError_(f"{self.location}: invalid alias {alias!r}")
        with self._mutex, self._manifest() as manifest:
            if (self._collections / alias / META_FILE).is_file():
                raise IndexError_(f"{self.location}: {alias!r} is a collection, it cannot also be an alias")
            if collection in manifest["aliases"] or not self._exists(collection):
                raise IndexError_(f"{self.location}: no collection {collection!r} to point {alias!r} at")
            manifest["aliases"][alias] = collection

    def delete_alias(self, alias: str) -> None:
        self._check_writable()
        with self._mutex, self._manifest() as manifest:
            if manifest["aliases"].pop(alias, None) is None:
                raise IndexError_(f"{self.location}: no alias {alias!r}")

    def _read_aliases(self) -> dict[str, str]:
        """The manifest's aliases, re-read only when the file changed; shards an alias left are closed."""
        path = self._root / ALIASES_FILE
        try:
            st = path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._aliases_stamp:
            aliases = dict(_read_json(path, {"aliases": {}}).get("aliases") or {}) if stamp else {}
            for alias, old in self._aliases.items():
                if aliases.get(alias) != old and old in self._shards and old not in aliases.values():
                    self._release(old)
            self._aliases, self._aliases_stamp = aliases, stamp
        return self._aliases

    @contextmanager
    def _manifest(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write `aliases.json` under the index's manifest lock (atomic for readers)."""
        with _flocked(self._root / ".manifest.lock"):
            path = self._root / ALIASES_FILE
            manifest = _read_json(path, {"aliases": {}})
            manifest.setdefault("aliases", {})
            yield manifest
            _write_atomic(path, json.dumps(manifest, indent=2, sort_keys=True))
            self._aliases_stamp = None  # re-read on the next lookup

    # --- collections -------------------------------------------------------------------------------

    def list_collections(self) -> list[str]:
        return sorted(p.name for p in self._collections.iterdir() if (p / META_FILE).is_file())

    def has_collection(self, name: str) -> bool:
        return bool(_NAME.fullmatch(name)) and self._exists(self.resolve(name))

    def _exists(self, name: str) -> bool:
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
        if self.has_collection(name) or name in self.list_aliases():
            raise IndexError_(f"{self._where(name)}: the collection already exists")
        record = {"schema_version": SCHEMA_VERSION, "dim": int(dim), "bits": int(bits), "meta": meta}
        text = json.dumps(record, indent=2)  # fail on a non-JSON meta before anything is written
        folder = self._collections / name
        with self._mutex:
            self._release(name)
            shutil.rmtree(folder, ignore_errors=True)  # what an interrupted create left behind
            folder.mkdir(parents=True)
            self._acquire(name, exclusive=True)
            with self._errors(name, "creating the shard"):
                shard = qe.EdgeShard.create(str(folder / "shard"), _config(dim, bits))
                for field_name in INDEXED_FIELDS:
                    shard.update(qe.UpdateOperation.create_field_index(field_name, qe.PayloadSchemaType.Keyword))
                lookup_only = qe.IntegerIndexParams(lookup=True, range=False, enable_hnsw=False)
                for i in range(len(mih_widths(bits))):
                    shard.update(qe.UpdateOperation.create_field_index(mih_field(i), lookup_only))
                shard.flush()
            self._shards[name] = shard
            _write_atomic(folder / META_FILE, text)
            self._schemas[name] = Schema(int(dim), int(bits))

    def delete_collection(self, name: str, wait: float = 0.0) -> None:
        """Delete a collection once no other process reads it, waiting up to `wait` seconds for that."""
        self._check_writable()
        with self._mutex:
            if not self._exists(name):
                self._require(name)
            users = [a for a, c in self.list_aliases().items() if c == name]
            if users:
                raise IndexError_(f"{self._where(name)}: alias {users[0]!r} points at it; move the alias first")
            deadline = time.monotonic() + wait
            while True:
                try:
                    self._acquire(name, exclusive=True)
                    break
                except IndexError_:
                    if time.monotonic() >= deadline:
                        raise
                time.sleep(0.05)
            self._close_shard(name)
            self._schemas.pop(name, None)
            folder = self._collections / name
            (folder / META_FILE).unlink()
            shutil.rmtree(folder)
            self._release(name)

    # --- snapshots (see cbir.index.snapshots) ------------------------------------------------------

    def write_shard_snapshot(self, name: str, path: Path) -> None:
        """Write collection `name` as a Qdrant shard snapshot (a tar of the shard, what
        `EdgeShard.unpack_snapshot` reads), under a shared lock so that no process writes it meanwhile."""
        with self._mutex:
            name = self.resolve(name)
            self._shard(name)  # holds the shared lock (or our own exclusive one, flushed below)
            if name in self._shards and self._locks.get(name, (None, False))[1]:
                with self._errors(name, "flush"):
                    self._shards[name].flush()
            with tarfile.open(path, "w") as tar:
                tar.add(self._collections / name / "shard", arcname=".")

    def create_from_snapshot(self, name: str, snapshot: Path, dim: int, bits: int, meta: dict[str, Any],
                             schema_version: int = SCHEMA_VERSION) -> None:
        """Create collection `name` from a Qdrant shard snapshot (from a server or from
        `write_shard_snapshot`)."""
        self._check_writable()
        if not _NAME.fullmatch(name) or self.has_collection(name) or name in self.list_aliases():
            raise IndexError_(f"{self._where(name)}: invalid name, or the collection already exists")
        record = {"schema_version": int(schema_version), "dim": int(dim), "bits": int(bits), "meta": meta}
        folder = self._collections / name
        with self._mutex:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            self._acquire(name, exclusive=True)
            with self._errors(name, "unpacking the snapshot"):
                qe.EdgeShard.unpack_snapshot(str(snapshot), str(folder / "shard"))
            _write_atomic(folder / META_FILE, json.dumps(record, indent=2))

    def schema_version(self, name: str) -> int:
        return int(self._read_record(self.resolve(name))["schema_version"])

    def get_meta(self, name: str) -> dict[str, Any]:
        return self._read_record(self.resolve(name))["meta"]

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
        with _flocked(self._root / ".manifest.lock"):
            _write_atomic(self._root / LEDGER_FILE, json.dumps({"applied": entries}, indent=2))

    def set_meta(self, name: str, meta: dict[str, Any]) -> None:
        self._check_writable()
        name = self.resolve(name)
        record = self._read_record(name)
        record["meta"] = meta
        _write_atomic(self._collections / name / META_FILE, json.dumps(record, indent=2))

    # --- points ------------------------------------------------------------------------------------

    def count(self, name: str, flt: Filter | None = None) -> int:
        with self._mutex:
            name = self.resolve(name)
            shard = self._shard(name)
            with self._errors(name, "count"):
                return shard.count(qe.CountRequest(exact=True, filter=edge_filter(flt)))

    def upsert(self, name: str, points: Sequence[Point]) -> None:
        """Write points in batches of `UPSERT_BATCH`; nothing is written if one is bad. Flushes now and
        then (see the module docstring) and always on `close()`."""
        self._check_writable()
        with self._mutex:
            name = self.resolve(name)
            schema = self._schema(name)
            for point in points:
                check_point_id(self._where(name), point.id)
                check_vectors(f"{self._where(name)}: point {point.id}", schema.dim, schema.bits,
                              point.embedding, point.code)
            shard = self._shard(name, write=True)
            with self._errors(name, "upsert"):
                for start in range(0, len(points), UPSERT_BATCH):
                    chunk = points[start:start + UPSERT_BATCH]
                    batch = [_edge_point(p, body) for p, body in zip(chunk, stored_payloads(chunk), strict=True)]
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
        with self._mutex:
            name = self.resolve(name)
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
               batch: int = 1024, with_thumbnails: bool = False) -> Iterator[Point]:
        """Every point matching `flt`, in id order."""
        name = self.resolve(name)
        offset: Any = None
        payload = True if with_thumbnails else _NO_THUMBNAIL
        while True:
            request = qe.ScrollRequest(offset=offset, limit=batch, filter=edge_filter(flt), with_payload=payload,
                                       with_vector=with_vectors)
            with self._mutex, self._errors(name, "scroll"):
                records, offset = self._shard(name).scroll(request)
            yield from (_to_point(rec, with_vectors) for rec in records)
            if offset is None:
                return

    def search(self, name: str, embedding: np.ndarray, k: int, flt: Filter | None = None,
               code: np.ndarray | None = None, prefilter: int | None = None,
               hamming_radius: int | None = None) -> list[Hit]:
        if code is None and (prefilter is not None or hamming_radius is not None):
            raise ValueError("prefilter and hamming_radius need the query's hash code")
        with self._mutex:
            name = self.resolve(name)
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
        condition, prefetches = edge_filter(flt), None
        if prefilter is not None:
            candidates = nearest_by_hamming(lambda limit: self._hash_query(name, code, flt, limit, radius),
                                            prefilter)
            if not candidates:
                return None
            condition = qe.Filter(must=[qe.HasIdCondition({point_id for point_id, _ in candidates})])
        elif radius is not None:
            condition = edge_filter(flt, self._mih(name, code, radius))
            with self._errors(name, "count"):
                population = self._shard(name).count(qe.CountRequest(exact=True, filter=condition))
            if population == 0:
                return None
            prefetches = [qe.Prefetch(limit=population, query=_hash_nearest(code), filter=condition,
                                      score_threshold=radius_threshold(radius), params=_EXACT)]
            condition = None
        query = qe.Query.Nearest(np.asarray(embedding, dtype=np.float32), using=EMBEDDING)
        return qe.QueryRequest(limit=k, query=query, prefetches=prefetches, filter=condition,
                               with_payload=_NO_THUMBNAIL, params=_EXACT)

    def _hash_query(self, name: str, code: np.ndarray, flt: Filter | None, limit: int,
                    radius: int | None) -> list[tuple[str, int]]:
        """(id, Hamming distance) of the `limit` nearest codes, nearest first."""
        threshold = None if radius is None else radius_threshold(radius)
        mih = None if radius is None else self._mih(name, code, radius)
        request = qe.QueryRequest(limit=limit, query=_hash_nearest(code), filter=edge_filter(flt, mih),
                                  score_threshold=threshold, with_payload=False, params=_EXACT)
        with self._errors(name, "Hamming search"):
            scored = self._shard(name).query(request)
        return [(str(p.id), int(round(p.score))) for p in scored]

    def _mih(self, name: str, code: np.ndarray, radius: int) -> list[list[int]] | None:
        """The multi-index-hashing keys for a radius search (schema 2 stores the substrings), else None."""
        return mih_keys(code, radius) if self._schema(name).version >= 2 else None

    # --- internals ---------------------------------------------------------------------------------

    def _where(self, name: str) -> str:
        return f"{self.location}: collection {name!r}"

    def _check_writable(self) -> None:
        if self._closed:
            raise IndexError_(f"{self.location}: the index has been closed")
        if not self.writable:
            raise IndexError_(f"{self.location}: the index was opened read-only")

    def _require(self, name: str) -> None:
        """Raise unless the collection `name` (already resolved) exists."""
        if not self._exists(name):
            known = ", ".join(self.list_collections()) or "none"
            raise IndexError_(f"{self.location}: no collection {name!r} (collections: {known})")

    def _read_record(self, name: str) -> dict[str, Any]:
        self._require(name)
        path = self._collections / name / META_FILE
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise IndexError_(f"{path}: unreadable collection metadata ({exc})") from exc
        if record.get("schema_version") not in READABLE_SCHEMAS:
            raise IndexError_(f"{path}: schema version {record.get('schema_version')!r}, this cbir reads "
                              f"versions {', '.join(map(str, READABLE_SCHEMAS))}; upgrade cbir")
        return record

    def _schema(self, name: str) -> Schema:
        if name not in self._schemas:
            record = self._read_record(name)
            self._schemas[name] = Schema(int(record["dim"]), int(record["bits"]), int(record["schema_version"]))
        return self._schemas[name]

    def _shard(self, name: str, write: bool = False) -> qe.EdgeShard:
        """The open shard of collection `name` (resolved), under a shared lock, or an exclusive one to write."""
        if self._closed:
            raise IndexError_(f"{self.location}: the index has been closed")
        if name not in self._shards or (write and not self._locks.get(name, (None, False))[1]):
            self._require(name)
            self._acquire(name, exclusive=write)
            if name not in self._shards:
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



def _config(dim: int, bits: int) -> qe.EdgeConfig:
    """Cosine `embedding`; `hash` as uint8 0/1 with Manhattan distance and no HNSW graph (m=0): it is only
    scanned exactly (schema 2; measured fastest, see migrations/README.md)."""
    no_graph = qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000)
    return qe.EdgeConfig(
        vectors={
            EMBEDDING: qe.EdgeVectorParams(size=int(dim), distance=qe.Distance.Cosine),
            HASH: qe.EdgeVectorParams(size=int(bits), distance=qe.Distance.Manhattan, hnsw_config=no_graph,
                                      datatype=qe.VectorStorageDatatype.Uint8),
        },
        wal_enabled=False,
    )


def _match(value: Any) -> qe.MatchValue | qe.MatchAny:
    if isinstance(value, (list, tuple, set, frozenset)):
        return qe.MatchAny(list(value))
    if isinstance(value, bool):
        return qe.MatchValue(np.bool_(value))  # a Python bool would become the integer 0/1
    return qe.MatchValue(value)


def edge_filter(flt: Filter | None, mih: list[list[int]] | None = None) -> qe.Filter | None:
    """The payload filter, and with `mih` keys also "at least one substring is near the query's"."""
    if not flt and not mih:
        return None
    flt = flt or Filter()
    must = [qe.FieldCondition(key, match=_match(v)) for key, v in flt.must.items()]
    must_not = [qe.FieldCondition(key, match=_match(v)) for key, v in flt.must_not.items()]
    should = [qe.FieldCondition(mih_field(i), match=qe.MatchAny(keys)) for i, keys in enumerate(mih or [])]
    return qe.Filter(must=must or None, must_not=must_not or None, should=should or None)


def _hash_nearest(code: np.ndarray) -> qe.Query:
    return qe.Query.Nearest(np.asarray(code, dtype=np.float32), using=HASH)


def _edge_point(point: Point, payload: dict[str, Any]) -> qe.Point:
    """Vectors go in as Python lists: qdrant-edge-py 0.9 converts a list about twice as fast as a NumPy array
    (17 vs 40 µs for 512 + 64 values), which was half of the ingest time (docs/performance.md)."""
    vectors = {EMBEDDING: np.asarray(point.embedding, dtype=np.float32).tolist(),
               HASH: np.asarray(point.code, dtype=np.float32).tolist()}
    return qe.Point(point.id, vectors, payload)


def _to_point(record: qe.Record, with_vectors: bool) -> Point:
    if with_vectors and record.vector:
        embedding = np.asarray(record.vector[EMBEDDING], dtype=np.float32)
        code = np.rint(record.vector[HASH]).astype(np.uint8)
    else:
        embedding, code = np.empty(0, np.float32), np.empty(0, np.uint8)
    return Point(str(record.id), embedding, code, public_payload(record.payload))


def _to_hit(point: qe.ScoredPoint, code: np.ndarray | None) -> Hit:
    payload = public_payload(point.payload)
    hamming = hamming_to(payload[HASH], code) if code is not None and HASH in payload else None
    return Hit(str(point.id), float(point.score), payload, hamming)


def _read_json(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        raise IndexError_(f"{path}: unreadable ({exc})") from None


@contextmanager
def _flocked(path: Path, timeout: float = 30.0) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if needed), waiting up to `timeout` seconds for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise IndexError_(f"{path}: held by another process for {timeout:.0f} s") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def _relock_shared(fd: int) -> bool:
    """After a failed shared → exclusive upgrade (which may drop the lock), take the shared lock back."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and `os.replace`, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
