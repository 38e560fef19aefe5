"""An in-memory copy of one collection for long-lived processes (`cbir serve`, `cbir bench`).

Qdrant stays the store of record; a process that answers many queries loads the collection once (ids,
normalised embeddings, codes packed into 64-bit words, payloads) and searches it with NumPy:

- payload filter → a boolean mask (cached per condition);
- Hamming distances → XOR and popcount over the packed words;
- `prefilter=N` → the N nearest codes, ties broken by ascending id exactly as `Index.search` does, found with
  a histogram of the distances instead of a sort;
- `hamming_radius=R` → the codes within R;
- exact cosine on the survivors, top k.

The results equal `Index.search` on the same collection (tests/test_memory.py checks it on every mode).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from cbir.index.base import Filter, FilterValue, Hit, Index, Point


class MemoryIndex:
    """A read-only snapshot of one collection, searched exactly in memory."""

    def __init__(self, points: Sequence[Point], name: str = "") -> None:
        self.name = name
        self.ids = [p.id for p in points]
        self.payloads = [p.payload for p in points]
        n = len(points)
        self.bits = int(points[0].code.size) if n else 0
        self.embeddings = (np.asarray(np.stack([p.embedding for p in points]), dtype=np.float32) if n
                           else np.zeros((0, 0), np.float32))
        self.words = pack_words(np.stack([p.code for p in points])) if n else np.zeros((0, 1), np.uint64)
        order = sorted(range(n), key=lambda i: self.ids[i])
        self.id_rank = np.empty(n, dtype=np.int64)
        self.id_rank[order] = np.arange(n)
        self._masks: OrderedDict[tuple, np.ndarray] = OrderedDict()

    @classmethod
    def load(cls, index: Index, collection: str) -> MemoryIndex:
        """Every point of `collection`, with vectors."""
        return cls(list(index.scroll(collection, with_vectors=True, batch=2048)), collection)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, embedding: np.ndarray, k: int, flt: Filter | None = None, code: np.ndarray | None = None,
               prefilter: int | None = None, hamming_radius: int | None = None) -> list[Hit]:
        """Same contract as `Index.search`."""
        if code is None and (prefilter is not None or hamming_radius is not None):
            raise ValueError("prefilter and hamming_radius need the query's hash code")
        if k <= 0 or not len(self) or (prefilter is not None and prefilter <= 0) or (hamming_radius or 0) < 0:
            return []
        candidates = self.candidates(flt)
        everything = candidates is None  # no filter: work on the arrays themselves, not on copies
        if everything:
            candidates = np.arange(len(self))
        distances = None
        if code is not None:
            words = self.words if everything else self.words[candidates]
            distances = hamming(words, pack_words(np.asarray(code)[None, :])[0])
            if hamming_radius is not None:
                keep = distances <= hamming_radius
                candidates, distances = candidates[keep], distances[keep]
            if prefilter is not None and prefilter < len(candidates):
                keep = self._nearest(candidates, distances, prefilter)
                candidates, distances = candidates[keep], distances[keep]
            everything = everything and len(candidates) == len(self) and hamming_radius is None
        if not len(candidates):
            return []
        query = np.asarray(embedding, dtype=np.float32)
        matrix = self.embeddings if everything else self.embeddings[candidates]
        scores = matrix @ (query / np.linalg.norm(query))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Hit(self.ids[candidates[i]], float(scores[i]), self.payloads[candidates[i]],
                    None if distances is None else int(distances[i])) for i in top]

    def _nearest(self, candidates: np.ndarray, distances: np.ndarray, n: int) -> np.ndarray:
        """Positions of the n nearest codes, ties broken by ascending id: every code below the cut-off
        distance, then the tied ones with the smallest ids."""
        counts = np.cumsum(np.bincount(distances, minlength=self.bits + 1))
        cut = int(np.searchsorted(counts, n))                  # the distance of the n-th nearest
        below = np.flatnonzero(distances < cut)
        tied = np.flatnonzero(distances == cut)
        tied = tied[np.argsort(self.id_rank[candidates[tied]], kind="stable")[: n - len(below)]]
        return np.concatenate([below, tied])

    # --- payload filters ---------------------------------------------------------------------------

    def candidates(self, flt: Filter | None) -> np.ndarray | None:
        """Positions of the points that pass the filter (None: no filter, all of them)."""
        if not flt:
            return None
        mask = np.ones(len(self), dtype=bool)
        for key, value in flt.must.items():
            mask &= self._mask(key, value)
        for key, value in flt.must_not.items():
            mask &= ~self._mask(key, value)
        return np.flatnonzero(mask)

    def _mask(self, key: str, value: FilterValue) -> np.ndarray:
        """Points whose field `key` matches `value` (any element of a list field; any item of a list value)."""
        wanted = tuple(value) if isinstance(value, (list, tuple, set, frozenset)) else (value,)
        cache_key = (key, tuple((type(v).__name__, v) for v in wanted))
        if cache_key in self._masks:
            self._masks.move_to_end(cache_key)
            return self._masks[cache_key]
        mask = np.fromiter((_matches(p.get(key), wanted) for p in self.payloads), dtype=bool, count=len(self))
        self._masks[cache_key] = mask
        if len(self._masks) > 256:
            self._masks.popitem(last=False)
        return mask


def _matches(field: Any, wanted: tuple) -> bool:
    have = field if isinstance(field, list) else [field]
    return any(h == w and isinstance(h, bool) == isinstance(w, bool) for h in have for w in wanted)


def pack_words(codes: np.ndarray) -> np.ndarray:
    """(n, bits) 0/1 → (n, ⌈bits/64⌉) uint64, zero-padded."""
    packed = np.packbits(np.asarray(codes, dtype=np.uint8), axis=1)
    pad = (-packed.shape[1]) % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return np.ascontiguousarray(packed).view(np.uint64)


def hamming(words: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Hamming distance of each row of packed `words` to the packed `query`."""
    return np.bitwise_count(words ^ query).sum(axis=1, dtype=np.int64)
