"""Keep C libraries quiet: what a decoder (OpenJPEG, libjpeg, CharLS, GDCM) writes to file descriptor 2 is
captured, so that stderr keeps one line per bad file. The text is returned for the error message."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress

_LOCK = threading.Lock()   # fd 2 is per process: one capture at a time


class Captured:
    """What was written to fd 2 inside `captured_stderr()`, available once the block has ended."""

    def __init__(self) -> None:
        self.text = ""

    def first_line(self, limit: int = 160) -> str:
        lines = [line.strip() for line in self.text.splitlines() if line.strip()]
        return lines[0][:limit] if lines else ""


@contextmanager
def captured_stderr() -> Iterator[Captured]:
    """Redirect fd 2 to a temporary file for the block; with $CBIR_DEBUG the text is written back."""
    captured = Captured()
    with _LOCK, tempfile.TemporaryFile() as sink:
        with suppress(AttributeError, ValueError, OSError):
            sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read(65536).decode("utf-8", "replace")
    if captured.text and os.environ.get("CBIR_DEBUG"):
        sys.stderr.write(captured.text)
