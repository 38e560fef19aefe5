"""`cbir index export` / `cbir index import`: move one collection between indexes as a Qdrant shard snapshot.

The file is a tar with two members:

    cbir.json        {"format", "collection", "schema_version", "dim", "bits", "points", "meta", "source", ...}
    shard.snapshot   a Qdrant shard snapshot: what `GET /collections/{name}/shards/0/snapshot` streams from a
                     server, and what `qdrant_edge.EdgeShard.unpack_snapshot` reads

Export: a Qdrant Edge collection is written as its shard; a one-shard collection on a server is downloaded
with the snapshot endpoint; anything else (a server collection with several shards, or qdrant-client's local
mode, which has no snapshots) is first copied point by point into a temporary Edge shard. Import: into Qdrant
Edge the snapshot is unpacked as is (vectors, payloads and payload indexes); into a server or local mode it is
unpacked into a temporary Edge shard and its points are upserted. The import lands as the next version of
the collection's alias, so importing over an existing collection (`replace=True`) is an atomic swap.
"""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cbir.console import QUIET, Reporter
from cbir.errors import CbirError, IndexError_
from cbir.store.base import SCHEMA_VERSION, Index
from cbir.store.record import shareable
from cbir.store.versions import Swap, check_alias_name, copy_points, next_version, swap

FORMAT = "cbir-snapshot/1"
MANIFEST = "cbir.json"
SHARD = "shard.snapshot"


@runtime_checkable
class WritesShardSnapshots(Protocol):
    """An index that can write a collection as a Qdrant shard snapshot (Qdrant Edge; a one-shard collection on
    a server)."""

    def write_shard_snapshot(self, name: str, path: Path) -> str | None:
        """Write the snapshot and say how, or return None where this collection has none."""


@runtime_checkable
class LoadsShardSnapshots(Protocol):
    """An index that can create a collection from a shard snapshot as it is (Qdrant Edge)."""

    def create_from_snapshot(self, name: str, snapshot: Path, dim: int, bits: int, meta: dict[str, Any],
                             schema_version: int = SCHEMA_VERSION) -> None: ...


@dataclass
class Exported:
    path: Path
    collection: str
    points: int
    method: str      # "edge shard", "server snapshot" or "copied into an Edge shard"


def export_collection(index: Index, name: str, path: Path, reporter: Reporter = QUIET) -> Exported:
    """Write collection `name` (an alias or a collection) of `index` to the snapshot file `path`."""
    if not index.has_collection(name):
        raise IndexError_(f"{index.location}: no collection {name!r}")
    if index.schema_version(name) != SCHEMA_VERSION:
        raise CbirError(f"collection {name!r} has schema version {index.schema_version(name)}; run `cbir migrate` "
                        "before exporting it")
    meta, points = shareable(index.get_meta(name)), index.count(name)   # no folder of this machine travels
    dim, bits = _sizes(index, name, meta)
    with tempfile.TemporaryDirectory(prefix="cbir-export-") as tmp:
        shard = Path(tmp) / SHARD
        method = index.write_shard_snapshot(name, shard) if isinstance(index, WritesShardSnapshots) else None
        if method is None:
            _copy_to_edge_snapshot(index, name, dim, bits, meta, shard, Path(tmp), reporter)
            method = "copied into an Edge shard"
        manifest = {"format": FORMAT, "collection": name, "schema_version": SCHEMA_VERSION, "dim": dim,
                    "bits": bits, "points": points, "meta": meta, "source": _kind_of(index),
                    "stored_as": index.resolve(name), "method": method,
                    "exported": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (Path(tmp) / MANIFEST).write_text(json.dumps(manifest, indent=2))
        partial = path.with_name(f".{path.name}.partial")
        try:
            with tarfile.open(partial, "w") as tar:
                tar.add(Path(tmp) / MANIFEST, arcname=MANIFEST)
                tar.add(shard, arcname=SHARD)
            partial.replace(path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise CbirError(f"{path}: cannot write the snapshot: {exc.strerror or exc}") from None
    return Exported(path, name, points, method)


@dataclass
class Imported:
    collection: str
    stored_as: str
    points: int
    swap: Swap


def read_manifest(path: Path) -> dict[str, Any]:
    """The snapshot's cbir.json; a one-line error for a file that is not a cbir snapshot."""
    try:
        with tarfile.open(path) as tar:
            member = tar.getmember(MANIFEST)
            extracted = tar.extractfile(member)
            if extracted is None:
                raise ValueError(f"{MANIFEST} is not a file")
            manifest = json.loads(extracted.read())
            tar.getmember(SHARD)
    except FileNotFoundError:
        raise CbirError(f"{path}: no such file") from None
    except (tarfile.TarError, KeyError, ValueError, OSError, AttributeError) as exc:
        detail = "not a tar file" if isinstance(exc, tarfile.ReadError) else f"{type(exc).__name__}: {exc}"
        raise CbirError(f"{path}: not a cbir snapshot ({detail.splitlines()[0]})") from None
    if manifest.get("format") != FORMAT:
        raise CbirError(f"{path}: snapshot format {manifest.get('format')!r}, this cbir reads {FORMAT}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise CbirError(f"{path}: schema version {manifest.get('schema_version')!r}, this cbir reads "
                        f"{SCHEMA_VERSION}")
    return manifest


def import_collection(index: Index, path: Path, name: str | None = None, replace: bool = False,
                      shards: int = 1, replicas: int = 1, reporter: Reporter = QUIET) -> Imported:
    """Load the snapshot file `path` into `index` as collection `name` (default: the exported name)."""
    manifest = read_manifest(path)
    alias = name or manifest["collection"]
    check_alias_name(alias)
    exists = index.has_collection(alias)
    if exists and not replace:
        raise CbirError(f"{index.location}: collection {alias!r} exists; pass --replace to swap the snapshot in "
                        "as its next version, or --collection to import under another name")
    if exists and alias not in index.list_aliases():
        raise CbirError(f"{index.location}: collection {alias!r} has no versions yet; run `cbir migrate` first")
    target = next_version(index, alias)
    meta = manifest["meta"]
    with tempfile.TemporaryDirectory(prefix="cbir-import-") as tmp:
        with tarfile.open(path) as tar:
            tar.extract(SHARD, tmp, filter="data")
        shard = Path(tmp) / SHARD
        if isinstance(index, LoadsShardSnapshots):
            if (shards, replicas) != (1, 1):
                raise IndexError_(f"{index.location}: the embedded index is one shard; --shards and --replicas "
                                  "need a Qdrant server")
            index.create_from_snapshot(target, shard, manifest["dim"], manifest["bits"], meta)
        else:
            _copy_from_edge_snapshot(index, target, shard, manifest, Path(tmp), shards, replicas, reporter)
    points = index.count(target)
    if points != manifest["points"]:
        index.delete_collection(target)
        raise CbirError(f"{path}: the snapshot holds {points} points but its manifest says {manifest['points']}; "
                        "nothing was imported")
    if exists:
        result = swap(index, alias, target, reporter=reporter, allow_count_change=True)
    else:
        index.set_alias(alias, target)
        result = Swap(alias, None, target, 0, points, False)
    return Imported(alias, target, points, result)


def _kind_of(index: Index) -> str:
    """Where a snapshot came from, without naming a host or a folder."""
    return "a Qdrant server" if getattr(index, "is_server", False) else "an embedded index"


def _sizes(index: Index, name: str, meta: dict[str, Any]) -> tuple[int, int]:
    sample = next(iter(index.scroll(name, batch=1)), None)
    if sample is None:
        return int(meta["dim"]), int(meta["bits"])
    return int(sample.embedding.size), int(sample.code.size)


def _copy_to_edge_snapshot(index: Index, name: str, dim: int, bits: int, meta: dict[str, Any], shard: Path,
                           tmp: Path, reporter: Reporter) -> None:
    from cbir.store.edge import EdgeIndex

    with EdgeIndex(tmp / "edge", writable=True, create=True) as edge:
        edge.create_collection("export", dim, bits, meta)
        copy_points(index, name, edge, "export", reporter)
        edge.write_shard_snapshot("export", shard)


def _copy_from_edge_snapshot(index: Index, target: str, shard: Path, manifest: dict[str, Any], tmp: Path,
                             shards: int, replicas: int, reporter: Reporter) -> None:
    from cbir.store.edge import EdgeIndex

    with EdgeIndex(tmp / "edge", writable=True, create=True) as edge:
        edge.create_from_snapshot("import", shard, manifest["dim"], manifest["bits"], manifest["meta"])
        index.create_collection(target, manifest["dim"], manifest["bits"], manifest["meta"], shards, replicas)
        try:
            copy_points(edge, "import", index, target, reporter)
        except BaseException:
            index.delete_collection(target)
            raise
    shutil.rmtree(tmp / "edge", ignore_errors=True)
