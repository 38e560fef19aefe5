"""Versioned collections behind aliases, the schema-2 migration from a real schema-1 index, the alias swap
under concurrent queries (threads on both backends, processes on Qdrant Edge), and snapshot export/import."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from test_index import BITS, DIM, META, SERVER_SHARDS, SERVER_URL, N, make_data, open_backend, server_index

from cbir.errors import CbirError, IndexError_
from cbir.store import Index, Point, open_index
from cbir.store.migrate import discover, migrate
from cbir.store.migrations import PACKAGE
from cbir.store.snapshots import export_collection, import_collection
from cbir.store.versions import create_versioned, drop, next_version, prune, swap, versions

FIXTURE = Path(__file__).parent / "fixtures" / "index-v1.tar.gz"
KINDS = ("edge", "local")
ALL_KINDS = (*KINDS, "server") if SERVER_URL else KINDS   # a live server when $CBIR_TEST_QDRANT_URL is set
LOCATION = {"edge": lambda root: str(root / "edge"), "local": lambda root: f"local:{root / 'local'}"}


def _points(version: int, count: int = N) -> list[Point]:
    data = make_data()
    return [Point(p.id, p.embedding, p.code, {**p.payload, "version": version}) for p in data.points[:count]]


def _filled(index: Index, alias: str, version: int, count: int = N) -> str:
    """A new version of `alias` (the first one creates the alias) filled with `count` points tagged `version`."""
    if alias in index.list_aliases():
        name = next_version(index, alias)
        index.create_collection(name, DIM, BITS, META)
    else:
        name = create_versioned(index, alias, DIM, BITS, META)
    index.upsert(name, _points(version, count))
    return name


# --- the schema-2 migration, from an index written by the previous cbir --------------------------------

def _extract_fixture(tmp_path: Path) -> Path:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path


@pytest.mark.parametrize("kind", KINDS)
def test_migration_from_schema_1(kind: str, tmp_path: Path) -> None:
    root = _extract_fixture(tmp_path)
    stored = np.load(root / "points.npz")
    ids = [str(i) for i in stored["ids"]]
    with open_index(LOCATION[kind](root), writable=True) as index:
        assert index.list_collections() == ["rsna"] and index.schema_version("rsna") == 1
        assert index.list_aliases() == {}
        q, code = stored["emb"][3], stored["codes"][3]
        before = [(h.id, round(h.score, 5), h.hamming) for h in index.search("rsna", q, 10, code=code, prefilter=20)]
        radius_before = {h.id for h in index.search("rsna", q, 60, code=code, hamming_radius=6)}
        old_meta = index.get_meta("rsna")
        applied = migrate(index, None, discover(PACKAGE))
        assert [m.number for m in applied] == [m.number for m in discover(PACKAGE)]
        assert index.list_aliases() == {"rsna": "rsna__v1"} and index.list_collections() == ["rsna__v1"]
        assert index.schema_version("rsna") == 2 and index.count("rsna") == 60
        meta = index.get_meta("rsna")
        assert meta["schema_version"] == 2 and meta["model_fingerprint"] == old_meta["model_fingerprint"]
        # migration 3: the typed record (`cbir.store.record`), derived from what the old one said
        assert "record_version" not in old_meta and meta["record_version"] == 1 and meta["revision"] >= 1
        assert meta["probability"] == {"calibrated": False, "operating_point": 0.5}   # raw scores were stored
        assert meta["label_space"]["target"] == old_meta["target"]
        assert meta["label_space"]["negative"] == old_meta["negative_label"]
        points = {p.id: p for p in index.retrieve("rsna", ids, with_vectors=True)}
        assert len(points) == 60
        for i, point_id in enumerate(ids):
            np.testing.assert_allclose(points[point_id].embedding, stored["emb"][i], atol=1e-6)
            assert np.array_equal(points[point_id].code, stored["codes"][i])
            assert points[point_id].payload["path"] == f"img{i:03d}.dcm"
        after = [(h.id, round(h.score, 5), h.hamming) for h in index.search("rsna", q, 10, code=code, prefilter=20)]
        assert after == before
        assert {h.id for h in index.search("rsna", q, 60, code=code, hamming_radius=6)} == radius_before
        assert migrate(index, None, discover(PACKAGE)) == []                                   # idempotent
    if kind == "edge":
        config = json.loads((root / "edge" / "collections" / "rsna__v1" / "shard" / "edge_config.json").read_text())
        assert config["vectors"]["hash"]["datatype"] == "uint8"         # the new storage, on disk


@pytest.mark.parametrize("kind", KINDS)
def test_interrupted_migration_is_finished_by_the_next_run(kind: str, tmp_path: Path) -> None:
    root = _extract_fixture(tmp_path)
    with open_index(LOCATION[kind](root), writable=True) as index:
        migrate(index, 1, discover(PACKAGE))
        # what a run killed halfway through copying leaves: a partial next version without an alias
        index.create_collection("rsna__v1", 16, 24, {"partial": True})
        index.upsert("rsna__v1", list(index.scroll("rsna", with_vectors=True))[:10])
        migrate(index, None, discover(PACKAGE))
        assert index.list_aliases() == {"rsna": "rsna__v1"} and index.count("rsna") == 60
        assert "partial" not in index.get_meta("rsna")


# --- aliases and swaps ---------------------------------------------------------------------------------

def _alias(kind: str) -> str:
    """A server is shared: its test aliases get unique names."""
    return f"cbir_test_{uuid.uuid4().hex[:8]}" if kind == "server" else "cxr"


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_versions_swap_and_prune(kind: str, tmp_path: Path) -> None:
    cxr = _alias(kind)
    with open_backend(kind, tmp_path) as index:
        try:
            _swap_and_prune(index, cxr)
        finally:
            if index.has_collection(cxr):
                drop(index, cxr)


def _swap_and_prune(index: Index, cxr: str) -> None:
    v1 = _filled(index, cxr, 1)
    assert v1 == f"{cxr}__v1" and index.list_aliases()[cxr] == v1 and index.has_collection(cxr)
    assert index.search(cxr, make_data().emb[0], 1)[0].payload["version"] == 1
    short = _filled(index, cxr, 2, count=N - 1)
    with pytest.raises(CbirError, match=f"holds 299 points but '{cxr}__v1' holds 300; the alias was not moved"):
        swap(index, cxr, short)
    assert index.resolve(cxr) == f"{cxr}__v1"
    result = swap(index, cxr, short, allow_count_change=True)
    assert index.resolve(cxr) == short and not result.deleted_old and "differ" in result.line
    assert versions(index, cxr) == [f"{cxr}__v1", f"{cxr}__v2"]
    with pytest.raises(IndexError_, match=f"alias '{cxr}' points at it"):
        index.delete_collection(short)
    assert prune(index, cxr) == ([f"{cxr}__v1"], [])
    v3 = _filled(index, cxr, 3, count=N - 1)
    result = swap(index, cxr, v3)
    assert result.deleted_old and versions(index, cxr) == [v3] and index.count(cxr) == N - 1
    with pytest.raises(CbirError, match="reserves"):
        create_versioned(index, "bad__v2", DIM, BITS, META)
    assert drop(index, cxr) == [v3] and cxr not in index.list_aliases() and versions(index, cxr) == []


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_alias_swap_under_concurrent_queries(kind: str, tmp_path: Path) -> None:
    """Readers query the alias nonstop while the next version is built and swapped in: none fails, each
    answer comes whole from one version, and the old version is gone at the end."""
    data = make_data()
    cxr = _alias(kind)
    with open_backend(kind, tmp_path) as index:
        try:
            _swap_under_queries(index, cxr, data)
        finally:
            if index.has_collection(cxr):
                drop(index, cxr)


def _swap_under_queries(index: Index, cxr: str, data) -> None:
    _filled(index, cxr, 1)
    seen: list[list[int]] = [[] for _ in range(3)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def read(slot: int) -> None:
        q, code = data.emb[slot * 7], data.codes[slot * 7]
        while not stop.is_set():
            try:
                for hits in (index.search(cxr, q, 10), index.search(cxr, q, 10, code=code, prefilter=50),
                             index.search(cxr, q, 10, code=code, hamming_radius=24)):
                    assert len(hits) == 10
                    tags = {h.payload["version"] for h in hits}
                    assert len(tags) == 1, tags                       # never a mix of versions
                    seen[slot].append(tags.pop())
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
                return

    readers = [threading.Thread(target=read, args=(i,)) for i in range(3)]
    for thread in readers:
        thread.start()
    time.sleep(0.3)
    new = _filled(index, cxr, 2)
    result = swap(index, cxr, new)
    time.sleep(0.3)
    stop.set()
    for thread in readers:
        thread.join(30)
    assert not errors, errors[0]
    assert result.deleted_old and versions(index, cxr) == [f"{cxr}__v2"]
    for tags in seen:
        assert tags[0] == 1 and tags[-1] == 2 and tags == sorted(tags)  # v1 until the swap, then v2


READER = """
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[3])
from test_index import make_data
from cbir.store.edge import EdgeIndex
data = make_data()
index = EdgeIndex(sys.argv[1])
stop = sys.argv[2]
out = []
while True:
    try:
        hits = index.search("cxr", data.emb[5], 10)
        out.append(hits[0].payload["version"])
    except Exception as exc:
        out.append(f"error: {exc}")
        break
    if len(out) == 1:
        open(stop + ".ready", "w").close()
    if __import__("os").path.exists(stop) and out[-1] == 2:
        break
    time.sleep(0.01)
index.close()
print(json.dumps(out))
"""


def test_edge_swap_while_another_process_queries(tmp_path: Path) -> None:
    """Qdrant Edge: a reader process keeps querying through the alias; the writer builds v2, swaps, and can
    delete v1 as soon as the reader has moved on (it re-reads aliases.json and releases v1's lock)."""
    root, stop = tmp_path / "idx", tmp_path / "stop"
    with open_index(str(root), writable=True, create=True) as index:
        _filled(index, "cxr", 1)
    reader = subprocess.Popen([sys.executable, "-c", READER, str(root), str(stop), str(Path(__file__).parent)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not Path(f"{stop}.ready").exists():
            assert reader.poll() is None and time.monotonic() < deadline, reader.stderr.read() if reader.stderr else ""
            time.sleep(0.05)
        with open_index(str(root), writable=True) as index:
            with pytest.raises(IndexError_, match="in use by another process"):
                index.upsert("cxr__v1", _points(1, 1))                 # the reader holds it
            new = _filled(index, "cxr", 2)
            result = swap(index, "cxr", new, wait=30)
            assert result.deleted_old, result.note
            stop.touch()
        out, err = reader.communicate(timeout=60)
    finally:
        reader.kill()
    tags = json.loads(out.strip().splitlines()[-1])
    assert all(isinstance(t, int) for t in tags), [t for t in tags if not isinstance(t, int)]  # no failed query
    assert tags[0] == 1 and tags[-1] == 2 and tags == sorted(tags)
    with open_index(str(root)) as index:
        assert index.list_collections() == ["cxr__v2"] and index.count("cxr") == N


# --- snapshots -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("source", "target"), [("edge", "edge"), ("local", "edge"), ("edge", "local")])
def test_snapshot_round_trip(source: str, target: str, tmp_path: Path) -> None:
    data = make_data()
    snapshot = tmp_path / "cxr.snapshot"
    with open_backend(source, tmp_path / "a") as index:
        _filled(index, "cxr", 1)
        expected = index.search("cxr", data.emb[9], 10, code=data.codes[9], prefilter=40)
        done = export_collection(index, "cxr", snapshot)
        assert done.points == N and done.method == ("edge shard" if source == "edge" else "copied into an Edge shard")
    with open_backend(target, tmp_path / "b") as index:
        imported = import_collection(index, snapshot)
        assert (imported.collection, imported.stored_as, imported.points) == ("cxr", "cxr__v1", N)
        assert index.get_meta("cxr") == META and index.count("cxr") == N
        got = index.search("cxr", data.emb[9], 10, code=data.codes[9], prefilter=40)
        assert [(h.id, h.hamming, h.payload) for h in got] == [(h.id, h.hamming, h.payload) for h in expected]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in expected], atol=1e-5)
        stored = {p.id: p for p in index.retrieve("cxr", data.ids, with_vectors=True)}
        assert all(np.array_equal(stored[i].code, c) for i, c in zip(data.ids, data.codes, strict=True))
        with pytest.raises(CbirError, match="exists; pass --replace"):
            import_collection(index, snapshot)
        again = import_collection(index, snapshot, replace=True)
        assert again.stored_as == "cxr__v2" and again.swap.deleted_old and index.list_collections() == ["cxr__v2"]
        copy = import_collection(index, snapshot, name="cxr_copy")
        assert copy.stored_as == "cxr_copy__v1" and index.count("cxr_copy") == N


def test_bad_snapshot_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.snapshot"
    junk.write_bytes(b"not a tar at all")
    with open_index(str(tmp_path / "idx"), writable=True, create=True) as index:
        for path, reason in ((junk, "not a cbir snapshot"), (tmp_path / "missing", "no such file")):
            with pytest.raises(CbirError, match=reason) as err:
                import_collection(index, path)
            assert "\n" not in str(err.value)
        assert index.list_collections() == []


# --- team tokens ---------------------------------------------------------------------------------------

def test_team_token_is_a_signed_collection_scoped_jwt() -> None:
    import base64
    import hashlib
    import hmac

    from cbir.store.tokens import make_token

    def decode(part: str) -> dict:
        return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))

    token = make_token("secret", ["radiology.rsna"], days=1, now=1_000_000)
    header, body, signature = token.split(".")
    assert decode(header) == {"alg": "HS256", "typ": "JWT"}
    assert decode(body) == {"access": [{"collection": "radiology.rsna", "access": "r"}], "exp": 1_086_400}
    expected = hmac.new(b"secret", f"{header}.{body}".encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4)) == expected
    assert decode(make_token("secret", ["a"], write=True).split(".")[1])["access"][0]["access"] == "rw"
    import jwt  # and a JWT library reads it back, checking the signature and the expiry
    claims = jwt.decode(make_token("a-longer-secret-of-32-bytes-or-more", ["t.c"], days=1),
                        "a-longer-secret-of-32-bytes-or-more", algorithms=["HS256"])
    assert claims["access"] == [{"collection": "t.c", "access": "r"}]
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(make_token("a-longer-secret-of-32-bytes-or-more", ["t.c"], days=1, now=1_000_000),
                   "a-longer-secret-of-32-bytes-or-more", algorithms=["HS256"])
    with pytest.raises(CbirError, match="signed with the server's API key"):
        make_token("", ["a"])


@pytest.mark.skipif(not SERVER_URL, reason="set $CBIR_TEST_QDRANT_URL (and $CBIR_TEST_QDRANT_API_KEY, with "
                    "QDRANT__SERVICE__JWT_RBAC=true on the server) to check team tokens against a live server")
def test_read_only_team_token_on_a_live_server() -> None:
    import os

    from cbir.store.tokens import make_token

    admin_key = os.environ.get("CBIR_TEST_QDRANT_API_KEY")
    if not admin_key:
        pytest.skip("needs $CBIR_TEST_QDRANT_API_KEY: the server's admin key, which signs the token")
    alias = f"cbir_test_{uuid.uuid4().hex[:8]}"
    with server_index(admin_key) as admin:
        _filled(admin, alias, 1)
        try:
            token = make_token(admin_key, [alias])
            with server_index(token) as team:
                assert len(team.search(alias, make_data().emb[0], 5)) == 5 and team.count(alias) == N
                with pytest.raises(IndexError_, match="HTTP 403"):
                    team.upsert(alias, _points(1, 1))
        finally:
            drop(admin, alias)


@pytest.mark.skipif(not SERVER_URL, reason="set $CBIR_TEST_QDRANT_URL to move a snapshot server → file → Edge → "
                    "file → server against a live server")
def test_snapshot_server_to_edge_and_back(tmp_path: Path) -> None:
    data = make_data()
    alias = f"cbir_test_{uuid.uuid4().hex[:8]}"
    with open_backend("server", tmp_path) as server:
        _filled(server, alias, 1)
        try:
            expected = [h.id for h in server.search(alias, data.emb[4], 10, code=data.codes[4], prefilter=40)]
            done = export_collection(server, alias, tmp_path / "a.snapshot")
            one_shard = SERVER_SHARDS == 1   # a sharded collection is copied point by point instead
            assert done.method == ("server snapshot" if one_shard else "copied into an Edge shard") and done.points == N
            with open_backend("edge", tmp_path) as edge:
                import_collection(edge, tmp_path / "a.snapshot")
                got = [h.id for h in edge.search(alias, data.emb[4], 10, code=data.codes[4], prefilter=40)]
                assert got == expected
                export_collection(edge, alias, tmp_path / "b.snapshot")
            back = import_collection(server, tmp_path / "b.snapshot", replace=True)
            assert back.swap.deleted_old and server.count(alias) == N
            assert [h.id for h in server.search(alias, data.emb[4], 10, code=data.codes[4], prefilter=40)] == expected
        finally:
            drop(server, alias)
