"""User-facing errors. Each carries a one-line message that the CLI prints without a traceback."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def printable(text: str) -> str:
    """`text` safe to print and to store as UTF-8: undecodable file-name bytes become \\xNN escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class CbirError(Exception):
    """Base class of every error a user can cause and fix (exit code 2 in the CLI)."""


class BadInputError(CbirError):
    """A single input file is unusable. Batch commands count it and go on."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(printable(f"{self.path}: {reason}"))


def failure_reasons(lines: Iterable[str], paths: Iterable[str | Path]) -> dict[str, int]:
    """How many failures of each reason, for files that are written (reports, run records): a batch command's
    failure lines are "PATH: reason" for the console, and the PATH (one of `paths`) never goes into a file. A line
    that names no known path counts as "unreadable", its text left out."""
    known = {printable(str(p)) for p in paths}
    counts: dict[str, int] = {}
    for line in lines:
        parts = str(line).split(": ")
        reason = next((": ".join(parts[i:]) for i in range(1, len(parts)) if ": ".join(parts[:i]) in known),
                      "unreadable")
        counts[reason] = counts.get(reason, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1]))


class DatasetError(CbirError):
    """A dataset folder or label file is missing, empty or malformed."""


class IndexError_(CbirError):
    """The index location, a collection, or its metadata is unusable."""


class ModelMismatchError(CbirError):
    """A collection was built with a different model than the one given."""
