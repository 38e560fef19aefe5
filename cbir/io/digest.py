"""The sha256 of a file, read once per version of it: encoder files and pretrained backbones are checked against
the digest their records hold."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_of(file: str | Path) -> str:
    """The file's sha256 (hex), remembered per (path, size, mtime) so a reload does not read a large file again."""
    stat = os.stat(file)
    key = (str(Path(file).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256()
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
        _DIGESTS[key] = digest.hexdigest()
    return _DIGESTS[key]
