"""Benchmark data: clustered embeddings (not isotropic noise), codes that correlate with them, payloads with a
field that a filter can cut to 20 %, and queries near the archive. Or the points of a real collection."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cbir.store.base import Filter, Index, Point

LABELS = ("a", "b", "c", "d", "e")   # uniform: `label=a` keeps 20 % of the points
FILTER_20 = Filter(must={"label": "a"})


@dataclass
class BenchData:
    points: list[Point] | None   # None: arrays only (`synthetic_arrays`, for sizes where Points cost too much)
    queries: np.ndarray          # (Q, dim) float32, normalised
    query_codes: np.ndarray      # (Q, bits) uint8
    source: str
    arrays: dict[str, Any] = field(default_factory=dict, repr=False)  # ids, embeddings, codes, labels

    def __len__(self) -> int:
        return len(self.ids)

    def _array(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self.arrays:
            self.arrays[name] = make()
        return self.arrays[name]

    @property
    def ids(self) -> list[str]:
        return self._array("ids", lambda: [p.id for p in self.points or []])

    @property
    def embeddings(self) -> np.ndarray:
        return self._array("embeddings", lambda: np.stack([p.embedding for p in self.points or []]))

    @property
    def codes(self) -> np.ndarray:
        return self._array("codes", lambda: np.stack([p.code for p in self.points or []]))

    @property
    def labels(self) -> np.ndarray:
        """Each point's `label` field (what `FILTER_20` tests)."""
        return self._array("labels", lambda: np.array([p.payload.get("label") for p in self.points or []]))


def synthetic(n: int, dim: int, bits: int, queries: int, seed: int = 0, clusters: int | None = None,
              spread: float = 0.3) -> BenchData:
    """`clusters` Gaussian clusters (default n/500, at least 20) on the unit sphere; codes are the signs of a
    fixed random projection (what an LSH or a trained hash head gives: near embeddings, near codes); queries
    are archive points with fresh noise, so each has true neighbours."""
    rng = np.random.default_rng(seed)
    clusters = clusters or max(20, n // 500)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    which = rng.integers(0, clusters, n)
    emb = centres[which] + spread * rng.normal(size=(n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    projection = rng.normal(size=(dim, bits)).astype(np.float32)
    codes = (emb @ projection > 0).astype(np.uint8)
    picks = rng.integers(0, n, queries)
    q = emb[picks] + 0.5 * spread * rng.normal(size=(queries, dim)).astype(np.float32) / np.sqrt(dim) * 4
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    points = [Point(str(uuid.UUID(bytes=rng.bytes(16), version=4)), emb[i], codes[i],
                    {"label": LABELS[i % len(LABELS)], "view": "PA" if i % 3 else "AP", "cluster": int(which[i])})
              for i in range(n)]
    return BenchData(points, q.astype(np.float32), (q @ projection > 0).astype(np.uint8), "synthetic")


def synthetic_arrays(n: int, dim: int, bits: int, queries: int, seed: int = 0, clusters: int | None = None,
                     spread: float = 0.3, chunk: int = 65_536) -> BenchData:
    """The same kind of data as `synthetic` (its own random stream), as arrays without `Point`s and without
    payloads (labels are kept for the filter), generated in chunks: 1M × 512 takes 2 GiB, not 4 more for
    float64 temporaries and Point objects."""
    rng = np.random.default_rng(seed)
    clusters = clusters or max(20, n // 500)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    projection = rng.normal(size=(dim, bits)).astype(np.float32)
    which = rng.integers(0, clusters, n)
    emb = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        part = centres[which[start:stop]] + spread * rng.standard_normal((stop - start, dim), dtype=np.float32)
        part /= np.linalg.norm(part, axis=1, keepdims=True)
        emb[start:stop] = part
    codes = np.empty((n, bits), np.uint8)
    for start in range(0, n, chunk):
        codes[start:start + chunk] = emb[start:start + chunk] @ projection > 0
    picks = rng.integers(0, n, queries)
    q = emb[picks] + 0.5 * spread * rng.normal(size=(queries, dim)).astype(np.float32) / np.sqrt(dim) * 4
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    raw = rng.bytes(16 * n)
    ids = [str(uuid.UUID(bytes=raw[16 * i:16 * i + 16], version=4)) for i in range(n)]
    labels = np.array(LABELS)[np.arange(n) % len(LABELS)]
    return BenchData(None, q.astype(np.float32), (q @ projection > 0).astype(np.uint8), "synthetic arrays",
                     {"ids": ids, "embeddings": emb, "codes": codes, "labels": labels})


def from_index(index: Index, collection: str, queries: int, seed: int = 0) -> BenchData:
    """A real collection: its points, and `queries` of its own points (perturbed slightly) as queries."""
    points = list(index.scroll(collection, with_vectors=True, batch=2048))
    if not points:
        raise ValueError(f"collection {collection!r} is empty")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(points), queries)
    emb = np.stack([points[i].embedding for i in picks])
    emb = emb + 0.01 * rng.normal(size=emb.shape).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    codes = np.stack([points[i].code for i in picks])
    for i, p in enumerate(points):   # the filter field, as in the synthetic data
        p.payload = {**p.payload, "label": LABELS[i % len(LABELS)]}
    return BenchData(points, emb.astype(np.float32), codes, f"{index.location} {collection}")


def exact_top(embeddings: np.ndarray, mask: np.ndarray | None, query: np.ndarray, k: int) -> np.ndarray:
    """Positions of the exact cosine top k (within `mask`): the ground truth for recall."""
    scores = embeddings @ query
    if mask is not None:
        scores = np.where(mask, scores, -np.inf)
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]
