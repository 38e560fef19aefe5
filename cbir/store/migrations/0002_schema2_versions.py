"""Schema version 2: the `hash` vector is stored as uint8 (faster to load and scan, see README.md), and
every collection becomes a version behind an alias (`rsna` → `rsna__v1`), so that a reindex can swap it.

For each schema-1 collection: copy every point into the next version in the new schema, check that the
point counts match, then point the alias at the copy and delete the old collection. A plain collection
`rsna` and its alias `rsna` cannot exist at once, so queries through that name fail for the moment between
the delete and the alias (milliseconds). Safe to re-run: a copy left by an interrupted run is started over,
and a version whose alias was never made gets it.
"""

from __future__ import annotations

from cbir.errors import CbirError
from cbir.store.versions import (
    DELETE_WAIT,
    copy_collection,
    next_version,
    split_version,
    version_number,
    versions,
)


def up(ctx) -> None:
    index = ctx.index
    for name in index.list_collections():
        if index.schema_version(name) >= 2:
            continue
        by_collection = {c: a for a, c in index.list_aliases().items()}
        parsed = split_version(name)
        alias = by_collection.get(name) or (parsed[0] if parsed else name)
        for leftover in versions(index, alias):     # an earlier, interrupted run of this migration
            number = version_number(leftover)
            if leftover not in by_collection and (parsed is None or number > parsed[1]):
                index.delete_collection(leftover)
        target = next_version(index, alias)
        copied = copy_collection(index, name, target, reporter=ctx.reporter)
        if copied != index.count(name) or index.count(target) != copied:
            raise CbirError(f"migrating {name!r}: copied {copied} of {index.count(name)} points; nothing changed")
        if name == alias:
            index.delete_collection(name, wait=DELETE_WAIT)
            index.set_alias(alias, target)
        else:
            index.set_alias(alias, target)
            index.delete_collection(name, wait=DELETE_WAIT)
        ctx.reporter.log(f"  {alias!r} now points at {target!r} (schema 2)")
    _repair_missing_aliases(index)


def _repair_missing_aliases(index) -> None:
    """Give the newest version its alias where a run died between deleting a collection and aliasing its copy."""
    aliases = index.list_aliases()
    newest: dict[str, str] = {}
    for name in index.list_collections():
        parsed = split_version(name)
        if parsed and parsed[0] not in aliases and not index.has_collection(parsed[0]):
            newest[parsed[0]] = max(newest.get(parsed[0], name), name, key=version_number)
    for alias, name in newest.items():
        index.set_alias(alias, name)
