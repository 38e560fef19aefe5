"""`cbir index …` (info, drop, calibrate, export, import, token, prune) and `cbir migrate`: the index itself."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from cbir.app.open import open_index
from cbir.cli.common import (
    CollectionOpt,
    IndexOpt,
    JsonOpt,
    KOpt,
    TeamOpt,
    err,
    guarded,
    make_reporter,
    out,
    settings,
)
from cbir.errors import CbirError

index_app = typer.Typer(no_args_is_help=True, rich_markup_mode="markdown", help="Inspect and manage the index.")


def register(app: typer.Typer) -> None:
    for name, command in (("info", index_info), ("drop", index_drop), ("calibrate", index_calibrate),
                          ("export", index_export), ("import", index_import), ("token", index_token),
                          ("prune", index_prune)):
        index_app.command(name)(guarded(command))
    app.command()(guarded(migrate))


def index_info(ctx: typer.Context, index: IndexOpt = None, as_json: JsonOpt = False) -> None:
    """List the collections (by the name you query them with) with their points, model, dimensions and team;
    --json adds the stored version, schema, key fingerprint and splits."""
    with open_index(settings(ctx, index)) as idx:
        by_collection = {c: a for a, c in idx.list_aliases().items()}
        rows = []
        for name in idx.list_collections():
            record = idx.record(name)
            rows.append({"collection": by_collection.get(name, name), "stored_as": name,
                         "current": name in by_collection, "points": idx.count(name),
                         "model_fingerprint": record.model_fingerprint, "backbone": record.backbone,
                         "dim": record.dim, "bits": record.bits, "team": record.team,
                         "schema_version": idx.schema_version(name), "model_path": record.model_path,
                         "key_fingerprint": record.key_fingerprint, "paths": record.path_mode,
                         "thumbnails": record.thumbnails is not None,
                         "splits": {dataset: split.get("description") for dataset, split in record.splits.items()}})
        location = idx.location
    if as_json:
        sys.stdout.write(json.dumps({"index": location, "collections": rows}, indent=2) + "\n")
        return
    out.print(info_table(location, rows))


def info_table(location: str, rows: list[dict[str, Any]]) -> Table:
    """Six short columns, so that the table fits 80 columns; `--json` has every field."""
    table = Table(title=f"index {location}", title_justify="left")
    for column, justify in (("collection", "left"), ("points", "right"), ("model", "left"), ("dim/bits", "right"),
                            ("team", "left"), ("names", "left")):
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for row in rows:
        version = "" if row["current"] else f" (old: {row['stored_as']})"
        table.add_row(f"{row['collection']}{version}", f"{row['points']:,}",
                      f"{row['backbone'] or ''} {str(row['model_fingerprint'] or '')[:8]}".strip(),
                      f"{row['dim']}/{row['bits']}", row["team"] or "", "paths" if row["paths"] == "plain" else
                      "pseudonyms")
    return table


@index_app.command("drop")
def index_drop(ctx: typer.Context,
               collection: Annotated[str, typer.Argument(help="a collection, or a stored version")],
               index: IndexOpt = None) -> None:
    """Delete a collection with all its versions, or one stored version that no alias points at."""
    from cbir.store.versions import drop
    with open_index(settings(ctx, index), writable=True) as idx:
        names = drop(idx, collection)
    out.print(f"deleted {', '.join(names)}", markup=False)


@index_app.command("calibrate")
def index_calibrate(ctx: typer.Context,
                    collection: Annotated[str | None, typer.Argument(
                        help="the collection to calibrate [default: --collection's]", show_default=False)] = None,
                    k: KOpt = 10, index: IndexOpt = None, team: TeamOpt = None) -> None:
    """Fit the vote's calibration and the close-case threshold on the collection's validation images again
    (`cbir ingest` does this; use it for collections ingested before, or for another k)."""
    from cbir.app.calibrate import calibrate
    from cbir.search.calibrate import describe
    from cbir.store.teams import team_collection
    chosen = settings(ctx, index)
    collection = team_collection(collection or chosen.collection, team)
    with open_index(chosen, writable=True) as idx:
        if not idx.has_collection(collection):
            raise CbirError(f"no collection {collection!r} in {idx.location} (collections: {idx.shown_names()})")
        body = calibrate(idx, collection, k, make_reporter())
    if body is None:
        raise CbirError(f"collection {collection!r}: too few labelled validation images to calibrate (at least "
                        "20, and training images); the vote stays uncalibrated")
    vote = body["vote"]
    out.print(f"{collection}: {describe(body)} (k = {k}; Platt a = {vote['a']:.3f}, b = {vote['b']:.3f})",
              markup=False)


@index_app.command("export")
def index_export(ctx: typer.Context,
                 collection: Annotated[str, typer.Argument(help="the collection to export")],
                 out_file: Annotated[Path, typer.Option("--out", help="snapshot file to write")],
                 index: IndexOpt = None, team: TeamOpt = None) -> None:
    """Write one collection to a file as a Qdrant shard snapshot (server → file → Edge, and back)."""
    from cbir.store.snapshots import export_collection
    from cbir.store.teams import team_collection
    with open_index(settings(ctx, index)) as idx:
        done = export_collection(idx, team_collection(collection, team), out_file, make_reporter())
    size = out_file.stat().st_size / 2**20
    out.print(f"exported {done.points} points of {done.collection!r} to {out_file} ({size:.1f} MiB, "
              f"{done.method})", markup=False)


@index_app.command("import")
def index_import(ctx: typer.Context,
                 snapshot: Annotated[Path, typer.Argument(help="a file from `cbir index export`")],
                 index: IndexOpt = None,
                 collection: Annotated[str | None, typer.Option(
                     "--collection", help="import under this name (default: the exported one)")] = None,
                 replace: Annotated[bool, typer.Option(
                     "--replace", help="swap it in as the next version of an existing collection")] = False,
                 shards: Annotated[int, typer.Option("--shards", min=1, help="server: shards")] = 1,
                 replicas: Annotated[int, typer.Option("--replicas", min=1, help="server: replicas")] = 1,
                 ) -> None:
    """Load a snapshot file into an index (Qdrant Edge, a server or local mode) as a collection; a team's
    collection keeps its name (TEAM.COLLECTION) and its team."""
    from cbir.store.snapshots import import_collection
    with open_index(settings(ctx, index), writable=True, create=True) as idx:
        done = import_collection(idx, snapshot, collection, replace, shards, replicas, make_reporter())
    out.print(f"imported {done.points} points: {done.swap.line}", markup=False)


@index_app.command("token")
def index_token(ctx: typer.Context, collection: CollectionOpt = None, team: TeamOpt = None,
                write: Annotated[bool, typer.Option("--write", help="also allow ingest (default: query only)")] = False,
                days: Annotated[float, typer.Option("--days", min=0.01, help="valid for this many days")] = 90.0,
                ) -> None:
    """Print a JWT for one team's collection, signed with the server's admin API key ($CBIR_QDRANT_API_KEY or
    --api-key-file): read-only unless --write. The server needs QDRANT__SERVICE__JWT_RBAC=true and enforces it;
    the team keeps the token in a file and passes it with --api-key-file (or $CBIR_QDRANT_API_KEY)."""
    from cbir.store.teams import team_collection
    from cbir.store.tokens import make_token
    chosen = settings(ctx)
    sys.stdout.write(make_token(chosen.server.api_key or "", [team_collection(collection or chosen.collection, team)],
                                write, days) + "\n")


@index_app.command("prune")
def index_prune(ctx: typer.Context, index: IndexOpt = None,
                wait: Annotated[float, typer.Option("--wait", min=0, help="seconds to wait for readers")] = 0.0
                ) -> None:
    """Delete old versions that a reindex left behind because another process was still reading them."""
    from cbir.store.versions import prune
    with open_index(settings(ctx, index), writable=True) as idx:
        deleted, busy = prune(idx, wait=wait)
    out.print(f"deleted {len(deleted)} old version(s){': ' + ', '.join(deleted) if deleted else ''}", markup=False)
    if busy:
        err.print(f"still in use by another process: {', '.join(busy)}", markup=False)
        raise typer.Exit(1)


def migrate(ctx: typer.Context, index: IndexOpt = None,
            to: Annotated[int | None, typer.Option("--to", min=0, help="stop after this migration")] = None
            ) -> None:
    """Apply the index migrations not yet applied (idempotent); `--to N` stops after migration N."""
    from cbir.store.migrate import discover
    from cbir.store.migrate import migrate as run_migrations
    from cbir.store.migrations import PACKAGE
    with open_index(settings(ctx, index), writable=True, create=True) as idx:
        applied = run_migrations(idx, to, discover(PACKAGE), reporter=make_reporter())
        ledger = idx.get_ledger()
    latest = max((int(e["number"]) for e in ledger), default=0)
    out.print(f"applied {len(applied)} migration(s); the index is at migration {latest}", markup=False)
