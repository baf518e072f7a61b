"""The import rules of the tree, read from the source (every import counts, those under
TYPE_CHECKING and inside functions included):

- a service imports no other service and no operator tooling (`ops`); `shared` imports
  neither services nor `ops`;
- inside a service, only `__main__` imports `service` (the wiring);
- inside a service, no module imports itself back through others (no import loop).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "__init__.py").exists())


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[str]:
    """Every module `path` imports, absolute (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            yield base
            for alias in node.names:  # `from services.x import store` names a module
                yield f"{base}.{alias.name}"


def _graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    folder = ROOT / package.replace(".", "/")
    modules = {_module(p): p for p in folder.rglob("*.py")}
    return {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import loops: strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_has_no_import_loop(service: str) -> None:
    assert _cycles(_graph(f"services.{service}")) == []


@pytest.mark.parametrize("service", SERVICES)
def test_only_the_entry_point_imports_the_wiring(service: str) -> None:
    wiring = f"services.{service}.service"
    importers = sorted(
        name
        for name, deps in _graph(f"services.{service}").items()
        if wiring in deps and name != f"services.{service}.__main__"
    )
    assert importers == []


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service_and_no_operator_tooling(service: str) -> None:
    own = f"services.{service}"
    bad = sorted(
        f"{_module(path)} -> {m}"
        for path in (ROOT / "services" / service).rglob("*.py")
        for m in _imports(path)
        if (m.startswith("services.") and not m.startswith(own + ".") and m != own)
        or m == "ops"
        or m.startswith("ops.")
    )
    assert bad == []


def test_shared_imports_neither_services_nor_operator_tooling() -> None:
    bad = sorted(
        f"{_module(path)} -> {m}"
        for path in (ROOT / "shared").rglob("*.py")
        for m in _imports(path)
        if m.split(".")[0] in ("services", "ops")
    )
    assert bad == []


def test_the_loop_finder_finds_a_loop() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
