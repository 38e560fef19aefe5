"""Which archived file a point is: the local file map, which never leaves the machine that ingested.

File names often are a PatientID or an MRN (RSNA's are, and many hospital exports'), so a payload names its
image by a keyed pseudonym (`file`, "f-…", `Pseudonymizer.file`), not by its path. The pseudonym → (dataset,
relative path) map is kept in one SQLite file per user and machine, `$CBIR_STATE_DIR/files.sqlite` (default
`$XDG_STATE_HOME/cbir`, else `~/.local/state/cbir`), whatever index the points went to: an embedded index, a
server or local mode. It is never written to an index, so exporting, copying or sharing an index carries no
file names; the team that ingested still finds its own images (`LocalFiles`), and other teams see the
thumbnails stored with the points (`cbir ingest --thumbnails`).

`cbir ingest --keep-paths` (private archives whose file names identify nobody) stores the relative path in the
payload field `path` instead, as every collection made before pseudonymised paths does; the collection records
which (`paths` in its metadata: "pseudonym" or "plain"; absent means "plain").
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cbir.errors import CbirError
from cbir.store.record import CollectionRecord

STATE_ENV = "CBIR_STATE_DIR"
FILE_MAP = "files.sqlite"
_SCHEMA = "CREATE TABLE IF NOT EXISTS files (file TEXT PRIMARY KEY, dataset TEXT NOT NULL, path TEXT NOT NULL)"


def default_state_dir(env: Mapping[str, str]) -> Path:
    """This user's folder for what stays on this machine: $CBIR_STATE_DIR, else $XDG_STATE_HOME/cbir, else
    ~/.local/state/cbir (read once, by `cbir.app.settings.Settings.from_env`)."""
    if env.get(STATE_ENV):
        return Path(env[STATE_ENV]).expanduser()
    return Path(env.get("XDG_STATE_HOME") or "~/.local/state").expanduser() / "cbir"


class FileMap:
    """pseudonym → (dataset, relative path), in SQLite (safe for parallel ingests and for threads)."""

    def __init__(self, path: Path, writable: bool = False) -> None:
        self.path, self.writable = path, writable
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        if writable:
            try:
                path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, timeout=60, check_same_thread=False)
                os.chmod(path, 0o600)
                with self._db:
                    self._db.execute(_SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                raise CbirError(f"{path}: cannot write the local file map ({exc}); set ${STATE_ENV} to a "
                                "writable folder") from None

    @classmethod
    def local(cls, state_dir: Path, writable: bool = False) -> FileMap:
        """This machine's map in `state_dir` (`Settings.state_dir`); reading a map that does not exist finds
        nothing."""
        return cls(state_dir / FILE_MAP, writable)

    def add(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Record (pseudonym, dataset, relative path) rows; a known pseudonym keeps its row."""
        rows = list(rows)
        if not rows:
            return
        if not self.writable or self._db is None:
            raise CbirError(f"{self.path}: the local file map was opened read-only")
        with self._lock:
            try:
                with self._db:
                    self._db.executemany("INSERT OR IGNORE INTO files VALUES (?, ?, ?)", rows)
            except sqlite3.Error as exc:
                raise CbirError(f"{self.path}: cannot write the local file map ({exc})") from None

    def relpath(self, pseudonym: str | None) -> str | None:
        """The relative path of a pseudonym ingested on this machine, else None."""
        if not pseudonym or not self._open_to_read():
            return None
        assert self._db is not None  # `_open_to_read` connected
        with self._lock:
            try:
                row = self._db.execute("SELECT path FROM files WHERE file = ?", (pseudonym,)).fetchone()
            except sqlite3.Error:
                return None
        return row[0] if row else None

    def _open_to_read(self) -> bool:
        """Connect read-only once the file exists (an ingest may create it while a viewer runs)."""
        if self._db is None and not self.writable and self.path.is_file():
            try:
                self._db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=60,
                                           check_same_thread=False)
            except sqlite3.Error:
                return False   # unreadable: nothing resolves, as on a machine that ingested nothing
        return self._db is not None

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> FileMap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalFiles:
    """Where this machine has a collection's images: a payload's relative path (its `path`, or its `file`
    pseudonym looked up in the local map) under one of the collection's recorded roots."""

    def __init__(self, record: CollectionRecord, file_map: FileMap | None = None) -> None:
        self.record = record
        self.file_map = file_map

    def relpath(self, payload: dict[str, Any]) -> str | None:
        """The relative path: stored in the payload (plain paths), else from the local map, else None."""
        if payload.get("path"):
            return str(payload["path"])
        return self.file_map.relpath(payload.get("file")) if self.file_map is not None else None

    def find(self, payload: dict[str, Any]) -> Path | None:
        """The archived image file on this machine, if it is still there."""
        return self.record.archive_file(payload.get("dataset"), self.relpath(payload))
