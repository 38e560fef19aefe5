"""The server path without a server: bounded request sizes, and bounded retries with backoff against real local
sockets that refuse, drop, hang or answer 5xx/4xx (no mocks: qdrant-client talks HTTP to them)."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir.cli.main import app
from cbir.errors import IndexError_
from cbir.store.base import Point, stored_payloads
from cbir.store.client import ClientIndex, ServerSettings
from cbir.store.client_convert import MAX_REQUEST_BYTES, batch_size
from cbir.store.client_convert import point_struct as _point_struct

QDRANT_LIMIT = 32 * 2**20


class Recorder(BaseHTTPRequestHandler):
    """Answers every request with `status` and `body`, and records method, path and body size."""

    status = 200
    body: dict = {"result": {"operation_id": 1, "status": "completed"}, "status": "ok", "time": 0.0}
    seen: list[tuple[str, str, int]]

    def _answer(self) -> None:
        size = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(size)
        self.seen.append((self.command, self.path, size))
        data = json.dumps(self.body if self.status == 200 else {"status": {"error": "nope"}}).encode()
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = _answer

    def log_message(self, *args: object) -> None:  # quiet
        pass


@pytest.fixture
def http_server() -> Iterator[callable]:
    servers = []

    def start(status: int = 200) -> tuple[str, list]:
        seen: list = []
        handler = type("Handler", (Recorder,), {"status": status, "seen": seen})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", seen

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class RawServer:
    """A TCP port that accepts connections and then drops them at once (`drop`) or never answers (`hang`)."""

    def __init__(self, mode: str) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.mode, self.accepted, self.held = mode, 0, []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == "drop":
                conn.close()
            else:
                self.held.append(conn)

    def close(self) -> None:
        for conn in self.held:
            conn.close()
        self.sock.close()


def _closed_port() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return f"http://127.0.0.1:{port}"


def _largest_points(n: int, dim: int = 2048, bits: int = 256) -> list[Point]:
    """Points as large as cbir makes them: a big backbone's embedding, 256 bits, 14 probabilities, 20 boxes."""
    rng = np.random.default_rng(0)
    findings = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema", "Fibrosis",
                "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia", "Pneumothorax"]
    points = []
    for _ in range(n):
        emb = rng.normal(size=dim).astype(np.float32)
        points.append(Point(str(uuid.uuid4()), emb / np.linalg.norm(emb), rng.integers(0, 2, bits).astype(np.uint8),
                            {"dataset": "nih", "split": "train", "path": "images_012/" + "x" * 200 + ".png",
                             "labels": findings, "label": "Pneumonia", "target": 1, "view": "PA", "sex": "F",
                             "age_band": "60-64", "modality": "DX", "pseudonym": "p-" + "a" * 32,
                             "boxes": [[1023.4, 511.2, 300.1, 280.9]] * 20, "probability": 0.123456,
                             "probabilities": {f: 0.123456 for f in findings}, "team": "radiology"}))
    return points


@pytest.mark.parametrize(("dim", "bits"), [(512, 64), (2048, 256), (4096, 256)])
def test_upsert_requests_stay_well_under_qdrants_limit(http_server: callable, dim: int, bits: int) -> None:
    """The real request bodies qdrant-client sends, measured by a local HTTP server."""
    url, seen = http_server()
    points = _largest_points(600, dim, bits)
    step = batch_size(points)
    index = ClientIndex(url, writable=True, settings=ServerSettings(retries=0, timeout=10))
    for start in range(0, len(points), step):
        chunk = points[start:start + step]
        structs = [_point_struct(p, body) for p, body in zip(chunk, stored_payloads(chunk), strict=True)]
        index._client.upsert("x", points=structs, wait=True)
    sizes = [size for method, path, size in seen if method == "PUT" and "/points" in path]
    assert len(sizes) == -(-len(points) // step)
    assert max(sizes) < MAX_REQUEST_BYTES * 1.1 < QDRANT_LIMIT / 3
    if dim == 512:
        assert step == 256                                   # small points keep full batches
    print(f"dim {dim}, bits {bits}: {step} points per request, largest request {max(sizes) / 2**20:.2f} MiB")


def test_closed_port_fails_after_bounded_retries() -> None:
    url = _closed_port()
    started = time.monotonic()
    with pytest.raises(IndexError_, match=r"cannot connect to the Qdrant server .*gave up after 3 attempts") as err:
        ClientIndex(url, settings=ServerSettings(retries=2, timeout=2)).list_collections()
    assert url in str(err.value) and "\n" not in str(err.value) and time.monotonic() - started < 20


@pytest.mark.parametrize("mode", ["drop", "hang"])
def test_dropping_or_silent_server_fails_after_bounded_retries(mode: str) -> None:
    server = RawServer(mode)
    try:
        started = time.monotonic()
        expected = "connection to the Qdrant server failed" if mode == "drop" else "did not answer in time"
        with pytest.raises(IndexError_, match=f"{expected}.*gave up after 3 attempts"):
            ClientIndex(server.url, settings=ServerSettings(retries=2, timeout=1)).list_collections()
        assert time.monotonic() - started < 30                # bounded, not a hang
        assert server.accepted >= 3                           # it really tried three times
    finally:
        server.close()


def test_5xx_is_retried_and_4xx_is_not(http_server: callable) -> None:
    url, seen = http_server(503)
    with pytest.raises(IndexError_, match="HTTP 503.*gave up after 4 attempts"):
        ClientIndex(url, settings=ServerSettings(retries=3, timeout=2)).list_collections()
    assert len(seen) == 4
    url, seen = http_server(401)
    with pytest.raises(IndexError_, match=r"HTTP 401.*check the API key"):
        ClientIndex(url, settings=ServerSettings(retries=3, timeout=2)).list_collections()
    assert len(seen) == 1


def test_cli_against_a_closed_port_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CBIR_QDRANT_RETRIES", "1")
    result = CliRunner().invoke(app, ["--timeout", "2", "index", "info", "--index", _closed_port()])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "gave up after 2 attempts" in result.stderr


class AppliedButLost(BaseHTTPRequestHandler):
    """A tiny stateful Qdrant: the first write of each kind is applied but answered 503 (its answer "lost");
    repeating it then fails as Qdrant's would (409: the collection exists; 404: no such alias)."""

    collections: set[str]
    aliases: dict[str, str]
    writes: list[str]

    def _send(self, status: int, result: object) -> None:
        body = {"result": result, "status": "ok", "time": 0.0} if status == 200 else {"status": {"error": "no"}}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path.endswith("/exists"):
            self._send(200, {"exists": self.path.split("/")[2] in self.collections})
        elif self.path.startswith("/aliases"):
            self._send(200, {"aliases": [{"alias_name": a, "collection_name": c} for a, c in self.aliases.items()]})
        else:
            self._send(404, None)

    def do_PUT(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        name = self.path.split("?")[0].split("/")[2]
        self.writes.append(f"create {name}")
        if name in self.collections:
            return self._send(409, None)
        self.collections.add(name)
        self._send(503, None)

    def do_POST(self) -> None:  # noqa: N802
        actions = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))["actions"]
        self.writes.append("aliases")
        for action in actions:
            if "delete_alias" in action:
                if action["delete_alias"]["alias_name"] not in self.aliases:
                    return self._send(404, None)
                del self.aliases[action["delete_alias"]["alias_name"]]
        self._send(503 if self.writes.count("aliases") == 1 else 200, True)

    def log_message(self, *args: object) -> None:  # quiet
        pass


def test_writes_that_are_not_idempotent_are_not_repeated_blindly() -> None:
    """Creating a collection and moving aliases were retried as they were: a create whose answer was lost
    then failed with "already exists", an alias delete with "not found", though both had been applied."""
    from qdrant_client import QdrantClient
    from qdrant_client.http import models as qm

    from cbir.store.retry import RetryingClient

    handler = type("Handler", (AppliedButLost,), {"collections": set(), "aliases": {"rsna": "rsna__v1"},
                                                  "writes": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        client = RetryingClient(QdrantClient(url=url, timeout=2, check_compatibility=False), url, retries=3)
        assert client.create_collection("rsna__v2", vectors_config={}) is True
        assert client.update_collection_aliases(change_aliases_operations=[
            qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name="rsna"))]) is True
        assert handler.writes == ["create rsna__v2", "aliases"]        # each sent once: the state said "done"
        assert handler.collections == {"rsna__v2"} and handler.aliases == {}
        assert client.get_aliases().aliases == []                      # reads are still retried and work
    finally:
        server.shutdown()
        server.server_close()
