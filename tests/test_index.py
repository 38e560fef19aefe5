"""Congruence suite for the index backends.

Every check runs on Qdrant Edge (a tmp directory), on qdrant-client's local mode (a tmp directory) and,
when $CBIR_TEST_QDRANT_URL is set, on that Qdrant server; each is compared with a NumPy brute force,
and `test_backends_agree` compares the backends with each other. No mocks: real engines, small data.
On a server, new collections get $CBIR_TEST_QDRANT_SHARDS shards of $CBIR_TEST_QDRANT_REPLICAS copies each
(default 1 and 1; the cluster job of .github/workflows/server.yml sets 3 and 2).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cbir.errors import IndexError_
from cbir.store import Filter, Hit, Index, Point, open_index
from cbir.store.base import HASH, pack_code
from cbir.store.client import ClientIndex, ServerSettings
from cbir.store.edge import EdgeIndex
from cbir.store.memory import MemoryIndex
from cbir.store.planner import Candidates, Costs, Request, Scope, SearchPlanner
from cbir.store.records import Schema

N, DIM, BITS = 300, 32, 64
LABELS = ("Atelectasis", "Effusion", "Nodule", "Pneumonia")
META = {"model_fingerprint": "abc123", "dim": DIM, "bits": BITS, "nested": {"a": [1, 2]}}
SERVER_ENV = "CBIR_TEST_QDRANT_URL"
SERVER_URL = os.environ.get(SERVER_ENV)
SERVER_SKIP = f"set ${SERVER_ENV} (e.g. http://localhost:6333) to run these checks against a Qdrant server"
KINDS = ("edge", "local", "server") if SERVER_URL else ("edge", "local")
SERVER_SHARDS = int(os.environ.get("CBIR_TEST_QDRANT_SHARDS") or 1)
SERVER_REPLICAS = int(os.environ.get("CBIR_TEST_QDRANT_REPLICAS") or 1)


# --- data and the NumPy oracle ---------------------------------------------------------------------

@dataclass
class Data:
    ids: list[str]
    emb: np.ndarray            # (N, DIM) float32, L2-normalised
    codes: np.ndarray          # (N, BITS) uint8
    payloads: list[dict[str, Any]]

    @property
    def points(self) -> list[Point]:
        return [Point(i, e, c, dict(p)) for i, e, c, p in zip(self.ids, self.emb, self.codes, self.payloads,
                                                                    strict=True)]


def make_data(seed: int = 7) -> Data:
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(N, DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    codes = (emb @ rng.normal(size=(DIM, BITS)) > 0).astype(np.uint8)  # LSH: near embeddings, near codes
    codes[:20] = codes[20:40]                                           # exact duplicates: Hamming ties
    ids = [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(N)]
    payloads = [{
        "labels": sorted(str(x) for x in rng.choice(LABELS, size=rng.integers(0, 3), replace=False)),
        "dataset": str(rng.choice(["nih", "chexpert"])),
        "split": str(rng.choice(["train", "val", "test"])),
        "view": str(rng.choice(["PA", "AP"])),
        "sex": str(rng.choice(["F", "M"])),
        "decade": int(rng.integers(2, 9)),
        "flag": bool(rng.integers(0, 2)),
    } for _ in range(N)]
    return Data(ids, emb, codes, payloads)


def _value_matches(field: Any, value: Any) -> bool:
    have = field if isinstance(field, list) else [field]
    want = list(value) if isinstance(value, (list, tuple)) else [value]
    return any(h == w and isinstance(h, bool) == isinstance(w, bool) for h in have for w in want)


def matches(payload: dict[str, Any], flt: Filter | None) -> bool:
    if not flt:
        return True
    return (all(_value_matches(payload.get(k), v) for k, v in flt.must.items())
            and not any(_value_matches(payload.get(k), v) for k, v in flt.must_not.items()))


def hamming(data: Data, code: np.ndarray) -> np.ndarray:
    return (data.codes != code).sum(axis=1)


def brute(data: Data, q: np.ndarray, k: int, flt: Filter | None = None, code: np.ndarray | None = None,
          prefilter: int | None = None, radius: int | None = None) -> list[tuple[str, float, int | None]]:
    """(id, cosine, Hamming) of the expected hits; prefilter ties are broken by id."""
    ham = hamming(data, code) if code is not None else np.zeros(N, int)
    rows = [i for i in range(N) if matches(data.payloads[i], flt)]
    if radius is not None:
        rows = [i for i in rows if ham[i] <= radius]
    if prefilter is not None:
        rows = sorted(rows, key=lambda i: (ham[i], data.ids[i]))[:prefilter]
    cos = data.emb[rows] @ (q / np.linalg.norm(q))
    best = np.argsort(-cos, kind="stable")[:k]
    return [(data.ids[rows[j]], float(cos[j]), None if code is None else int(ham[rows[j]])) for j in best]


def assert_hits(hits: list[Hit], expected: list[tuple[str, float, int | None]]) -> None:
    assert [h.id for h in hits] == [e[0] for e in expected]
    np.testing.assert_allclose([h.score for h in hits], [e[1] for e in expected], atol=1e-5)
    assert [h.hamming for h in hits] == [e[2] for e in expected]


FILTERS = [
    Filter(must={"labels": "Effusion"}),
    Filter(must={"labels": ["Effusion", "Nodule"]}),
    Filter(must_not={"labels": "Effusion"}),
    Filter(must_not={"labels": ["Atelectasis", "Pneumonia"]}),
    Filter(must={"sex": "F", "view": "PA"}, must_not={"labels": ["Nodule", "Pneumonia"]}),
    Filter(must={"dataset": ["nih"], "split": ["val", "test"]}),
    Filter(must={"decade": 4}),
    Filter(must={"flag": True}),        # Edge turns a Python bool into 1 unless passed as numpy.bool_
    Filter(must={"flag": False, "labels": "Nodule"}),
    Filter(must={"labels": []}),        # a list matches any of its items: none here
    Filter(must={"dataset": "absent"}),
]
FILTER_IDS = [f"f{i}" for i in range(len(FILTERS))]


# --- backends --------------------------------------------------------------------------------------

@dataclass
class Col:
    index: Index
    name: str


class ServerIndex(ClientIndex):
    """The live test server: a collection made without distribution settings gets the test run's
    (`SERVER_SHARDS`, `SERVER_REPLICAS`), so every server check also runs on a sharded, replicated cluster."""

    def create_collection(self, name: str, dim: int, bits: int, meta: dict[str, Any], shards: int = 1,
                          replicas: int = 1) -> None:
        super().create_collection(name, dim, bits, meta, max(shards, SERVER_SHARDS), max(replicas, SERVER_REPLICAS))


def server_index(api_key: str | None = None) -> ServerIndex:
    """The live server of $CBIR_TEST_QDRANT_URL, with `api_key` (default: $CBIR_TEST_QDRANT_API_KEY)."""
    assert SERVER_URL, SERVER_SKIP
    key = api_key or os.environ.get("CBIR_TEST_QDRANT_API_KEY")
    return ServerIndex(SERVER_URL, writable=True, create=True, settings=ServerSettings(api_key=key))


def open_backend(kind: str, folder: Path, writable: bool = True, create: bool = True) -> Index:
    if kind == "edge":
        return EdgeIndex(folder / "edge", writable=writable, create=create)
    if kind == "local":
        return ClientIndex(f"local:{folder / 'local'}", writable=writable, create=create)
    return server_index()


def fresh_name(kind: str) -> str:
    """A server is shared, so its test collections get unique names (and are deleted afterwards)."""
    return f"cbir_test_{uuid.uuid4().hex[:10]}" if kind == "server" else "cxr"


def drop(index: Index, name: str) -> None:
    if index.has_collection(name):
        index.delete_collection(name)


@pytest.fixture(scope="module")
def data() -> Data:
    return make_data()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, data: Data) -> Iterator[Callable[[str], Col]]:
    """Loaded collections, one per backend, built on first use and shared by the read-only tests."""
    opened: dict[str, Col] = {}

    def get(kind: str) -> Col:
        if kind not in opened:
            index = open_backend(kind, tmp_path_factory.mktemp(kind))
            col = Col(index, fresh_name(kind))
            index.create_collection(col.name, DIM, BITS, META)
            index.upsert(col.name, data.points)
            opened[kind] = col
        return opened[kind]

    yield get
    for kind, col in opened.items():
        if kind == "server":
            drop(col.index, col.name)
        col.index.close()


@pytest.fixture(params=KINDS)
def loaded(request: pytest.FixtureRequest, store: Callable[[str], Col]) -> Col:
    return store(request.param)


@pytest.fixture(params=KINDS)
def empty(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Col]:
    """A writable index of each backend with no collection yet, and the name to use."""
    index = open_backend(request.param, tmp_path)
    col = Col(index, fresh_name(request.param))
    yield col
    if request.param == "server":
        drop(index, col.name)
    index.close()


def queries(data: Data, count: int = 4, seed: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    """Query (embedding, code) pairs: stored points (distance-0 and tied codes) and random ones."""
    rng = np.random.default_rng(seed)
    out = [(data.emb[i], data.codes[i]) for i in (0, 25, 111)]
    for _ in range(count):
        q = rng.normal(size=DIM).astype(np.float32)
        out.append((q / np.linalg.norm(q), rng.integers(0, 2, BITS).astype(np.uint8)))
    return out


# --- collections and metadata ----------------------------------------------------------------------

def test_collection_lifecycle_and_meta(empty: Col) -> None:
    idx, name = empty.index, empty.name
    assert not idx.has_collection(name) and name not in idx.list_collections()
    idx.create_collection(name, DIM, BITS, META)
    assert idx.has_collection(name) and name in idx.list_collections()
    assert idx.get_meta(name) == META
    with pytest.raises(IndexError_, match="already exists"):
        idx.create_collection(name, DIM, BITS, {})
    idx.set_meta(name, {"model_fingerprint": "def456"})  # replaces, does not merge
    assert idx.get_meta(name) == {"model_fingerprint": "def456"}
    assert idx.count(name) == 0
    idx.delete_collection(name)
    assert not idx.has_collection(name) and name not in idx.list_collections()
    idx.create_collection(name, DIM, BITS, META)  # the name is free again
    assert idx.count(name) == 0 and idx.get_meta(name) == META


def test_unknown_collection(empty: Col, data: Data) -> None:
    idx, name = empty.index, empty.name
    calls: list[Callable[[], Any]] = [
        lambda: idx.get_meta(name), lambda: idx.set_meta(name, {}), lambda: idx.count(name),
        lambda: idx.upsert(name, data.points[:1]), lambda: idx.existing_ids(name, data.ids[:1]),
        lambda: idx.retrieve(name, data.ids[:1]), lambda: list(idx.scroll(name)),
        lambda: idx.search(name, data.emb[0], 3), lambda: idx.delete_collection(name),
    ]
    for call in calls:
        with pytest.raises(IndexError_, match=f"no collection '{name}'"):
            call()


# --- writing ---------------------------------------------------------------------------------------

def test_upsert_count_and_reupsert(empty: Col, data: Data) -> None:
    idx, name = empty.index, empty.name
    idx.create_collection(name, DIM, BITS, META)
    idx.upsert(name, data.points)
    assert idx.count(name) == N
    changed = [Point(p.id, p.embedding, p.code, {**p.payload, "split": "moved"}) for p in data.points[:50]]
    idx.upsert(name, changed)
    assert idx.count(name) == N
    assert idx.count(name, Filter(must={"split": "moved"})) == 50
    assert all(p.payload["split"] == "moved" for p in idx.retrieve(name, data.ids[:50]))


def test_upsert_rejects_bad_points(empty: Col, data: Data) -> None:
    idx, name = empty.index, empty.name
    idx.create_collection(name, DIM, BITS, META)
    good = data.points[0]
    bad = [
        (Point(good.id, good.embedding[:-1], good.code, {}), "embedding has shape"),
        (Point(good.id, good.embedding, good.code[:-8], {}), "hash code has shape"),
        (Point("not-a-uuid", good.embedding, good.code, {}), "not a canonical UUID"),
    ]
    for point, message in bad:
        with pytest.raises(IndexError_, match=message):
            idx.upsert(name, [*data.points[1:10], point])
    assert idx.count(name) == 0  # a bad point anywhere in the call writes nothing
    with pytest.raises(IndexError_, match="embedding has shape"):
        idx.search(name, np.ones(DIM + 1, np.float32), 3)
    with pytest.raises(IndexError_, match="hash code has shape"):
        idx.search(name, data.emb[0], 3, code=data.codes[0][:8], prefilter=5)


def test_payload_hash_is_set(loaded: Col, data: Data) -> None:
    (point,) = loaded.index.retrieve(loaded.name, data.ids[:1])
    assert point.payload[HASH] == pack_code(data.codes[0])


# --- reading ---------------------------------------------------------------------------------------

def test_existing_ids(loaded: Col, data: Data) -> None:
    unknown = [str(uuid.uuid4()) for _ in range(5)]
    assert loaded.index.existing_ids(loaded.name, data.ids[::7] + unknown) == set(data.ids[::7])
    assert loaded.index.existing_ids(loaded.name, []) == set()


def test_retrieve(loaded: Col, data: Data) -> None:
    rows = [5, 0, 299, 42]
    asked = [data.ids[i] for i in rows[:2]] + [str(uuid.uuid4())] + [data.ids[i] for i in rows[2:]]
    with_vectors = loaded.index.retrieve(loaded.name, asked, with_vectors=True)
    assert [p.id for p in with_vectors] == [data.ids[i] for i in rows]  # asked order, missing left out
    for p, i in zip(with_vectors, rows, strict=True):
        np.testing.assert_allclose(p.embedding, data.emb[i], atol=1e-6)
        assert p.code.dtype == np.uint8 and np.array_equal(p.code, data.codes[i])
        assert p.payload == {**data.payloads[i], HASH: pack_code(data.codes[i])}
    bare = loaded.index.retrieve(loaded.name, asked)
    assert [p.id for p in bare] == [data.ids[i] for i in rows]
    assert all(p.embedding.size == 0 and p.code.size == 0 and p.payload for p in bare)


@pytest.mark.parametrize("flt", [None, *FILTERS[:6]], ids=["all", *FILTER_IDS[:6]])
def test_scroll(loaded: Col, data: Data, flt: Filter | None) -> None:
    got = list(loaded.index.scroll(loaded.name, flt, with_vectors=flt is None, batch=37))
    expected = sorted(i for i, p in zip(data.ids, data.payloads, strict=True) if matches(p, flt))
    assert [p.id for p in got] == expected  # every match once, in id order
    if flt is None:
        rows = {i: r for r, i in enumerate(data.ids)}
        assert all(np.array_equal(p.code, data.codes[rows[p.id]]) for p in got)


@pytest.mark.parametrize("flt", FILTERS, ids=FILTER_IDS)
def test_count_with_filter(loaded: Col, data: Data, flt: Filter) -> None:
    assert loaded.index.count(loaded.name, flt) == sum(matches(p, flt) for p in data.payloads)


# --- search ----------------------------------------------------------------------------------------

def test_search_exact_cosine(loaded: Col, data: Data) -> None:
    for q, _ in queries(data):
        for k in (1, 10, N + 5):
            assert_hits(loaded.index.search(loaded.name, q, k), brute(data, q, k))
    assert loaded.index.search(loaded.name, data.emb[0], 0) == []


@pytest.mark.parametrize("flt", FILTERS, ids=FILTER_IDS)
def test_search_with_filter(loaded: Col, data: Data, flt: Filter) -> None:
    for q, _ in queries(data, count=2):
        assert_hits(loaded.index.search(loaded.name, q, 15, flt), brute(data, q, 15, flt))


def test_search_reports_hamming(loaded: Col, data: Data) -> None:
    for q, code in queries(data, count=2):
        assert_hits(loaded.index.search(loaded.name, q, 20, code=code), brute(data, q, 20, code=code))


@pytest.mark.parametrize("n", [1, 7, 40, 150, N, N + 50])
@pytest.mark.parametrize("flt", [None, FILTERS[1], FILTERS[4]], ids=["all", "labels-any", "mixed"])
def test_prefilter(loaded: Col, data: Data, n: int, flt: Filter | None) -> None:
    for q, code in queries(data, count=2):
        hits = loaded.index.search(loaded.name, q, 12, flt, code=code, prefilter=n)
        assert_hits(hits, brute(data, q, 12, flt, code=code, prefilter=n))


def test_prefilter_candidates_break_ties_by_id(loaded: Col, data: Data) -> None:
    """k = n returns the whole candidate set: it must be the n nearest codes, ties broken by id."""
    tied = 0
    for q, code in queries(data, count=4):
        ham = np.sort(hamming(data, code))
        for n in (10, 33, 90):
            tied += int(ham[n - 1] == ham[n])
            hits = loaded.index.search(loaded.name, q, n, code=code, prefilter=n)
            assert {h.id for h in hits} == {e[0] for e in brute(data, q, n, code=code, prefilter=n)}
    assert tied >= 5  # the boundary ties really were exercised


@pytest.mark.parametrize("radius", [0, 10, 20, 26, 32, BITS])
def test_hamming_radius(loaded: Col, data: Data, radius: int) -> None:
    for q, code in queries(data, count=2):
        everything = loaded.index.search(loaded.name, q, N, code=code, hamming_radius=radius)
        assert_hits(everything, brute(data, q, N, code=code, radius=radius))  # exactly the points within R
        top = loaded.index.search(loaded.name, q, 5, FILTERS[2], code=code, hamming_radius=radius)
        assert_hits(top, brute(data, q, 5, FILTERS[2], code=code, radius=radius))


def test_prefilter_within_radius(loaded: Col, data: Data) -> None:
    for q, code in queries(data, count=2):
        for n, radius in ((10, 24), (200, 20), (50, 0)):
            hits = loaded.index.search(loaded.name, q, 30, code=code, prefilter=n, hamming_radius=radius)
            assert_hits(hits, brute(data, q, 30, code=code, prefilter=n, radius=radius))


def test_prefilter_needs_a_code(loaded: Col, data: Data) -> None:
    with pytest.raises(ValueError, match="hash code"):
        loaded.index.search(loaded.name, data.emb[0], 5, prefilter=10)


# --- the backends against each other ---------------------------------------------------------------

def answers(col: Col, data: Data) -> tuple[list[Any], np.ndarray]:
    """What a backend says to a battery of calls: everything but the scores, and the scores."""
    idx, name = col.index, col.name
    out: list[Any] = [idx.count(name), idx.get_meta(name), sorted(idx.existing_ids(name, data.ids[::3]))]
    out.append([(p.id, p.payload) for p in idx.scroll(name, FILTERS[4], with_vectors=False)])
    scores: list[float] = []
    for q, code in queries(data, count=3):
        variants: list[dict[str, Any]] = [{}, {"code": code}, {"code": code, "prefilter": 25},
                                          {"code": code, "hamming_radius": 22}]
        for flt in (None, *FILTERS):
            for kw in variants:
                hits = idx.search(name, q, 8, flt, **kw)
                out.append([(h.id, h.hamming, h.payload) for h in hits])
                scores += [h.score for h in hits]
    return out, np.array(scores)


def assert_agree(col: Col, reference: Col, data: Data) -> None:
    (got, got_scores), (want, want_scores) = answers(col, data), answers(reference, data)
    assert got == want
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)


def test_backends_agree(store: Callable[[str], Col], data: Data) -> None:
    assert_agree(store("local"), store("edge"), data)


@pytest.mark.skipif(not SERVER_URL, reason=SERVER_SKIP)
def test_server_agrees(store: Callable[[str], Col], data: Data) -> None:
    """With $CBIR_TEST_QDRANT_URL set, every test above also runs on the server; this compares it too."""
    assert_agree(store("server"), store("edge"), data)


@pytest.mark.skipif(not SERVER_URL, reason=SERVER_SKIP)
def test_server_collections_have_the_test_runs_shards_and_replicas(store: Callable[[str], Col]) -> None:
    col = store("server")
    params = col.index._client.get_collection(col.name).config.params
    assert (params.shard_number, params.replication_factor) == (SERVER_SHARDS, SERVER_REPLICAS)
    assert col.index.shard_count(col.name) == SERVER_SHARDS and col.index.count(col.name) == N


class TiedEngine:
    """An engine that orders equal Hamming distances in reverse id order, as a real one may."""

    costs = Costs(round_trip=0.0, per_hit=0.0, prefetch_limit=False)

    def __init__(self) -> None:
        self.pairs = [(f"id{i:03d}", d) for i, d in enumerate([0, 1, 1] + [2] * 60 + [3] * 5)]
        self.pairs.sort(key=lambda p: (p[1], -int(p[0][2:])))
        self.asked: list[int] = []

    def schema(self, name: str) -> Schema:
        return Schema(1, 4)

    def pin(self, name: str) -> str:
        return name

    def count(self, name: str, scope: Scope) -> int:
        return len(self.pairs)

    def nearest_by_code(self, name: str, code: np.ndarray, limit: int, scope: Scope) -> Candidates:
        self.asked.append(limit)
        found = self.pairs[:limit]
        return Candidates([p[0] for p in found], np.array([p[1] for p in found]))

    def nearest_by_vector(self, name: str, embedding: np.ndarray, limit: int, scope: Scope) -> list[Hit]:
        return [Hit(i, 1.0, {}, None) for i in scope.ids][:limit]


def test_planner_widens_the_code_search_until_ties_are_seen() -> None:
    engine = TiedEngine()
    hits = SearchPlanner(engine).search("x", Request(np.ones(1, np.float32), 5, code=np.zeros(4, np.uint8),
                                                     prefilter=5))
    assert [h.id for h in hits] == ["id000", "id001", "id002", "id003", "id004"]  # equal cosines: by id
    assert engine.asked == [26, 104]


# --- the planner: every plan on every engine ---------------------------------------------------------

ENGINES = (*KINDS, "memory")
PREFILTER_PLANS = ("two-step", "one-request")


def searcher(store: Callable[[str], Col], engine: str) -> Callable[..., list[Hit]]:
    """`search(q, k, flt, **kw)` on a backend, or on the in-memory engine loaded from the Edge collection."""
    if engine == "memory":
        col = store("edge")
        memory = MemoryIndex.load(col.index, col.name)
        return memory.search
    col = store(engine)
    return lambda *args, **kw: col.index.search(col.name, *args, **kw)


@pytest.mark.parametrize("plan", PREFILTER_PLANS)
@pytest.mark.parametrize("engine", ENGINES)
def test_every_plan_on_every_engine(store: Callable[[str], Col], data: Data, engine: str, plan: str) -> None:
    """Each engine runs both prefilter plans (and the exact and radius steps), and the answers equal the
    brute force id by id, Hamming ties at the shortlist's edge included."""
    search = searcher(store, engine)
    for q, code in queries(data, count=3):
        for flt in (None, FILTERS[1], FILTERS[4], FILTERS[10]):
            for n, radius in ((1, None), (25, None), (90, None), (N + 5, None), (30, 24), (None, 22), (None, 0)):
                hits = search(q, 12, flt, code=code, prefilter=n, hamming_radius=radius, plan=plan)
                assert_hits(hits, brute(data, q, 12, flt, code=code, prefilter=n, radius=radius))
            assert_hits(search(q, 9, flt, plan=plan), brute(data, q, 9, flt))


@pytest.mark.parametrize("engine", ENGINES)
def test_equal_cosines_come_in_id_order(tmp_path: Path, engine: str) -> None:
    """Duplicated embeddings tie exactly; every engine and plan returns them in ascending id order."""
    rng = np.random.default_rng(5)
    base = rng.normal(size=(6, DIM)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    emb = np.repeat(base, 8, axis=0)                                   # 6 groups of 8 identical vectors
    codes = (emb @ rng.normal(size=(DIM, BITS)) > 0).astype(np.uint8)
    ids = [str(uuid.UUID(bytes=rng.bytes(16), version=4)) for _ in range(len(emb))]
    points = [Point(i, e, c, {"dataset": "nih"}) for i, e, c in zip(ids, emb, codes, strict=True)]
    kind = "edge" if engine == "memory" else engine
    with open_backend(kind, tmp_path) as index:
        name = fresh_name(kind)
        index.create_collection(name, DIM, BITS, META)
        try:
            index.upsert(name, points)
            memory = MemoryIndex.load(index, name)
            search = memory.search if engine == "memory" else (lambda *a, **kw: index.search(name, *a, **kw))
            for group in range(6):
                want = sorted(ids[group * 8:group * 8 + 8])[:5]
                for kw in ({}, {"code": codes[group * 8], "prefilter": 20}):
                    for plan in PREFILTER_PLANS:
                        assert [h.id for h in search(emb[group * 8], 5, **kw, plan=plan)] == want
        finally:
            if kind == "server":
                drop(index, name)


def test_plans_follow_the_measured_costs(store: Callable[[str], Col]) -> None:
    """An engine whose request costs more than sending the shortlist back gets one request (a server); an
    in-process one two steps."""
    slow = Costs(round_trip=2e-3, per_hit=2e-5, rescore=True)
    request = Request(np.zeros(DIM, np.float32), 10, code=np.zeros(BITS, np.uint8), prefilter=25)
    edge = store("edge").index

    class Remote:
        costs = slow

        def rescore(self, *args: Any) -> list[Hit]:
            return []

    assert SearchPlanner(Remote()).plan(request) == "one-request"   # type: ignore[arg-type]
    assert SearchPlanner(edge).plan(request) == "two-step"
    assert SearchPlanner(edge).plan(Request(request.embedding, 10)) == "exact"
    assert SearchPlanner(MemoryIndex([])).plan(request) == "two-step"


# --- persistence, locking, opening -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["edge", "local"])
def test_persistence_across_reopen(kind: str, tmp_path: Path, data: Data) -> None:
    q, code = queries(data)[0]
    with open_backend(kind, tmp_path) as idx:
        idx.create_collection("cxr", DIM, BITS, META)
        idx.upsert("cxr", data.points[:200])
        idx.upsert("cxr", data.points[200:])
        before = idx.search("cxr", q, 10, code=code, prefilter=40)
    with open_backend(kind, tmp_path, writable=False, create=False) as idx:
        assert idx.list_collections() == ["cxr"] and idx.get_meta("cxr") == META
        assert idx.count("cxr") == N
        after = idx.search("cxr", q, 10, code=code, prefilter=40)
        assert [(h.id, h.payload, h.hamming) for h in after] == [(h.id, h.payload, h.hamming) for h in before]
        np.testing.assert_allclose([h.score for h in after], [h.score for h in before], atol=1e-6)
        with pytest.raises(IndexError_, match="read-only"):
            idx.upsert("cxr", data.points[:1])


def test_edge_one_writer_per_collection(tmp_path: Path, data: Data) -> None:
    """Locks are per collection (flock is per open file, so two EdgeIndex objects behave like two processes)."""
    with EdgeIndex(tmp_path / "idx", writable=True, create=True) as writer:
        writer.create_collection("a", DIM, BITS, META)
        writer.upsert("a", data.points[:5])
        with EdgeIndex(tmp_path / "idx", writable=True) as other:
            with pytest.raises(IndexError_, match="'a': the collection is in use by another process.*Qdrant server"
                               ) as err:
                other.upsert("a", data.points[5:6])
            assert "\n" not in str(err.value)
            other.create_collection("b", DIM, BITS, META)           # another collection: no conflict
            other.upsert("b", data.points[:3])
        with EdgeIndex(tmp_path / "idx") as reader:
            with pytest.raises(IndexError_, match="being written by another process.*Qdrant server"):
                reader.count("a")
            assert reader.count("b") == 3                            # b was closed by its writer
    with EdgeIndex(tmp_path / "idx") as reader, EdgeIndex(tmp_path / "idx") as another:  # readers share
        assert reader.count("a") == another.count("a") == 5
        with EdgeIndex(tmp_path / "idx", writable=True) as writer:
            with pytest.raises(IndexError_, match="in use by another process"):
                writer.upsert("a", data.points[5:6])
            with pytest.raises(IndexError_, match="in use by another process"):
                writer.delete_collection("a")
            assert writer.count("a") == 5                           # its shared lock survived the failed upgrade
    with EdgeIndex(tmp_path / "idx", writable=True) as writer:      # closing released every lock
        writer.upsert("a", data.points[5:6])
        assert writer.count("a") == 6


def test_edge_layout_and_interrupted_create(tmp_path: Path, data: Data) -> None:
    root = tmp_path / "idx"
    with EdgeIndex(root, writable=True, create=True) as idx:
        (root / "collections" / "half").mkdir()  # a create that died before meta.json was written
        assert idx.list_collections() == [] and not idx.has_collection("half")
        idx.create_collection("half", DIM, BITS, META)
        idx.upsert("half", data.points[:10])
        assert idx.count("half") == 10
        with pytest.raises(IndexError_, match="invalid collection name"):
            idx.create_collection("../escape", DIM, BITS, META)
    assert (root / "collections" / "half" / "shard").is_dir()
    assert (root / "collections" / "half" / "meta.json").is_file()
    with pytest.raises(IndexError_, match="closed"):
        idx.count("half")


def test_local_mode_one_process_at_a_time(tmp_path: Path) -> None:
    with (ClientIndex(f"local:{tmp_path}", writable=True, create=True),
          pytest.raises(IndexError_, match="in use by another process.*Qdrant server")):
        ClientIndex(f"local:{tmp_path}")


def test_no_index_here(tmp_path: Path) -> None:
    missing = tmp_path / "nothing"
    for location in (str(missing), f"local:{missing}"):
        with pytest.raises(IndexError_, match=r"no index here \(run `cbir ingest` first\)"):
            open_index(location)
    assert not missing.exists()
    with pytest.raises(ValueError, match="writable"):
        open_index(str(missing), create=True)


def test_open_index_picks_the_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open_index(str(tmp_path / "e"), writable=True, create=True) as idx:
        assert isinstance(idx, EdgeIndex)
    with open_index(f"local:{tmp_path / 'l'}", writable=True, create=True) as idx:
        assert isinstance(idx, ClientIndex) and not idx.is_server
    with open_index(":memory:", writable=True, create=True) as idx:
        assert isinstance(idx, ClientIndex)
        idx.create_collection("m", 4, 8, {})
        assert idx.list_collections() == ["m"]
    monkeypatch.setenv("CBIR_INDEX", str(tmp_path / "e"))        # read once, into the settings
    import cbir
    with cbir.open_index(settings=cbir.Settings.from_env()) as idx:
        assert isinstance(idx, EdgeIndex) and idx.location == str(tmp_path / "e")
    monkeypatch.delenv("CBIR_INDEX")
    monkeypatch.chdir(tmp_path)
    with open_index(None, writable=True, create=True) as idx:
        assert idx.location == "./cbir-index" and (tmp_path / "cbir-index").is_dir()
    idx = open_index("http://127.0.0.1:9")  # a server location does not connect until used
    assert isinstance(idx, ClientIndex) and idx.is_server
    with pytest.raises(IndexError_, match="http://127.0.0.1:9"):
        idx.list_collections()
    idx.close()


# --- property: the Hamming prefilter on random codes, against brute force ---------------------------

def random_code_data(seed: int, bits: int) -> Data:
    """Uniformly random `bits`-bit codes, unrelated to the embeddings: with few bits most distances tie."""
    data = make_data(seed)
    rng = np.random.default_rng(seed + 1000)
    return Data(data.ids, data.emb, rng.integers(0, 2, size=(N, bits)).astype(np.uint8), data.payloads)


@pytest.mark.parametrize("kind", ["edge", "local"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefilter_property_on_random_codes(kind: str, seed: int, tmp_path: Path) -> None:
    bits = (12, 16, 24)[seed]
    data = random_code_data(seed, bits)
    rng = np.random.default_rng(seed)
    with open_backend(kind, tmp_path) as index:
        index.create_collection("p", DIM, bits, META)
        index.upsert("p", data.points)
        for _ in range(6):
            q = rng.normal(size=DIM).astype(np.float32)
            code = rng.integers(0, 2, bits).astype(np.uint8)
            flt = FILTERS[int(rng.integers(0, 6))] if rng.random() < 0.5 else None
            n, radius = int(rng.integers(1, N + 20)), int(rng.integers(0, bits + 1))
            # k = n returns the whole candidate set: exactly the n nearest codes, ties broken by id
            hits = index.search("p", q, n, flt, code=code, prefilter=n)
            assert {h.id for h in hits} == {e[0] for e in brute(data, q, n, flt, code=code, prefilter=n)}
            assert_hits(index.search("p", q, 7, flt, code=code, prefilter=n),
                        brute(data, q, 7, flt, code=code, prefilter=n))
            within = index.search("p", q, N, flt, code=code, hamming_radius=radius)
            assert_hits(within, brute(data, q, N, flt, code=code, radius=radius))
            assert all(h.hamming <= radius for h in within)


def test_multi_index_hashing_keys_cover_every_code_within_the_radius() -> None:
    """Pigeonhole: any code within Hamming R of the query has a substring among the query's MIH keys."""
    from cbir.store.base import MIH_MAX_KEYS, mih_keys, mih_substrings, mih_widths

    assert mih_widths(64) == [16] * 4 and mih_widths(24) == [12, 12] and mih_widths(70) == [14] * 5
    assert mih_widths(16) == [16] and sum(mih_widths(100)) == 100
    code = np.array([1, 0] * 8, dtype=np.uint8)
    assert mih_substrings(code) == [0b1010101010101010]
    rng = np.random.default_rng(0)
    for bits in (16, 24, 64, 70):
        for radius in (0, 1, 3, 7, 12):
            q = rng.integers(0, 2, bits).astype(np.uint8)
            keys = mih_keys(q, radius)
            if keys is None:                               # only when the neighbourhoods are too many values
                from math import comb
                widths = mih_widths(bits)
                r = radius // len(widths)
                assert sum(sum(comb(w, i) for i in range(r + 1)) for w in widths) > MIH_MAX_KEYS
                continue
            assert sum(len(k) for k in keys) <= MIH_MAX_KEYS
            for _ in range(50):
                other = q.copy()
                other[rng.choice(bits, size=min(radius, bits), replace=False)] ^= 1
                assert any(s in k for s, k in zip(mih_substrings(other), keys, strict=True))


@pytest.mark.parametrize("location", ["edge", "local"])
def test_record_updates_from_many_threads_are_never_lost(location: str, tmp_path: Path) -> None:
    """Every change to a collection's record goes through `update_meta` (one read-modify-write under the
    index's lock, counted by `revision`): 8 threads × 10 roots all land. With `get_meta` + `set_meta`, as ingest,
    calibrate and ITQ fitting wrote before, concurrent writers dropped each other's roots."""
    import threading

    from cbir.store import open_index
    from cbir.store.record import add_root
    where = str(tmp_path / "edge") if location == "edge" else f"local:{tmp_path / 'local'}"
    with open_index(where, writable=True, create=True) as index:
        index.create_collection("c", 4, 8, {"model_fingerprint": "f", "dim": 4, "bits": 8})
        barrier = threading.Barrier(8)

        def work(t: int) -> None:
            barrier.wait()
            for i in range(10):
                index.update_meta("c", lambda meta, t=t, i=i: add_root(meta, f"d{t}", f"/root/{t}/{i}"))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        meta = index.get_meta("c")
        assert sum(len(v) for v in meta["roots"].values()) == 80 and meta["revision"] == 80
        with pytest.raises(Exception, match="record's 'dim' is a str"):
            index.update_meta("c", lambda meta: meta.update(dim="4"))
        assert index.get_meta("c")["dim"] == 4            # refused before anything was written
