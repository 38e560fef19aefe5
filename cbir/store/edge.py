"""Qdrant Edge backend: the index is a directory, each collection one embedded `EdgeShard`.

The files (per-collection locks, the alias manifest, `meta.json`) are `cbir.store.edge_files`; a collection
can be built while others query an older version through its alias. Search is exact, its steps are the
planner's (`cbir.store.planner`) and `cbir.store.edge_convert` translates them. The WAL is off (with it, a
second load of a shard fails even for readers), so `upsert` flushes after `FLUSH_SECONDS`, or once the
unflushed points reach `FLUSH_POINTS` or the collection's size at the last flush (`edge_files.FlushSchedule`),
and `close()` always does: a killed writer loses at most those points. One `EdgeIndex` may be shared by
threads: every engine call runs under one mutex.

A process that queries a collection many times gets it copied into memory (`copies`, `cbir.store.memory.Copies`):
while this process holds a shard (its lock), no other process writes it, and every write and close here forgets
the copy.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import qdrant_edge as qe

from cbir.errors import IndexError_
from cbir.store import base
from cbir.store import edge_convert as ec
from cbir.store import edge_files as ef
from cbir.store.base import SCHEMA_VERSION, Filter, Hit, Index, Point, Schema, as_scope, to_hit, to_point
from cbir.store.edge_snapshots import EdgeSnapshots
from cbir.store.memory import Copies
from cbir.store.planner import Candidates, Costs, Scope

META_FILE = "meta.json"
LEDGER_FILE = "ledger.json"
FLUSH_POINTS, FLUSH_SECONDS = ef.FLUSH_POINTS, ef.FLUSH_SECONDS   # a writer's defaults (`ef.FlushPolicy`)
#: Points per `update` call: 2,048 took 6 % less CPU than 256 (100k × 512, docs/performance.md).
EDGE_BATCH = 2048

#: In-process calls, measured on 600 × 512 (2 cores): ~130 µs per query beyond the scan, ~12 µs per returned hit.
#: Copying a collection into memory (`cbir.store.memory.Copies`; 10k points of 32 and of 512 values, load average 3):
#: 17 µs a point, plus 49 ns per embedding value (the engine builds a Python float for each).
EDGE_COSTS = Costs(round_trip=1.3e-4, per_hit=1.2e-5, mih=True, prefetch_limit=True, rescore=True,
                   copy_per_point=1.7e-5, copy_per_value=4.9e-8)


class EdgeIndex(EdgeSnapshots, Index):
    """Collections as Qdrant Edge shards under one directory; shards are opened lazily and cached."""

    costs = EDGE_COSTS
    _copies: Copies | None = None

    def __init__(self, path: str | os.PathLike[str], writable: bool = False, create: bool = False,
                 flush: ef.FlushPolicy | None = None) -> None:
        if create and not writable:
            raise ValueError("create=True needs writable=True")
        self.location = str(path)
        self.writable = writable
        self._root = Path(path)
        self._collections = self._root / "collections"
        self._shards: dict[str, qe.EdgeShard] = {}
        self._locks = ef.CollectionLocks(self._collections, self._where)
        self._manifest = ef.Manifest(self._root)
        self._schemas: dict[str, Schema] = {}
        flush = flush or ef.FlushPolicy(FLUSH_POINTS, FLUSH_SECONDS)
        self._flushes = ef.FlushSchedule(flush.points, flush.seconds)
        self._mutex = threading.RLock()
        self._closed = False
        if not self._collections.is_dir():
            if not create:
                raise IndexError_(f"{self.location}: no index here (run `cbir ingest` first)")
            if self._root.exists() and not self._root.is_dir():
                raise IndexError_(f"{self.location}: not a directory, cannot create an index here")
            self._collections.mkdir(parents=True, exist_ok=True)

    def release(self, name: str) -> None:
        """Flush and close the collection and drop its lock, so that other processes can read it."""
        with self._mutex:
            self._release(self.resolve(name))

    def _release(self, name: str) -> None:
        self._close_shard(name)
        self._locks.release(name)

    def close(self) -> None:
        """Flush (writer) and close every open shard, then release the locks. Safe to call twice."""
        with self._mutex:
            try:
                for name in list(self._shards):
                    self._close_shard(name)
            finally:
                self._closed = True
                for name in list(self._locks.held):
                    self._release(name)

    def _close_shard(self, name: str) -> None:
        self.copies.forget(name)   # once the lock goes, another process may write
        shard = self._shards.pop(name, None)
        self._flushes.forget(name)
        if shard is None:
            return
        with self._errors(name, "closing the shard"):
            if self.writable and self._locks.exclusive(name):
                shard.flush()
            shard.close()

    def list_aliases(self) -> dict[str, str]:
        with self._mutex:
            return dict(self._read_aliases())

    def resolve(self, name: str) -> str:
        with self._mutex:
            return self._read_aliases().get(name, name)

    def set_alias(self, alias: str, collection: str) -> None:
        self._check_writable()
        with self._mutex:
            self._manifest.set_alias(self.location, alias, collection, self._exists)

    def delete_alias(self, alias: str) -> None:
        self._check_writable()
        with self._mutex:
            self._manifest.delete_alias(self.location, alias)

    def _read_aliases(self) -> dict[str, str]:
        """The manifest's aliases; shards that an alias left are closed (their locks released)."""
        aliases, before = self._manifest.read()
        for alias, old in before.items():
            if aliases.get(alias) != old and old in self._shards and old not in aliases.values():
                self._release(old)
        return aliases

    def list_collections(self) -> list[str]:
        return sorted(p.name for p in self._collections.iterdir() if (p / META_FILE).is_file())

    def has_collection(self, name: str) -> bool:
        return bool(ef.NAME.fullmatch(name)) and self._exists(self.resolve(name))

    def _exists(self, name: str) -> bool:
        return bool(ef.NAME.fullmatch(name)) and (self._collections / name / META_FILE).is_file()

    def create_collection(self, name: str, dim: int, bits: int, meta: dict[str, Any], shards: int = 1,
                          replicas: int = 1) -> None:
        self._check_writable()
        if shards != 1 or replicas != 1:
            raise IndexError_(f"{self.location}: the embedded index is one shard on one machine; --shards and "
                              "--replicas need a Qdrant server (--index http://host:6333)")
        if not ef.NAME.fullmatch(name):
            raise IndexError_(f"{self.location}: invalid collection name {name!r} "
                              "(letters, digits, '_', '-', '.'; at most 128 characters)")
        if self.has_collection(name) or name in self.list_aliases():
            raise IndexError_(f"{self._where(name)}: the collection already exists")
        self._new_folder(name, {"schema_version": SCHEMA_VERSION, "dim": int(dim), "bits": int(bits), "meta": meta},
                         self._make_shard(name, int(dim), int(bits)), "creating the shard")

    def _make_shard(self, name: str, dim: int, bits: int) -> Any:
        return lambda folder: self._shards.__setitem__(name, ec.create_shard(folder / "shard", dim, bits))

    def _new_folder(self, name: str, record: dict[str, Any], make: Any, action: str) -> None:
        """Make a collection's folder with `make(folder)` under its exclusive lock; meta.json comes last."""
        text = json.dumps(record, indent=2)  # fail on a non-JSON meta before anything is written
        folder = self._collections / name
        with self._mutex:
            self._release(name)
            shutil.rmtree(folder, ignore_errors=True)  # what an interrupted create left behind
            folder.mkdir(parents=True)
            self._acquire(name, exclusive=True)
            with self._errors(name, action):
                make(folder)
            ef.write_atomic(folder / META_FILE, text)
            self._schemas[name] = Schema(record["dim"], record["bits"], record["schema_version"])

    def delete_collection(self, name: str, wait: float = 0.0) -> None:
        """Delete a collection once no other process reads it, waiting up to `wait` seconds for that."""
        self._check_writable()
        with self._mutex:
            self._require(name)
            users = [a for a, c in self.list_aliases().items() if c == name]
            if users:
                raise IndexError_(f"{self._where(name)}: alias {users[0]!r} points at it; move the alias first")
            self._locks.acquire(name, True, lambda: self._close_shard(name), wait=wait)
            self._close_shard(name)
            self._schemas.pop(name, None)
            (self._collections / name / META_FILE).unlink()
            shutil.rmtree(self._collections / name)
            self._release(name)

    def get_meta(self, name: str) -> dict[str, Any]:
        return self._read_record(self.resolve(name))["meta"]

    def set_meta(self, name: str, meta: dict[str, Any]) -> None:
        self._check_writable()
        name = self.resolve(name)
        record = self._read_record(name)
        record["meta"] = meta
        ef.write_atomic(self._collections / name / META_FILE, json.dumps(record, indent=2))

    def schema(self, name: str) -> Schema:
        name = self.resolve(name)
        if name not in self._schemas:
            record = self._read_record(name)
            self._schemas[name] = Schema(int(record["dim"]), int(record["bits"]), int(record["schema_version"]))
        return self._schemas[name]

    def get_ledger(self) -> list[dict[str, Any]]:
        return ef.read_ledger(self._root / LEDGER_FILE)

    def set_ledger(self, entries: list[dict[str, Any]]) -> None:
        self._check_writable()
        with ef.flocked(self._root / ".manifest.lock"):
            ef.write_atomic(self._root / LEDGER_FILE, json.dumps({"applied": entries}, indent=2))

    def count(self, name: str, flt: Filter | Scope | None = None) -> int:
        with self._mutex:
            name = self.resolve(name)
            with self._errors(name, "count"):
                return self._shard(name).count(qe.CountRequest(exact=True, filter=ec.scope_filter(as_scope(flt))))

    def _write(self, name: str, points: Sequence[Point]) -> None:
        """Batches of `EDGE_BATCH`; flushes now and then (see the module docstring) and on `close()`."""
        with self._mutex:
            name = self.resolve(name)
            self.copies.forget(name)
            shard = self._shard(name, write=True)
            with self._errors(name, "upsert"):
                self._flushes.start(name, lambda: shard.count(qe.CountRequest(exact=True)))
                for start in range(0, len(points), EDGE_BATCH):
                    chunk = points[start:start + EDGE_BATCH]
                    bodies = base.stored_payloads(chunk)
                    batch = [ec.edge_point(p, body) for p, body in zip(chunk, bodies, strict=True)]
                    shard.update(qe.UpdateOperation.upsert_points(batch))
                if self._flushes.due(name, len(points)):
                    shard.flush()
                    self._flushes.flushed(name)

    def _fetch(self, name: str, ids: list[str], with_payload: bool, with_vectors: bool) -> list[Point]:
        with self._mutex:
            name = self.resolve(name)
            with self._errors(name, "retrieve"):
                records = self._shard(name).retrieve(cast("list[qe.PointId]", ids), with_payload=with_payload,
                                                     with_vector=with_vectors)
        return [to_point(r.id, r.vector, r.payload, with_vectors) for r in records]

    def scroll(self, name: str, flt: Filter | None = None, with_vectors: bool = True,
               batch: int = 1024, with_thumbnails: bool = False) -> Iterator[Point]:
        name = self.resolve(name)
        offset: Any = None
        payload = True if with_thumbnails else ec.NO_THUMBNAIL
        while True:
            request = qe.ScrollRequest(offset=offset, limit=batch, filter=ec.edge_filter(flt), with_payload=payload,
                                       with_vector=with_vectors)
            with self._mutex, self._errors(name, "scroll"):
                records, offset = self._shard(name).scroll(request)
            yield from (to_point(r.id, r.vector, r.payload, with_vectors) for r in records)
            if offset is None:
                return

    # --- in-memory copies (`cbir.store.memory.Copies`) -------------------------------------------------

    @property
    def copies(self) -> Copies:
        if self._copies is None:
            self._copies = Copies(self)
        return self._copies

    def size(self, name: str) -> int:
        with self._mutex, self._errors(name, "size"):
            return int(self._shard(name).info().points_count)

    def search(self, name: str, *args: Any, **kw: Any) -> list[Hit]:
        """`Index.search` under the mutex, so that every step sees the collection the alias pinned."""
        with self._mutex:
            return super().search(name, *args, **kw)

    def nearest_by_vector(self, name: str, embedding: np.ndarray, limit: int, scope: Scope) -> list[Hit]:
        return self._query(name, ec.vector_request(embedding, limit, scope), scope.code, "search")

    def nearest_by_code(self, name: str, code: np.ndarray, limit: int, scope: Scope) -> Candidates:
        with self._mutex, self._errors(name, "Hamming search"):
            scored = self._shard(name).query(ec.code_request(code, limit, scope))
        return base.code_pairs([p.id for p in scored], [p.score for p in scored])

    def rescore(self, name: str, embedding: np.ndarray, code: np.ndarray, limit: int, scope: Scope) -> list[Hit]:
        return self._query(name, ec.rescore_request(embedding, code, limit, scope), code, "search")

    def _query(self, name: str, request: qe.QueryRequest, code: np.ndarray | None, action: str) -> list[Hit]:
        with self._mutex, self._errors(name, action):
            scored = self._shard(name).query(request)
        return [to_hit(p.id, p.score, p.payload, code) for p in scored]

    def _acquire(self, name: str, exclusive: bool) -> None:
        self._locks.acquire(name, exclusive, lambda: self._close_shard(name))

    def _require(self, name: str) -> None:
        """Raise unless the collection `name` (already resolved) exists."""
        if not self._exists(name):
            raise IndexError_(f"{self.location}: no collection {name!r} (collections: {self.shown_names()})")

    def _read_record(self, name: str) -> dict[str, Any]:
        self._require(name)
        return ef.read_record(self._collections / name / META_FILE, base.READABLE_SCHEMAS)

    def _shard(self, name: str, write: bool = False) -> qe.EdgeShard:
        """The open shard of collection `name` (resolved), under a shared lock, or an exclusive one to write."""
        if self._closed:
            raise IndexError_(f"{self.location}: the index has been closed")
        if name not in self._shards or (write and not self._locks.exclusive(name)):
            self._require(name)
            self._acquire(name, exclusive=write)
            if name not in self._shards:
                with self._errors(name, "opening the shard"):
                    self._shards[name] = qe.EdgeShard.load(str(self._collections / name / "shard"))
        return self._shards[name]

