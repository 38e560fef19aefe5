"""Shard snapshots on Qdrant Edge, an optional capability of an index (see `cbir.index.snapshots`).

A mixin of `cbir.index.edge.EdgeIndex`: it uses the index's mutex, locks and shards.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import qdrant_edge as qe

from cbir.errors import IndexError_
from cbir.index.edge_files import NAME
from cbir.index.records import SCHEMA_VERSION


class EdgeSnapshots:
    """`write_shard_snapshot` and `create_from_snapshot` for `EdgeIndex`."""

    def write_shard_snapshot(self, name: str, path: Path) -> str:
        """Write collection `name` as a Qdrant shard snapshot (a tar of the shard, what
        `EdgeShard.unpack_snapshot` reads), under a shared lock so that no process writes it meanwhile."""
        with self._mutex:  # type: ignore[attr-defined]
            name = self.resolve(name)  # type: ignore[attr-defined]
            shard = self._shard(name)  # type: ignore[attr-defined]
            if self._locks.exclusive(name):  # type: ignore[attr-defined]
                with self._errors(name, "flush"):  # type: ignore[attr-defined]
                    shard.flush()
            with tarfile.open(path, "w") as tar:
                tar.add(self._collections / name / "shard", arcname=".")  # type: ignore[attr-defined]
        return "edge shard"

    def create_from_snapshot(self, name: str, snapshot: Path, dim: int, bits: int, meta: dict[str, Any],
                             schema_version: int = SCHEMA_VERSION) -> None:
        """Create collection `name` from a Qdrant shard snapshot (a server's or `write_shard_snapshot`'s)."""
        self._check_writable()  # type: ignore[attr-defined]
        if not NAME.fullmatch(name) or self.has_collection(name) or name in self.list_aliases():  # type: ignore
            raise IndexError_(f"{self._where(name)}: invalid name, or the collection already exists")  # type: ignore
        record = {"schema_version": int(schema_version), "dim": int(dim), "bits": int(bits), "meta": meta}
        self._new_folder(name, record,  # type: ignore[attr-defined]
                         lambda folder: qe.EdgeShard.unpack_snapshot(str(snapshot), str(folder / "shard")),
                         "unpacking the snapshot")
