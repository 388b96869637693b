"""The layout's rules, checked: `core/` holds pure decisions (no I/O, no clock, nothing outside core); packages
import only downwards (LAYERS); no module imports one that imports it back, not even for annotations; the top
level holds only the entry points; no module is over 400 lines."""

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


# Packages, lowest first: a module imports (at run time) only from its own package or one listed before it.
LAYERS = ("core", "host", "spec", "telemetry", "media", "child", "fleet", "models", "web", "")  # "": cli, daemon
TOP_LEVEL = frozenset({"__init__", "__main__", "cli", "daemon"})
MAX_LINES = 400
# Over the limit for now, with the reason; each entry is a debt with an owner, not a licence. None today.
OVER_LIMIT: dict[str, str] = {}


def _runtime_imports(path: Path, root: Path = PKG.parent, *, annotations: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module) for every import that runs at import time: `if TYPE_CHECKING:` blocks are
    annotations only and do not count, unless `annotations`."""
    tree = ast.parse(path.read_text(), str(path))
    pkg_parts = list(path.relative_to(root).with_suffix("").parts)[:-1]
    out: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test) and not annotations:
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
        for _, mod in _runtime_imports(path, annotations=True):
            # `from ..host import gpu` names the module supervisor.host.gpu; fall back to the package.
            while mod and mod not in modules:
                mod = mod.rsplit(".", 1)[0] if "." in mod else ""
            if mod and mod != name and mod.startswith("supervisor"):
                deps.add(mod)
        graph[name] = deps
    # Packages' __init__ files are empty; a cycle is a path from a module back to itself. Annotation-only
    # imports count: a cycle through them is still two modules that cannot be read one without the other.
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


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in LAYERS else ""


def test_packages_import_only_downwards() -> None:
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = _module_name(path)
        rank = LAYERS.index(_layer(me))
        for line, mod in _runtime_imports(path):
            if mod.startswith("supervisor.__"):  # the package's own attributes (__version__)
                continue
            if mod.startswith("supervisor.") and LAYERS.index(_layer(mod)) > rank:
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {_layer(me) or 'top'} imports {mod}")
    assert not bad, f"packages import only downwards ({' < '.join(x or 'top' for x in LAYERS)}):\n" + "\n".join(bad)


def test_layering_check_catches_an_upward_import(tmp_path: Path) -> None:
    probe = tmp_path / "supervisor" / "models" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..web.api import proxy\nfrom ..child import runner\n")
    ranks = [LAYERS.index(_layer(m)) for _, m in _runtime_imports(probe, tmp_path)]
    assert ranks == [LAYERS.index("web"), LAYERS.index("child")] and ranks[0] > LAYERS.index("models") > ranks[1]


def test_top_level_holds_only_entry_points() -> None:
    extra = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in TOP_LEVEL)
    assert not extra, f"supervisor/ keeps only {sorted(TOP_LEVEL)}; move these into a subpackage: {extra}"


def test_modules_stay_small() -> None:
    big = {rel: n for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES and (rel := str(p.relative_to(PKG.parent))) not in OVER_LIMIT}
    assert not big, f"modules over {MAX_LINES} lines: {big}"
