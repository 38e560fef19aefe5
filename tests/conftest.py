"""Shared fixtures: the real data in ../shared (skipped when absent) and an isolated pseudonym key."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: The real data: ../shared beside the clone (`$CBIR_SHARED_DIR` stands in for it, so that a test can run the
#: suite as a clone without it). Every test reaches it through `SHARED`, `shared_path` or `needs_shared`, so
#: that every skip for it gives `SHARED_ABSENT`, the reason `ALLOWED_SKIPS` lets CI pass.
SHARED = Path(os.environ.get("CBIR_SHARED_DIR") or REPO.parent / "shared")
REAL = SHARED / "data" / "real"
LABELS = SHARED / "data" / "labels"
SHARED_ABSENT = "../shared is absent: a user's clone has none"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or a skip with the reason when this clone has none."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} ({SHARED_ABSENT})")
    return path


def needs_shared(path: Path) -> pytest.MarkDecorator:
    """Skip, with the reason every ../shared skip gives, when `path` (under `SHARED`) is absent."""
    return pytest.mark.skipif(not path.exists(), reason=f"real data not available: {path} ({SHARED_ABSENT})")


#: The only reasons a test may skip when $CBIR_STRICT_SKIPS is set (as `.ci/run` does): something this machine
#: cannot have, never a package that an extra of pyproject.toml provides. Name → a phrase of the skip reason.
ALLOWED_SKIPS = {
    "live Qdrant server": "CBIR_TEST_QDRANT_URL",
    "Qdrant server admin key": "CBIR_TEST_QDRANT_API_KEY",
    "Chromium browser": "Chromium is not installed",
    "CUDA GPU": "needs a CUDA GPU",
    "real data in ../shared": "../shared is absent",
}
_SKIPS: list[tuple[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPS.append((report.nodeid, str(reason)))


def disallowed_skips(skips: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(node, reason) for node, reason in skips
            if not any(phrase in reason for phrase in ALLOWED_SKIPS.values())]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With $CBIR_STRICT_SKIPS, a skip for any reason outside `ALLOWED_SKIPS` (a missing package above all)
    fails the run."""
    if not os.environ.get("CBIR_STRICT_SKIPS"):
        return
    bad = disallowed_skips(_SKIPS)
    if bad:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"{node}: {reason}" for node, reason in bad]
        text = "tests skipped for a reason CI does not allow (install the extras; allowed: " \
               f"{', '.join(ALLOWED_SKIPS)}):\n  " + "\n  ".join(lines)
        if reporter is not None:
            reporter.write_line(text, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_configure(config: pytest.Config) -> None:
    """The whole run (module fixtures included) uses a throwaway pseudonym key file and local state folder (the
    file map), never the user's."""
    key_dir = Path(tempfile.mkdtemp(prefix="cbir-test-key-"))
    os.environ["CBIR_KEY_FILE"] = str(key_dir / "pseudonym.key")
    os.environ["CBIR_STATE_DIR"] = str(key_dir / "state")
    for name in ("CBIR_PSEUDONYM_KEY", "CBIR_INDEX", "CBIR_COLLECTION"):
        os.environ.pop(name, None)


@pytest.fixture
def fresh_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A key file path of this test's own (not yet created)."""
    key_file = tmp_path / "keys" / "pseudonym.key"
    monkeypatch.setenv("CBIR_KEY_FILE", str(key_file))
    return key_file


def payload_path(payload: dict) -> str | None:
    """A stored payload's relative path, through this machine's file map where the payload has a pseudonym."""
    from cbir.app.settings import Settings
    from cbir.store.files import FileMap, LocalFiles
    from cbir.store.record import CollectionRecord
    with FileMap.local(Settings.from_env().state_dir) as file_map:
        return LocalFiles(CollectionRecord.new("c"), file_map).relpath(payload)


def run_cli(*args: object) -> tuple[int, str, str]:
    """`cbir ARGS…` in this process: (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from cbir.cli.main import app
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(autouse=True)
def _reader_limits_do_not_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts without the reader variables of the developer's shell ($CBIR_ANY_MODALITY,
    $CBIR_MAX_PIXELS), which `Settings.from_env` would read."""
    for name in ("CBIR_ANY_MODALITY", "CBIR_MAX_PIXELS"):
        monkeypatch.delenv(name, raising=False)
