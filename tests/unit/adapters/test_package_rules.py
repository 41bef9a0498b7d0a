"""Rules of the adapters package as a whole: one error root, and no import of ``bridge``."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import adapters
from adapters.errors import AdapterError

PACKAGE = Path(adapters.__file__).parent


def _modules() -> list[str]:
    return [m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="adapters.")]


def test_every_exception_class_of_the_package_derives_from_adapter_error() -> None:
    strays = []
    for name in _modules():
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == name
                and not issubclass(obj, AdapterError)
            ):
                strays.append(f"{name}.{obj.__qualname__}")
    assert strays == []


def test_the_package_imports_nothing_from_bridge() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            offenders += [
                f"{path.relative_to(PACKAGE)}: {n}" for n in names if n == "bridge" or n.startswith("bridge.")
            ]
    assert offenders == []
