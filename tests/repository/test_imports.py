"""How the examples' modules import each other: every sibling module is known to ruff's isort as
local (or has a section of its own), and no folder's modules import each other in a cycle."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from tests.shared.harness import EXAMPLES, REPO

ISORT = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]["isort"]


def siblings(example: str) -> set[str]:
    return {path.stem for path in (REPO / example).glob("*.py")}


def imported(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle in `graph` (module -> the modules it imports), as a path; [] when none."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once all it reaches is explored
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = "open"
        path.append(module)
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                return [*path[path.index(other) :], other]
            if other not in state and (found := visit(other)):
                return found
        path.pop()
        state[module] = "done"
        return []

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return []


def test_every_sibling_module_is_a_known_local_folder() -> None:
    """Else ruff's isort takes a sibling for a third-party package, and the import blocks of the
    examples sort differently from one folder to the next."""
    own_sections = {name for modules in ISORT.get("sections", {}).values() for name in modules}
    known = set(ISORT["known-local-folder"]) | own_sections
    missing = {example: sorted(siblings(example) - {"handler"} - known) for example in EXAMPLES}
    assert not any(missing.values()), f"add to [tool.ruff.lint.isort] known-local-folder: {missing}"


@pytest.mark.parametrize("example", EXAMPLES)
def test_no_import_cycle_between_an_examples_modules(example: str) -> None:
    own = siblings(example)
    graph = {path.stem: imported(path) & own - {path.stem} for path in (REPO / example).glob("*.py")}
    assert not (found := cycle(graph)), f"{example}: import cycle {' -> '.join(found)}"


def test_the_cycle_check_finds_a_cycle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
