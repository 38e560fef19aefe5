"""Translation of cbir's collections, filters and scopes into Qdrant Edge 0.9 objects.

Quirks handled here: `MatchValue(True)` would become the integer 1, so bool filter values are passed as
`numpy.bool_`; Manhattan scores are positive distances and `score_threshold` keeps the ones strictly below it
(`radius_threshold`). The package's stubs list Python lists for vectors, but the engine reads any float sequence:
numpy arrays and memoryviews, which skip building the lists, carry a `type: ignore[arg-type]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import qdrant_edge as qe

from cbir.store.base import EMBEDDING, HASH, INDEXED_FIELDS, THUMBNAIL, Point
from cbir.store.hamming import mih_field, mih_widths, radius_threshold
from cbir.store.planner import Scope
from cbir.store.records import Filter

EXACT = qe.SearchParams(exact=True)
NO_THUMBNAIL = qe.PayloadSelector.Exclude([THUMBNAIL])


def edge_config(dim: int, bits: int) -> qe.EdgeConfig:
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


def create_shard(path: Path, dim: int, bits: int) -> qe.EdgeShard:
    """A new shard with keyword indexes on `INDEXED_FIELDS` and lookup-only integer indexes on the MIH fields."""
    shard = qe.EdgeShard.create(str(path), edge_config(dim, bits))
    for field_name in INDEXED_FIELDS:
        shard.update(qe.UpdateOperation.create_field_index(field_name, qe.PayloadSchemaType.Keyword))
    lookup_only = qe.IntegerIndexParams(lookup=True, range=False, enable_hnsw=False)
    for i in range(len(mih_widths(bits))):
        shard.update(qe.UpdateOperation.create_field_index(mih_field(i), lookup_only))
    shard.flush()
    return shard


def _match(value: Any) -> qe.MatchValue | qe.MatchAny:
    if isinstance(value, (list, tuple, set, frozenset)):
        return qe.MatchAny(list(value))
    if isinstance(value, bool):
        # a Python bool would become the integer 0/1; the stub does not list numpy.bool_, which the engine reads
        return qe.MatchValue(np.bool_(value))  # type: ignore[arg-type]  # stub: no numpy.bool_
    return qe.MatchValue(value)


def edge_filter(flt: Filter | None, mih: list[list[int]] | None = None) -> qe.Filter | None:
    """The payload filter, and with `mih` keys also "at least one substring is near the query's"."""
    if not flt and not mih:
        return None
    flt = flt or Filter()
    must: list[qe.ConditionType] = [qe.FieldCondition(key, match=_match(v)) for key, v in flt.must.items()]
    must_not: list[qe.ConditionType] = [qe.FieldCondition(key, match=_match(v)) for key, v in flt.must_not.items()]
    should: list[qe.ConditionType] = [qe.FieldCondition(mih_field(i), match=qe.MatchAny(keys))
                                      for i, keys in enumerate(mih or [])]
    return qe.Filter(must=must or None, must_not=must_not or None, should=should or None)


def scope_filter(scope: Scope) -> qe.Filter | None:
    """A scope's payload conditions: its filter and MIH keys, or its id shortlist (already filtered)."""
    if scope.ids is not None:
        return qe.Filter(must=[qe.HasIdCondition(set(scope.ids))])
    return edge_filter(scope.flt, scope.mih)


def code_query(code: np.ndarray) -> qe.Query:
    return qe.Query.Nearest(np.asarray(code, dtype=np.float32), using=HASH)  # type: ignore[arg-type]  # stub: lists only


def vector_request(embedding: np.ndarray, limit: int, scope: Scope) -> qe.QueryRequest:
    """Exact cosine, inside the scope's Hamming ball (a thresholded prefetch on `hash`) when it has one."""
    condition, prefetches = scope_filter(scope), None
    if scope.radius is not None and scope.ids is None:
        assert scope.code is not None and scope.population is not None  # the planner's radius scope on Edge
        prefetches = [qe.Prefetch(limit=scope.population, query=code_query(scope.code), filter=condition,
                                  score_threshold=radius_threshold(scope.radius), params=EXACT)]
        condition = None
    query = qe.Query.Nearest(np.asarray(embedding, dtype=np.float32), using=EMBEDDING)  # type: ignore[arg-type]  # stub: lists only
    return qe.QueryRequest(limit=limit, query=query, prefetches=prefetches, filter=condition,
                           with_payload=NO_THUMBNAIL, params=EXACT)


def code_request(code: np.ndarray, limit: int, scope: Scope) -> qe.QueryRequest:
    threshold = None if scope.radius is None else radius_threshold(scope.radius)
    return qe.QueryRequest(limit=limit, query=code_query(code), filter=scope_filter(scope),
                           score_threshold=threshold, with_payload=False, params=EXACT)


def rescore_request(embedding: np.ndarray, code: np.ndarray, limit: int, scope: Scope) -> qe.QueryRequest:
    """Prefetch the `limit` nearest codes in scope, then exact cosine over all of them (one request)."""
    threshold = None if scope.radius is None else radius_threshold(scope.radius)
    prefetch = qe.Prefetch(limit=limit, query=code_query(code), filter=scope_filter(scope),
                           score_threshold=threshold, params=EXACT)
    query = qe.Query.Nearest(np.asarray(embedding, dtype=np.float32), using=EMBEDDING)  # type: ignore[arg-type]  # stub: lists only
    return qe.QueryRequest(limit=limit, query=query, prefetches=[prefetch], with_payload=NO_THUMBNAIL, params=EXACT)


def edge_point(point: Point, payload: dict[str, Any]) -> qe.Point:
    """The vectors as memoryviews of float32 arrays: qdrant-edge-py reads any sequence, and these skip the
    Python lists (13 instead of 16.5 µs a point for 512 + 64 values; the stored values are the same)."""
    # numpy's stubs give arrays the buffer protocol from Python 3.12 on only (the runtime has it on every version)
    vectors = {EMBEDDING: memoryview(np.ascontiguousarray(point.embedding, dtype=np.float32)),  # type: ignore[arg-type]
               HASH: memoryview(np.ascontiguousarray(point.code, dtype=np.float32))}  # type: ignore[arg-type]
    return qe.Point(point.id, vectors, payload)  # type: ignore[arg-type]  # stub: lists only
