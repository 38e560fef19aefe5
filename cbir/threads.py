"""Single-threaded BLAS for the query path.

A single query multiplies at most a few thousand rows by one vector: split over OpenBLAS's threads, it waits
for every core, and on a machine where another process keeps one core busy a 0.7 ms search takes 8 ms (2 cores,
docs/performance.md). `single_threaded()` limits the BLAS libraries loaded in this process to one thread for the
duration of a `with` block and restores their previous counts afterwards; `cbir query`, `cbir serve` and
`cbir bench`'s single-query rows search inside it. Batched work (ingest, evaluation, bench's batched rows) keeps
every thread.

The context costs about 3 µs (it calls `openblas_set_num_threads` directly on the libraries that threadpoolctl
found once; `threadpoolctl.threadpool_limits` rescans the loaded libraries on every call, about 1 ms, and a
`ThreadpoolController.limit` about 22 µs). BLAS libraries loaded after the first call (e.g. FAISS's) are
picked up by `refresh()`. No environment variable is needed.

OpenBLAS built with pthreads (NumPy's wheels) has one thread pool for the whole process, and threadpoolctl lets
only one Python thread (the first that sets a limit) change it; calls from other threads do nothing. So a
process that only answers queries from several threads (`cbir serve`, whose requests run in a thread pool)
sets the limit once from its main thread with `limit_process(1)`; `cbir query` does the same.

PyTorch's intra-op threads are another pool: OpenMP keeps their count per calling thread, so `torch_threads(n)`
sets it for one request's forward pass only, and `CoreShare` gives concurrent requests each their share of the
cores (`cbir serve`), so that the process does not run more compute threads than cores (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

_lock = threading.Lock()
_blas: list[Any] | None = None     # threadpoolctl LibControllers of the BLAS libraries, found once
_state: dict[str, Any] = {"active": 0, "saved": []}   # blocks open in any thread; counts to restore


def blas_libraries() -> list[Any]:
    """threadpoolctl's controllers of the BLAS libraries loaded in this process (scanned once; see `refresh`)."""
    global _blas
    if _blas is None:
        with _lock:
            if _blas is None:
                from threadpoolctl import ThreadpoolController
                _blas = [lib for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
    return _blas


def refresh() -> None:
    """Scan the loaded libraries again (after importing one that brings its own BLAS)."""
    global _blas
    with _lock:
        _blas = None
    blas_libraries()


def blas_threads() -> list[int]:
    """The current thread count of each BLAS library (for tests and reports)."""
    return [lib.get_num_threads() for lib in blas_libraries()]


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """BLAS on one thread inside the block, the previous counts restored after it. Nested blocks (and other
    threads' blocks while one is open) keep the limit until the last one ends."""
    libs = blas_libraries()
    with _lock:
        if _state["active"] == 0:
            _state["saved"] = [lib.get_num_threads() for lib in libs]
            for lib in libs:
                lib.set_num_threads(1)
        _state["active"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["active"] -= 1
            if _state["active"] == 0:
                for lib, count in zip(libs, _state["saved"], strict=True):
                    lib.set_num_threads(count)


def limit_process(threads: int = 1) -> None:
    """Set every BLAS library of this process to `threads` for good (a process that only answers queries)."""
    for lib in blas_libraries():
        lib.set_num_threads(threads)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """PyTorch's intra-op threads for forward passes the calling thread runs inside the block; its previous count
    is restored after it. OpenMP keeps the count per thread, so other threads keep theirs. The outputs of the
    models checked (resnet18; the tests' model, tests/test_serve_concurrent.py) are bit-identical whatever it is."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class CoreShare:
    """Counts the requests in flight in a process and gives each its share of `cores` for its forward pass: all
    of them to a lone request, one each when as many requests as cores are in flight."""

    def __init__(self, cores: int) -> None:
        self.cores, self.active = max(1, cores), 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Count one request in flight for the duration of the block."""
        with self._lock:
            self.active += 1
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1

    def share(self) -> int:
        """Intra-op threads for a forward pass now: the cores divided among the requests in flight, at least 1."""
        return max(1, self.cores // max(1, self.active))
