"""Shard snapshots on Qdrant Edge, an optional capability of an index (see `cbir.store.snapshots`).

A mixin of `cbir.store.edge.EdgeIndex`: it uses the index's mutex, locks and shards, which `_EdgeParts` names
so that a type checker sees them.
"""

from __future__ import annotations

import tarfile
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import qdrant_edge as qe

from cbir.errors import IndexError_
from cbir.store.edge_files import NAME, CollectionLocks
from cbir.store.records import SCHEMA_VERSION


class _EdgeParts(Protocol):
    """What the mixin uses of `EdgeIndex`."""

    _mutex: threading.RLock
    _locks: CollectionLocks
    _collections: Path

    def resolve(self, name: str) -> str: ...
    def _shard(self, name: str, write: bool = False) -> qe.EdgeShard: ...
    def _errors(self, name: str | None, action: str) -> AbstractContextManager[None]: ...
    def _check_writable(self) -> None: ...
    def has_collection(self, name: str) -> bool: ...
    def list_aliases(self) -> dict[str, str]: ...
    def _where(self, name: str | None) -> str: ...
    def _new_folder(self, name: str, record: dict[str, Any], make: Callable[[Path], object], action: str
                    ) -> None: ...


class EdgeSnapshots:
    """`write_shard_snapshot` and `create_from_snapshot` for `EdgeIndex`."""

    def write_shard_snapshot(self: _EdgeParts, name: str, path: Path) -> str:
        """Write collection `name` as a Qdrant shard snapshot (a tar of the shard, what
        `EdgeShard.unpack_snapshot` reads), under a shared lock so that no process writes it meanwhile."""
        with self._mutex:
            name = self.resolve(name)
            shard = self._shard(name)
            if self._locks.exclusive(name):
                with self._errors(name, "flush"):
                    shard.flush()
            with tarfile.open(path, "w") as tar:
                tar.add(self._collections / name / "shard", arcname=".")
        return "edge shard"

    def create_from_snapshot(self: _EdgeParts, name: str, snapshot: Path, dim: int, bits: int, meta: dict[str, Any],
                             schema_version: int = SCHEMA_VERSION) -> None:
        """Create collection `name` from a Qdrant shard snapshot (a server's or `write_shard_snapshot`'s)."""
        self._check_writable()
        if not NAME.fullmatch(name) or self.has_collection(name) or name in self.list_aliases():
            raise IndexError_(f"{self._where(name)}: invalid name, or the collection already exists")
        record = {"schema_version": int(schema_version), "dim": int(dim), "bits": int(bits), "meta": meta}
        self._new_folder(name, record,
                         lambda folder: qe.EdgeShard.unpack_snapshot(str(snapshot), str(folder / "shard")),
                         "unpacking the snapshot")
