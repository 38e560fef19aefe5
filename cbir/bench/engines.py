"""The engines `cbir bench` compares. Each loads the benchmark points (timed) and answers queries by method.

Methods: `exact_knn` (exact cosine), `hnsw_knn` (approximate), `topn_prefilter_rerank` (the N nearest codes by
Hamming distance, then exact cosine), `radius_prefilter_rerank` (codes within Hamming R, then exact cosine),
`binary_flat_rerank` (FAISS IndexBinaryFlat top N + NumPy rerank). `topn_codes_only` and `binary_flat_only` are the
Hamming step alone (the N nearest codes, no rerank; their recall@10 is the share of the true top 10 in the
shortlist), so that the two halves of a prefilter plan can be compared apart.

`cbir-memory-f16` and `cbir-memory-i8` are the in-memory engine storing fewer bytes per vector (issue 27): float16
vectors alone (approximate cosines), or int8 vectors whose best candidates are rescored from the float32 ones.
"""

from __future__ import annotations

import tempfile
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cbir.bench.data import BenchData
from cbir.store.base import Filter
from cbir.store.memory import MemoryIndex

#: Local mode answers a radius prefilter (a prefetch as large as the collection) in Python: 5.8 s per query
#: at 3,000 points on the 2-core machine, so the bench leaves it out above this size.
LOCAL_RADIUS_CAP = 5_000

Search = Callable[[np.ndarray, np.ndarray, Filter | None], list[int]]   # (query, code, filter) → positions


class Engine(ABC):
    name = ""
    filters = True                    # whether it answers payload-filtered queries

    @abstractmethod
    def load(self, data: BenchData) -> tuple[float, float]:
        """Load the points; returns (ingest points/s, index build seconds)."""

    @abstractmethod
    def methods(self, k: int, prefilter: int, radius: int) -> dict[str, Search]:
        """Method name → search function."""

    def batched(self, k: int) -> dict[str, Callable[[np.ndarray], object]]:
        """Method name → a search of a whole (Q, dim) batch of queries with every thread (throughput rows)."""
        return {}

    def answered(self) -> Counter[str] | None:
        """Requests so far by what answered them, "native" or "copy" (an index's in-memory copy); None: n/a."""
        return None

    def one_shot(self, method: str, k: int, prefilter: int, radius: int, data: BenchData,
                 flt: Filter | None) -> float | None:
        """Milliseconds to open the index afresh, answer one query by `method` and close it (what a one-shot
        `cbir query` pays for its search); None where there is nothing to reopen."""
        return None

    def close(self) -> None:  # noqa: B027 - most engines hold nothing
        pass


def cbir_methods(search: Callable[..., list], position: dict[str, int], k: int, prefilter: int,
                 radius: int) -> dict[str, Search]:
    """Exact kNN and both prefilters through anything with `Index.search`'s contract (`search(q, k, flt, ...)`,
    hits with ids), as benchmark positions."""
    def run(**kw: object) -> Search:
        def one(q: np.ndarray, code: np.ndarray, flt: Filter | None) -> list[int]:
            extra = {**kw, "code": code} if kw else {}
            return [position[h.id] for h in search(q, k, flt, **extra)]
        return one
    return {"exact_knn": run(), "topn_prefilter_rerank": run(prefilter=prefilter),
            "radius_prefilter_rerank": run(hamming_radius=radius)}


class IndexEngine(Engine):
    """cbir's `Index` (Qdrant Edge, or qdrant-client local mode): exact search, prefilters through Qdrant."""

    def __init__(self, kind: str) -> None:
        self.name = "qdrant-edge" if kind == "edge" else "qdrant-local"
        self.kind = kind
        self._tmp = tempfile.TemporaryDirectory(prefix="cbir-bench-")

    def load(self, data: BenchData) -> tuple[float, float]:
        from cbir.store import open_index
        self.location = str(Path(self._tmp.name) / "edge") if self.kind == "edge" else ":memory:"
        self.index = open_index(self.location, writable=True, create=True)
        assert data.points is not None, "Qdrant engines need Points"
        dim, bits = data.points[0].embedding.size, data.points[0].code.size
        self.index.create_collection("bench", dim, bits, {"dim": dim, "bits": bits})
        started = time.perf_counter()
        for start in range(0, len(data.points), 2048):
            self.index.upsert("bench", data.points[start:start + 2048])
        self.index.release("bench")  # flushed, as a reader would find it
        seconds = time.perf_counter() - started
        self.position = {p.id: i for i, p in enumerate(data.points)}
        return len(data.points) / seconds, 0.0

    def methods(self, k: int, prefilter: int, radius: int) -> dict[str, Search]:
        methods = cbir_methods(lambda *a, **kw: self.index.search("bench", *a, **kw), self.position, k, prefilter,
                               radius)
        if self.kind == "local" and len(self.position) > LOCAL_RADIUS_CAP:
            del methods["radius_prefilter_rerank"]  # seconds per query: see LOCAL_RADIUS_CAP
        return methods

    def answered(self) -> Counter[str] | None:
        copies = getattr(self.index, "copies", None)
        return None if copies is None else Counter(copies.answered)

    def one_shot(self, method: str, k: int, prefilter: int, radius: int, data: BenchData,
                 flt: Filter | None) -> float | None:
        if self.kind != "edge":
            return None   # local mode's `:memory:` lives in this index object only
        from cbir.store import open_index
        started = time.perf_counter()
        with open_index(self.location) as fresh:
            search = cbir_methods(lambda *a, **kw: fresh.search("bench", *a, **kw), self.position, k, prefilter,
                                  radius)[method]
            search(data.queries[0], data.query_codes[0], flt)
        return 1000 * (time.perf_counter() - started)

    def close(self) -> None:
        self.index.close()
        self._tmp.cleanup()


class EdgeHnswEngine(Engine):
    """Qdrant Edge with an HNSW graph on the embedding (built by `optimize()`), searched approximately."""

    name = "qdrant-edge"

    def __init__(self, m: int = 16, ef_construct: int = 64, ef: int = 64) -> None:
        self.m, self.ef_construct, self.ef = m, ef_construct, ef
        self._tmp = tempfile.TemporaryDirectory(prefix="cbir-bench-hnsw-")

    def load(self, data: BenchData) -> tuple[float, float]:
        import qdrant_edge as qe

        from cbir.store.edge_convert import edge_filter
        self._filter = edge_filter
        assert data.points is not None, "Qdrant engines need Points"
        dim = data.points[0].embedding.size
        hnsw = qe.HnswIndexConfig(m=self.m, ef_construct=self.ef_construct, full_scan_threshold=10_000)
        config = qe.EdgeConfig(vectors={"embedding": qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine,
                                                                          hnsw_config=hnsw)}, wal_enabled=False)
        self.shard = qe.EdgeShard.create(str(Path(self._tmp.name) / "shard"), config)
        self.shard.update(qe.UpdateOperation.create_field_index("label", qe.PayloadSchemaType.Keyword))
        started = time.perf_counter()
        for start in range(0, len(data.points), 2048):
            batch = [qe.Point(p.id, {"embedding": p.embedding}, p.payload)  # type: ignore[dict-item]  # stub: lists only
                     for p in data.points[start:start + 2048]]
            self.shard.update(qe.UpdateOperation.upsert_points(batch))
        self.shard.flush()
        ingest = len(data.points) / (time.perf_counter() - started)
        started = time.perf_counter()
        self.shard.optimize()
        build = time.perf_counter() - started
        self.position = {p.id: i for i, p in enumerate(data.points)}
        self._params = qe.SearchParams(hnsw_ef=self.ef, exact=False)
        return ingest, build

    def methods(self, k: int, prefilter: int, radius: int) -> dict[str, Search]:
        import qdrant_edge as qe

        def search(q: np.ndarray, code: np.ndarray, flt: Filter | None) -> list[int]:
            query = qe.Query.Nearest(q, using="embedding")  # type: ignore[arg-type]  # stub: lists only
            request = qe.QueryRequest(limit=k, query=query, filter=self._filter(flt),
                                      with_payload=False, params=self._params)
            return [self.position[str(p.id)] for p in self.shard.query(request)]
        return {"hnsw_knn": search}

    def close(self) -> None:
        self.shard.close()
        self._tmp.cleanup()


class MemoryEngine(Engine):
    """cbir's in-memory searcher (`cbir.store.memory`), what `cbir serve` answers with."""

    name = "cbir-memory"
    kind: type[MemoryIndex] = MemoryIndex

    def load(self, data: BenchData) -> tuple[float, float]:
        started = time.perf_counter()
        if data.points is not None:
            self.memory = self.kind(data.points)
        else:   # arrays only: no payloads but the filter field
            self.memory = self.kind.from_arrays(data.ids, data.embeddings, data.codes,
                                                [{"label": str(label)} for label in data.labels])
        seconds = time.perf_counter() - started
        self.position = self.memory.position
        return len(data) / seconds, 0.0

    def methods(self, k: int, prefilter: int, radius: int) -> dict[str, Search]:
        from cbir.store.planner import Scope

        def codes(q: np.ndarray, code: np.ndarray, flt: Filter | None) -> list[int]:
            shortlist = self.memory.nearest_by_code("", code, prefilter, Scope(flt=flt, code=code))
            assert shortlist.rows is not None
            return shortlist.rows.tolist()
        return {**cbir_methods(self.memory.search, self.position, k, prefilter, radius), "topn_codes_only": codes}


class HalfMemoryIndex(MemoryIndex):
    """The in-memory engine with float16 vectors only: half the bytes, approximate cosines."""

    def _build(self, *args: Any, **kw: Any) -> None:
        super()._build(*args, **kw)
        self.half = self.embeddings.astype(np.float16)
        self.embeddings = np.zeros((0, self.embeddings.shape[1]), np.float32)   # keeps the schema's dim

    def scores(self, rows: np.ndarray | None, query: np.ndarray, limit: int) -> np.ndarray:
        return (self.half if rows is None else self.half[rows]).astype(np.float32) @ query


class Int8MemoryIndex(MemoryIndex):
    """int8 vectors (a scale per row: a quarter of the bytes) score the candidates; the best `RESCORED` × limit are
    rescored exactly from the float32 vectors, which stay in memory for that (1.25× the vectors in all)."""

    RESCORED = 4

    def _build(self, *args: Any, **kw: Any) -> None:
        super()._build(*args, **kw)
        scale = np.maximum(np.abs(self.embeddings).max(axis=1, initial=0.0), 1e-12) / 127
        self.int8 = np.rint(self.embeddings / scale[:, None]).astype(np.int8)
        self.scale = scale.astype(np.float32)

    def scores(self, rows: np.ndarray | None, query: np.ndarray, limit: int) -> np.ndarray:
        rows = np.arange(len(self)) if rows is None else rows
        approx = (self.int8[rows] @ query) * self.scale[rows]
        keep = min(len(rows), self.RESCORED * limit)
        best = np.argpartition(-approx, keep - 1)[:keep] if keep < len(rows) else np.arange(len(rows))
        exact = np.full(len(rows), -np.inf, np.float32)
        exact[best] = self.embeddings[rows[best]] @ query
        return exact


class ReducedMemoryEngine(MemoryEngine):
    """`cbir-memory` storing fewer bytes per vector ("f16" or "i8"): its top-N prefilter rows only."""

    def __init__(self, precision: str) -> None:
        self.name = f"cbir-memory-{precision}"
        self.kind = {"f16": HalfMemoryIndex, "i8": Int8MemoryIndex}[precision]

    def methods(self, k: int, prefilter: int, radius: int) -> dict[str, Search]:
        return {"topn_prefilter_rerank": super().methods(k, prefilter, radius)["topn_prefilter_rerank"]}


class NumpyEngine(Engine):
    """The exact baseline: one matrix-vector product over every embedding."""

    name = "numpy"

    def load(self, data: BenchData) -> tuple[float, float]:
        started = time.perf_counter()
        self.emb = np.ascontiguousarray(data.embeddings)
        self.labels = data.labels
        return len(data) / (time.perf_counter() - started), 0.0

    def methods(self, k: int, prefilter: int, radius: int) -> dict[str, Search]:
        def search(q: np.ndarray, code: np.ndarray, flt: Filter | None) -> list[int]:
            scores = self.emb @ q
            if flt:
                scores = np.where(self.labels == flt.must["label"], scores, -np.inf)
            top = np.argpartition(-scores, k)[:k]
            return top[np.argsort(-scores[top])].tolist()
        return {"exact_knn": search}

    def batched(self, k: int) -> dict[str, Callable[[np.ndarray], object]]:
        def search(queries: np.ndarray) -> object:
            scores = queries @ self.emb.T
            return np.argpartition(-scores, k, axis=1)[:, :k]
        return {"exact_knn": search}


class FaissEngine(Engine):
    """FAISS (`pip install 'cbir[bench]'`): IndexFlatIP, and IndexBinaryFlat top N + NumPy rerank."""

    name = "faiss"
    filters = False

    def load(self, data: BenchData) -> tuple[float, float]:
        import faiss
        started = time.perf_counter()
        self.emb = np.ascontiguousarray(data.embeddings)
        self.flat = faiss.IndexFlatIP(self.emb.shape[1])
        self.flat.add(self.emb)
        codes = data.codes
        self.binary = faiss.IndexBinaryFlat(codes.shape[1])
        self.binary.add(np.packbits(codes, axis=1))
        return len(data) / (time.perf_counter() - started), 0.0

    def methods(self, k: int, prefilter: int, radius: int) -> dict[str, Search]:
        def flat(q: np.ndarray, code: np.ndarray, flt: Filter | None) -> list[int]:
            return self.flat.search(q[None], k)[1][0].tolist()

        def binary(q: np.ndarray, code: np.ndarray, flt: Filter | None) -> list[int]:
            candidates = self.binary.search(np.packbits(code)[None], prefilter)[1][0]
            candidates = candidates[candidates >= 0]
            scores = self.emb[candidates] @ q
            top = np.argsort(-scores)[:k]
            return candidates[top].tolist()
        def codes(q: np.ndarray, code: np.ndarray, flt: Filter | None) -> list[int]:
            return self.binary.search(np.packbits(code)[None], prefilter)[1][0].tolist()
        return {"exact_knn": flat, "binary_flat_rerank": binary, "binary_flat_only": codes}

    def batched(self, k: int) -> dict[str, Callable[[np.ndarray], object]]:
        return {"exact_knn": lambda queries: self.flat.search(queries, k)}


def faiss_available() -> bool:
    from cbir.extras import missing
    return missing("bench") is None
