"""Translation of cbir's collections, filters and scopes into qdrant-client objects (server and local mode)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
from qdrant_client import models as qm

from cbir.store.base import EMBEDDING, HASH, THUMBNAIL, UPSERT_BATCH, Point, vector_lists
from cbir.store.hamming import mih_field, radius_threshold
from cbir.store.planner import Scope
from cbir.store.records import Filter

NO_THUMBNAIL = qm.PayloadSelectorExclude(exclude=[THUMBNAIL])
#: Qdrant refuses requests over 32 MiB; cbir keeps each upsert request near a quarter of that.
MAX_REQUEST_BYTES = 8 * 2**20


def vectors_config(dim: int, bits: int, server: bool) -> dict[str, qm.VectorParams]:
    """Cosine `embedding`; `hash` as 0/1 (uint8 on a server: local mode ignores the datatype), only ever scanned
    exactly: no HNSW graph (schema 2)."""
    return {
        EMBEDDING: qm.VectorParams(size=int(dim), distance=qm.Distance.COSINE),
        HASH: qm.VectorParams(size=int(bits), distance=qm.Distance.MANHATTAN, hnsw_config=qm.HnswConfigDiff(m=0),
                              datatype=qm.Datatype.UINT8 if server else None),
    }


def _match(value: Any) -> qm.MatchValue | qm.MatchAny:
    if isinstance(value, (list, tuple, set, frozenset)):
        return qm.MatchAny(any=list(value))
    return qm.MatchValue(value=value)


def client_filter(flt: Filter | None, mih: list[list[int]] | None = None) -> qm.Filter | None:
    """The payload filter, and with `mih` keys also "at least one substring is near the query's"."""
    if not flt and not mih:
        return None
    flt = flt or Filter()
    must: list[qm.Condition] = [qm.FieldCondition(key=key, match=_match(v)) for key, v in flt.must.items()]
    must_not: list[qm.Condition] = [qm.FieldCondition(key=key, match=_match(v)) for key, v in flt.must_not.items()]
    should: list[qm.Condition] = [qm.FieldCondition(key=mih_field(i), match=qm.MatchAny(any=keys))
                                  for i, keys in enumerate(mih or [])]
    return qm.Filter(must=must or None, must_not=must_not or None, should=should or None)


def scope_filter(scope: Scope) -> qm.Filter | None:
    """A scope's payload conditions: its filter and MIH keys, or its id shortlist (already filtered)."""
    if scope.ids is not None:
        return qm.Filter(must=[qm.HasIdCondition(has_id=list(scope.ids))])
    return client_filter(scope.flt, scope.mih)


def floats(vector: np.ndarray) -> list[float]:
    return np.asarray(vector, dtype=np.float32).tolist()


def threshold(scope: Scope) -> float | None:
    return None if scope.radius is None else radius_threshold(scope.radius)


def vector_query(embedding: np.ndarray, limit: int, scope: Scope, params: qm.SearchParams | None) -> dict[str, Any]:
    """`query_points` arguments: exact cosine, inside the scope's Hamming ball (a thresholded prefetch)."""
    args: dict[str, Any] = {"query": floats(embedding), "using": EMBEDDING, "limit": limit,
                            "with_payload": NO_THUMBNAIL, "search_params": params}
    if scope.radius is not None and scope.ids is None:
        assert scope.code is not None  # the planner's radius scope has the code
        args["prefetch"] = qm.Prefetch(query=floats(scope.code), using=HASH, filter=scope_filter(scope),
                                       limit=scope.population, score_threshold=threshold(scope), params=params)
    else:
        args["query_filter"] = scope_filter(scope)
    return args


def code_query(code: np.ndarray, limit: int, scope: Scope, params: qm.SearchParams | None) -> dict[str, Any]:
    return {"query": floats(code), "using": HASH, "query_filter": scope_filter(scope), "limit": limit,
            "score_threshold": threshold(scope), "with_payload": False, "search_params": params}


def rescore_query(embedding: np.ndarray, code: np.ndarray, limit: int, scope: Scope,
                  params: qm.SearchParams | None) -> dict[str, Any]:
    """One Query API request: prefetch the `limit` nearest codes in scope, rescore them all by cosine."""
    prefetch = qm.Prefetch(query=floats(code), using=HASH, filter=scope_filter(scope), limit=limit,
                           score_threshold=threshold(scope), params=params)
    return {"query": floats(embedding), "using": EMBEDDING, "prefetch": prefetch, "limit": limit,
            "with_payload": NO_THUMBNAIL, "search_params": params}


def point_struct(point: Point, payload: dict[str, Any]) -> qm.PointStruct:
    return qm.PointStruct(id=point.id, vector=cast("qm.VectorStruct", vector_lists(point)), payload=payload)


def batch_size(points: Sequence[Point]) -> int:
    """Points per upsert request: `UPSERT_BATCH`, or fewer when the largest point's JSON (a float takes up
    to 24 characters) would push a request past `MAX_REQUEST_BYTES`."""
    if not points:
        return UPSERT_BATCH
    largest = max(24 * (p.embedding.size + p.code.size) + len(json.dumps(p.payload, default=str)) + 256
                  for p in points)
    return max(1, min(UPSERT_BATCH, MAX_REQUEST_BYTES // largest))
