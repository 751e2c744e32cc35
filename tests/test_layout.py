"""The code's shape: the import graph between packages, and module sizes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 450
# What the pure network may import: PyTorch, the standard library's pure parts and itself.
NETWORK_ALLOWED = {"torch", "math", "dataclasses", "typing", "collections", "__future__"}
NETWORK_ALLOWED_ENGINE = ("engine.network",)


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def test_engine_never_imports_export_or_handler():
    offenders = {
        str(path.relative_to(REPO)): sorted(
            n for n in imports(path) if n.split(".")[0] in ("export", "handler")
        )
        for path in modules("engine")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_network_is_pure_pytorch():
    for path in modules("engine/network"):
        for name in imports(path):
            top = name.split(".")[0]
            allowed = top in NETWORK_ALLOWED or name.startswith(NETWORK_ALLOWED_ENGINE)
            assert allowed, f"{path.relative_to(REPO)} imports {name}"
        source = path.read_text()
        for word in ("open(", "threading", "os.environ", "logging"):
            assert word not in source, f"{path.relative_to(REPO)} uses {word}"


def test_splats_do_not_depend_on_the_runtime_or_the_worker():
    for path in modules("engine/splats"):
        bad = [n for n in imports(path) if n.startswith(("engine.runtime", "handler", "export"))]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


@pytest.mark.parametrize("package", ["engine", "handler"])
def test_no_module_is_too_long(package):
    long = {
        str(path.relative_to(REPO)): n
        for path in modules(package)
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"over {MAX_LINES} lines: {long}"
