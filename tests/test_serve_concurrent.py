"""`cbir serve` under concurrent requests (real threads through FastAPI's TestClient, a real model and index):
forward passes overlap, each with its share of the cores, and the answers equal the sequential ones; a bad
upload or a failing forward pass fails only its own request and leaves nothing held."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import cbir.serve.app as serve_app
from cbir.embed.embedder import embed_and_detect
from cbir.io import read_image
from cbir.threads import CoreShare, torch_threads
from tests.test_serve import _post, served  # noqa: F401  (the module-scoped index, model and searcher)

CORES = 2


def _client(served: dict) -> TestClient:  # noqa: F811
    return TestClient(serve_app.create_app(served["searcher"], max_upload_bytes=2**20, cores=CORES),
                      raise_server_exceptions=False)


def _answer(response: Any) -> dict:
    assert response.status_code == 200, response.text
    body = response.json()
    body.pop("timing_ms")
    return body


@contextmanager
def _on_forward(served: dict, hook: Callable[[], None]) -> Iterator[None]:  # noqa: F811
    """Run `hook` in the requesting thread before each forward pass of the served model."""
    handle = served["loaded"].model.register_forward_pre_hook(lambda module, args: hook())
    try:
        yield
    finally:
        handle.remove()


def _parallel(client: TestClient, paths: list[Path], **form: object) -> list[Any]:
    with ThreadPoolExecutor(len(paths)) as pool:
        return list(pool.map(lambda p: _post(client, p, **form), paths))


def test_concurrent_forwards_overlap_with_one_thread_each_and_answer_as_sequential_ones(
        served: dict) -> None:  # noqa: F811
    client = _client(served)
    dicoms = served["dicoms"][:4]
    threads: list[int] = []
    with _on_forward(served, lambda: threads.append(torch.get_num_threads())):
        sequential = [_answer(_post(client, d, k=5, prefilter=20)) for d in dicoms]
    assert threads == [CORES] * len(dicoms)         # a lone request takes every core

    meeting = threading.Barrier(2, timeout=30)      # times out (a 500) unless two forwards run at once
    lock = threading.Lock()

    def meet() -> None:
        with lock:
            threads.append(torch.get_num_threads())
            first_two = len(threads) <= 2
        if first_two:
            meeting.wait()

    threads.clear()
    with _on_forward(served, meet):
        concurrent = [_answer(r) for r in _parallel(client, dicoms, k=5, prefilter=20)]
    assert concurrent == sequential                 # ids, scores, vote and prediction, bit for bit
    assert threads[1] == 1       # the second forward started while the first was in flight: one core each


def test_a_bad_upload_among_concurrent_requests_fails_alone(served: dict, tmp_path: Path) -> None:  # noqa: F811
    client = _client(served)
    noise = tmp_path / "noise.dcm"
    noise.write_bytes(b"\x01" * 4096)
    good = served["dicoms"][4:7]
    expected = [_answer(_post(client, d, k=4)) for d in good]
    responses = _parallel(client, [good[0], noise, good[1], good[2]], k=4)
    assert responses[1].status_code == 400 and responses[1].json()["detail"].startswith(
        "noise.dcm: not a DICOM file")
    assert [_answer(r) for r in (responses[0], responses[2], responses[3])] == expected


def test_a_failing_forward_pass_fails_its_request_only_and_holds_nothing(served: dict) -> None:  # noqa: F811
    client = _client(served)
    dicoms = served["dicoms"][7:11]
    expected = [_answer(_post(client, d, k=3)) for d in dicoms]
    failed = threading.Event()
    lock = threading.Lock()
    threads: list[int] = []

    def fail_once() -> None:
        threads.append(torch.get_num_threads())
        with lock:
            if not failed.is_set():
                failed.set()
                raise RuntimeError("forward pass failed")

    with _on_forward(served, fail_once):
        responses = _parallel(client, dicoms, k=3)
        assert sorted(r.status_code for r in responses) == [200, 200, 200, 500]
        assert [_answer(r) for r in responses if r.status_code == 200] == \
            [e for e, r in zip(expected, responses, strict=True) if r.status_code == 200]
        threads.clear()
        assert _answer(_post(client, dicoms[0], k=3)) == expected[0]   # no lock left held, no request counted
    assert threads == [CORES]


def test_thread_count_leaves_embeddings_bit_identical_and_is_per_thread(served: dict) -> None:  # noqa: F811
    loaded = served["loaded"]
    image = read_image(served["dicoms"][0])
    embeddings = []
    for count in (1, 2, 3):
        with torch_threads(count):
            assert torch.get_num_threads() == count
            embeddings.append(embed_and_detect(loaded, image)[0].embedding)
    assert all(np.array_equal(embeddings[0], e) for e in embeddings[1:])
    before = torch.get_num_threads()
    seen: list[int] = []

    def other() -> None:
        with torch_threads(1):
            seen.append(torch.get_num_threads())

    worker = threading.Thread(target=other)
    worker.start()
    worker.join()
    assert seen == [1] and torch.get_num_threads() == before     # another thread's setting is its own


def test_core_share() -> None:
    share = CoreShare(2)
    assert share.share() == 2
    with share.request():
        assert share.share() == 2
        with share.request():
            assert share.share() == 1
            with share.request():
                assert share.share() == 1
    assert share.active == 0
    with pytest.raises(RuntimeError), share.request():
        raise RuntimeError("boom")
    assert share.active == 0 and CoreShare(0).share() == 1
