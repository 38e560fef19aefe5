"""Routing requests to an engine's in-memory copy (`cbir.store.memory.Copies`, issue 27), on real engines.

Qdrant Edge and local mode answer from a copy of the collection once it has paid for itself: the answers must be
exactly the engine's own, a one-shot request must never make one, and every write (or a released shard, or a
moved alias) must be seen by the next request. `priced` makes a copy free (the second request buys it) or
unaffordable by changing the engine's measured copy costs, so that the tests do not depend on timings.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_index import BITS, DIM, FILTERS, META, Data, N, assert_hits, brute, make_data, open_backend, queries

from cbir.store import Filter, Index, Point
from cbir.store.memory import MemoryIndex, in_memory_seconds
from cbir.store.planner import Request

COPIED = ("edge", "local")
MODES = ({}, {"prefilter": 40}, {"prefilter": 1}, {"hamming_radius": 26}, {"prefilter": 30, "hamming_radius": 28},
         {"prefilter": N + 5})


def priced(kind: str, folder: Path, per_point: float | None) -> Index:
    """A writable index whose copies cost `per_point` seconds a point (0: free; None: never copied)."""
    index = open_backend(kind, folder)
    costs = replace(index.costs, copy_per_point=per_point, copy_per_value=0.0)
    if kind == "edge":
        index.costs = costs   # type: ignore[misc]  # the class's measured constants, for this object only
    else:
        index._costs = costs   # type: ignore[attr-defined]
    return index


def loaded(kind: str, folder: Path, per_point: float | None, points: list[Point]) -> Index:
    index = priced(kind, folder, per_point)
    index.create_collection("cxr", DIM, BITS, META)
    index.upsert("cxr", points)
    return index


@pytest.fixture(scope="module")
def data() -> Data:
    return make_data()


def answers(index: Index, q: np.ndarray, flt: Filter | None = None, **kw: object) -> list[tuple]:
    """(id, Hamming distance, payload) of each hit (scores: `assert_hits` compares them, to 1e-5)."""
    return [(h.id, h.hamming, h.payload) for h in index.search("cxr", q, 10, flt, **kw)]


@pytest.mark.parametrize("kind", COPIED)
def test_the_copy_answers_exactly_as_the_engine_does(kind: str, tmp_path: Path, data: Data) -> None:
    """Every search mode and filter: the copy's hits (ids, scores, Hamming distances, payloads) are the engine's own
    plan's and the brute force's, and it was the copy that answered."""
    with loaded(kind, tmp_path, 1e3, data.points) as index:   # no request pays for it: only forced copies answer
        copied = 0
        for q, code in queries(data, count=2):
            for flt in (None, *FILTERS):
                for mode in MODES:
                    kw = {"code": code, **mode} if mode else {}
                    want = brute(data, q, 10, flt, kw.get("code"), mode.get("prefilter"), mode.get("hamming_radius"))
                    native = answers(index, q, flt, **kw, plan="exact")
                    assert answers(index, q, flt, **kw, plan="copy") == native
                    assert_hits(index.search("cxr", q, 10, flt, **kw, plan="copy"), want)
                    copied += 2
        assert index.copies.answered["copy"] == copied


@pytest.mark.parametrize("kind", COPIED)
def test_a_one_shot_request_runs_natively_and_a_paid_off_copy_answers_the_next(kind: str, tmp_path: Path,
                                                                                 data: Data) -> None:
    q, code = queries(data)[3]
    with loaded(kind, tmp_path, 0.0, data.points) as index:
        first = answers(index, q, FILTERS[4], code=code, prefilter=60)
        assert index.copies.answered == {"native": 1}                  # free, yet not made for the first request
        for _ in range(3):
            assert answers(index, q, FILTERS[4], code=code, prefilter=60) == first
        assert index.copies.answered == {"native": 1, "copy": 3}
    with loaded(kind, tmp_path / "dear", 1e3, data.points) as index:    # a copy no request pays off
        for _ in range(3):
            assert answers(index, q, FILTERS[4], code=code, prefilter=60) == first
        assert index.copies.answered == {"native": 3}


def test_only_what_a_copy_would_speed_up_pays_for_it(tmp_path: Path, data: Data) -> None:
    """A request adds to the account only what it took beyond the copy's estimate: an exact kNN the engine answered
    faster than the in-memory scan would have buys nothing; a slow prefiltered one buys the copy."""
    with loaded("edge", tmp_path, 0.0, data.points) as index:
        exact = Request(data.emb[0], 10)
        prefiltered = Request(data.emb[0], 10, code=data.codes[0], prefilter=40)
        index.copies.paid("cxr", exact, 0.5 * in_memory_seconds(exact, N, DIM))
        assert index.copies.engine("cxr") is None
        index.copies.paid("cxr", prefiltered, 1.0)
        assert isinstance(index.copies.engine("cxr"), MemoryIndex)


def test_no_copy_where_the_costs_rule_it_out(tmp_path: Path, data: Data) -> None:
    """An engine whose costs say it may not be copied (a server: other processes write it) answers every request
    itself, and a forced copy plan is refused; so is one on an engine that keeps no copies."""
    q, code = queries(data)[0]
    with loaded("edge", tmp_path, None, data.points) as index:
        for _ in range(3):
            assert_hits(index.search("cxr", q, 10, FILTERS[0], code=code, prefilter=50),
                        brute(data, q, 10, FILTERS[0], code, 50))
        assert not index.copies.answered
        with pytest.raises(ValueError, match="keeps no in-memory copies"):
            index.search("cxr", q, 10, plan="copy")
    with pytest.raises(ValueError, match="keeps no in-memory copies"):
        MemoryIndex(data.points).search(q, 10, plan="copy")


def test_a_nested_filter_key_stays_in_the_engine(tmp_path: Path, data: Data) -> None:
    """Qdrant reads `a.b` as a nested path, which the copy does not: such a request never goes to it."""
    q, _ = queries(data)[0]
    with loaded("edge", tmp_path, 0.0, data.points) as index:
        for _ in range(3):
            assert index.search("cxr", q, 10, Filter(must={"meta.view": "PA"})) == []
        assert not index.copies.answered
        index.search("cxr", q, 10, FILTERS[0])
        assert index.copies.answered == {"native": 1}


def _moved(data: Data, q: np.ndarray) -> tuple[Data, list[Point]]:
    """The data after a change: the last point (not yet stored) is the query's exact match, and the stored point
    nearest the query is turned away from it; and the two points to upsert for that."""
    unit = q / np.linalg.norm(q)
    best = int(np.argmax(data.emb[:-1] @ unit))
    emb = data.emb.copy()
    emb[-1], emb[best] = unit, -emb[best]
    after = Data(data.ids, emb, data.codes, data.payloads)
    return after, [after.points[-1], after.points[best]]


@pytest.mark.parametrize("kind", COPIED)
def test_an_upsert_is_in_the_next_answer(kind: str, tmp_path: Path, data: Data) -> None:
    """After the copy answered, an upsert changes one point and adds another: the next answers (every mode) have
    both, exactly as the engine's own plan and the brute force on the new data."""
    q, code = queries(data)[4]
    with loaded(kind, tmp_path, 0.0, data.points[:-1]) as index:
        for _ in range(2):
            index.search("cxr", q, 10, code=code, prefilter=60)
        assert index.copies.answered["copy"] == 1
        after, changed = _moved(data, q)
        index.upsert("cxr", changed)
        for mode in MODES:
            kw = {"code": code, **mode} if mode else {}
            hits = index.search("cxr", q, 10, **kw)
            assert_hits(hits, brute(after, q, 10, None, kw.get("code"), mode.get("prefilter"),
                                    mode.get("hamming_radius")))
        assert index.search("cxr", q, 1)[0].id == data.ids[-1]


@pytest.mark.parametrize("kind", COPIED)
def test_a_deleted_and_remade_collection_is_not_answered_from_the_old_copy(kind: str, tmp_path: Path,
                                                                           data: Data) -> None:
    q, _ = queries(data)[4]
    with loaded(kind, tmp_path, 0.0, data.points[:150]) as index:
        index.search("cxr", q, 10)
        index.search("cxr", q, 10, plan="copy")
        index.delete_collection("cxr")
        index.create_collection("cxr", DIM, BITS, META)
        assert index.search("cxr", q, 10) == []
        index.upsert("cxr", data.points[150:])
        assert {h.id for h in index.search("cxr", q, 10)} <= set(data.ids[150:])


@pytest.mark.parametrize("kind", COPIED)
def test_a_moved_alias_is_followed(kind: str, tmp_path: Path, data: Data) -> None:
    q, _ = queries(data)[4]
    with loaded(kind, tmp_path, 0.0, data.points[:150]) as index:
        index.create_collection("cxr2", DIM, BITS, META)
        index.upsert("cxr2", data.points[150:])
        index.set_alias("current", "cxr")
        for _ in range(2):
            assert {h.id for h in index.search("current", q, 10)} <= set(data.ids[:150])
        assert index.copies.answered["copy"] == 1
        index.set_alias("current", "cxr2")
        for _ in range(2):
            assert {h.id for h in index.search("current", q, 10)} <= set(data.ids[150:])


def test_a_released_shard_is_copied_again_after_another_writer(tmp_path: Path, data: Data) -> None:
    """Qdrant Edge: once a reader releases a collection, another writer may change it; the reader's copy goes with
    the release, so the reader sees the change."""
    q, _ = queries(data)[4]
    _, changed = _moved(data, q)
    with priced("edge", tmp_path, 0.0) as writer:
        writer.create_collection("cxr", DIM, BITS, META)
        writer.upsert("cxr", data.points[:-1])
        writer.release("cxr")
        with priced("edge", tmp_path, 0.0) as reader:
            for _ in range(2):
                before = reader.search("cxr", q, 10)
            assert reader.copies.answered["copy"] == 1 and data.ids[-1] not in {h.id for h in before}
            reader.release("cxr")
            writer.upsert("cxr", changed)
            writer.release("cxr")
            assert reader.search("cxr", q, 1)[0].id == data.ids[-1]


def test_hamming_to_equals_the_bit_count() -> None:
    from cbir.store.hamming import hamming_to, pack_code
    rng = np.random.default_rng(1)
    for bits in (8, 13, 24, 64, 100, 256):
        a, b = rng.integers(0, 2, (2, bits)).astype(np.uint8)
        assert hamming_to(pack_code(a), b) == int((a != b).sum())
