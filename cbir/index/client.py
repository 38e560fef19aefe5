"""qdrant-client backend: a Qdrant server (`http(s)://host:port`) or qdrant-client's local mode
(`:memory:`, `local:PATH`).

Collection metadata is kept in the collection's own metadata (`create_collection(metadata=…)`, supported
by qdrant-client 1.20 in local mode and by Qdrant servers from 1.16), under the single key `cbir`:
`{"schema_version": 2, "meta": {...}}`. `update_collection` merges metadata key by key, so writing the
whole `cbir` value replaces the dict. Collections without that key are not cbir's: `list_collections`
leaves them out. The dimension and bit count are read from the vector configuration.

Search is exact (`SearchParams(exact=True)` on a server; local mode always scans). `prefilter=N` first
asks for the Hamming-nearest ids (ties broken by id, see `base.nearest_by_hamming`) and then ranks those
by cosine under a `HasIdCondition`; `hamming_radius` alone is one query whose `Prefetch` on the `hash`
vector has a distance threshold.

Names are passed to the engine as given, so an alias is resolved by Qdrant itself, per request: a query
through an alias never sees half a swap, and a read-only JWT scoped to the alias is enough to query.
`update_collection_aliases` moves an alias atomically (delete + create in one request).

Local mode ignores payload indexes, search params and the uint8 vector datatype (and warns about them), so
they are only sent to a server. Local mode on disk locks its folder: one process at a time, readers included.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
from cbir.index.retry import RetryingClient, call_with_retries

META_KEY = "cbir"
#: Seconds a collection's vector sizes are cached (see `ClientIndex._schema`).
SCHEMA_TTL = 2.0
_SHARE_HINT = "use a Qdrant server to share an index"
_NO_THUMBNAIL = qm.PayloadSelectorExclude(exclude=[THUMBNAIL])


@dataclass(frozen=True)
class ServerSettings:
    """How to reach a Qdrant server: API key (or JWT), request timeout in seconds (qdrant-client's own
    setting; None keeps its default), and a CA bundle for TLS with a private certificate authority."""

    api_key: str | None = None
    timeout: int | None = None
    ca_cert: str | None = None
    retries: int = 3

    @classmethod
    def from_env(cls, api_key: str | None = None, timeout: int | None = None,
                 ca_cert: str | None = None, retries: int | None = None) -> ServerSettings:
        """Arguments first, then $CBIR_QDRANT_API_KEY, $CBIR_QDRANT_TIMEOUT, $CBIR_QDRANT_CA_CERT and
        $CBIR_QDRANT_RETRIES."""
        timeout = timeout if timeout is not None else _env_int("CBIR_QDRANT_TIMEOUT", None)
        retries = retries if retries is not None else _env_int("CBIR_QDRANT_RETRIES", 3)
        return cls(api_key or os.environ.get("CBIR_QDRANT_API_KEY") or None, timeout,
                   ca_cert or os.environ.get("CBIR_QDRANT_CA_CERT") or None, int(retries or 0))


class ClientIndex(Index):
    """Collections in a Qdrant server or in qdrant-client's local mode."""

    def __init__(self, location: str, writable: bool = False, create: bool = False,
                 settings: ServerSettings | None = None) -> None:
        if create and not writable:
            raise ValueError("create=True needs writable=True")
        self.location = location
        self.writable = writable
        self.is_server = location.startswith(("http://", "https://"))
        self.settings = settings or ServerSettings()
        self._search_params = qm.SearchParams(exact=True) if self.is_server else None
        self._schemas: dict[str, tuple[Schema, float]] = {}
        self._client = self._connect(create)

    def _connect(self, create: bool) -> QdrantClient:
        if self.is_server:
            extra: dict[str, Any] = {}
            if self.settings.ca_cert:
                if not Path(self.settings.ca_cert).is_file():
                    raise IndexError_(f"{self.settings.ca_cert}: CA certificate file not found")
                extra["verify"] = self.settings.ca_cert  # passed on to httpx
            client = QdrantClient(url=self.location, api_key=self.settings.api_key, timeout=self.settings.timeout,
                                  check_compatibility=False, **extra)
            return RetryingClient(client, self.location, self.settings.retries)  # type: ignore[return-value]
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
        if name in self.list_aliases():
            raise IndexError_(f"{self._where(name)}: the name is an alias")
        vectors = {
            EMBEDDING: qm.VectorParams(size=int(dim), distance=qm.Distance.COSINE),
            # 0/1 as uint8 (schema 2), only ever scanned exactly: no HNSW graph.
            HASH: qm.VectorParams(size=int(bits), distance=qm.Distance.MANHATTAN,
                                  hnsw_config=qm.HnswConfigDiff(m=0),
                                  datatype=qm.Datatype.UINT8 if self.is_server else None),
        }
        with self._errors(name, "create"):
            # local mode accepts and ignores the distribution settings; a server applies them
            self._client.create_collection(name, vectors_config=vectors, metadata=_meta_record(meta),
                                           shard_number=int(shards), replication_factor=int(replicas))
            if self.is_server:
                for field_name in INDEXED_FIELDS:
                    self._client.create_payload_index(name, field_name, qm.PayloadSchemaType.KEYWORD,
                                                      wait=True)
                lookup_only = qm.IntegerIndexParams(type=qm.IntegerIndexType.INTEGER, lookup=True, range=False)
                for i in range(len(mih_widths(bits))):
                    self._client.create_payload_index(name, mih_field(i), lookup_only, wait=True)
        self._schemas[name] = (Schema(int(dim), int(bits)), time.monotonic())

    def delete_collection(self, name: str, wait: float = 0.0) -> None:
        """Delete a collection (the server finishes requests in flight); `wait` is for Edge and unused here."""
        self._check_writable()
        if name in self.list_aliases():
            raise IndexError_(f"{self._where(name)}: is an alias; delete the collection it points at "
                              f"({self.resolve(name)!r}) or move the alias")
        self._config(name)
        users = [a for a, c in self.list_aliases().items() if c == name]
        if users:
            raise IndexError_(f"{self._where(name)}: alias {users[0]!r} points at it; move the alias first")
        self._schemas.pop(name, None)
        with self._errors(name, "delete"):
            self._client.delete_collection(name)

    def get_meta(self, name: str) -> dict[str, Any]:
        return self._record(name)["meta"]

    def schema_version(self, name: str) -> int:
        return int(self._record(name)["schema_version"])

    def _record(self, name: str) -> dict[str, Any]:
        record = self._config(name).metadata[META_KEY]
        if record.get("schema_version") not in READABLE_SCHEMAS:
            raise IndexError_(f"{self._where(name)}: schema version {record.get('schema_version')!r}, this "
                              f"cbir reads versions {', '.join(map(str, READABLE_SCHEMAS))}; upgrade cbir")
        return record

    # --- snapshots (see cbir.index.snapshots) ------------------------------------------------------

    def shard_count(self, name: str) -> int:
        return int(self._config(name).params.shard_number or 1)

    def download_shard_snapshot(self, name: str, path: Path) -> None:
        """Stream the server's snapshot of the collection's only shard to `path` (Qdrant's
        `GET /collections/{name}/shards/0/snapshot`, the format Qdrant Edge unpacks)."""
        import httpx  # qdrant-client's own HTTP library

        if not self.is_server:
            raise IndexError_(f"{self.location}: local mode has no snapshots")
        collection = self.resolve(name)
        url = f"{self.location.rstrip('/')}/collections/{collection}/shards/0/snapshot"
        headers = {"api-key": self.settings.api_key} if self.settings.api_key else {}

        def download() -> None:
            with httpx.stream("GET", url, headers=headers, timeout=self.settings.timeout or 300,
                              verify=self.settings.ca_cert or True) as response:
                if response.status_code in (500, 502, 503, 504):
                    response.raise_for_status()  # transient: retried
                if response.status_code != 200:
                    hint = " (snapshots need a full-access API key)" if response.status_code in (401, 403) else ""
                    raise IndexError_(f"{self._where(name)}: snapshot download failed: HTTP "
                                      f"{response.status_code}{hint}")
                with open(path, "wb") as fh:
                    for chunk in response.iter_bytes(1 << 20):
                        fh.write(chunk)

        with self._errors(name, "downloading the snapshot"):
            call_with_retries(self.location, self.settings.retries, download)

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
            # keeps the schema version the collection was written with
            self._client.update_collection(name, metadata=_meta_record(meta, self.schema_version(name)))

    # --- points ------------------------------------------------------------------------------------

    def count(self, name: str, flt: Filter | None = None) -> int:
        self._schema(name)
        with self._errors(name, "count"):
            return self._client.count(name, count_filter=_filter(flt), exact=True).count

    def upsert(self, name: str, points: Sequence[Point]) -> None:
        """Write points in requests of at most `UPSERT_BATCH` points and about `MAX_REQUEST_BYTES` (see
        `batch_size`); nothing is written if one of them is bad."""
        self._check_writable()
        schema = self._schema(name)
        for point in points:
            check_point_id(self._where(name), point.id)
            check_vectors(f"{self._where(name)}: point {point.id}", schema.dim, schema.bits,
                          point.embedding, point.code)
        step = batch_size(points)
        with self._errors(name, "upsert"):
            for start in range(0, len(points), step):
                chunk = points[start:start + step]
                batch = [_point_struct(p, body) for p, body in zip(chunk, stored_payloads(chunk), strict=True)]
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
               batch: int = 1024, with_thumbnails: bool = False) -> Iterator[Point]:
        """Every point matching `flt`, in id order."""
        self._schema(name)
        offset: Any = None
        while True:
            with self._errors(name, "scroll"):
                records, offset = self._client.scroll(name, scroll_filter=_filter(flt), limit=batch,
                                                      offset=offset,
                                                      with_payload=True if with_thumbnails else _NO_THUMBNAIL,
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
                                               with_payload=_NO_THUMBNAIL, search_params=self._search_params,
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
            condition = _filter(flt, self._mih(name, code, radius))
            with self._errors(name, "count"):
                population = self._client.count(name, count_filter=condition, exact=True).count
            if population == 0:
                return None
            return {"prefetch": qm.Prefetch(query=_floats(code), using=HASH, filter=condition,
                                            limit=population, score_threshold=radius_threshold(radius),
                                            params=self._search_params)}
        return {"query_filter": _filter(flt)}

    def _hash_query(self, name: str, code: np.ndarray, flt: Filter | None, limit: int,
                    radius: int | None) -> list[tuple[str, int]]:
        """(id, Hamming distance) of the `limit` nearest codes, nearest first."""
        threshold = None if radius is None else radius_threshold(radius)
        mih = None if radius is None else self._mih(name, code, radius)
        with self._errors(name, "Hamming search"):
            scored = self._client.query_points(name, query=_floats(code), using=HASH,
                                               query_filter=_filter(flt, mih), limit=limit,
                                               score_threshold=threshold, with_payload=False,
                                               search_params=self._search_params).points
        return [(str(p.id), int(round(p.score))) for p in scored]

    def _mih(self, name: str, code: np.ndarray, radius: int) -> list[list[int]] | None:
        """The multi-index-hashing keys for a radius search (schema 2 stores the substrings), else None."""
        return mih_keys(code, radius) if self._schema(name).version >= 2 else None

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
        """Vector sizes of the collection `name` stands for. The server resolves an alias itself (no
        `GET /aliases`, which a collection-scoped token may not be allowed); cached for `SCHEMA_TTL` seconds
        so that an alias moved to a collection with other sizes is noticed."""
        cached = self._schemas.get(name)
        if cached is not None and time.monotonic() - cached[1] < SCHEMA_TTL:
            return cached[0]
        vectors = self._config(name).params.vectors
        if not isinstance(vectors, dict) or not {EMBEDDING, HASH} <= vectors.keys():
            raise IndexError_(f"{self._where(name)}: lacks the '{EMBEDDING}'/'{HASH}' vectors")
        version = int((self._config(name).metadata or {}).get(META_KEY, {}).get("schema_version", SCHEMA_VERSION))
        schema = Schema(vectors[EMBEDDING].size, vectors[HASH].size, version)
        self._schemas[name] = (schema, time.monotonic())
        return schema

    @contextmanager
    def _errors(self, name: str | None, action: str) -> Iterator[None]:
        """Turn a qdrant-client or transport exception into a one-line `IndexError_`."""
        try:
            yield
        except CbirError:
            raise
        except Exception as exc:
            raise IndexError_(f"{self._where(name)}: {action} failed: {_detail(exc)}") from exc


#: Qdrant refuses requests over 32 MiB; cbir keeps each upsert request near a quarter of that.
MAX_REQUEST_BYTES = 8 * 2**20


def batch_size(points: Sequence[Point]) -> int:
    """Points per upsert request: `UPSERT_BATCH`, or fewer when the largest point's JSON (a float takes up
    to 24 characters) would push a request past `MAX_REQUEST_BYTES`."""
    if not points:
        return UPSERT_BATCH
    largest = max(24 * (p.embedding.size + p.code.size) + len(json.dumps(p.payload, default=str)) + 256
                  for p in points)
    return max(1, min(UPSERT_BATCH, MAX_REQUEST_BYTES // largest))


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise IndexError_(f"${name}={value!r}: not a whole number") from None


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


def _meta_record(meta: dict[str, Any], schema_version: int = SCHEMA_VERSION) -> dict[str, Any]:
    return {META_KEY: {"schema_version": schema_version, "meta": meta}}


def _match(value: Any) -> qm.MatchValue | qm.MatchAny:
    if isinstance(value, (list, tuple, set, frozenset)):
        return qm.MatchAny(any=list(value))
    return qm.MatchValue(value=value)


def _filter(flt: Filter | None, mih: list[list[int]] | None = None) -> qm.Filter | None:
    """The payload filter, and with `mih` keys also "at least one substring is near the query's"."""
    if not flt and not mih:
        return None
    flt = flt or Filter()
    must = [qm.FieldCondition(key=key, match=_match(v)) for key, v in flt.must.items()]
    must_not = [qm.FieldCondition(key=key, match=_match(v)) for key, v in flt.must_not.items()]
    should = [qm.FieldCondition(key=mih_field(i), match=qm.MatchAny(any=keys)) for i, keys in enumerate(mih or [])]
    return qm.Filter(must=must or None, must_not=must_not or None, should=should or None)


def _floats(vector: np.ndarray) -> list[float]:
    return np.asarray(vector, dtype=np.float32).tolist()


def _point_struct(point: Point, payload: dict[str, Any]) -> qm.PointStruct:
    vectors = {EMBEDDING: _floats(point.embedding), HASH: _floats(point.code)}
    return qm.PointStruct(id=point.id, vector=vectors, payload=payload)


def _to_point(record: qm.Record, with_vectors: bool) -> Point:
    if with_vectors and isinstance(record.vector, dict):
        embedding = np.asarray(record.vector[EMBEDDING], dtype=np.float32)
        code = np.rint(record.vector[HASH]).astype(np.uint8)
    else:
        embedding, code = np.empty(0, np.float32), np.empty(0, np.uint8)
    return Point(str(record.id), embedding, code, public_payload(record.payload))


def _to_hit(point: qm.ScoredPoint, code: np.ndarray | None) -> Hit:
    payload = public_payload(point.payload)
    hamming = hamming_to(payload[HASH], code) if code is not None and HASH in payload else None
    return Hit(str(point.id), float(point.score), payload, hamming)
