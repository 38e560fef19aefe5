"""The in-memory engine: a copy of one collection for long-lived processes (`cbir serve`, `cbir bench`,
`cbir evaluate`), and the copies an engine keeps of its own collections (`Copies`).

Qdrant stays the store of record; a process that answers many queries loads the collection once (ids,
normalised embeddings, codes packed into 64-bit words, payloads) and the planner (`cbir.store.planner`) runs
its steps on these primitives:

- payload filter → a boolean mask (each field factorised once, each condition's mask cached);
- Hamming distances → XOR and popcount over the packed words (`cbir.store.hamming`);
- the N nearest codes, ties broken by ascending id, found by a cut-off guessed from a sample instead of a sort;
- exact cosine on the survivors, top k.

The results equal `Index.search` on the same collection (tests/test_index.py and tests/test_memory.py).

`Copies` is how Qdrant Edge and qdrant-client's local mode reach this engine's speed in a long-lived process
without a one-shot query paying for a copy: see its docstring.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, overload

import numpy as np

from cbir.store.base import Filter, FilterValue, Hit, Point
from cbir.store.hamming import hamming, pack_words
from cbir.store.planner import Candidates, Costs, Engine, Request, Scope, SearchPlanner
from cbir.store.records import Schema

#: In this process, on NumPy arrays: a call costs microseconds and a hit about one.
MEMORY_COSTS = Costs(round_trip=5e-6, per_hit=1e-6, ordered_codes=True, mih=False, prefetch_limit=False,
                     rescore=True)
#: This engine's time, single-threaded on the 2-core machine, per embedding value of an exact kNN's scan (100k × 512:
#: 17 ms) and of a gathered shortlist row (1,000 rows of 512 from 100k: 0.4 ms), and per code of the Hamming scan
#: (100k: 0.25 ms). `Copies` weighs what an engine took against them.
SCAN_PER_VALUE, GATHER_PER_VALUE, HAMMING_PER_CODE = 3.4e-10, 8e-10, 2.5e-9


class MemoryIndex:
    """A read-only snapshot of one collection, searched exactly in memory (the `Engine` protocol)."""

    costs = MEMORY_COSTS

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
        self.name = self.location = name
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
        self._fields: dict[str, _Field] = {}

    @classmethod
    def load(cls, index: Scrolling, collection: str) -> MemoryIndex:
        """Every point of `collection`, with vectors."""
        return cls(list(index.scroll(collection, with_vectors=True, batch=2048)), collection)

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, embedding: np.ndarray, k: int, flt: Filter | None = None, code: np.ndarray | None = None,
               prefilter: int | None = None, hamming_radius: int | None = None, plan: str | None = None
               ) -> list[Hit]:
        """Same contract as `Index.search`."""
        if not len(self):
            if code is None and (prefilter is not None or hamming_radius is not None):
                raise ValueError("prefilter and hamming_radius need the query's hash code")
            return []
        return SearchPlanner(self, plan).search(self.name, Request(embedding, k, flt, code, prefilter,
                                                                   hamming_radius))

    # --- the engine primitives -----------------------------------------------------------------------

    def schema(self, name: str) -> Schema:
        return Schema(int(self.embeddings.shape[1]), self.bits)

    def pin(self, name: str) -> str:
        return name

    def count(self, name: str, scope: Scope) -> int:
        rows, _ = self._scoped(scope)
        return len(self) if rows is None else len(rows)

    def nearest_by_code(self, name: str, code: np.ndarray, limit: int, scope: Scope) -> Candidates:
        rows, distances = self._scoped(replace(scope, code=code))
        assert distances is not None
        if limit < len(distances):
            inner = self._nearest(distances, self.id_rank if rows is None else self.id_rank[rows], limit)
        else:
            inner = np.arange(len(distances))
        picked = inner if rows is None else rows[inner]
        order = np.lexsort((self.id_rank[picked], distances[inner]))
        picked = picked[order]
        return Candidates(_Ids(self.ids, picked), distances[inner][order], picked, ordered=True)

    def nearest_by_vector(self, name: str, embedding: np.ndarray, limit: int, scope: Scope) -> list[Hit]:
        rows, distances = self._scoped(scope)
        if rows is not None and not len(rows):
            return []
        query = np.asarray(embedding, dtype=np.float32)
        if rows is not None and len(rows) > 1:   # read the rows in memory order: fewer DRAM page misses
            order = np.argsort(rows, kind="stable")
            rows = rows[order]
            distances = None if distances is None else distances[order]
        scores = self.scores(rows, query / np.linalg.norm(query), limit)
        top = np.argpartition(-scores, limit - 1)[:limit] if limit < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        picked = top if rows is None else rows[top]
        return [Hit(self.ids[row], float(scores[i]), self.payloads[row],
                    None if distances is None else int(distances[i])) for i, row in zip(top, picked, strict=True)]

    def scores(self, rows: np.ndarray | None, query: np.ndarray, limit: int) -> np.ndarray:
        """Cosine of the unit `query` with the rows (None: all of them), in order; of which the best `limit` are kept
        (a variant storing fewer bytes per vector, in `cbir.bench.engines`, rescores only those exactly)."""
        return (self.embeddings if rows is None else self.embeddings[rows]) @ query

    def rescore(self, name: str, embedding: np.ndarray, code: np.ndarray, limit: int, scope: Scope) -> list[Hit]:
        shortlist = self.nearest_by_code(name, code, limit, scope)
        return self.nearest_by_vector(name, embedding, limit, Scope(ids=shortlist.ids, rows=shortlist.rows,
                                                                    distances=shortlist.distances, code=code))

    # --- scopes --------------------------------------------------------------------------------------

    def _scoped(self, scope: Scope) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Positions in scope (None: all, without copying) and, with a code, their Hamming distances."""
        if scope.rows is not None:
            rows: np.ndarray | None = scope.rows
        elif scope.ids is not None:
            rows = np.array([self.position[i] for i in scope.ids if i in self.position], dtype=np.int64)
        else:
            rows = self.candidates(scope.flt)
        if scope.code is None:
            return rows, None
        if scope.rows is not None and scope.distances is not None:   # a shortlist's, already computed
            return rows, np.asarray(scope.distances)
        words = self.words if rows is None else self.words[rows]
        distances = hamming(words, pack_words(np.asarray(scope.code)[None, :])[0])
        if scope.radius is not None and scope.ids is None:
            keep = np.flatnonzero(distances <= scope.radius)
            rows, distances = (keep if rows is None else rows[keep]), distances[keep]
        return rows, distances

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

    def matching(self, flt: Filter | None) -> int:
        """How many points pass the filter (its masks are cached, as the search's are)."""
        rows = self.candidates(flt)
        return len(self) if rows is None else int(rows.size)

    def _mask(self, key: str, value: FilterValue) -> np.ndarray:
        """Points whose field `key` matches `value` (any element of a list field; any item of a list value)."""
        wanted = tuple(value) if isinstance(value, (list, tuple, set, frozenset)) else (value,)
        cache_key = (key, tuple((type(v).__name__, v) for v in wanted))
        if cache_key in self._masks:
            self._masks.move_to_end(cache_key)
            return self._masks[cache_key]
        if key not in self._fields:
            self._fields[key] = _Field([p.get(key) for p in self.payloads])
        mask = self._fields[key].mask(wanted, len(self))
        self._masks[cache_key] = mask
        if len(self._masks) > 256:
            self._masks.popitem(last=False)
        return mask


class _Field:
    """One payload field, factorised once: each value (each element of a list value) as a small integer, so that a
    condition on the field is one vectorised `isin` instead of a pass over the payloads in Python (a per-query
    condition, such as `cbir evaluate`'s "not this patient", costs 0.17 ms at 100k points instead of 44)."""

    def __init__(self, values: Sequence[Any]) -> None:
        self.codes: dict[tuple[bool, Any], int] = {}
        numbers: list[int] = []
        rows: list[int] = []
        for row, value in enumerate(values):
            for item in value if isinstance(value, list) else (value,):
                try:
                    numbers.append(self.codes.setdefault((isinstance(item, bool), item), len(self.codes)))
                except TypeError:   # a dict or a nested list: equals no filter value
                    continue
                rows.append(row)
        self.numbers = np.array(numbers, dtype=np.int64)
        self.rows = np.array(rows, dtype=np.int64)

    def mask(self, wanted: tuple, n: int) -> np.ndarray:
        """Rows with an element equal to a wanted value; a bool equals only a bool (True is not 1), and 4 equals
        4.0, as in Qdrant's match."""
        found = []
        for value in wanted:
            try:
                found.append(self.codes[(isinstance(value, bool), value)])
            except (KeyError, TypeError):
                continue
        mask = np.zeros(n, dtype=bool)
        if found:
            mask[self.rows[np.isin(self.numbers, found)]] = True
        return mask


class _Ids(Sequence[str]):
    """The ids of some positions, built only when read."""

    def __init__(self, ids: list[str], rows: np.ndarray) -> None:
        self._ids, self._rows = ids, rows

    def __len__(self) -> int:
        return len(self._rows)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> _Ids: ...

    def __getitem__(self, i: int | slice) -> str | _Ids:
        if isinstance(i, slice):
            return _Ids(self._ids, self._rows[i])
        return self._ids[int(self._rows[i])]


# --- copies of an engine's collections ---------------------------------------------------------------

class Scrolling(Protocol):
    def scroll(self, name: str, flt: Filter | None = None, with_vectors: bool = True,
               batch: int = 1024, with_thumbnails: bool = False) -> Iterator[Point]: ...


class CopySource(Scrolling, Engine, Protocol):
    """What an engine offers its `Copies` (Qdrant Edge, qdrant-client's local mode)."""

    def size(self, name: str) -> int:
        """About how many points the collection holds (cheap: it prices a copy)."""


@dataclass
class _Account:
    """One collection's copy, and the seconds its requests lost to not having one."""

    spent: float = 0.0
    shape: tuple[int, int] | None = None    # (points, dim), read when first needed
    copy: MemoryIndex | None = None


class Copies:
    """The in-memory copies (`MemoryIndex`es) one engine keeps of its collections for this process, each made
    once it has paid for itself (ski rental): a one-shot query never pays for a copy, and a long-lived process
    pays at most about twice what the best choice in hindsight would have cost.

    Every request the engine answers itself adds to its collection's account what it took beyond what the copy
    would have taken (`in_memory_seconds`), so that requests a copy would not speed up (an exact kNN without a
    filter, where Qdrant Edge's scan is faster than NumPy's) never buy one. Once the account reaches the copy's
    price (the engine's `Costs.copy_per_point`, plus `copy_per_value` per embedding value, times the collection's
    size), the collection is copied and the copy answers from then on. The owner calls `forget` on every write and
    whenever another process could write (a released shard): the copy and the account start again.
    """

    def __init__(self, source: CopySource) -> None:
        self.source = source
        self._accounts: dict[str, _Account] = {}
        #: Requests by what answered them, "native" or "copy" (`cbir bench` reports them).
        self.answered: Counter[str] = Counter()

    def forget(self, name: str | None = None) -> None:
        """Drop the copy of collection `name` (of every collection: None) and what its requests spent."""
        if name is None:
            self._accounts.clear()
        else:
            self._accounts.pop(name, None)

    def engine(self, name: str, force: bool = False) -> MemoryIndex | None:
        """The copy that answers a request on collection `name`, made now if it is due (or `force`d); None: the
        engine answers (always for an empty collection)."""
        account = self._accounts.setdefault(name, _Account())
        if account.copy is None and (force or account.spent > 0) and self._shape(name, account)[0] > 0:
            n, dim = self._shape(name, account)
            costs = self.source.costs
            if force or account.spent >= n * ((costs.copy_per_point or 0.0) + dim * costs.copy_per_value):
                account.copy = MemoryIndex.load(self.source, name)
        self.answered["native" if account.copy is None else "copy"] += 1
        return account.copy

    def paid(self, name: str, request: Request, seconds: float) -> None:
        """The engine answered `request` on `name` itself, in `seconds`."""
        account = self._accounts.setdefault(name, _Account())
        account.spent += max(0.0, seconds - in_memory_seconds(request, *self._shape(name, account)))

    def _shape(self, name: str, account: _Account) -> tuple[int, int]:
        if account.shape is None:
            account.shape = (self.source.size(name), self.source.schema(name).dim)
        return account.shape


def in_memory_seconds(request: Request, n: int, dim: int) -> float:
    """About what this engine takes for `request` on n points of `dim` values, single-threaded: a scan of every
    embedding for an exact kNN, else the Hamming scan and the prefilter's shortlist (a radius keeps few)."""
    if request.prefilter is None and request.radius is None:
        return n * dim * SCAN_PER_VALUE
    return n * HAMMING_PER_CODE + min(n, request.prefilter or 0) * dim * GATHER_PER_VALUE
