"""`cbir ingest --thumbnails`: team A ingests into qdrant-client's local mode (the server path) and into Qdrant
Edge, its archive folder is deleted, and team B (another machine: its own key and local state, no file map)
sees every case from the index alone, in the viewer's API and in montages. Real engines, no mocks."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from cbir.app.settings import Settings
from cbir.io.thumbnails import THUMBNAIL_SIZE
from cbir.store import open_index
from tests.conftest import run_cli

N = 24
SIZE = 256   # larger than the thumbnails, so that they are really downscaled
COLLECTION = "teama.rsna"


def _ok(*args: object) -> str:
    code, out, err = run_cli(*args)
    assert code == 0, err
    return out


def _as_team(monkeypatch: pytest.MonkeyPatch, root: Path, team: str) -> None:
    """This process becomes `team`'s machine: its own pseudonym key and local state (file map)."""
    monkeypatch.setenv("CBIR_KEY_FILE", str(root / team / "pseudonym.key"))
    monkeypatch.setenv("CBIR_STATE_DIR", str(root / team / "state"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Team A's collection with thumbnails in local mode and in an Edge index; its archive is then deleted."""
    from cbir.models import ModelConfig, create_model, save_checkpoint
    root = tmp_path_factory.mktemp("thumbs")
    with pytest.MonkeyPatch.context() as monkeypatch:
        _as_team(monkeypatch, root, "a")
        _ok("synth", "--layout", "rsna", "--n", N, "--size", SIZE, "--out", root / "archive", "--seed", 4)
        save_checkpoint(create_model(ModelConfig(backbone="test_resnet", image_size=32, embed_dim=16, bits=32)),
                        root / "model")
        for location in (f"local:{root / 'local'}", str(root / "edge")):
            _ok("ingest", "--data", root / "archive", "--model", root / "model", "--index", location, "--team", "teama",
                "--collection", "rsna", "--workers", 0, "--thumbnails")
        shutil.rmtree(root / "archive")
    _ok("synth", "--layout", "rsna", "--n", 4, "--size", SIZE, "--out", root / "own", "--seed", 9)  # team B's
    return {"root": root, "local": f"local:{root / 'local'}", "edge": str(root / "edge"),
            "query": sorted((root / "own" / "stage_2_train_images").glob("*.dcm"))[0]}


def _picture(data: bytes) -> Image.Image:
    picture = Image.open(io.BytesIO(data))
    picture.load()
    return picture


def test_thumbnails_are_small_grey_webp_without_metadata(shared: dict) -> None:
    for location in (shared["local"], shared["edge"]):
        with open_index(location) as idx:
            meta = idx.get_meta(COLLECTION)
            assert meta["thumbnails"] == {"codec": "webp", "size": THUMBNAIL_SIZE, "quality": 75}
            assert all("thumbnail" not in p.payload for p in idx.scroll(COLLECTION))   # bulk reads leave them out
            points = list(idx.scroll(COLLECTION, with_thumbnails=True))
            hits = idx.search(COLLECTION, points[0].embedding, 3)
            assert hits and all("thumbnail" not in h.payload for h in hits)
            (again,) = idx.retrieve(COLLECTION, [points[0].id])
            assert again.payload["thumbnail"] == points[0].payload["thumbnail"]
        assert len(points) == N
        sizes = []
        for point in points:
            data = base64.b64decode(point.payload["thumbnail"])
            picture = _picture(data)
            channels = np.asarray(picture.convert("RGB"), dtype=np.int16)
            assert picture.format == "WEBP" and np.abs(channels - channels[..., :1]).max() <= 3   # grey
            assert max(picture.size) == THUMBNAIL_SIZE and point.payload["shape"] == [SIZE, SIZE]
            assert not {"exif", "xmp", "icc_profile"} & set(picture.info)
            assert np.asarray(picture).std() > 10            # an X-ray, not a blank square
            sizes.append(len(data))
        assert 500 < np.mean(sizes) < 12_000, np.mean(sizes)


def test_team_b_sees_the_cases_in_the_viewer_from_the_index_alone(shared: dict, monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    import cbir.serve.app as serve_app
    from cbir.io import load_pseudonymizer
    from cbir.models import load_checkpoint
    from cbir.search.warm import WarmSearcher
    _as_team(monkeypatch, shared["root"], "b")
    with open_index(shared["local"]) as idx:
        searcher = WarmSearcher(idx, COLLECTION, load_checkpoint(shared["root"] / "model"), load_pseudonymizer(),
                                state_dir=Settings.from_env().state_dir)
        client = TestClient(serve_app.create_app(searcher))
        query = shared["query"]
        body = client.post("/query", files={"file": (query.name, query.read_bytes())}, data={"k": "6"}).json()
        assert len(body["neighbors"]) == 6 and query.stem not in str(body)
        for neighbor in body["neighbors"]:
            assert neighbor["path"] is None and neighbor["file"].startswith("f-") and neighbor["labels"]
            response = client.get(neighbor["thumbnail"])
            assert response.status_code == 200 and response.headers["content-type"] == "image/png"
            picture = _picture(response.content)
            assert picture.format == "PNG" and picture.size == (256, 256) and not picture.info.get("text")
            assert np.asarray(picture.convert("L")).std() > 10
            assert _picture(client.get(neighbor["image"]).content).size == (1024, 1024)
        searcher.close()


def test_team_b_montage_from_thumbnails(shared: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cbir.report.montage import CAPTION, COLS, TILE
    _as_team(monkeypatch, shared["root"], "b")
    for location in (shared["local"], shared["edge"]):
        montage = tmp_path / "montage.png"
        _ok("query", shared["query"], "--index", location, "--collection", COLLECTION, "--k", 4, "--montage",
            montage)
        canvas = np.asarray(Image.open(montage).convert("L"), dtype=np.float32)
        header = 36
        for col in range(COLS):     # the neighbours' tiles, in the second row: pictures, not grey tiles
            top, left = header + TILE + CAPTION, col * TILE
            inside = canvas[top + 8:top + TILE - 8, left + 8:left + TILE - 8]   # within the coloured frame
            assert inside.std() > 20, (location, col)


def test_thumbnails_travel_with_a_snapshot(shared: dict, tmp_path: Path) -> None:
    snapshot = tmp_path / "a.snapshot"
    _ok("index", "export", COLLECTION, "--index", shared["edge"], "--out", snapshot)
    _ok("index", "import", snapshot, "--index", f"local:{tmp_path / 'copy'}")
    with open_index(f"local:{tmp_path / 'copy'}") as idx:
        points = list(idx.scroll(COLLECTION, with_thumbnails=True))
    assert len(points) == N and all(p.payload.get("thumbnail") for p in points)


def test_a_stored_thumbnail_read_takes_turns_with_searches_and_reloads(shared: dict,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """/thumbnail reads the index and the thumbnail cache under the searcher's lock, as searches and reloads do;
    a search's own prefetch takes it again in the same thread (reentrant)."""
    import threading

    from cbir.io import load_pseudonymizer
    from cbir.models import load_checkpoint
    from cbir.search.pictures import Picture
    from cbir.search.warm import WarmSearcher
    _as_team(monkeypatch, shared["root"], "b")
    with open_index(shared["edge"]) as idx:
        searcher = WarmSearcher(idx, COLLECTION, load_checkpoint(shared["root"] / "model"), load_pseudonymizer(),
                                state_dir=Settings.from_env().state_dir)
        point = next(iter(searcher.memory.position))
        got: list[Picture | None] = []
        reader = threading.Thread(target=lambda: got.append(searcher.picture(point)))
        with searcher._lock:   # what a search or a reload holds
            reader.start()
            reader.join(0.5)
            assert reader.is_alive() and not got   # waits: no index read beside the search
        reader.join(10)
        assert not reader.is_alive() and got and got[0] is not None and got[0].source == "thumbnail"
        result = searcher.query(shared["query"], k=3)   # prefetch under the lock it already holds
        assert len(result.neighbors) == 3
        searcher.close()
