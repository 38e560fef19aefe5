"""The files around Qdrant Edge shards: per-collection locks, the alias manifest and atomic JSON writes.

Layout::

    <location>/aliases.json                   {"aliases": {alias: collection}, "retired": [...]}, the manifest
    <location>/ledger.json                    applied migrations (see `cbir.store.migrate`)
    <location>/.manifest.lock                 flock held while aliases.json or ledger.json is rewritten
    <location>/collections/<name>/.lock       flock: exclusive while a process writes the collection, shared
                                              while a process reads it
    <location>/collections/<name>/shard/      the EdgeShard (WAL off, see cbir.store.edge)
    <location>/collections/<name>/meta.json   {"schema_version", "dim", "bits", "meta"}, written last and
                                              atomically, so a collection exists once it is complete

Qdrant Edge 0.9.0 rewrites some files when it loads a shard, even when the load then fails, and a process
that has the shard open for writing then fails on its next flush. So readers take a shared lock on the
collection: it is read by any number of processes or written by one.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cbir.errors import IndexError_

SHARE_HINT = "use a Qdrant server to share an index"
#: A valid collection or alias name.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


#: Every lock this process holds: a forked child (a DataLoader worker) gets copies of their file descriptors, and
#: a flock lives until the last copy is closed, so a child that outlived a killed parent kept the collection
#: locked. `_forget_in_child` closes the copies in every forked child, so only the process that took a lock
#: holds it, and the lock goes when that process does.
_LOCK_FDS: set[int] = set()
_ALL_LOCKS: weakref.WeakSet[CollectionLocks] = weakref.WeakSet()


def _forget_in_child() -> None:
    for fd in list(_LOCK_FDS):
        with suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()
    for locks in list(_ALL_LOCKS):
        locks.held.clear()   # the child holds nothing: it takes its own locks if it ever opens the index


os.register_at_fork(after_in_child=_forget_in_child)


class CollectionLocks:
    """flocks on `<folder>/<name>/.lock`: shared to read, exclusive to write, never waited for; held by this
    process only, never by a forked child (`_forget_in_child`)."""

    def __init__(self, folder: Path, where: Callable[[str], str]) -> None:
        self.folder = folder
        self.where = where
        self.held: dict[str, tuple[int | None, bool]] = {}   # collection → (lock fd, exclusive)
        _ALL_LOCKS.add(self)

    def exclusive(self, name: str) -> bool:
        return self.held.get(name, (None, False))[1]

    def acquire(self, name: str, exclusive: bool, before_upgrade: Callable[[], None], wait: float = 0.0) -> None:
        """Take the lock, retrying for up to `wait` seconds; `before_upgrade` runs before a shared lock is traded
        for an exclusive one (the shard must be closed and reloaded then)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return self._acquire(name, exclusive, before_upgrade)
            except IndexError_:
                if time.monotonic() >= deadline:
                    raise
            time.sleep(0.05)

    def _acquire(self, name: str, exclusive: bool, before_upgrade: Callable[[], None]) -> None:
        held = self.held.get(name)
        if held is not None and (held[1] or not exclusive):
            return
        if held is not None:
            before_upgrade()
            fd = held[0]
        else:
            try:
                fd = os.open(self.folder / name / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                if exclusive:
                    raise IndexError_(f"{self.where(name)}: cannot open the lock file: {exc.strerror}") from exc
                self.held[name] = (None, False)  # read-only media: nobody can be writing there either
                return
        if fd is None:
            raise IndexError_(f"{self.where(name)}: the index is on read-only storage")
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            if held is not None and _relock_shared(fd):
                raise IndexError_(self._in_use(name, exclusive)) from None
            _close(fd)
            self.held.pop(name, None)
            raise IndexError_(self._in_use(name, exclusive)) from None
        _LOCK_FDS.add(fd)
        self.held[name] = (fd, exclusive)

    def release(self, name: str) -> None:
        fd, _ = self.held.pop(name, (None, False))
        if fd is not None:
            _close(fd)  # releases the flock

    def _in_use(self, name: str, exclusive: bool) -> str:
        if exclusive:
            return (f"{self.where(name)}: the collection is in use by another process (Qdrant Edge allows one "
                    f"writer and no readers meanwhile); {SHARE_HINT}")
        return (f"{self.where(name)}: the collection is being written by another process; try again when it "
                f"has finished, or {SHARE_HINT}")


FLUSH_POINTS = 4096   # the first flush interval, in points
FLUSH_SECONDS = 5.0


@dataclass(frozen=True)
class FlushPolicy:
    """A writer's flush interval (`FlushSchedule`): `points` first, and `seconds` at most."""

    points: int = FLUSH_POINTS
    seconds: float = FLUSH_SECONDS

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FlushPolicy:
        """$CBIR_EDGE_FLUSH_POINTS and $CBIR_EDGE_FLUSH_SECONDS (`cbir.app.settings`); malformed is one line."""
        try:
            return cls(int(env.get("CBIR_EDGE_FLUSH_POINTS") or FLUSH_POINTS),
                       float(env.get("CBIR_EDGE_FLUSH_SECONDS") or FLUSH_SECONDS))
        except ValueError:
            raise IndexError_("$CBIR_EDGE_FLUSH_POINTS and $CBIR_EDGE_FLUSH_SECONDS must be numbers") from None


class FlushSchedule:
    """When a writer flushes a collection (the WAL is off, so only flushed points survive a kill): after
    `seconds`, or once the unflushed points reach `points` or as many as the collection held at its last flush.

    A flush waits for fsync, 0.1–0.5 s on a busy disk whatever its size, so flushing every 4,096 points took
    about half of a 100k-point load; doubling the interval makes a bulk load of n points flush about
    log2(n / points) times, and a killed writer still loses at most the points of the last interval.
    """

    def __init__(self, points: int, seconds: float, grow: bool = True) -> None:
        self.points = points
        self.seconds = seconds
        self.grow = grow   # False: every `points` points, as before (`cbir.bench.ingest` compares the two)
        self._state: dict[str, tuple[int, float, int]] = {}   # collection → (unflushed, last flush, held then)

    def start(self, name: str, held: Callable[[], int]) -> None:
        """Before a write to `name`: a new schedule (after an open or a flush) asks `held()` for its size."""
        if name not in self._state:
            self._state[name] = (0, time.monotonic(), held())

    def due(self, name: str, added: int) -> bool:
        """Count `added` points just written to `name` (after `start`); whether to flush now."""
        pending, since, flushed = self._state[name]
        pending += added
        self._state[name] = (pending, since, flushed)
        return pending >= max(self.points, flushed if self.grow else 0) or time.monotonic() - since >= self.seconds

    def flushed(self, name: str) -> None:
        pending, _, flushed = self._state.get(name, (0, 0.0, 0))
        self._state[name] = (0, time.monotonic(), flushed + pending)

    def forget(self, name: str) -> None:
        """The shard was closed (and flushed): the next writer starts a new schedule."""
        self._state.pop(name, None)


class Manifest:
    """`aliases.json`, re-read only when the file changed."""

    def __init__(self, root: Path) -> None:
        self.path = root / "aliases.json"
        self.lock = root / ".manifest.lock"
        self.aliases: dict[str, str] = {}
        self._stamp: tuple[int, int, int] | None = None

    def read(self) -> tuple[dict[str, str], dict[str, str]]:
        """(aliases now, aliases before this read)."""
        try:
            st = self.path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        before = self.aliases
        if stamp != self._stamp:
            self.aliases = dict(read_json(self.path, {"aliases": {}}).get("aliases") or {}) if stamp else {}
            self._stamp = stamp
        return self.aliases, before

    def set_alias(self, where: str, alias: str, collection: str, is_collection: Callable[[str], bool]) -> None:
        if not NAME.fullmatch(alias):
            raise IndexError_(f"{where}: invalid alias {alias!r}")
        with self.edit() as manifest:
            if is_collection(alias):
                raise IndexError_(f"{where}: {alias!r} is a collection, it cannot also be an alias")
            if collection in manifest["aliases"] or not is_collection(collection):
                raise IndexError_(f"{where}: no collection {collection!r} to point {alias!r} at")
            manifest["aliases"][alias] = collection

    def delete_alias(self, where: str, alias: str) -> None:
        with self.edit() as manifest:
            if manifest["aliases"].pop(alias, None) is None:
                raise IndexError_(f"{where}: no alias {alias!r}")

    @contextmanager
    def edit(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write under the manifest lock (atomic for readers)."""
        with flocked(self.lock):
            manifest = read_json(self.path, {"aliases": {}})
            manifest.setdefault("aliases", {})
            yield manifest
            write_atomic(self.path, json.dumps(manifest, indent=2, sort_keys=True))
            self._stamp = None  # re-read on the next lookup


def read_json(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default
    except (OSError, ValueError) as exc:
        raise IndexError_(f"{path}: unreadable ({exc})") from None


@contextmanager
def flocked(path: Path, timeout: float = 30.0) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if needed), waiting up to `timeout` seconds for it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    _LOCK_FDS.add(fd)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise IndexError_(f"{path}: held by another process for {timeout:.0f} s") from None
                time.sleep(0.02)
        yield
    finally:
        _close(fd)


def _close(fd: int) -> None:
    _LOCK_FDS.discard(fd)
    os.close(fd)


def _relock_shared(fd: int) -> bool:
    """After a failed shared → exclusive upgrade (which may drop the lock), take the shared lock back."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and `os.replace`, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_record(path: Path, readable: Sequence[int]) -> dict[str, Any]:
    """A collection's `meta.json`, checked for a schema version this cbir reads."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IndexError_(f"{path}: unreadable collection metadata ({exc})") from exc
    if record.get("schema_version") not in readable:
        raise IndexError_(f"{path}: schema version {record.get('schema_version')!r}, this cbir reads "
                          f"versions {', '.join(map(str, readable))}; upgrade cbir")
    return record


def read_ledger(path: Path) -> list[dict[str, Any]]:
    try:
        return list(read_json(path, {"applied": []})["applied"])
    except (KeyError, TypeError) as exc:
        raise IndexError_(f"{path}: unreadable migration ledger ({exc})") from None
