"""The core install is lean; a command whose extra is missing says which one to install, in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

from cbir.extras import EXTRAS, MissingExtraError, missing, require

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("fastapi", "uvicorn", "python-multipart", "faiss", "playwright")


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower()


def _extra(requirement: str) -> str | None:
    found = re.search(r"extra\s*==\s*[\"']([^\"']+)", requirement)
    return found.group(1) if found else None


def test_the_core_install_has_no_server_benchmark_or_browser_packages() -> None:
    # the installed package's own metadata: what `pip install cbir` resolves
    metadata = requires("cbir") or []
    core = {_name(r) for r in metadata if _extra(r) is None}
    assert not any(name.startswith(heavy) for name in core for heavy in HEAVY), core
    extras: dict[str, set[str]] = {}
    for r in metadata:
        if _extra(r) is not None:
            extras.setdefault(str(_extra(r)), set()).add(_name(r))
    assert {"fastapi", "uvicorn", "python-multipart"} <= extras["serve"]
    assert extras["bench"] == {"faiss-cpu"} and extras["browser"] == {"playwright"}
    assert set(EXTRAS) <= set(extras)      # every extra cbir checks for exists in the metadata
    assert "cbir" in extras["test"]        # the test extra pulls in the others it needs
    assert "httpx" in core                 # imported directly, so declared


def test_a_blocked_module_counts_as_missing() -> None:
    saved = sys.modules.get("faiss", "absent")
    sys.modules["faiss"] = None   # type: ignore[assignment]  # how Python marks a module as not importable
    try:
        assert missing("bench") == "faiss"
        try:
            require("bench", "the FAISS rows")
        except MissingExtraError as exc:
            assert str(exc) == ("the FAISS rows needs the 'bench' extra (faiss is not installed): "
                                "pip install 'cbir[bench]'")
        else:
            raise AssertionError("no error")
    finally:
        if saved == "absent":
            del sys.modules["faiss"]
        else:
            sys.modules["faiss"] = saved


def test_cbir_serve_without_the_serve_extra_prints_the_install_line(tmp_path: Path) -> None:
    script = ("import sys; sys.modules['fastapi'] = None; sys.argv = ['cbir', 'serve', '--index', "
              f"{str(tmp_path / 'none')!r}]; from cbir.cli.main import app; app()")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: cbir serve needs the 'serve' extra (fastapi is not installed): pip install "
                     "'cbir[serve]'"], result.stderr
    assert "Traceback" not in result.stderr
