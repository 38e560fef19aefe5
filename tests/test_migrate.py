"""Migrations: discovery, the ledger on both backends, idempotence, `--to`, and no downgrade."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cbir.cli.main import app
from cbir.errors import CbirError
from cbir.store import Point, open_index
from cbir.store.migrate import Migration, discover, migrate, pending
from cbir.store.migrations import PACKAGE

LOCATIONS = {"edge": lambda tmp: str(tmp / "edge"), "local": lambda tmp: f"local:{tmp / 'local'}"}


def _old_collection(index, name: str = "old") -> None:
    """A collection as cbir wrote it before migration 1: no codes/shards/replicas in its metadata."""
    index.create_collection(name, 4, 8, {"model_fingerprint": "f", "dim": 4, "bits": 8})
    code = np.array([1, 0, 1, 0, 1, 0, 1, 0], dtype=np.uint8)
    index.upsert(name, [Point("00000000-0000-4000-8000-000000000001", np.array([1, 0, 0, 0], np.float32), code,
                              {"label": "x"})])


def test_discover_finds_numbered_migrations() -> None:
    found = discover(PACKAGE)
    assert [m.number for m in found] == list(range(1, len(found) + 1)) and found[0].name == "collection_settings"


@pytest.mark.parametrize("kind", LOCATIONS)
def test_migrate_from_empty_and_from_an_old_collection(kind: str, tmp_path: Path) -> None:
    location = LOCATIONS[kind](tmp_path)
    with open_index(location, writable=True, create=True) as index:
        assert index.get_ledger() == [] and len(pending(index, discover(PACKAGE))) == len(discover(PACKAGE))
        applied = migrate(index, None, discover(PACKAGE))
        assert [m.number for m in applied] == [m.number for m in discover(PACKAGE)]
        assert migrate(index, None, discover(PACKAGE)) == []                       # idempotent
        assert [e["number"] for e in index.get_ledger()] == [m.number for m in discover(PACKAGE)]
        assert index.list_collections() == []            # the ledger is not a collection
    other = tmp_path / "other"
    other.mkdir()
    with open_index(LOCATIONS[kind](other), writable=True, create=True) as index:
        _old_collection(index)
        assert "codes" not in index.get_meta("old")
        migrate(index, None, discover(PACKAGE))
        meta = index.get_meta("old")
        assert (meta["codes"], meta["shards"], meta["replicas"]) == ("model", 1, 1)
        assert meta["model_fingerprint"] == "f" and index.count("old") == 1   # nothing else touched
    with open_index(LOCATIONS[kind](other)) as index:                        # the ledger persists
        assert [e["number"] for e in index.get_ledger()] == [m.number for m in discover(PACKAGE)]


def test_to_and_no_downgrade(tmp_path: Path) -> None:
    calls: list[int] = []
    chain = [Migration(n, f"m{n}", lambda ctx, n=n: calls.append(n)) for n in (1, 2, 3)]
    with open_index(str(tmp_path / "edge"), writable=True, create=True) as index:
        assert [m.number for m in migrate(index, 2, chain)] == [1, 2]
        assert [m.number for m in migrate(index, None, chain)] == [3] and calls == [1, 2, 3]
        with pytest.raises(CbirError, match="does not migrate down"):
            migrate(index, 1, chain)
        with pytest.raises(CbirError, match="knows migrations 1 to 3"):
            migrate(index, 7, chain)


def test_a_failed_migration_is_not_recorded(tmp_path: Path) -> None:
    def boom(ctx) -> None:
        raise CbirError("disk full")
    chain = [Migration(1, "ok", lambda ctx: None), Migration(2, "boom", boom)]
    with open_index(str(tmp_path / "edge"), writable=True, create=True) as index:
        with pytest.raises(CbirError, match="disk full"):
            migrate(index, None, chain)
        assert [e["number"] for e in index.get_ledger()] == [1]


def test_cli_migrate(tmp_path: Path) -> None:
    runner = CliRunner()
    first = runner.invoke(app, ["migrate", "--index", str(tmp_path / "idx")])
    assert first.exit_code == 0 and f"applied {len(discover(PACKAGE))} migration(s)" in first.stdout
    again = runner.invoke(app, ["migrate", "--index", str(tmp_path / "idx")])
    assert again.exit_code == 0 and "applied 0 migration(s)" in again.stdout
    down = runner.invoke(app, ["migrate", "--index", str(tmp_path / "idx"), "--to", "0"])
    assert down.exit_code == 2 and "does not migrate down" in down.stderr
