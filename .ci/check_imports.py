#!/usr/bin/env python3
"""No import cycles among adm_fast's modules: walk every module's imports (at
module level and inside functions alike: a function-local import that closes a
cycle is still a cycle, only a hidden one), and fail naming each cycle.

    python .ci/check_imports.py          # exit 1 and the cycles, or a one-line OK

The package is read as source (nothing is imported); a file's path is its
import path. `from pkg import name` is an edge to
pkg.name when that is a module, else to pkg.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"adm_fast": ROOT / "adm_fast"}


def modules() -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    for prefix, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix] + parts)] = path
    return found


def _resolve(module: str, is_package: bool, level: int, target: str) -> str:
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def edges(mods: Dict[str, Path]) -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (_resolve(mod, is_pkg, node.level, node.module or "") if node.level
                        else node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for t in targets:
                while t and t not in mods:  # import a.b.c of a module a.b
                    t = t.rpartition(".")[0]
                if t and t != mod:
                    graph[mod].add(t)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    mods = modules()
    graph = edges(mods)
    found = cycles(graph)
    if not found:
        print(f"no import cycles among {len(mods)} modules")
        return 0
    for comp in found:
        inner = {m: sorted(graph[m] & set(comp)) for m in comp}
        print("import cycle among: " + ", ".join(comp))
        for m, ts in inner.items():
            print(f"  {m} -> {', '.join(ts)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
