"""User-facing errors. Each carries a one-line message that the CLI prints without a traceback."""

from __future__ import annotations

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


class DatasetError(CbirError):
    """A dataset folder or label file is missing, empty or malformed."""


class IndexError_(CbirError):
    """The index location, a collection, or its metadata is unusable."""


class ModelMismatchError(CbirError):
    """A collection was built with a different model than the one given."""
