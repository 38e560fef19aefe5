"""`cbir serve`'s API through FastAPI's TestClient: answers equal `cbir query`, every error is a 4xx with one
line, and the warm copy follows the collection when it grows."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import cbir.serve.app as serve_app
from cbir.app.settings import Settings
from cbir.cli.main import app as cli
from cbir.io import load_pseudonymizer
from cbir.models import load_checkpoint
from cbir.search import query_image
from cbir.search.warm import WarmSearcher
from cbir.store import open_index
from tests.conftest import payload_path

N = 40


def _run(*args: object) -> None:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from cbir.models import ModelConfig, create_model, save_checkpoint
    root = tmp_path_factory.mktemp("serve")
    _run("synth", "--layout", "rsna", "--n", N, "--size", 48, "--out", root / "data", "--seed", 5)
    save_checkpoint(create_model(ModelConfig(backbone="test_resnet", image_size=32, embed_dim=16, bits=32)),
                    root / "model")
    _run("ingest", "--data", root / "data", "--model", root / "model", "--index", root / "index", "--collection",
         "rsna", "--workers", 0)
    index = open_index(str(root / "index"))
    loaded = load_checkpoint(root / "model")
    searcher = WarmSearcher(index, "rsna", loaded, load_pseudonymizer(), state_dir=Settings.from_env().state_dir)
    client = TestClient(serve_app.create_app(searcher, max_upload_bytes=2**20))
    yield {"root": root, "client": client, "index": index, "loaded": loaded, "searcher": searcher,
           "dicoms": sorted((root / "data" / "stage_2_train_images").glob("*.dcm"))}
    index.close()


def _post(client: TestClient, path: Path, **form: object):
    with open(path, "rb") as fh:
        return client.post("/query", files={"file": (path.name, fh.read())},
                           data={k: str(v) if not isinstance(v, list) else v for k, v in form.items()})


def test_health_and_openapi(served: dict) -> None:
    health = served["client"].get("/health").json()
    assert health["status"] == "ok" and health["points"] == N and health["collection"] == "rsna"
    assert health["model_fingerprint"] == served["loaded"].fingerprint
    paths = served["client"].get("/openapi.json").json()["paths"]
    assert "/query" in paths and "/health" in paths


def test_query_equals_cbir_query(served: dict) -> None:
    for dicom in served["dicoms"][:3]:
        response = _post(served["client"], dicom, k=5)
        assert response.status_code == 200, response.text
        body = response.json()
        expected = query_image(dicom, served["loaded"], served["index"], "rsna", 5,
                               pseudonymize=load_pseudonymizer()).to_json()
        assert [n["id"] for n in body["neighbors"]] == [n["id"] for n in expected["neighbors"]]
        assert [n["file"] for n in body["neighbors"]] == [n["file"] for n in expected["neighbors"]]
        first = body["neighbors"][0]
        assert first["path"] is None and first["file"].startswith("f-")        # no file name leaves
        assert payload_path(first) == f"stage_2_train_images/{dicom.name}"     # but this machine knows it
        assert body["prediction"] == expected["prediction"] and body["vote"] == expected["vote"]
        assert body["query"]["path"] == load_pseudonymizer().file("query", dicom.name) and body["timing_ms"] > 0
    served["index"].release("rsna")  # query_image read the index directly; the server itself holds nothing
    body = _post(served["client"], served["dicoms"][0], k=10, filter="label=Pneumonia", prefilter=30).json()
    assert body["neighbors"] and all("Pneumonia" in n["labels"] for n in body["neighbors"])


def test_bad_requests_are_4xx_with_one_line(served: dict, tmp_path: Path) -> None:
    client = served["client"]
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(b"\x01" * 4096)
    cases = [(_post(client, noise), 400, "noise.dcm: not a DICOM file"),
             (client.post("/query", files={"file": ("empty.png", b"")}), 400, "empty file"),
             (client.post("/query", files={"file": ("big.dcm", b"\0" * (2**20 + 1))}), 413, "larger than"),
             (_post(client, served["dicoms"][0], k=0), 422, ""),
             (_post(client, served["dicoms"][0], filter="nonsense"), 422, "bad filter 'nonsense'"),
             (_post(client, served["dicoms"][0], filter="label=pneumonia"), 422, "did you mean label=Pneumonia?"),
             (_post(client, served["dicoms"][0], filter="foo=bar"), 422, "unknown filter key 'foo'"),
             (client.post("/query"), 422, "")]
    for response, status, text in cases:
        assert response.status_code == status, response.text
        detail = response.json()["detail"]
        if isinstance(detail, str):
            assert text in detail and "\n" not in detail


def test_the_warm_copy_follows_the_collection(served: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    root = served["root"]
    _run("synth", "--layout", "rsna", "--n", 10, "--size", 48, "--out", root / "more", "--seed", 6)
    _run("ingest", "--data", root / "more", "--model", root / "model", "--index", root / "index",
         "--collection", "rsna", "--workers", 0)   # the server process does not block the writer
    monkeypatch.setattr(serve_app, "REFRESH_SECONDS", 0.0)
    _post(served["client"], served["dicoms"][0], k=3)
    assert served["client"].get("/health").json()["points"] == N + 10


def test_viewer_page_thumbnails_and_region_search(served: dict) -> None:
    client = served["client"]
    page = client.get("/")
    assert page.status_code == 200 and "<title>cbir" in page.text and "/query" in page.text
    body = _post(client, served["dicoms"][1], k=6).json()
    assert body["query"]["preview"].startswith("data:image/png;base64,") and body["query"]["region"] is None
    first = body["neighbors"][0]
    thumb = client.get(first["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    from io import BytesIO

    from PIL import Image
    picture = Image.open(BytesIO(thumb.content))
    assert picture.size == (256, 256) and not picture.info.get("text")      # no header data in the picture
    assert Image.open(BytesIO(client.get(first["image"]).content)).size == (1024, 1024)
    h, w = body["query"]["shape"]
    cropped = _post(client, served["dicoms"][1], k=6, region=f"0,0,{w // 2},{h // 2}").json()
    assert cropped["query"]["region"] == [0, 0, w // 2, h // 2] and len(cropped["neighbors"]) == 6
    assert cropped["query"]["shape"] == [h, w]                # the whole image's, which the region is part of
    assert [n["id"] for n in cropped["neighbors"]] != [n["id"] for n in body["neighbors"]]


def test_viewer_error_paths(served: dict) -> None:
    client = served["client"]
    dicom = served["dicoms"][0]
    for region, text in (("1,2,3", "give x,y,w,h"), ("a,b,c,d", "give x,y,w,h"), ("0,0,4,4", "at least 16×16"),
                         ("5000,5000,100,100", "at least 16×16")):
        response = _post(client, dicom, region=region)
        assert response.status_code == 422 and text in response.json()["detail"], region
    missing = client.get("/thumbnail/00000000-0000-4000-8000-000000000000")
    assert missing.status_code == 404 and "no archived image" in missing.json()["detail"]
    assert client.get(f"/thumbnail/{served['searcher'].memory.ids[0]}?size=5000").status_code == 422


def test_fractional_region_is_accepted_and_a_non_finite_one_is_a_4xx(served: dict) -> None:
    """A browser's box is in fractional pixels: `region=10.5,…` used to answer HTTP 500."""
    client = served["client"]
    dicom = served["dicoms"][2]
    response = _post(client, dicom, k=3, region="10.5,2.25,30.75,40.5")
    assert response.status_code == 200, response.text
    assert response.json()["query"]["region"] == [10, 2, 31, 40]    # what was cropped, rounded to pixels
    for region in ("inf,0,30,30", "nan,0,30,30", "1e999,0,30,30"):
        response = _post(client, dicom, region=region)
        assert response.status_code == 422 and "four finite numbers" in response.json()["detail"], region


def _client(served: dict, **access: object) -> TestClient:
    from cbir.serve.access import Access
    return TestClient(serve_app.create_app(served["searcher"], max_upload_bytes=2**20, access=Access(**access)),
                      base_url="http://127.0.0.1:8000")


def test_a_host_outside_the_allow_list_is_refused(served: dict) -> None:
    """DNS rebinding: a page on another site that resolves its name to 127.0.0.1 sends its own Host header."""
    client = _client(served, hosts=("localhost", "127.0.0.1", "::1"))
    assert client.get("/health").status_code == 200
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example"):
        response = client.get("/health", headers={"host": host})
        assert response.status_code == 400 and "--allow-host" in response.json()["detail"], host
    assert client.get("/health", headers={"host": "[::1]:8000"}).status_code == 200


def test_a_token_guards_every_request_but_the_page(served: dict) -> None:
    token = "t0ken-for-the-tests-0123456789"
    client = _client(served, token=token)
    dicom = served["dicoms"][0]
    assert client.get("/").status_code == 200                                 # the page itself is static
    for response in (_post(client, dicom, k=3), client.get("/health"), client.get("/openapi.json"),
                     client.get(f"/thumbnail/{served['searcher'].memory.ids[0]}")):
        assert response.status_code == 401 and "token" in response.json()["detail"]
    assert _post(client, dicom, k=3).headers["www-authenticate"] == "Bearer"
    wrong = client.get("/health", headers={"authorization": "Bearer " + token[:-1] + "x"})
    assert wrong.status_code == 401
    assert client.get("/health", headers={"authorization": f"Bearer {token}"}).status_code == 200
    assert client.get("/?token=nope", follow_redirects=False).status_code == 401
    login = client.get(f"/?token={token}", follow_redirects=False)              # the browser's way in
    assert login.status_code == 303 and login.headers["location"] == "/"
    assert "HttpOnly" in login.headers["set-cookie"] and "SameSite=Strict" in login.headers["set-cookie"]
    assert _post(client, dicom, k=3).status_code == 200                        # the cookie now rides along


def test_the_upload_limit_holds_while_the_body_streams(served: dict) -> None:
    """Before, the limit was checked after the whole multipart body was buffered. Now a Content-Length over it is
    refused before a byte is read, and a body without one is cut off once it passes the limit."""
    import asyncio

    from cbir.serve.access import FORM_OVERHEAD, Access, Guard
    reads: list[int] = []
    sent: list[dict] = []

    async def app(scope, receive, send):
        while True:
            message = await receive()
            reads.append(len(message.get("body", b"")))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limit = 1000 + FORM_OVERHEAD

    def call(headers: list[tuple[bytes, bytes]], chunks: int) -> int:
        reads.clear()
        sent.clear()
        pending = [{"type": "http.request", "body": b"x" * 1000, "more_body": i < chunks - 1} for i in range(chunks)]

        async def receive():
            return pending.pop(0)

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "path": "/query", "headers": [(b"host", b"127.0.0.1"), *headers]}
        asyncio.run(Guard(app, Access(), limit)(scope, receive, send))
        return sent[0]["status"]

    assert call([(b"content-length", str(10 * 2**20).encode())], 1) == 413 and reads == []   # nothing read
    assert call([], 200) == 413 and sum(reads) <= limit                  # chunked: cut off at the limit
    assert call([], 3) == 200 and sum(reads) == 3000                     # under it: untouched
    client = served["client"]                                            # and through the real app
    response = client.post("/query", content=iter([b"\0" * 2**16] * 40),      # chunked: no Content-Length
                           headers={"content-type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413 and "larger than" in response.json()["detail"], response.text


def test_an_upload_named_like_a_path_is_read_under_a_safe_name(served: dict) -> None:
    """An upload named ".." made the temporary path the folder itself: the write raised, and the client got 500."""
    client = served["client"]
    data = served["dicoms"][0].read_bytes()
    for name in ("..", "../../etc/passwd.dcm", "/", "a\0b.dcm", "x" * 300 + ".dcm"):   # 300: over a file name's 255
        response = client.post("/query", files={"file": (name, data)}, data={"k": "3"})
        assert response.status_code == 200, (name, response.text)


def test_a_reindex_with_another_model_stops_the_answers(served: dict, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, `refresh` caught only IndexError_, so after a reindex with another model one request in 5 s got a
    422 and the others were answered from the old copy: two models' answers mixed. Now every answer stops with
    409 naming both models (and /health says 503 stale) until the collection matches the served model again. A
    change of the record alone (a new calibration) is reloaded too: before, the stamp was (alias, count)."""
    import shutil
    shutil.copytree(served["root"] / "index", tmp_path / "index")
    index = open_index(str(tmp_path / "index"))
    searcher = WarmSearcher(index, "rsna", served["loaded"], load_pseudonymizer(),
                            state_dir=Settings.from_env().state_dir)
    client = TestClient(serve_app.create_app(searcher, max_upload_bytes=2**20))
    monkeypatch.setattr(serve_app, "REFRESH_SECONDS", 0.0)
    dicom = served["dicoms"][0]
    assert _post(client, dicom, k=3).status_code == 200
    name = index.resolve("rsna")
    with open_index(str(tmp_path / "index"), writable=True) as writer:       # a new calibration, same points
        writer.update_meta(name, lambda meta: meta.update(calibration={**(meta.get("calibration") or {}), "k": 7}))
    assert _post(client, dicom, k=3).status_code == 200
    assert searcher.record.vote_calibration["k"] == 7
    fingerprint = served["loaded"].fingerprint
    with open_index(str(tmp_path / "index"), writable=True) as writer:       # as a reindex with another model
        writer.update_meta(name, lambda meta: meta.update(model_fingerprint="another-model"))
    for _ in range(2):
        response = _post(client, dicom, k=3)
        assert response.status_code == 409 and "another-model" in response.json()["detail"], response.text
    assert client.get(f"/thumbnail/{searcher.memory.ids[0]}").status_code == 409
    health = client.get("/health")
    assert health.status_code == 503 and health.json()["status"] == "stale"
    with open_index(str(tmp_path / "index"), writable=True) as writer:       # the model's collection is back
        writer.update_meta(name, lambda meta: meta.update(model_fingerprint=fingerprint))
    assert _post(client, dicom, k=3).status_code == 200 and client.get("/health").status_code == 200
    searcher.close()
    index.close()


def test_serve_beyond_loopback_needs_a_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cbir.errors import CbirError
    from cbir.serve.access import access_for, serve_token
    monkeypatch.delenv("CBIR_SERVE_TOKEN", raising=False)
    assert access_for("127.0.0.1", None).hosts == ("localhost", "127.0.0.1", "::1")
    with pytest.raises(CbirError, match="--host 0.0.0.0 serves the archive's images beyond this machine"):
        access_for("0.0.0.0", serve_token(None))
    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--index", str(tmp_path / "none")])
    assert result.exit_code == 2 and "CBIR_SERVE_TOKEN" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "token").write_text("short\n")
    with pytest.raises(CbirError, match="16 to 512") as caught:
        serve_token(tmp_path / "token")
    assert "short" not in str(caught.value)                              # never shows the token
    monkeypatch.setenv("CBIR_SERVE_TOKEN", "a-long-enough-token-0123")
    access = access_for("10.0.0.5", serve_token(None), ["xray.example"])
    assert access.token == "a-long-enough-token-0123" and access.hosts == ("10.0.0.5", "xray.example")
