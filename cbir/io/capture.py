"""Keep C libraries quiet: what a decoder (OpenJPEG, libjpeg, CharLS, GDCM) writes to file descriptors 1 and 2
is captured, so that stderr keeps one line per bad file and `--json` output stays JSON. The text is returned for
the error message."""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

_LOCK = threading.Lock()   # file descriptors are per process: one capture at a time
FDS = (1, 2)


class Captured:
    """What was written to fd 1 and 2 inside `captured_output()`, available once the block has ended."""

    def __init__(self) -> None:
        self.text = ""

    def first_line(self, limit: int = 160) -> str:
        lines = [line.strip() for line in self.text.splitlines() if line.strip()]
        return lines[0][:limit] if lines else ""


def _flush_c_streams() -> None:
    with suppress(OSError, AttributeError, TypeError):
        ctypes.CDLL(None).fflush(None)


@contextmanager
def captured_output() -> Iterator[Captured]:
    """Redirect fds 1 and 2 to a temporary file for the block; with $CBIR_DEBUG the text goes to stderr."""
    captured = Captured()
    with _LOCK, tempfile.TemporaryFile() as sink:
        for stream in (sys.stdout, sys.stderr):
            with suppress(AttributeError, ValueError, OSError):
                stream.flush()
        saved = [os.dup(fd) for fd in FDS]
        for fd in FDS:
            os.dup2(sink.fileno(), fd)
        try:
            yield captured
        finally:
            _flush_c_streams()                              # C stdio buffers hold what a library printed
            for fd, copy in zip(FDS, saved, strict=True):
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            captured.text = sink.read(65536).decode("utf-8", "replace")
    if captured.text and os.environ.get("CBIR_DEBUG"):
        sys.stderr.write(captured.text)
