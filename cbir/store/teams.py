"""Teams: each team's data lives in its own collection, because Qdrant grants access per collection.

`--team radiology --collection rsna` names the alias `radiology.rsna` (and its versions
`radiology.rsna__v1`, …). The collection records its team, every point's payload carries it, and ingest
refuses to write one team's data into a collection that is not that team's.
"""

from __future__ import annotations

import re

from cbir.errors import CbirError
from cbir.store.record import CollectionRecord

_TEAM = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def team_collection(collection: str, team: str | None) -> str:
    """The alias that `--collection` names for `--team` (unchanged without a team)."""
    if team is None:
        return collection
    if not _TEAM.fullmatch(team):
        raise CbirError(f"--team {team!r}: use 1-32 lower-case letters, digits, '_' or '-', starting with a "
                        "letter or digit")
    if "." in collection:
        raise CbirError(f"--collection {collection!r} with --team {team!r}: name the collection without a team "
                        f"prefix (it becomes {team}.<collection>)")
    return f"{team}.{collection}"


def check_team(record: CollectionRecord, team: str | None) -> None:
    """Refuse to write `team`'s data (None: no team) into a collection that belongs to another team or none."""
    owner, collection = record.team, record.name
    if owner == team:
        return
    if owner is None:
        raise CbirError(f"collection {collection!r} belongs to no team; ingest without --team, or into "
                        f"--team {team} --collection <name> (a collection of its own)")
    raise CbirError(f"collection {collection!r} belongs to team {owner!r}; "
                    f"{'pass --team ' + owner if team is None else 'team ' + repr(team) + ' cannot write to it'}")
