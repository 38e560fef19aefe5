"""Versioned collections behind a stable alias: `NAME` → `NAME__v1`, then `NAME__v2` after a reindex.

Users and queries only ever name the alias. A reindex (a new model, or a new schema) fills the next version
while queries keep using the current one, then moves the alias in one atomic step (a Qdrant alias update on a
server, a rewrite of `aliases.json` on Qdrant Edge) and deletes the old version only when the point counts
match, and only once no other process reads it any more.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from cbir.console import QUIET, Reporter
from cbir.errors import CbirError, IndexError_
from cbir.store.base import Index

_VERSION = re.compile(r"^(?P<alias>.+)__v(?P<number>\d+)$")

#: Seconds a swap waits for other processes to stop reading the old version before leaving it for later.
DELETE_WAIT = 30.0


def version_name(alias: str, number: int) -> str:
    return f"{alias}__v{number}"


def split_version(collection: str) -> tuple[str, int] | None:
    """(alias, number) for a versioned collection name, else None."""
    match = _VERSION.match(collection)
    return (match.group("alias"), int(match.group("number"))) if match else None


def version_number(collection: str) -> int:
    """The number of a versioned collection name (one that `versions` lists)."""
    parsed = split_version(collection)
    assert parsed is not None, f"{collection!r} is not a versioned name"
    return parsed[1]


def check_alias_name(alias: str) -> None:
    if split_version(alias) is not None:
        raise CbirError(f"collection name {alias!r} ends like a version (__vN), which cbir reserves; pick another")


def versions(index: Index, alias: str) -> list[str]:
    """Every version of `alias` in the index, oldest first."""
    found = [(split_version(name), name) for name in index.list_collections()]
    return [name for parsed, name in sorted((p, n) for p, n in found if p and p[0] == alias)]


def next_version(index: Index, alias: str) -> str:
    """The name of a new version, numbered after every existing one (and after a legacy plain collection)."""
    numbers = [version_number(name) for name in versions(index, alias)]
    return version_name(alias, max(numbers, default=0) + 1)


def create_versioned(index: Index, alias: str, dim: int, bits: int, meta: dict[str, Any], shards: int = 1,
                     replicas: int = 1) -> str:
    """Create the first version of a new collection and point `alias` at it; returns the version's name."""
    check_alias_name(alias)
    if index.has_collection(alias):
        raise IndexError_(f"{index.location}: collection {alias!r} already exists")
    name = next_version(index, alias)
    index.create_collection(name, dim, bits, meta, shards, replicas)
    index.set_alias(alias, name)
    return name


@dataclass
class Swap:
    """What a reindex swap did."""

    alias: str
    old: str | None
    new: str
    old_points: int
    new_points: int
    deleted_old: bool
    note: str = ""

    @property
    def line(self) -> str:
        moved = f"alias {self.alias!r} now points at {self.new!r} ({self.new_points} points)"
        if self.old is None:
            return moved
        gone = "deleted" if self.deleted_old else "kept"
        return f"{moved}; the previous version {self.old!r} ({self.old_points} points) was {gone}" + (
            f": {self.note}" if self.note else "")


def swap(index: Index, alias: str, new: str, allow_count_change: bool = False, wait: float = DELETE_WAIT,
         reporter: Reporter = QUIET) -> Swap:
    """Point `alias` at the filled version `new`; delete the old version when the point counts match.

    With different counts nothing moves unless `allow_count_change`, and then the old version is kept.
    """
    aliases = index.list_aliases()
    old = aliases.get(alias)
    if old is None and index.has_collection(alias):
        raise IndexError_(f"{index.location}: {alias!r} is a collection without versions; run `cbir migrate`")
    new_points = index.count(new)
    old_points = index.count(old) if old else 0
    if old and old_points != new_points and not allow_count_change:
        raise CbirError(f"reindex of {alias!r}: the new version {new!r} holds {new_points} points but {old!r} "
                        f"holds {old_points}; the alias was not moved (pass --allow-count-change to move it "
                        f"and keep {old!r}, or delete {new!r} with `cbir index drop`)")
    index.release(new)  # let other processes open the new version before the alias sends them there
    index.set_alias(alias, new)
    result = Swap(alias, old, new, old_points, new_points, deleted_old=False)
    if old is None:
        return result
    if old_points != new_points:
        result.note = "the point counts differ"
        return result
    try:
        index.delete_collection(old, wait=wait)
        result.deleted_old = True
    except IndexError_ as exc:
        result.note = f"{exc}; `cbir index prune` deletes it later"
        reporter.warn(result.note)
    return result


def prune(index: Index, alias: str | None = None, wait: float = 0.0) -> tuple[list[str], list[str]]:
    """Delete the versions that no alias points at any more (of `alias`, or of every alias).

    Returns (deleted, still in use by another process). Versions newer than the current one (a reindex
    still running, or one refused for a count mismatch) are left alone.
    """
    aliases = index.list_aliases()
    deleted, busy = [], []
    for name in index.list_collections():
        parsed = split_version(name)
        if parsed is None or (alias is not None and parsed[0] != alias) or name in aliases.values():
            continue
        current = split_version(aliases.get(parsed[0], "")) if parsed[0] in aliases else None
        if current is None or parsed[1] > current[1]:
            continue
        try:
            index.delete_collection(name, wait=wait)
            deleted.append(name)
        except IndexError_:
            busy.append(name)
    return deleted, busy


def drop(index: Index, name: str) -> list[str]:
    """Delete a collection with every version (given its alias), or one version or plain collection."""
    aliases = index.list_aliases()
    if name in aliases:
        names = versions(index, name) or [aliases[name]]
        index.delete_alias(name)
    elif index.has_collection(name):
        names = [name]
    else:
        raise IndexError_(f"{index.location}: no collection {name!r}")
    for collection in names:
        index.delete_collection(collection)
    return names


def copy_collection(index: Index, source: str, target: str, reporter: Reporter = QUIET) -> int:
    """Create `target` with `source`'s sizes and metadata in the current schema and copy every point into
    it (ids, vectors and payloads unchanged); returns the number of points copied."""
    from cbir.store.base import SCHEMA_VERSION

    meta = dict(index.get_meta(source))
    if "schema_version" in meta:
        meta["schema_version"] = SCHEMA_VERSION
    sample = next(iter(index.scroll(source, batch=1)), None)
    dim, bits = (int(meta["dim"]), int(meta["bits"])) if sample is None else (sample.embedding.size,
                                                                               sample.code.size)
    index.create_collection(target, dim, bits, meta)
    copied = copy_points(index, source, index, target, reporter)
    reporter.log(f"  copied {copied} points from {source!r} to {target!r}")
    return copied


def copy_points(source: Index, name: str, target: Index, target_name: str, reporter: Reporter = QUIET,
                batch: int = 1024) -> int:
    """Upsert every point of `source`'s collection `name` into `target`'s `target_name`; returns the count."""
    copied, chunk = 0, []
    with reporter.task(f"copy {name}", source.count(name)) as bar:
        for point in source.scroll(name, with_vectors=True, batch=batch, with_thumbnails=True):
            chunk.append(point)
            if len(chunk) >= batch:
                target.upsert(target_name, chunk)
                bar.advance(len(chunk))
                copied, chunk = copied + len(chunk), []
        if chunk:
            target.upsert(target_name, chunk)
            bar.advance(len(chunk))
            copied += len(chunk)
    return copied
