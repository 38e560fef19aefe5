"""The in-memory searcher answers exactly like the index it was loaded from, in every search mode."""

from __future__ import annotations

import numpy as np
import pytest
from test_index import BITS, DIM, FILTERS, META, N, assert_hits, brute, make_data, open_backend, queries

from cbir.search.memory import MemoryIndex, hamming, pack_words


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
    from cbir.index.hamming import SCAN_CHUNK, hamming, pack_words
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 2, (2 * SCAN_CHUNK + 17, 64), dtype=np.uint8)
    query = pack_words(rng.integers(0, 2, (1, 64), dtype=np.uint8))[0]
    words = pack_words(codes)
    got = hamming(words, query)
    assert got.dtype == np.uint8 and got.shape == (len(codes),)
    assert np.array_equal(got, np.unpackbits((words ^ query).view(np.uint8), axis=1).sum(axis=1))
