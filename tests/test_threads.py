"""`cbir.threads`: the single-thread context really limits BLAS and restores the previous counts."""

from __future__ import annotations

import threading

import numpy as np

from cbir.threads import blas_libraries, blas_threads, limit_process, single_threaded


def test_single_threaded_limits_blas_and_restores_it() -> None:
    np.ones((4, 4)) @ np.ones(4)   # NumPy's BLAS is loaded
    assert blas_libraries(), "threadpoolctl finds NumPy's BLAS"
    before = blas_threads()
    limit_process(2)
    try:
        assert blas_threads() == [2] * len(before)
        with single_threaded():
            assert blas_threads() == [1] * len(before)
            with single_threaded():            # nested: still one thread
                assert blas_threads() == [1] * len(before)
            assert blas_threads() == [1] * len(before)
        assert blas_threads() == [2] * len(before)
        try:
            with single_threaded():
                raise RuntimeError("a failed query")
        except RuntimeError:
            pass
        assert blas_threads() == [2] * len(before)   # restored after an exception too
    finally:
        for lib, count in zip(blas_libraries(), before, strict=True):
            lib.set_num_threads(count)


def test_a_process_limit_set_by_the_main_thread_holds_in_worker_threads() -> None:
    """What `cbir serve` relies on: it limits BLAS once, and its request threads search on one thread."""
    before = blas_threads()
    seen: list[list[int]] = []
    try:
        limit_process(1)
        worker = threading.Thread(target=lambda: seen.append(blas_threads()))
        worker.start()
        worker.join(5)
        assert seen == [[1] * len(before)]
        with single_threaded():   # a block inside a limited process leaves the limit in place
            pass
        assert blas_threads() == [1] * len(before)
    finally:
        for lib, count in zip(blas_libraries(), before, strict=True):
            lib.set_num_threads(count)
