"""Shared fixtures: the real data in ../shared (skipped when absent) and an isolated pseudonym key."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL = SHARED / "data" / "real"
LABELS = SHARED / "data" / "labels"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or a skip with the reason when this clone has none."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} (a user's clone has no ../shared)")
    return path


def pytest_configure(config: pytest.Config) -> None:
    """The whole run (module fixtures included) uses a throwaway pseudonym key file, never the user's."""
    key_dir = Path(tempfile.mkdtemp(prefix="cbir-test-key-"))
    os.environ["CBIR_KEY_FILE"] = str(key_dir / "pseudonym.key")
    for name in ("CBIR_PSEUDONYM_KEY", "CBIR_INDEX", "CBIR_COLLECTION"):
        os.environ.pop(name, None)


@pytest.fixture
def fresh_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A key file path of this test's own (not yet created)."""
    key_file = tmp_path / "keys" / "pseudonym.key"
    monkeypatch.setenv("CBIR_KEY_FILE", str(key_file))
    return key_file


def run_cli(*args: object) -> tuple[int, str, str]:
    """`cbir ARGS…` in this process: (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from cli.main import app
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr
