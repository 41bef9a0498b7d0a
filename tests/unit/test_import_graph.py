"""The house rules of docs/architecture.md, read from the code: imports flow one way, and stay on top.

* ``adapters`` and ``ledger`` import nothing from ``bridge``.
* Inside ``bridge``: cross-cutting modules (config, errors, logging, metrics, gctune, tls) import no layer;
  ingest -> stream; consumers -> stream, stores; service -> stores, stream (the API's own writes); stream and stores import no other
  layer; cli imports everything.
* No module imports itself back through a cycle.
* Imports sit at the top of modules, except in ``bridge/cli`` (start-up time) and where a comment
  beside the import says why (an optional dependency).
"""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("adapters", "bridge", "ledger")
LAYERS = ("ingest", "stream", "consumers", "stores", "service", "cli")
#: layer -> the layers it may import (itself always)
ALLOWED = {
    "ingest": {"stream"},
    "stream": set(),
    "consumers": {"stream", "stores"},
    "stores": set(),
    "service": {"stores", "stream"},
    "cli": set(LAYERS),
}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, int, bool, str]]:
    """(imported module, line, at top level, the source line) for every project import in ``path``."""
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    nested: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            nested |= {id(n) for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)}
    type_checking: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_checking |= {id(n) for n in ast.walk(node) if isinstance(n, ast.Import | ast.ImportFrom)}
    out = []
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            out.append((name, node.lineno, id(node) not in nested, lines[node.lineno - 1]))
    return out


def _project_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


MODULES = {_module(p) for p in _project_files()}


def _edges() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _project_files():
        mod = _module(path)
        targets = graph.setdefault(mod, set())
        for name, _line, top, _text in _imports(path):
            if name in MODULES and name != mod and top:
                targets.add(name)
    return graph


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "bridge" and parts[1] in LAYERS else None


@pytest.mark.parametrize("package", ["adapters", "ledger"])
def test_adapters_and_ledger_import_nothing_from_bridge(package: str) -> None:
    bad = [
        f"{p.relative_to(ROOT)}:{line}: {text.strip()}"
        for p in sorted((ROOT / package).rglob("*.py"))
        for name, line, _top, text in _imports(p)
        if name == "bridge" or name.startswith("bridge.")
    ]
    assert bad == []


def test_bridge_layers_import_only_downstream() -> None:
    bad = []
    for path in sorted((ROOT / "bridge").rglob("*.py")):
        mod = _module(path)
        own = _layer(mod)
        for name, line, _top, text in _imports(path):
            target = _layer(name)
            if not name.startswith("bridge."):
                continue
            if own is None and target is not None:
                bad.append(
                    f"{path.relative_to(ROOT)}:{line}: cross-cutting module imports a layer: {text.strip()}"
                )
            elif own is not None and target is not None and target != own and target not in ALLOWED[own]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {own} -> {target}: {text.strip()}")
    assert bad == []


def test_no_import_cycles() -> None:
    graph = _edges()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    # a package's __init__ re-exporting its submodules is not a cycle between modules
    real = [c for c in cycles if not any(b.startswith(a + ".") for a, b in itertools.pairwise(c))]
    assert real == []


def test_imports_sit_at_the_top_outside_the_cli() -> None:
    bad = sorted(
        {
            f"{p.relative_to(ROOT)}:{line}: {text.strip()}"
            for p in _project_files()
            if not str(p.relative_to(ROOT)).startswith("bridge/cli/")
            for _name, line, top, text in _imports(p)
            if not top and "#" not in text
        }
    )
    assert bad == []


def test_the_rules_catch_a_reverse_edge(tmp_path: Path) -> None:
    """The checks above must be able to fail: a stores module importing the service is found."""
    probe = tmp_path / "probe.py"
    probe.write_text("from bridge.service.app import create_app\n\ndef f():\n    import bridge.cli\n")
    found = _imports(probe)
    assert ("bridge.service.app", 1, True, "from bridge.service.app import create_app") in found
    assert any(name == "bridge.cli" and not top for name, _l, top, _t in found)
    assert "service" not in ALLOWED["stores"] and _layer("bridge.service.app") == "service"


def test_every_exception_derives_from_its_package_root() -> None:
    """No exception class outside the three roots derives from a built-in exception directly."""
    import builtins

    builtin_errors = {
        n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)
    }
    roots = {"FhirbridgeError", "AdapterError", "LedgerError"}
    bad = []
    for path in _project_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name not in roots:
                direct = [b.id for b in node.bases if isinstance(b, ast.Name) and b.id in builtin_errors]
                if direct:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.name}({', '.join(direct)})")
    assert bad == []
