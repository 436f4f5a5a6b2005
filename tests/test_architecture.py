"""Structural rules: protocol state machines stay pure (no I/O imports), modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "emailproxy"
IO_MODULES = {
    "asyncio", "socket", "ssl", "http", "urllib", "requests", "selectors", "threading", "subprocess"
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_protocol_modules_do_no_io() -> None:
    modules = sorted((PACKAGE / "protocols").glob("*.py"))
    assert len(modules) >= 5
    for path in modules:
        forbidden = _imports(path) & IO_MODULES
        assert not forbidden, f"{path.name} imports {sorted(forbidden)}: protocol modules must stay sans-IO"


def test_modules_stay_small() -> None:
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        assert lines <= 700, f"{path.relative_to(PACKAGE)} has {lines} lines: split it by concept"
