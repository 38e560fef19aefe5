"""Index migrations: `cbir/store/migrations/NNNN_name.py` files, each with `up(ctx)`, applied in order by
`cbir migrate`.

The index keeps a ledger of what was applied (Edge: `ledger.json` beside `collections/`; a server or local
mode: the metadata of the reserved `cbir_ledger` collection). A migration is recorded only after its `up`
returns, and `up` must be safe to run again on a half-migrated index, so an interrupted run is finished by
running `cbir migrate` again. Migrations only go up.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from cbir.console import QUIET, Reporter
from cbir.errors import CbirError
from cbir.store.base import Index

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)$")


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    up: Callable[[MigrationContext], None]


@dataclass
class MigrationContext:
    """What a migration's `up` gets: the writable index and a reporter."""

    index: Index
    reporter: Reporter = QUIET

    def collections(self) -> list[str]:
        return self.index.list_collections()


def discover(package: str = "cbir.store.migrations") -> list[Migration]:
    """Every `NNNN_name` module of `package` with an `up` function, by number; gaps and duplicates are refused."""
    root = importlib.import_module(package)
    found = []
    for info in pkgutil.iter_modules(root.__path__):
        match = _FILE.match(info.name)
        if not match:
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        if not callable(getattr(module, "up", None)):
            raise CbirError(f"migration {info.name} has no up(ctx) function")
        found.append(Migration(int(match.group(1)), match.group(2), module.up))
    found.sort(key=lambda m: m.number)
    numbers = [m.number for m in found]
    if numbers != list(range(1, len(found) + 1)):
        raise CbirError(f"migrations must be numbered 1, 2, 3… without gaps, found {numbers}")
    return found


def migrate(index: Index, to: int | None = None, migrations: list[Migration] | None = None,
            reporter: Reporter = QUIET) -> list[Migration]:
    """Apply the pending migrations up to number `to` (default: all); return those applied now."""
    available = discover() if migrations is None else migrations
    ledger = index.get_ledger()
    done = {int(entry["number"]) for entry in ledger}
    target = len(available) if to is None else to
    if not 0 <= target <= len(available):
        raise CbirError(f"--to {target}: this cbir knows migrations 1 to {len(available)}")
    if done and max(done) > target:
        raise CbirError(f"the index is already at migration {max(done)}; cbir does not migrate down to {target}")
    applied = []
    for migration in available[:target]:
        if migration.number in done:
            continue
        reporter.log(f"migration {migration.number:04d} {migration.name}")
        migration.up(MigrationContext(index, reporter))
        ledger.append({"number": migration.number, "name": migration.name,
                       "applied": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        index.set_ledger(ledger)
        applied.append(migration)
    return applied


def pending(index: Index, migrations: list[Migration] | None = None) -> list[Migration]:
    done = {int(entry["number"]) for entry in index.get_ledger()}
    return [m for m in (discover() if migrations is None else migrations) if m.number not in done]
