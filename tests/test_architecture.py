"""The layout's rules, checked: `core/` holds pure decisions (no I/O, no clock, nothing outside core), and
no module imports one that imports it back."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "supervisor"
# What a pure decision may use: data types, maths and text. No I/O, processes, network, clock or randomness.
CORE_STDLIB_ALLOWED = frozenset({
    "__future__", "collections", "dataclasses", "enum", "functools", "hashlib", "itertools", "math", "operator",
    "re", "signal", "typing", "bisect", "heapq", "fnmatch",
})


def _runtime_imports(path: Path, root: Path = PKG.parent) -> list[tuple[int, str]]:
    """(line, absolute module) for every import that runs at import time: `if TYPE_CHECKING:` blocks are
    annotations only and do not count."""
    tree = ast.parse(path.read_text(), str(path))
    pkg_parts = list(path.relative_to(root).with_suffix("").parts)[:-1]
    out: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                out.extend((child.lineno, a.name) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = pkg_parts[: len(pkg_parts) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                    if child.module is None:  # from . import a, b
                        out.extend((child.lineno, f"{mod}.{a.name}") for a in child.names)
                        continue
                else:
                    mod = child.module or ""
                out.append((child.lineno, mod))
            visit(child)

    visit(tree)
    return out


def test_core_is_pure() -> None:
    bad = []
    for path in sorted((PKG / "core").glob("*.py")):
        for line, mod in _runtime_imports(path):
            top = mod.split(".")[0]
            if top == "supervisor":
                ok = mod.startswith("supervisor.core")
            else:
                ok = top in CORE_STDLIB_ALLOWED
            if not ok:
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: imports {mod}")
    assert not bad, "core/ must stay pure (no I/O, no clock, nothing outside core):\n" + "\n".join(bad)


def test_core_purity_check_catches_a_violation(tmp_path: Path) -> None:
    # The checker itself must see a forbidden import and a relative escape, and skip TYPE_CHECKING blocks.
    probe = tmp_path / "supervisor" / "core" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("import asyncio\nfrom ..host import gpu\nfrom typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from ..profile import Profile\n")
    mods = [m for _, m in _runtime_imports(probe, tmp_path)]
    assert mods == ["asyncio", "supervisor.host", "typing"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def test_no_import_cycles() -> None:
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for _, mod in _runtime_imports(path):
            # `from ..host import gpu` names the module supervisor.host.gpu; fall back to the package.
            while mod and mod not in modules:
                mod = mod.rsplit(".", 1)[0] if "." in mod else ""
            if mod and mod != name and mod.startswith("supervisor"):
                deps.add(mod)
        graph[name] = deps
    # Packages' __init__ files are empty; a cycle is a path from a module back to itself.
    sys.setrecursionlimit(10_000)
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := dfs(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            raise AssertionError("import cycle: " + " → ".join(cycle))
