"""qdrant-client backend: a Qdrant server (`http(s)://host:port`) or qdrant-client's local mode
(`:memory:`, `local:PATH`).

Collection metadata is kept in the collection's own metadata (Qdrant servers from 1.16, qdrant-client 1.20's
local mode) under the single key `cbir`: `{"schema_version": 2, "meta": {...}}`. Collections without that key
are not cbir's: `list_collections` leaves them out. The dimension and bit count are read from the vector
configuration.

Search is exact (`SearchParams(exact=True)` on a server; local mode always scans); its steps are the planner's
(`cbir.store.planner`). On a server, one request costs a network round trip, so a top-N prefilter is one Query
API request (prefetch on `hash`, rescoring on `embedding`). Names are passed as given, so Qdrant resolves an
alias itself, per request: a read-only JWT scoped to the alias is enough to query. Local mode ignores payload
indexes, search params and the uint8 datatype (and warns), so they are only sent to a server; on disk it locks
its folder: one process at a time, readers included.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import models as qm

from cbir.errors import IndexError_
from cbir.store import base
from cbir.store import client_convert as cc
from cbir.store.base import INDEXED_FIELDS, LEDGER_COLLECTION, Filter, Hit, Index, Point, Schema, as_scope, to_hit
from cbir.store.hamming import mih_field, mih_widths
from cbir.store.memory import Copies
from cbir.store.planner import Candidates, Costs, Scope
from cbir.store.server import ServerSettings, connect, download_snapshot, error_detail

META_KEY = "cbir"
#: Seconds a collection's vector sizes are cached (see `ClientIndex.schema`).
SCHEMA_TTL = 2.0
#: Local mode runs in this process, in Python: measured ~0.6 ms per query beyond the scan, ~20 µs per hit; copying a
#: collection into memory 58 µs a point plus 108 ns per embedding value (10k points of 32 and of 512 values, load
#: average 3). A server is never copied.
LOCAL_COSTS = Costs(round_trip=6e-4, per_hit=2e-5, mih=False, prefetch_limit=True, rescore=True,
                    copy_per_point=5.8e-5, copy_per_value=1.08e-7)


class ClientIndex(Index):
    """Collections in a Qdrant server or in qdrant-client's local mode."""

    _copies: Copies | None = None

    def __init__(self, location: str, writable: bool = False, create: bool = False,
                 settings: ServerSettings | None = None) -> None:
        if create and not writable:
            raise ValueError("create=True needs writable=True")
        self.location = location
        self.writable = writable
        self.is_server = location.startswith(("http://", "https://"))
        self.settings = settings or ServerSettings()
        self._params = qm.SearchParams(exact=True) if self.is_server else None
        self._schemas: dict[str, tuple[Schema, float]] = {}
        self._costs: Costs | None = None if self.is_server else LOCAL_COSTS
        self._client = connect(location, self.settings, create)

    @property
    def costs(self) -> Costs:
        """Local mode's measured constants; a server's round trip is timed on first use (one cheap request)."""
        if self._costs is None:
            started = time.perf_counter()
            with self._errors(None, "listing collections"):
                self._client.get_collections()
            self._costs = Costs(round_trip=time.perf_counter() - started, per_hit=2e-5, rescore=True)
        return self._costs

    def close(self) -> None:
        self._client.close()

    def pin(self, name: str) -> str:
        """A server resolves an alias itself, per request (a read-only JWT scoped to the alias is enough to query);
        local mode pins the collection, as Qdrant Edge does, so that an in-memory copy is the collection's."""
        return name if self.is_server else self.resolve(name)

    # --- collections -------------------------------------------------------------------------------

    def list_collections(self) -> list[str]:
        """The collections that carry cbir metadata (a server may hold others)."""
        with self._errors(None, "listing collections"):
            names = [c.name for c in self._client.get_collections().collections]
            return sorted(n for n in names if META_KEY in (self._client.get_collection(n).config.metadata or {}))

    def has_collection(self, name: str) -> bool:
        with self._errors(name, "lookup"):
            return self._client.collection_exists(name)

    def create_collection(self, name: str, dim: int, bits: int, meta: dict[str, Any], shards: int = 1,
                          replicas: int = 1) -> None:
        self._check_writable()
        if self.has_collection(name):
            raise IndexError_(f"{self._where(name)}: the collection already exists")
        if name in self.list_aliases():
            raise IndexError_(f"{self._where(name)}: the name is an alias")
        with self._errors(name, "create"):
            # local mode accepts and ignores the distribution settings; a server applies them
            self._client.create_collection(name, vectors_config=cc.vectors_config(dim, bits, self.is_server),
                                           metadata=_meta_record(meta), shard_number=int(shards),
                                           replication_factor=int(replicas))
            if self.is_server:
                for field_name in INDEXED_FIELDS:
                    self._client.create_payload_index(name, field_name, qm.PayloadSchemaType.KEYWORD, wait=True)
                lookup_only = qm.IntegerIndexParams(type=qm.IntegerIndexType.INTEGER, lookup=True, range=False)
                for i in range(len(mih_widths(bits))):
                    self._client.create_payload_index(name, mih_field(i), lookup_only, wait=True)
        self._schemas[name] = (Schema(int(dim), int(bits)), time.monotonic())

    def delete_collection(self, name: str, wait: float = 0.0) -> None:
        """Delete a collection (the server finishes requests in flight); `wait` is for Edge and unused here."""
        self._check_writable()
        aliases = self.list_aliases()
        if name in aliases:
            raise IndexError_(f"{self._where(name)}: is an alias; delete the collection it points at "
                              f"({aliases[name]!r}) or move the alias")
        self._config(name)
        users = [a for a, c in aliases.items() if c == name]
        if users:
            raise IndexError_(f"{self._where(name)}: alias {users[0]!r} points at it; move the alias first")
        self._schemas.pop(name, None)
        self.copies.forget(name)
        with self._errors(name, "delete"):
            self._client.delete_collection(name)

    # --- metadata, the ledger and snapshots --------------------------------------------------------

    def get_meta(self, name: str) -> dict[str, Any]:
        return self._record(name)["meta"]

    def set_meta(self, name: str, meta: dict[str, Any]) -> None:
        self._check_writable()
        version = self._record(name)["schema_version"]  # kept: the collection's vectors did not change
        with self._errors(name, "set metadata"):
            self._client.update_collection(name, metadata=_meta_record(meta, version))

    def _record(self, name: str) -> dict[str, Any]:
        record = (self._config(name).metadata or {})[META_KEY]  # `_config` checked it is there
        if record.get("schema_version") not in base.READABLE_SCHEMAS:
            raise IndexError_(f"{self._where(name)}: schema version {record.get('schema_version')!r}, this "
                              f"cbir reads versions {', '.join(map(str, base.READABLE_SCHEMAS))}; upgrade cbir")
        return record

    def get_ledger(self) -> list[dict[str, Any]]:
        if not self.has_collection(LEDGER_COLLECTION):
            return []
        with self._errors(LEDGER_COLLECTION, "reading the migration ledger"):
            metadata = self._client.get_collection(LEDGER_COLLECTION).config.metadata or {}
        return list(metadata.get("applied") or [])

    def set_ledger(self, entries: list[dict[str, Any]]) -> None:
        self._check_writable()
        with self._errors(LEDGER_COLLECTION, "writing the migration ledger"):
            if not self._client.collection_exists(LEDGER_COLLECTION):
                self._client.create_collection(LEDGER_COLLECTION, vectors_config={}, metadata={"applied": entries})
            else:
                self._client.update_collection(LEDGER_COLLECTION, metadata={"applied": entries})

    def shard_count(self, name: str) -> int:
        return int(self._config(name).params.shard_number or 1)

    def write_shard_snapshot(self, name: str, path: Path) -> str | None:
        """A server's snapshot of a one-shard collection; None where there is none (local mode, several
        shards), and the caller copies the points instead (see `cbir.store.snapshots`)."""
        if not self.is_server or self.shard_count(name) != 1:
            return None
        with self._errors(name, "downloading the snapshot"):
            download_snapshot(self.location, self.settings, self.resolve(name), path, self._where(name))
        return "server snapshot"

    # --- aliases -----------------------------------------------------------------------------------

    def list_aliases(self) -> dict[str, str]:
        with self._errors(None, "listing aliases"):
            return {a.alias_name: a.collection_name for a in self._client.get_aliases().aliases}

    def set_alias(self, alias: str, collection: str) -> None:
        self._check_writable()
        aliases = self.list_aliases()
        if collection in aliases or not self._client.collection_exists(collection):
            raise IndexError_(f"{self.location}: no collection {collection!r} to point {alias!r} at")
        operations: list[Any] = []
        if alias in aliases:
            operations.append(qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=alias)))
        operations.append(qm.CreateAliasOperation(
            create_alias=qm.CreateAlias(collection_name=collection, alias_name=alias)))
        with self._errors(alias, "moving the alias"):
            self._client.update_collection_aliases(change_aliases_operations=operations)  # one atomic request

    def delete_alias(self, alias: str) -> None:
        self._check_writable()
        if alias not in self.list_aliases():
            raise IndexError_(f"{self.location}: no alias {alias!r}")
        with self._errors(alias, "deleting the alias"):
            self._client.update_collection_aliases(change_aliases_operations=[
                qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=alias))])

    # --- points ------------------------------------------------------------------------------------

    def count(self, name: str, flt: Filter | Scope | None = None) -> int:
        self.schema(name)
        with self._errors(name, "count"):
            return self._client.count(name, count_filter=cc.scope_filter(as_scope(flt)), exact=True).count

    def _write(self, name: str, points: Sequence[Point]) -> None:
        """Requests of at most `UPSERT_BATCH` points and about `MAX_REQUEST_BYTES` (see `batch_size`)."""
        step = cc.batch_size(points)
        self.copies.forget()   # every collection: `name` may be an alias
        with self._errors(name, "upsert"):
            for start in range(0, len(points), step):
                chunk = points[start:start + step]
                batch = [cc.point_struct(p, body) for p, body in zip(chunk, base.stored_payloads(chunk), strict=True)]
                self._client.upsert(name, points=batch, wait=True)

    def _fetch(self, name: str, ids: list[str], with_payload: bool, with_vectors: bool) -> list[Point]:
        with self._errors(name, "retrieve"):
            records = self._client.retrieve(name, ids, with_payload=with_payload, with_vectors=with_vectors)
        return [base.to_point(r.id, r.vector, r.payload, with_vectors) for r in records]

    def scroll(self, name: str, flt: Filter | None = None, with_vectors: bool = True,
               batch: int = 1024, with_thumbnails: bool = False) -> Iterator[Point]:
        self.schema(name)
        offset: Any = None
        while True:
            with self._errors(name, "scroll"):
                records, offset = self._client.scroll(name, scroll_filter=cc.client_filter(flt), limit=batch,
                                                      offset=offset, with_vectors=with_vectors,
                                                      with_payload=True if with_thumbnails else cc.NO_THUMBNAIL)
            yield from (base.to_point(r.id, r.vector, r.payload, with_vectors) for r in records)
            if offset is None:
                return

    # --- search primitives (composed by cbir.store.planner) ----------------------------------------

    @property
    def copies(self) -> Copies:
        """Local mode's in-memory copies (`cbir.store.memory.Copies`); a server's costs rule them out, as other
        processes write it. Local mode holds its folder alone, and every write here forgets the copies."""
        if self._copies is None:
            self._copies = Copies(self)
        return self._copies

    def size(self, name: str) -> int:
        with self._errors(name, "count"):
            return self._client.count(name, exact=False).count

    def nearest_by_vector(self, name: str, embedding: np.ndarray, limit: int, scope: Scope) -> list[Hit]:
        return self._query(name, cc.vector_query(embedding, limit, scope, self._params), scope.code)

    def nearest_by_code(self, name: str, code: np.ndarray, limit: int, scope: Scope) -> Candidates:
        with self._errors(name, "Hamming search"):
            scored = self._client.query_points(name, **cc.code_query(code, limit, scope, self._params)).points
        return base.code_pairs([p.id for p in scored], [p.score for p in scored])

    def rescore(self, name: str, embedding: np.ndarray, code: np.ndarray, limit: int, scope: Scope) -> list[Hit]:
        return self._query(name, cc.rescore_query(embedding, code, limit, scope, self._params), code)

    def _query(self, name: str, args: dict[str, Any], code: np.ndarray | None) -> list[Hit]:
        with self._errors(name, "search"):
            scored = self._client.query_points(name, **args).points
        return [to_hit(p.id, p.score, p.payload, code) for p in scored]

    # --- internals ---------------------------------------------------------------------------------

    def _detail(self, exc: Exception) -> str:
        return error_detail(exc)

    def _config(self, name: str) -> qm.CollectionConfig:
        """The collection's config; raises for an unknown or non-cbir collection."""
        if not self.has_collection(name):
            raise IndexError_(f"{self.location}: no collection {name!r} (collections: {self.shown_names()})")
        with self._errors(name, "reading the collection"):
            config = self._client.get_collection(name).config
        if META_KEY not in (config.metadata or {}):
            raise IndexError_(f"{self._where(name)}: not a cbir collection (no '{META_KEY}' metadata; "
                              "Qdrant servers older than 1.16 drop collection metadata)")
        return config

    def schema(self, name: str) -> Schema:
        """Vector sizes of the collection `name` stands for, read from its config (no `GET /aliases`, which a
        collection-scoped token may not be allowed), cached for `SCHEMA_TTL` seconds so that an alias moved to
        a collection with other sizes is noticed."""
        cached = self._schemas.get(name)
        if cached is not None and time.monotonic() - cached[1] < SCHEMA_TTL:
            return cached[0]
        config = self._config(name)
        vectors = config.params.vectors
        if not isinstance(vectors, dict) or not {base.EMBEDDING, base.HASH} <= vectors.keys():
            raise IndexError_(f"{self._where(name)}: lacks the '{base.EMBEDDING}'/'{base.HASH}' vectors")
        version = int((config.metadata or {}).get(META_KEY, {}).get("schema_version", base.SCHEMA_VERSION))
        schema = Schema(vectors[base.EMBEDDING].size, vectors[base.HASH].size, version)
        self._schemas[name] = (schema, time.monotonic())
        return schema


def _meta_record(meta: dict[str, Any], schema_version: int = base.SCHEMA_VERSION) -> dict[str, Any]:
    return {META_KEY: {"schema_version": schema_version, "meta": meta}}
