"""qdrant-client backend: a Qdrant server (`http(s)://host:port`) or qdrant-client's local mode
(`:memory:`, `local:PATH`).

Collection metadata is kept in the collection's own metadata (`create_collection(metadata=…)`, supported
by qdrant-client 1.20 in local mode and by Qdrant servers from 1.16), under the single key `cbir`:
`{"schema_version": 1, "meta": {...}}`. `update_collection` merges metadata key by key, so writing the
whole `cbir` value replaces the dict. Collections without that key are not cbir's: `list_collections`
leaves them out. The dimension and bit count are read from the vector configuration.

Search is exact (`SearchParams(exact=True)` on a server; local mode always scans). `prefilter=N` first
asks for the Hamming-nearest ids (ties broken by id, see `base.nearest_by_hamming`) and then ranks those
by cosine under a `HasIdCondition`; `hamming_radius` alone is one query whose `Prefetch` on the `hash`
vector has a distance threshold.

Local mode ignores payload indexes and search params (and warns about them), so they are only sent to a
server. Local mode on disk locks its folder: one process at a time, readers included.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from qdrant_client import QdrantClient
from qdrant_client import models as qm
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from cbir.errors import CbirError, IndexError_
from cbir.index.base import (
    EMBEDDING,
    HASH,
    INDEXED_FIELDS,
    LEDGER_COLLECTION,
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

META_KEY = "cbir"
_SHARE_HINT = "use a Qdrant server to share an index"


class ClientIndex(Index):
    """Collections in a Qdrant server or in qdrant-client's local mode."""

    def __init__(self, location: str, writable: bool = False, create: bool = False,
                 api_key: str | None = None, timeout: int | None = None) -> None:
        if create and not writable:
            raise ValueError("create=True needs writable=True")
        self.location = location
        self.writable = writable
        self.is_server = location.startswith(("http://", "https://"))
        self._search_params = qm.SearchParams(exact=True) if self.is_server else None
        self._schemas: dict[str, Schema] = {}
        self._client = self._connect(create, api_key, timeout)

    def _connect(self, create: bool, api_key: str | None, timeout: int | None) -> QdrantClient:
        if self.is_server:
            return QdrantClient(url=self.location, api_key=api_key, timeout=timeout,
                                check_compatibility=False)
        if self.location == ":memory:":
            return QdrantClient(location=":memory:")
        if not self.location.startswith("local:"):
            raise IndexError_(f"{self.location}: not a qdrant-client location "
                              "(http(s)://…, :memory:, local:PATH)")
        path = self.location.removeprefix("local:")
        if not create and not Path(path).is_dir():
            raise IndexError_(f"{self.location}: no index here (run `cbir ingest` first)")
        try:
            return QdrantClient(path=path)
        except RuntimeError as exc:  # portalocker: the folder is locked by another client
            raise IndexError_(f"{self.location}: the index is in use by another process "
                              f"(local mode allows one at a time); {_SHARE_HINT}") from exc

    def close(self) -> None:
        self._client.close()

    # --- collections -------------------------------------------------------------------------------

    def list_collections(self) -> list[str]:
        """The collections that carry cbir metadata (a server may hold others)."""
        with self._errors(None, "listing collections"):
            names = [c.name for c in self._client.get_collections().collections]
            return sorted(n for n in names if META_KEY in (self._client.get_collection(n).config.metadata
                                                           or {}))

    def has_collection(self, name: str) -> bool:
        with self._errors(name, "lookup"):
            return self._client.collection_exists(name)

    def create_collection(self, name: str, dim: int, bits: int, meta: dict[str, Any], shards: int = 1,
                          replicas: int = 1) -> None:
        self._check_writable()
        if self.has_collection(name):
            raise IndexError_(f"{self._where(name)}: the collection already exists")
        vectors = {
            EMBEDDING: qm.VectorParams(size=int(dim), distance=qm.Distance.COSINE),
            # Only ever scanned exactly: no HNSW graph.
            HASH: qm.VectorParams(size=int(bits), distance=qm.Distance.MANHATTAN,
                                  hnsw_config=qm.HnswConfigDiff(m=0)),
        }
        with self._errors(name, "create"):
            # local mode accepts and ignores the distribution settings; a server applies them
            self._client.create_collection(name, vectors_config=vectors, metadata=_meta_record(meta),
                                           shard_number=int(shards), replication_factor=int(replicas))
            if self.is_server:
                for field_name in INDEXED_FIELDS:
                    self._client.create_payload_index(name, field_name, qm.PayloadSchemaType.KEYWORD,
                                                      wait=True)
        self._schemas[name] = Schema(int(dim), int(bits))

    def delete_collection(self, name: str) -> None:
        self._check_writable()
        self._config(name)
        self._schemas.pop(name, None)
        with self._errors(name, "delete"):
            self._client.delete_collection(name)

    def get_meta(self, name: str) -> dict[str, Any]:
        record = self._config(name).metadata[META_KEY]
        if record.get("schema_version") != SCHEMA_VERSION:
            raise IndexError_(f"{self._where(name)}: schema version {record.get('schema_version')!r}, this "
                              f"cbir reads version {SCHEMA_VERSION}")
        return record["meta"]

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
                self._client.create_collection(LEDGER_COLLECTION, vectors_config={},
                                               metadata={"applied": entries})
            else:
                self._client.update_collection(LEDGER_COLLECTION, metadata={"applied": entries})

    def set_meta(self, name: str, meta: dict[str, Any]) -> None:
        self._check_writable()
        self._config(name)
        with self._errors(name, "set metadata"):
            self._client.update_collection(name, metadata=_meta_record(meta))

    # --- points ------------------------------------------------------------------------------------

    def count(self, name: str, flt: Filter | None = None) -> int:
        self._schema(name)
        with self._errors(name, "count"):
            return self._client.count(name, count_filter=_filter(flt), exact=True).count

    def upsert(self, name: str, points: Sequence[Point]) -> None:
        """Write points in batches of `UPSERT_BATCH`; nothing is written if one of them is bad."""
        self._check_writable()
        schema = self._schema(name)
        for point in points:
            check_point_id(self._where(name), point.id)
            check_vectors(f"{self._where(name)}: point {point.id}", schema.dim, schema.bits,
                          point.embedding, point.code)
        with self._errors(name, "upsert"):
            for start in range(0, len(points), UPSERT_BATCH):
                batch = [_point_struct(p) for p in points[start:start + UPSERT_BATCH]]
                self._client.upsert(name, points=batch, wait=True)

    def existing_ids(self, name: str, ids: Sequence[str]) -> set[str]:
        return {str(rec.id) for rec in self._retrieve(name, ids, with_payload=False, with_vectors=False)}

    def retrieve(self, name: str, ids: Sequence[str], with_vectors: bool = False) -> list[Point]:
        records = self._retrieve(name, ids, with_payload=True, with_vectors=with_vectors)
        by_id = {str(rec.id): _to_point(rec, with_vectors) for rec in records}
        return [by_id[i] for i in dict.fromkeys(ids) if i in by_id]

    def _retrieve(self, name: str, ids: Sequence[str], with_payload: bool,
                  with_vectors: bool) -> list[qm.Record]:
        self._schema(name)
        for point_id in ids:
            check_point_id(self._where(name), point_id)
        out: list[qm.Record] = []
        with self._errors(name, "retrieve"):
            for start in range(0, len(ids), 1024):
                out += self._client.retrieve(name, list(ids[start:start + 1024]), with_payload=with_payload,
                                             with_vectors=with_vectors)
        return out

    def scroll(self, name: str, flt: Filter | None = None, with_vectors: bool = True,
               batch: int = 1024) -> Iterator[Point]:
        """Every point matching `flt`, in id order."""
        self._schema(name)
        offset: Any = None
        while True:
            with self._errors(name, "scroll"):
                records, offset = self._client.scroll(name, scroll_filter=_filter(flt), limit=batch,
                                                      offset=offset, with_payload=True,
                                                      with_vectors=with_vectors)
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
        restriction = self._restriction(name, flt, code, prefilter, hamming_radius)
        if restriction is None:
            return []
        with self._errors(name, "search"):
            scored = self._client.query_points(name, query=_floats(embedding), using=EMBEDDING, limit=k,
                                               with_payload=True, search_params=self._search_params,
                                               **restriction).points
        return [_to_hit(p, code) for p in scored]

    def _restriction(self, name: str, flt: Filter | None, code: np.ndarray | None, prefilter: int | None,
                     radius: int | None) -> dict[str, Any] | None:
        """`query_filter` or `prefetch` for the cosine query: the Hamming candidates when asked, else
        the payload filter; None when there are no candidates."""
        if prefilter is not None:
            candidates = nearest_by_hamming(lambda limit: self._hash_query(name, code, flt, limit, radius),
                                            prefilter)
            if not candidates:
                return None
            return {"query_filter": qm.Filter(must=[qm.HasIdCondition(has_id=[i for i, _ in candidates])])}
        if radius is not None:
            population = self.count(name, flt)
            if population == 0:
                return None
            return {"prefetch": qm.Prefetch(query=_floats(code), using=HASH, filter=_filter(flt),
                                            limit=population, score_threshold=radius_threshold(radius),
                                            params=self._search_params)}
        return {"query_filter": _filter(flt)}

    def _hash_query(self, name: str, code: np.ndarray, flt: Filter | None, limit: int,
                    radius: int | None) -> list[tuple[str, int]]:
        """(id, Hamming distance) of the `limit` nearest codes, nearest first."""
        threshold = None if radius is None else radius_threshold(radius)
        with self._errors(name, "Hamming search"):
            scored = self._client.query_points(name, query=_floats(code), using=HASH,
                                               query_filter=_filter(flt), limit=limit,
                                               score_threshold=threshold, with_payload=False,
                                               search_params=self._search_params).points
        return [(str(p.id), int(round(p.score))) for p in scored]

    # --- internals ---------------------------------------------------------------------------------

    def _where(self, name: str | None) -> str:
        return self.location if name is None else f"{self.location}: collection {name!r}"

    def _check_writable(self) -> None:
        if not self.writable:
            raise IndexError_(f"{self.location}: the index was opened read-only")

    def _config(self, name: str) -> qm.CollectionConfig:
        """The collection's config; raises for an unknown or non-cbir collection."""
        if not self.has_collection(name):
            known = ", ".join(self.list_collections()) or "none"
            raise IndexError_(f"{self.location}: no collection {name!r} (collections: {known})")
        with self._errors(name, "reading the collection"):
            config = self._client.get_collection(name).config
        if META_KEY not in (config.metadata or {}):
            raise IndexError_(f"{self._where(name)}: not a cbir collection (no '{META_KEY}' metadata; "
                              "Qdrant servers older than 1.16 drop collection metadata)")
        return config

    def _schema(self, name: str) -> Schema:
        if name not in self._schemas:
            vectors = self._config(name).params.vectors
            if not isinstance(vectors, dict) or not {EMBEDDING, HASH} <= vectors.keys():
                raise IndexError_(f"{self._where(name)}: lacks the '{EMBEDDING}'/'{HASH}' vectors")
            self._schemas[name] = Schema(vectors[EMBEDDING].size, vectors[HASH].size)
        return self._schemas[name]

    @contextmanager
    def _errors(self, name: str | None, action: str) -> Iterator[None]:
        """Turn a qdrant-client or transport exception into a one-line `IndexError_`."""
        try:
            yield
        except CbirError:
            raise
        except Exception as exc:
            raise IndexError_(f"{self._where(name)}: {action} failed: {_detail(exc)}") from exc


def _detail(exc: Exception) -> str:
    """One line on what went wrong, with the server's own error message where there is one."""
    if isinstance(exc, UnexpectedResponse):
        try:
            error = str(exc.structured()["status"]["error"])
        except (ValueError, KeyError, TypeError):
            error = exc.reason_phrase
        hint = " (check the API key)" if exc.status_code in (401, 403) else ""
        return f"HTTP {exc.status_code}: {error}{hint}"
    if isinstance(exc, ResponseHandlingException):
        return f"cannot reach the Qdrant server ({_first_line(exc.source)})"
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _meta_record(meta: dict[str, Any]) -> dict[str, Any]:
    return {META_KEY: {"schema_version": SCHEMA_VERSION, "meta": meta}}


def _match(value: Any) -> qm.MatchValue | qm.MatchAny:
    if isinstance(value, (list, tuple, set, frozenset)):
        return qm.MatchAny(any=list(value))
    return qm.MatchValue(value=value)


def _filter(flt: Filter | None) -> qm.Filter | None:
    if not flt:
        return None
    must = [qm.FieldCondition(key=key, match=_match(v)) for key, v in flt.must.items()]
    must_not = [qm.FieldCondition(key=key, match=_match(v)) for key, v in flt.must_not.items()]
    return qm.Filter(must=must or None, must_not=must_not or None)


def _floats(vector: np.ndarray) -> list[float]:
    return np.asarray(vector, dtype=np.float32).tolist()


def _point_struct(point: Point) -> qm.PointStruct:
    vectors = {EMBEDDING: _floats(point.embedding), HASH: _floats(point.code)}
    return qm.PointStruct(id=point.id, vector=vectors, payload={**point.payload, HASH: pack_code(point.code)})


def _to_point(record: qm.Record, with_vectors: bool) -> Point:
    if with_vectors and isinstance(record.vector, dict):
        embedding = np.asarray(record.vector[EMBEDDING], dtype=np.float32)
        code = np.rint(record.vector[HASH]).astype(np.uint8)
    else:
        embedding, code = np.empty(0, np.float32), np.empty(0, np.uint8)
    return Point(str(record.id), embedding, code, dict(record.payload or {}))


def _to_hit(point: qm.ScoredPoint, code: np.ndarray | None) -> Hit:
    payload = dict(point.payload or {})
    hamming = hamming_to(payload[HASH], code) if code is not None and HASH in payload else None
    return Hit(str(point.id), float(point.score), payload, hamming)
