"""The CI skip policy of tests/conftest.py: with $CBIR_STRICT_SKIPS, a test skipped for a missing package fails
the run; the named, allowed reasons (live server, Chromium, GPU, ../shared) do not."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()


def _run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, body: str, strict: bool) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_sample=body)
    if strict:
        monkeypatch.setenv("CBIR_STRICT_SKIPS", "1")
    else:
        monkeypatch.delenv("CBIR_STRICT_SKIPS", raising=False)
    return pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")


MISSING = """
import pytest
def test_needs_a_package():
    pytest.importorskip("no_such_package_for_cbir")
def test_ok():
    assert True
"""

ALLOWED = """
import pytest
@pytest.mark.skipif(True, reason="set $CBIR_TEST_QDRANT_URL to run against a server")
def test_server():
    pass
def test_shared():
    pytest.skip("real data not available: x (../shared is absent: a user's clone has none)")
def test_ok():
    assert True
"""


def test_a_skip_for_a_missing_package_fails_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run(pytester, monkeypatch, MISSING, strict=True)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*skipped for a reason CI does not allow*", "*no_such_package_for_cbir*"])
    assert _run(pytester, monkeypatch, MISSING, strict=False).ret == pytest.ExitCode.OK  # a user's plain run


def test_allowed_skips_pass(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    result = _run(pytester, monkeypatch, ALLOWED, strict=True)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1, skipped=2)


def test_ci_runs_the_readme_test_command_from_the_lock() -> None:
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = re.search(r"Run the tests:\s*```bash\n(.+?)\n```", readme, re.S)
    assert block, "the README's quick start has no test command"
    command = block.group(1).strip()
    assert command in (root / ".ci" / "run").read_text()
    assert "-c requirements-lock.txt" in command and (root / "requirements-lock.txt").is_file()
    locked = {line.split("==")[0].lower() for line in (root / "requirements-lock.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    assert {"torch", "numpy", "qdrant-edge-py", "fastapi", "pytest", "faiss-cpu"} <= locked


def test_ci_type_checks_cbir_with_mypy() -> None:
    """After pytest and ruff, .ci/run runs the test extra's mypy on pyproject.toml's [tool.mypy] files (cbir, with
    unneeded `type: ignore` comments reported); a mypy failure fails a run whose tests passed."""
    import re
    root = Path(__file__).resolve().parents[1]
    lines = (root / ".ci" / "run").read_text().splitlines()

    def line_of(text: str) -> int:
        found = [i for i, line in enumerate(lines) if text in line and not line.lstrip().startswith("#")]
        assert found, f".ci/run has no {text!r}"
        return found[0]

    mypy = line_of(".venv/bin/mypy ||")
    assert line_of("-m pytest") < line_of(".venv/bin/ruff check") < mypy
    assert '[ "$status" -eq 0 ] && status=1' in lines[mypy]
    pyproject = (root / "pyproject.toml").read_text()
    section = re.search(r"^\[tool\.mypy\]\n(.*?)(?=^\[)", pyproject, re.S | re.M)
    assert section, "pyproject.toml has no [tool.mypy] section"
    assert 'files = ["cbir"]' in section.group(1) and "warn_unused_ignores = true" in section.group(1)
    test_extra = re.search(r"^test = \[(.*?)\]$", pyproject, re.S | re.M)
    assert test_extra and '"mypy>=' in test_extra.group(1) and '"pandas-stubs' in test_extra.group(1)


def test_a_clone_without_shared_passes_the_strict_skip_check() -> None:
    """`.ci/run` on a user's clone (no ../shared): every skip for the real data gives the reason CI allows. Before,
    tests/test_synth.py skipped with "real RSNA labels absent", and a fresh clone's CI run was red. The modules
    that build paths into ../shared themselves run here as such a clone ($CBIR_SHARED_DIR: a missing folder), and
    no test module reaches ../shared except through tests/conftest.py's `SHARED`, `shared_path` or `needs_shared`."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    own = [str(p.relative_to(root)) for p in sorted((root / "tests").glob("test_*.py"))
           if p.name != Path(__file__).name and ('"shared"' in p.read_text() or "parents[1].parent" in p.read_text())]
    assert own == [], f"reach ../shared through tests/conftest.py: {own}"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_synth.py",
                           "tests/test_datasets.py"], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CBIR_SHARED_DIR": str(root / "no-such-shared"),
                               "CBIR_STRICT_SKIPS": "1"})
    assert done.returncode == 0, done.stdout[-3000:]
    assert " skipped" in done.stdout.splitlines()[-1]                  # the real-data tests did skip
