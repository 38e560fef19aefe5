"""Bulk loads into Qdrant Edge: the flush schedule (`edge_files.FlushSchedule`) flushes a growing collection
about log2(n) times instead of every `FLUSH_POINTS` points. A bulk-loaded collection must answer exactly like
one flushed after every point, keep its payload indexes, survive an exception or a SIGKILL mid-load (a re-run
completes it), and collections written before must open and grow as before. Real Qdrant Edge, small data."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_index import BITS, DIM, META, Col, N, assert_agree, make_data

from cbir.store import Index, edge
from cbir.store.base import INDEXED_FIELDS, Point, mih_field, mih_widths
from cbir.store.edge import EdgeIndex
from cbir.store.edge_files import FlushSchedule

FIXTURE = Path(__file__).parent / "fixtures" / "index-v1.tar.gz"
INDEXES = {*INDEXED_FIELDS, *(mih_field(i) for i in range(len(mih_widths(BITS))))}
DATA = make_data()


def _load(root: Path, batch: int, monkeypatch: pytest.MonkeyPatch, points: int = 4096, seconds: float = 5.0) -> None:
    """Create `cxr` (unless it exists) and upsert the points it lacks in batches of `batch`, under the given
    flush schedule (what a re-run of `cbir ingest` does)."""
    monkeypatch.setattr(edge, "FLUSH_POINTS", points)
    monkeypatch.setattr(edge, "FLUSH_SECONDS", seconds)
    with EdgeIndex(root, writable=True, create=True) as idx:
        if not idx.has_collection("cxr"):
            idx.create_collection("cxr", DIM, BITS, META)
        present = idx.existing_ids("cxr", DATA.ids)
        missing = [p for p in DATA.points if p.id not in present]
        for start in range(0, len(missing), batch):
            idx.upsert("cxr", missing[start:start + batch])


def _indexes(idx: Index) -> dict[str, int]:
    """Payload index → points it holds, as the engine reports them."""
    assert isinstance(idx, EdgeIndex)
    return {field: info.points for field, info in idx._shard(idx.resolve("cxr")).info().payload_schema.items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Col]:
    """The collection built point by point (one upsert each), flushed at 1, 2, 4, … points."""
    root = tmp_path_factory.mktemp("one-by-one")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _load(root, 1, monkeypatch, points=1)
    with EdgeIndex(root) as index:
        yield Col(index, "cxr")


def test_flush_interval_doubles_with_the_collection() -> None:
    schedule = FlushSchedule(points=4, seconds=math.inf)
    flushed_at, total = [], 0
    schedule.start("c", lambda: 0)
    for _ in range(30):
        total += 10
        if schedule.due("c", 10):
            schedule.flushed("c")
            flushed_at.append(total)
    assert flushed_at == [10, 20, 40, 80, 160]
    big = FlushSchedule(points=4, seconds=math.inf)          # a collection that already holds 1,000 points
    big.start("c", lambda: 1000)
    assert not big.due("c", 999) and big.due("c", 1)
    timed = FlushSchedule(points=10**9, seconds=0.0)         # the time rule still bounds what a kill loses
    timed.start("c", lambda: 0)
    assert timed.due("c", 1)


def test_bulk_load_answers_like_point_by_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              reference: Col) -> None:
    _load(tmp_path / "bulk", N, monkeypatch)                          # one upsert, flushed once, at close
    with EdgeIndex(tmp_path / "bulk") as bulk:
        assert_agree(Col(bulk, "cxr"), reference, DATA)               # every search mode and filter
        assert _indexes(bulk) == _indexes(reference.index)


def test_payload_indexes_exist_after_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(edge, "FLUSH_POINTS", 8)
    with EdgeIndex(tmp_path / "idx", writable=True, create=True) as idx:
        idx.create_collection("cxr", DIM, BITS, META)
        for start in range(0, N, 64):
            idx.upsert("cxr", DATA.points[start:start + 64])
        idx.release("cxr")
        with EdgeIndex(tmp_path / "idx") as reader:                   # another process's view
            held = _indexes(reader)
    assert set(held) == INDEXES
    assert all(held[mih_field(i)] == N for i in range(len(mih_widths(BITS))))
    assert held["view"] == N and held["labels"] > 0


def test_interrupted_bulk_load_opens_and_a_rerun_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           reference: Col) -> None:
    root = tmp_path / "idx"
    with pytest.raises(RuntimeError, match="interrupted"), EdgeIndex(root, writable=True, create=True) as idx:
        idx.create_collection("cxr", DIM, BITS, META)
        for start in range(0, N, 50):
            if start == 150:
                raise RuntimeError("interrupted")
            idx.upsert("cxr", DATA.points[start:start + 50])
    with EdgeIndex(root) as reader:                                   # close() flushed what was written
        assert reader.count("cxr") == 150 and set(_indexes(reader)) == INDEXES
    _load(root, 64, monkeypatch)                                      # the re-run
    with EdgeIndex(root) as resumed:
        assert_agree(Col(resumed, "cxr"), reference, DATA)


KILLED_WRITER = """
import sys
from test_index import BITS, DIM, META, make_data
from cbir.app.settings import Settings
from cbir.store.edge import EdgeIndex
points = make_data().points
index = EdgeIndex(sys.argv[1], writable=True, create=True, flush=Settings.from_env().edge_flush)
index.create_collection("cxr", DIM, BITS, META)
for start in range(0, 150, 50):   # flushes after 50 and 100 points (FLUSH_POINTS=40), not after 150
    index.upsert("cxr", points[start:start + 50])
print("written", flush=True)
sys.stdin.read()
"""


def test_writer_killed_mid_bulk_load_then_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                reference: Col) -> None:
    root = tmp_path / "idx"
    env = {**os.environ, "CBIR_EDGE_FLUSH_POINTS": "40", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=env, text=True)
    assert writer.stdout is not None and writer.stdout.readline() == "written\n"
    writer.send_signal(signal.SIGKILL)
    writer.wait(30)
    with EdgeIndex(root) as reader:                                   # opens, with its indexes
        survived = reader.count("cxr")
        assert set(_indexes(reader)) == INDEXES
        assert reader.existing_ids("cxr", DATA.ids) == set(DATA.ids[:survived])
    assert 100 <= survived <= 150, survived                           # the last flush's points (or more)
    _load(root, 64, monkeypatch)
    with EdgeIndex(root) as resumed:
        assert_agree(Col(resumed, "cxr"), reference, DATA)


def test_collections_written_before_open_and_grow_unchanged(tmp_path: Path) -> None:
    """The schema-1 index of an earlier cbir (tests/fixtures): opened, searched, appended to, reopened."""
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    stored = np.load(tmp_path / "points.npz")
    q, code = stored["emb"][3], stored["codes"][3]
    with EdgeIndex(tmp_path / "edge") as reader:
        before = [(h.id, h.hamming) for h in reader.search("rsna", q, 10, code=code, prefilter=20)]
        config = reader._shard("rsna").info().payload_schema.keys()
        count = reader.count("rsna")
    extra = Point("00000000-0000-4000-8000-000000000001", q, code, {"view": "PA"})
    with EdgeIndex(tmp_path / "edge", writable=True) as writer:
        writer.upsert("rsna", [extra])                                # 1 < 60 held: flushed by close()
    with EdgeIndex(tmp_path / "edge") as reader:
        assert reader.count("rsna") == count + 1
        assert reader._shard("rsna").info().payload_schema.keys() == config
        after = [(h.id, h.hamming) for h in reader.search("rsna", q, 11, code=code, prefilter=21)]
        assert extra.id in {i for i, _ in after}
        assert [hit for hit in after if hit[0] != extra.id] == before
