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


PACKAGES = ("engine", "handler", "export", "benchmarks")
# The layers, lowest first: a unit imports only from units of lower layers (and itself). The
# entry points at the top never import one another.
LAYERS = (
    {"engine.network"},
    {"engine.splats", "engine.settings"},
    {"engine.io", "engine.viewer"},
    {"engine.runtime"},
    {"engine.results"},
    {"engine.cli", "handler", "export", "benchmarks"},
)


def imports(path: Path, *, submodules: bool = False) -> set[str]:
    """Absolute names imported by `path`; with `submodules`, `from a import b` adds a.b too."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if submodules:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_graph() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports."""
    paths = {}
    for package in PACKAGES:
        for path in modules(package):
            parts = path.relative_to(REPO).with_suffix("").parts
            paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return {
        name: {n for n in imports(path, submodules=True) if n in paths and n != name}
        for name, path in paths.items()
    }


def unit(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "engine" and len(parts) > 1 else parts[0]


def layer(module: str) -> int:
    (index,) = (i for i, units in enumerate(LAYERS) if unit(module) in units)
    return index


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


def back_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if unit(target) != unit(module) and layer(target) >= layer(module)
    )


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, str] = {}  # "open" while on the path, then "done"
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_imports_only_go_down_the_layers():
    assert back_edges(module_graph()) == []


def test_the_import_graph_has_no_cycle():
    assert find_cycles(module_graph()) == []


def test_the_graph_checks_can_fail():
    graph = {
        "engine.settings": {"engine.runtime.precision"},  # a back-edge
        "handler.worker": {"export.build_engine"},  # between entry points
        "engine.io.a": {"engine.io.b"},
        "engine.io.b": {"engine.io.a"},  # a cycle
    }
    assert back_edges(graph) == [
        "engine.settings -> engine.runtime.precision",
        "handler.worker -> export.build_engine",
    ]
    assert find_cycles(graph) == [["engine.io.a", "engine.io.b", "engine.io.a"]]
    assert "engine.network.sharp" in module_graph()["engine.network"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_module_is_too_long(package):
    long = {
        str(path.relative_to(REPO)): n
        for path in modules(package)
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"over {MAX_LINES} lines: {long}"
