#!/usr/bin/env python3
"""adm_fast's import graph: no cycles, and each layer imports only what sits
below it (LAYERS). Every import counts, at module level or inside a function
(a function-local import that closes a cycle or reaches up a layer is still
one, only a hidden one), and so does importlib.import_module of a literal name
(or an f-string whose literal start names a module).

    python .ci/check_imports.py   # exit 1 naming each cycle and each broken rule, else OK

The package is read as source (nothing is imported); a file's path is its
import path. `from pkg import name` is an edge to pkg.name when that is a
module, else to pkg.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"adm_fast": ROOT / "adm_fast"}


class Layer(NamedTuple):
    """Modules under `module` import only under `only` (when given) and
    nothing under `never`."""
    module: str
    reason: str
    only: tuple[str, ...] = ()
    never: tuple[str, ...] = ()


LAYERS = (
    Layer("adm_fast.io", only=("adm_fast.io",),
          reason="the I/O layer is used by every layer, the op layer included: it depends on "
                 "none of them"),
    Layer("adm_fast.kernels", only=("adm_fast.kernels",),
          reason="kernels are tensors in, tensors out; the op layer above chooses, checks and "
                 "wraps them, so a kernel never reaches up into ops or anything above"),
    Layer("adm_fast.ops", only=("adm_fast.ops", "adm_fast.kernels", "adm_fast.io"),
          reason="the op layer is tensors only: models, diffusion, sampling, training, "
                 "evaluation, checkpoints and the commands build on it, not it on them"),
    Layer("adm_fast.models", never=("adm_fast.diffusion", "adm_fast.sampling", "adm_fast.train",
                                    "adm_fast.evaluation"),
          reason="a network runs without the diffusion process, sampler or trainer around it "
                 "(guided-diffusion's models load and run on their own)"),
    Layer("adm_fast.sampling", never=("adm_fast.train",),
          reason="sampling runs where nothing trains: what both need (World, image folders) "
                 "lives in shared modules, not in train"),
    Layer("adm_fast.evaluation", never=("adm_fast.train",),
          reason="evaluation scores samples without the trainer: what both need lives in "
                 "shared modules, not in train"),
)


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
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


def _dynamic(node: ast.AST) -> list[str]:
    """importlib.import_module("a.b") or import_module(f"a.b.{x}") (-> a.b)."""
    if not (isinstance(node, ast.Call) and node.args and
            getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"):
        return []
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        name = arg.value
    elif (isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant)
          and isinstance(arg.values[0].value, str)):
        name = arg.values[0].value.rstrip(".")
    else:
        return []
    return [] if name.startswith(".") else [name]


def imports(mods: dict[str, Path]) -> dict[str, list[tuple[str, int]]]:
    """Per module, the package modules it imports, with the line of each import."""
    found: dict[str, list[tuple[str, int]]] = {m: [] for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets: list[str] = _dynamic(node)
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
                    found[mod].append((t, node.lineno))
    return found


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    return {m: {t for t, _ in ts} for m, ts in imports(mods).items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

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


def layer_violations(mods: dict[str, Path]) -> list[str]:
    """One line per import that breaks a rule in LAYERS: where, what, which rule."""
    out = []
    for mod, found in sorted(imports(mods).items()):
        for target, line in sorted(found, key=lambda tl: tl[1]):
            for layer in LAYERS:
                if not _under(mod, layer.module):
                    continue
                if layer.only and not any(_under(target, p) for p in layer.only):
                    rule = f"{layer.module} imports only from {', '.join(layer.only)}"
                elif any(_under(target, p) for p in layer.never):
                    rule = f"{layer.module} imports nothing from {', '.join(layer.never)}"
                else:
                    continue
                where = mods[mod].relative_to(PACKAGES[mod.partition(".")[0]].parent)
                out.append(f"{where}:{line}: {mod} imports {target}: breaks the rule "
                           f"'{rule}' ({layer.reason})")
    return out


def main() -> int:
    mods = modules()
    graph = edges(mods)
    found = cycles(graph)
    for comp in found:
        inner = {m: sorted(graph[m] & set(comp)) for m in comp}
        print("import cycle among: " + ", ".join(comp))
        for m, ts in inner.items():
            print(f"  {m} -> {', '.join(ts)}")
    broken = layer_violations(mods)
    for line in broken:
        print(line)
    if found or broken:
        return 1
    print(f"no import cycles among {len(mods)} modules; the {len(LAYERS)} layer rules hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
