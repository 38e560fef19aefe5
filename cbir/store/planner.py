"""The search planner: the one place where a search request becomes steps.

A request is `(embedding, k, filter, code, prefilter N | radius R)`. The steps are always, in order:

1. the payload filter;
2. the Hamming step, when asked: the N nearest codes (ties broken by ascending id), or the codes within R
   (narrowed by multi-index hashing where that pays), or both;
3. exact cosine on what is left;
4. a deterministic tie-break: equal cosines in ascending id order.

Engines (`Engine`) only translate a handful of primitives into their own calls: count, nearest by vector
and nearest by code within a `Scope`, and optionally `rescore` (Hamming prefetch and cosine rescoring in one
request, which Qdrant's Query API runs shard-parallel). Which steps run where is chosen from each engine's
measured `Costs`, never from its type: an engine whose requests are expensive (a server) gets the one-request
plan, an in-process one the two-step plan, and MIH is used only where a payload index on the substrings beats
a scan of the codes.

An engine that may keep its collections copied in this process (`Copying`: Qdrant Edge and local mode, whose
collections no other process writes while this one reads; not a server) has its requests routed to those copies
once they have paid for themselves (`cbir.store.memory.Copies`: a ski rental priced by `Costs.copy_per_point` and
`copy_per_value`), so a one-shot query runs natively and a long-lived process at the in-memory engine's speed.
The answers are the same either way: a copy runs the same steps exactly.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol, cast, runtime_checkable

import numpy as np

from cbir.errors import IndexError_
from cbir.store.hamming import mih_keys
from cbir.store.records import Filter, Hit, Schema

#: Extra cosine hits asked for, so that ties at the k-th place are broken by id and not by the engine.
TIE_SLACK = 8

#: "copy" answers from the engine's in-memory copy of the collection (`cbir.store.memory.Copies`), made now if
#: missing; forcing one of the others keeps a request in the engine itself.
PLANS = ("exact", "two-step", "one-request", "copy")
#: A payload key that the copies read as the engine does: no nested path (`a.b`, `a[]`).
PLAIN_KEY = re.compile(r"[^.\[\]]+")


@dataclass(frozen=True)
class Costs:
    """What an engine's calls cost, measured (seconds), and what it can do.

    `round_trip` is one request's fixed cost, `per_hit` one returned hit's (payload included). `ordered_codes`:
    `nearest_by_code` already breaks distance ties by id, so no wider search is needed. `mih`: a payload
    filter on the MIH substrings is faster than scanning the codes. `prefetch_limit`: a radius prefetch
    needs a limit, i.e. a count first (Qdrant). `copy_per_point`: copying one point (id, code, payload) into this
    process's memory (None: never copied, as other processes may write it: a server), and `copy_per_value` each
    value of its embedding (see `cbir.store.memory.Copies`).
    """

    round_trip: float
    per_hit: float
    ordered_codes: bool = False
    mih: bool = True
    prefetch_limit: bool = True
    rescore: bool = False
    copy_per_point: float | None = None
    copy_per_value: float = 0.0


@dataclass(frozen=True)
class Scope:
    """The points a primitive may look at: those passing `flt`, among `ids` (a Hamming shortlist; `rows` is the
    engine's own handle for them, `distances` their Hamming distances to `code` when already known), with at
    least one MIH substring in `mih`, and within Hamming distance `radius` of `code`. With `code`, hits report
    their Hamming distance to it. `population` bounds the number of points in the scope (a prefetch limit)."""

    flt: Filter | None = None
    ids: Sequence[str] | None = None
    rows: np.ndarray | None = None
    distances: np.ndarray | None = None
    mih: list[list[int]] | None = None
    code: np.ndarray | None = None
    radius: int | None = None
    population: int | None = None


@dataclass(frozen=True)
class Candidates:
    """A Hamming shortlist: ids with their distances, nearest first (ties by id when `ordered`)."""

    ids: Sequence[str]
    distances: np.ndarray
    rows: np.ndarray | None = None
    ordered: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    def nearest(self, n: int) -> Candidates:
        """The n nearest, ties broken by ascending id."""
        if self.ordered:
            return self if len(self) <= n else Candidates(self.ids[:n], self.distances[:n],
                                                           None if self.rows is None else self.rows[:n], True)
        order = sorted(range(len(self)), key=lambda i: (int(self.distances[i]), self.ids[i]))[:n]
        return Candidates([self.ids[i] for i in order], self.distances[order],
                          None if self.rows is None else self.rows[order], True)


@runtime_checkable
class Engine(Protocol):
    """The search primitives every engine translates (see `cbir.store.base.Index` for storage)."""

    @property
    def costs(self) -> Costs: ...

    def schema(self, name: str) -> Schema: ...

    def pin(self, name: str) -> str:
        """The name to use for every step of one request (Edge resolves the alias once; a server resolves it
        itself, per request)."""

    def count(self, name: str, scope: Scope) -> int: ...

    def nearest_by_vector(self, name: str, embedding: np.ndarray, limit: int, scope: Scope) -> list[Hit]:
        """Up to `limit` hits in `scope` by exact cosine, best first."""

    def nearest_by_code(self, name: str, code: np.ndarray, limit: int, scope: Scope) -> Candidates:
        """Up to `limit` points in `scope` by exact Hamming distance, nearest first."""


@runtime_checkable
class Rescoring(Protocol):
    """Optional: a Hamming prefetch of `limit` codes and exact cosine over them in one request."""

    def rescore(self, name: str, embedding: np.ndarray, code: np.ndarray, limit: int, scope: Scope) -> list[Hit]:
        """Every prefetched point (up to `limit`) with its cosine and Hamming distance, in any order."""


class Copies(Protocol):
    """An engine's in-memory copies of its collections, as the planner uses them (`cbir.store.memory.Copies`)."""

    def engine(self, name: str, force: bool = False) -> Engine | None:
        """The copy that answers a request on collection `name` (made now if due, or `force`d); None: the engine."""

    def paid(self, name: str, request: Request, seconds: float) -> None:
        """The engine answered `request` on `name` itself, in `seconds`."""


@runtime_checkable
class Copying(Protocol):
    """Optional: an engine that may keep its collections copied in memory for this process."""

    @property
    def copies(self) -> Copies: ...


@dataclass(frozen=True)
class Request:
    embedding: np.ndarray
    k: int
    flt: Filter | None = None
    code: np.ndarray | None = None
    prefilter: int | None = None
    radius: int | None = None


class SearchPlanner:
    """Runs a `Request` on an engine with the plan its costs favour (`plan` forces one, for tests)."""

    def __init__(self, engine: Engine, plan: str | None = None) -> None:
        if plan is not None and plan not in PLANS:
            raise ValueError(f"unknown plan {plan!r} (choose from {', '.join(PLANS)})")
        self.engine = engine
        self.forced = plan

    def search(self, name: str, request: Request) -> list[Hit]:
        engine, r = self.engine, request
        if r.code is None and (r.prefilter is not None or r.radius is not None):
            raise ValueError("prefilter and hamming_radius need the query's hash code")
        name = engine.pin(name)
        schema = engine.schema(name)
        check_vectors(f"{getattr(engine, 'location', '')}: collection {name!r}: query", schema.dim, schema.bits,
                      r.embedding, r.code)
        if r.k <= 0 or (r.prefilter is not None and r.prefilter <= 0) or (r.radius or 0) < 0:
            return []
        copies = self._copies(r)
        if copies is None:
            return self._run(name, r, schema)
        copy = copies.engine(name, force=self.forced == "copy")
        if copy is not None:   # the request is checked: straight to the copy's steps
            return SearchPlanner(copy)._run(name, r, schema)
        started = time.perf_counter()
        hits = self._run(name, r, schema)
        copies.paid(name, r, time.perf_counter() - started)
        return hits

    def _copies(self, request: Request) -> Copies | None:
        """The engine's copies, where one may answer: not where a plan in the engine is forced, the engine's costs
        rule copies out (a server), or the filter names a nested field."""
        copies: Copies | None = getattr(self.engine, "copies", None)   # `Copying` (isinstance costs 11 µs)
        if copies is None or self.engine.costs.copy_per_point is None:
            if self.forced == "copy":
                raise ValueError("plan 'copy': this engine keeps no in-memory copies")
            return None
        flt = request.flt or Filter()
        if self.forced not in (None, "copy") or not all(PLAIN_KEY.fullmatch(key) for key in (*flt.must, *flt.must_not)):
            return None
        return copies

    def _run(self, name: str, r: Request, schema: Schema) -> list[Hit]:
        """The request's steps in the engine itself (`name` pinned, the request checked)."""
        engine = self.engine
        scope = Scope(flt=r.flt or None, code=None if r.code is None else np.asarray(r.code, dtype=np.uint8))
        if r.radius is not None:
            assert scope.code is not None  # checked above: a radius needs the code
            use_mih = engine.costs.mih and schema.version >= 2
            scope = replace(scope, radius=r.radius, mih=mih_keys(scope.code, r.radius) if use_mih else None)
        limit = r.k + TIE_SLACK
        if r.prefilter is not None:
            if self.plan(r) == "one-request":
                return self._one_request(name, r, scope)
            shortlist = self._nearest_codes(name, scope, r.prefilter)
            if not len(shortlist):
                return []
            scope = Scope(ids=shortlist.ids, rows=shortlist.rows, distances=shortlist.distances, code=scope.code)
        elif r.radius is not None and engine.costs.prefetch_limit:
            population = engine.count(name, replace(scope, code=None, radius=None))
            if population == 0:
                return []
            scope = replace(scope, population=population)
        return _best(engine.nearest_by_vector(name, r.embedding, limit, scope), r.k)

    def plan(self, request: Request) -> str:
        """"exact" without a prefilter; else "one-request" (prefetch + rescoring) when the engine can and one
        request costs more than sending the shortlist back, else "two-step" (codes, then cosine)."""
        if request.prefilter is None:
            return "exact"
        if self.forced is not None and self.forced != "copy":
            return self.forced if self.forced != "exact" else "two-step"
        costs = self.engine.costs
        if not (costs.rescore and isinstance(self.engine, Rescoring)):
            return "two-step"
        shortlist = 2 * request.prefilter + 16
        return "one-request" if costs.round_trip > costs.per_hit * (shortlist - request.k) else "two-step"

    def _nearest_codes(self, name: str, scope: Scope, n: int) -> Candidates:
        """The n nearest codes in scope, ties by id. Engines order equal distances arbitrarily unless
        `ordered_codes`, so the search widens until every point tied with the n-th is seen."""
        assert scope.code is not None  # a prefilter needs the code (`search` checks)
        if self.engine.costs.ordered_codes:
            return self.engine.nearest_by_code(name, scope.code, n, scope).nearest(n)
        limit = 2 * n + 16
        while True:
            found = self.engine.nearest_by_code(name, scope.code, limit, scope)
            if _complete(found.distances, limit, n):
                return found.nearest(n)
            limit *= 4

    def _one_request(self, name: str, r: Request, scope: Scope) -> list[Hit]:
        """Prefetch 2N+16 codes and rescore them in one request; pick the N nearest (ties by id) from them."""
        assert r.prefilter is not None and scope.code is not None  # the one-request plan is for a prefilter
        engine = cast(Rescoring, self.engine)  # the one-request plan is for an engine with `rescore`
        limit = 2 * r.prefilter + 16
        while True:
            hits = engine.rescore(name, r.embedding, scope.code, limit, scope)
            distances = np.sort(np.array([h.hamming for h in hits], dtype=np.int64))
            if _complete(distances, limit, r.prefilter):
                break
            limit *= 4
        shortlist = sorted(hits, key=lambda h: (h.hamming, h.id))[:r.prefilter]
        return _best(shortlist, r.k)


def _complete(distances: np.ndarray, limit: int, n: int) -> bool:
    """Whether `distances` (ascending, from a search limited to `limit`) hold every point tied with the n-th."""
    return len(distances) < limit or distances[-1] > distances[n - 1]


def _best(hits: list[Hit], k: int) -> list[Hit]:
    """The k best by cosine, equal scores in ascending id order."""
    return sorted(hits, key=lambda h: (-h.score, h.id))[:k]


def check_vectors(where: str, dim: int, bits: int, embedding: np.ndarray, code: np.ndarray | None) -> None:
    """Raise `IndexError_` unless the embedding (and code, if any) fit the collection."""
    if np.shape(embedding) != (dim,):
        raise IndexError_(f"{where}: embedding has shape {np.shape(embedding)}, expected ({dim},)")
    if code is not None and np.shape(code) != (bits,):
        raise IndexError_(f"{where}: hash code has shape {np.shape(code)}, expected ({bits},)")
