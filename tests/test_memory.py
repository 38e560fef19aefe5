"""The in-memory searcher answers exactly like the index it was loaded from, in every search mode."""

from __future__ import annotations

import numpy as np
import pytest
from test_index import BITS, DIM, FILTERS, META, N, assert_hits, brute, make_data, matches, open_backend, queries

from cbir.store import Filter, Point
from cbir.store.memory import MemoryIndex, hamming, pack_words


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    data = make_data()
    index = open_backend("edge", tmp_path_factory.mktemp("edge"))
    index.create_collection("cxr", DIM, BITS, META)
    index.upsert("cxr", data.points)
    yield index, MemoryIndex.load(index, "cxr"), data
    index.close()


def test_packed_hamming_equals_bit_counting() -> None:
    rng = np.random.default_rng(0)
    for bits in (8, 24, 64, 100, 256):
        codes = rng.integers(0, 2, (50, bits)).astype(np.uint8)
        q = rng.integers(0, 2, bits).astype(np.uint8)
        assert np.array_equal(hamming(pack_words(codes), pack_words(q[None])[0]), (codes != q).sum(axis=1))


@pytest.mark.parametrize("flt", [None, *FILTERS])
def test_memory_search_equals_the_index(loaded: tuple, flt) -> None:
    index, memory, data = loaded
    assert len(memory) == N
    for q, code in queries(data):
        for kwargs in ({}, {"code": code, "prefilter": 40}, {"code": code, "prefilter": 1},
                       {"code": code, "hamming_radius": 26}, {"code": code, "prefilter": 30, "hamming_radius": 28},
                       {"code": code, "prefilter": N + 5}):
            got = memory.search(q, 10, flt, **kwargs)
            assert_hits(got, brute(data, q, 10, flt, kwargs.get("code"), kwargs.get("prefilter"),
                                   kwargs.get("hamming_radius")))
            want = index.search("cxr", q, 10, flt, **kwargs)
            assert [h.id for h in got] == [h.id for h in want]
            assert [h.payload for h in got] == [h.payload for h in want]


def test_edge_cases(loaded: tuple) -> None:
    _, memory, data = loaded
    q, code = queries(data)[0]
    assert memory.search(q, 0) == [] and memory.search(q, 5, code=code, prefilter=0) == []
    assert len(memory.search(q, N + 10)) == N
    with pytest.raises(ValueError, match="need the query's hash code"):
        memory.search(q, 5, prefilter=3)
    assert MemoryIndex([]).search(q, 5) == []


def test_the_chunked_hamming_scan_equals_a_plain_popcount() -> None:
    from cbir.store.hamming import SCAN_CHUNK, hamming, pack_words
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 2, (2 * SCAN_CHUNK + 17, 64), dtype=np.uint8)
    query = pack_words(rng.integers(0, 2, (1, 64), dtype=np.uint8))[0]
    words = pack_words(codes)
    got = hamming(words, query)
    assert got.dtype == np.uint8 and got.shape == (len(codes),)
    assert np.array_equal(got, np.unpackbits((words ^ query).view(np.uint8), axis=1).sum(axis=1))


def test_filter_masks_match_values_as_qdrant_does() -> None:
    """The factorised fields give every condition the oracle's answer: a bool matches only a bool (True is not 1),
    4 matches 4.0, a list field matches on any element, unhashable elements and missing fields match nothing; the
    same field asked again with other values (a per-query condition) reuses the factorisation."""
    values = [True, False, 1, 0, 4, 4.0, "4", "a", ["a", "b"], ["b", {"x": 1}], [["a"]], None, {"y": 2}, [], [1, True]]
    points = [Point(f"{i:08d}-0000-4000-8000-000000000000", np.ones(4, np.float32), np.zeros(8, np.uint8),
                    {"f": values[i % len(values)], **({} if i % 7 else {"g": "x"})}) for i in range(90)]
    memory = MemoryIndex(points)
    wanted = [True, False, 1, 0, 4, 4.0, "4", "a", "b", "x", ["a", 1], [True, "b"], []]
    for value in wanted:
        for flt in (Filter(must={"f": value}), Filter(must_not={"f": value}), Filter(must={"g": "x", "f": value})):
            got = memory.candidates(flt)
            assert got is not None and got.tolist() == [i for i, p in enumerate(points) if matches(p.payload, flt)]
    assert len(memory._fields) == 2
