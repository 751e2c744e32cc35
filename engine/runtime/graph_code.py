"""The source code that decides a traced graph, found by following its imports.

A compiled artifact is only valid for the code it was traced from. That code is the network
package and the precision plan's cast blocks, plus every project module they import, directly or
through others: a helper moved out of the network still changes the graph when it changes. The
imports are read from the source with `ast` (nothing is imported), so the digest is the same in
the worker, the build tool and a test, and a new import is covered the moment it is written.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from pathlib import Path

# The modules that define the traced modules: the network (its package imports every part of it)
# and the precision plan's cast blocks. A test checks that every module class in a traced
# network comes from the modules these reach.
GRAPH_ROOTS = ("engine.network", "engine.runtime.precision")
PROJECT_PACKAGE = "engine"
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def module_path(name: str, root: Path) -> Path | None:
    """The source file of project module `name` under `root` (a package's __init__.py)."""
    base = root.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imported_names(path: Path, name: str) -> set[str]:
    """Absolute names of every module `path` imports, and of `from x import y` submodules."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _with_parents(name: str) -> list[str]:
    """`a.b.c` -> a, a.b, a.b.c: importing a module runs its packages' __init__ first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def graph_modules(
    roots: Iterable[str] = GRAPH_ROOTS, source_root: Path = SOURCE_ROOT
) -> dict[str, Path]:
    """Every project module reachable by imports from `roots`: name -> source file."""
    found: dict[str, Path] = {}
    pending = [parent for root in roots for parent in _with_parents(root)]
    while pending:
        name = pending.pop()
        if name in found or name.split(".")[0] != PROJECT_PACKAGE:
            continue
        path = module_path(name, source_root)
        if path is None:  # a name imported from a module, not a module
            continue
        found[name] = path
        for imported in _imported_names(path, name):
            pending.extend(_with_parents(imported))
    return dict(sorted(found.items()))


def graph_code_digest(roots: Iterable[str] = GRAPH_ROOTS, source_root: Path = SOURCE_ROOT) -> str:
    """SHA-256 over the name and source of every module in `graph_modules`."""
    sha = hashlib.sha256()
    for name, path in graph_modules(roots, source_root).items():
        sha.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()[:20]
