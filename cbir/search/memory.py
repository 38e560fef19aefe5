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
        n = len(points)
        self._build([p.id for p in points], [p.payload for p in points],
                    np.stack([p.embedding for p in points]) if n else np.zeros((0, 0), np.float32),
                    np.stack([p.code for p in points]) if n else np.zeros((0, 0), np.uint8), name)

    @classmethod
    def from_arrays(cls, ids: Sequence[str], embeddings: np.ndarray, codes: np.ndarray,
                    payloads: Sequence[dict[str, Any]] | None = None, name: str = "") -> MemoryIndex:
        """From (n, dim) L2-normalised embeddings and (n, bits) 0/1 codes, without building `Point`s."""
        self = cls.__new__(cls)
        self._build(list(ids), list(payloads) if payloads is not None else [{} for _ in ids], embeddings, codes, name)
        return self

    def _build(self, ids: list[str], payloads: list[dict[str, Any]], embeddings: np.ndarray, codes: np.ndarray,
               name: str) -> None:
        self.name = name
        self.ids = ids
        self.payloads = payloads
        n = len(ids)
        self.bits = int(codes.shape[1]) if n else 0
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32) if n else np.zeros((0, 0), np.float32)
        self.words = pack_words(codes) if n else np.zeros((0, 1), np.uint64)
        self.position = {point_id: i for i, point_id in enumerate(self.ids)}
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
        candidates = self.candidates(flt)   # None: every point, without copying anything
        distances = None
        if code is not None:
            words = self.words if candidates is None else self.words[candidates]
            distances = hamming(words, pack_words(np.asarray(code)[None, :])[0])
            keep = None
            if hamming_radius is not None:
                keep = np.flatnonzero(distances <= hamming_radius)
            if prefilter is not None and prefilter < (len(distances) if keep is None else len(keep)):
                inner = self._nearest(distances if keep is None else distances[keep],
                                      self.id_rank if candidates is None and keep is None else
                                      self.id_rank[_take(candidates, keep)], prefilter)
                keep = inner if keep is None else keep[inner]
            if keep is not None:
                candidates, distances = _take(candidates, keep), distances[keep]
        if candidates is not None and not len(candidates):
            return []
        query = np.asarray(embedding, dtype=np.float32)
        matrix = self.embeddings if candidates is None else self.embeddings[candidates]
        scores = matrix @ (query / np.linalg.norm(query))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        rows = top if candidates is None else candidates[top]
        return [Hit(self.ids[row], float(scores[i]), self.payloads[row],
                    None if distances is None else int(distances[i])) for i, row in zip(top, rows, strict=True)]

    def _nearest(self, distances: np.ndarray, id_rank: np.ndarray, n: int) -> np.ndarray:
        """Positions of the n smallest distances, ties broken by ascending id: every distance below the cut-off,
        then the tied ones with the smallest ids. The cut-off is guessed from a sample and then checked with two
        counts, which is cheaper than a histogram of all distances."""
        sample = distances[:: max(1, len(distances) // 2048)]
        cut = int(np.partition(sample, min(len(sample) - 1, n * len(sample) // len(distances)))
                  [min(len(sample) - 1, n * len(sample) // len(distances))])
        while cut > 0 and np.count_nonzero(distances < cut) >= n:
            cut -= 1
        while np.count_nonzero(distances <= cut) < n:
            cut += 1
        near = np.flatnonzero(distances <= cut)                # one pass over all distances
        at_cut = distances[near] == cut
        below, tied = near[~at_cut], near[at_cut]
        tied = tied[np.argsort(id_rank[tied], kind="stable")[: n - len(below)]]
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
    """Hamming distance of each row of packed `words` to the packed `query` (uint8 up to 64 bits)."""
    if words.shape[1] == 1:
        return np.bitwise_count(words[:, 0] ^ query[0])
    return np.bitwise_count(words ^ query).sum(axis=1, dtype=np.int64)


def _take(positions: np.ndarray | None, keep: np.ndarray | None) -> np.ndarray | None:
    """`positions[keep]`, where None means all positions (or keep everything)."""
    if keep is None:
        return positions
    return keep if positions is None else positions[keep]
