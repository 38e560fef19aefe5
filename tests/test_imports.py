"""Every module of the package imports, and no two modules import each other, even through a function-level
import (which hides a cycle at import time but still ties the modules together)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cbir"


def modules() -> dict[str, Path]:
    """Dotted name → file of every module of the package (a package is its __init__.py)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (module level, functions, TYPE_CHECKING):
    `from cbir.a import b` names module `cbir.a.b` when that is a module, else `cbir.a`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in known else base)
    return {t for t in targets if t in known and t != name}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The cycles a depth-first search meets (each as a closed path), in name order."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    found: list[list[str]] = []
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_no_import_cycles() -> None:
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert "cbir.cli.main" in graph and "cbir.store.migrations" in graph
    assert [" → ".join(c) for c in cycles(graph)] == []


def test_the_cycle_search_finds_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("import cbir.b\n")
    (tmp_path / "b.py").write_text("def f():\n    from cbir.a import x\n")
    known = {"cbir.a": tmp_path / "a.py", "cbir.b": tmp_path / "b.py"}
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert cycles(graph) == [["cbir.a", "cbir.b", "cbir.a"]]


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


ARCHITECTURE = ROOT / "docs" / "architecture.md"


def documented_layers(text: str) -> dict[str, int]:
    """Package or module (below `cbir.`; `cbir` itself for the package) → layer, from docs/architecture.md's table."""
    table = text.split("<!-- layers: checked by tests/test_imports.py -->")[1].split("<!-- /layers -->")[0]
    layers: dict[str, int] = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].isdigit():
            for name in re.findall(r"`([a-z_]+)`", cells[1]):
                layers[name] = int(cells[0])
    return layers


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    parts = module.split(".")
    return layers.get(parts[1] if len(parts) > 1 else "cbir")


def upward_imports(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
    """Every import of a module from a layer below its own (a higher number)."""
    return sorted(f"{a} → {b}" for a, targets in graph.items() for b in targets
                  if (la := layer_of(a, layers)) is not None and (lb := layer_of(b, layers)) is not None and lb > la)


STORE_MUST_NOT_IMPORT = ("data", "models", "train", "embed")


def test_every_import_points_down_the_documented_layers() -> None:
    layers = documented_layers(ARCHITECTURE.read_text())
    assert {"io", "data", "models", "train", "embed", "store", "search", "evaluation", "report", "app", "cli"} <= set(
        layers)
    known = modules()
    unplaced = sorted(m for m in known if layer_of(m, layers) is None)
    assert unplaced == [], f"add these to docs/architecture.md's layer table: {unplaced}"
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert upward_imports(graph, layers) == []
    store = sorted(f"{a} → {b}" for a, targets in graph.items() if a.startswith("cbir.store")
                   for b in targets if b.split(".")[1] in STORE_MUST_NOT_IMPORT)
    assert store == []
    assert "<!-- store-independent" in ARCHITECTURE.read_text()


def test_the_layer_check_finds_an_upward_import() -> None:
    layers = documented_layers(ARCHITECTURE.read_text())
    graph = {"cbir.evaluation.summary": {"cbir.report.evaluation"},
             "cbir.report.evaluation": {"cbir.evaluation.summary"}}
    assert upward_imports(graph, layers) == ["cbir.evaluation.summary → cbir.report.evaluation"]


def test_no_module_writes_the_environment() -> None:
    """Settings travel as `cbir.app.settings.Settings`, never through os.environ; the one write is OpenMP's, in
    the CLI's entry point (docs/architecture.md)."""
    writes = re.compile(r"os\.environ\[[^\]]+\]\s*=|os\.environ\.(update|setdefault|pop)\(|os\.putenv\(|"
                        r"os\.environ\s*\|=")
    found = [f"{path.relative_to(ROOT)}:{n}" for path in sorted(PACKAGE.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1) if writes.search(line)]
    assert found == ["cbir/cli/main.py:" + str(next(
        n for n, line in enumerate((PACKAGE / "cli" / "main.py").read_text().splitlines(), 1)
        if "OMP_WAIT_POLICY" in line and "setdefault" in line))]


def test_no_mutable_module_state_holds_settings() -> None:
    """The server settings lived in a module dict (`_SERVER`) and the default collection was read at import."""
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign | ast.AnnAssign):
                value = node.value
                assert not isinstance(value, ast.Dict | ast.List | ast.Set), f"{path.name}: module-level mutable"
                assert "environ" not in ast.unparse(value), f"{path.name}: reads the environment at import"


def test_the_cli_modules_stay_small() -> None:
    sizes = {path.name: len(path.read_text().splitlines()) for path in (PACKAGE / "cli").glob("*.py")}
    assert max(sizes.values()) <= 300, sizes


def test_every_option_of_every_command_says_what_it_does() -> None:
    """A newcomer's `--help`: `--k`, `--device` and `--hamming-radius` had no description."""
    from typer.main import get_command

    from cbir.cli.main import app

    def commands(command: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
        if hasattr(command, "commands"):
            return [found for name, sub in command.commands.items() for found in commands(sub, (*path, name))]
        return [(path, command)]
    silent = [f"{' '.join(path)} {p.opts[0]}" for path, command in commands(get_command(app)) for p in command.params
              if getattr(p, "param_type_name", "") == "option" and not p.hidden and p.name != "help"
              and not (p.help or "").strip()]
    assert silent == []
