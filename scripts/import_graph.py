"""The project's import graph by layer, checked: no import from a lower layer to a higher one, no cycles, and no
project import hidden inside a function (those exist only to dodge a cycle).

    python scripts/import_graph.py            # prints the layer-to-layer edges; exit 1 on a violation
    python scripts/import_graph.py --folders  # the same, as arrows between the top-level folders

Layers (a module may import its own layer's package or lower layers only):
  0 core       varbench.{errors,io,weights,tokens,entropy,attention*,hooks,records,flops,loop,profiling},
               varbench.backbones (table) and varbench.backbones.base (the protocol)
  1 backbones  varbench.backbones.<family>.*
  2 plug-ins   nova.* (NOVA), baselines.* (other methods), eval.* (scorers, results store, tables)
  3 harness    varbench.harness.* (registry, runner, run dirs, fixture checks, CLI)
  4 entry      run.py, scripts/*
Plug-in packages do not import each other (a method never imports a scorer, and so on). At the level of top folders,
``varbench/`` (core, backbones and harness) imports no plug-in folder: the harness finds plug-ins through entry points
(varbench/harness/registry.py), so the core never calls up into ``nova/``, ``baselines/`` or ``eval/``.
"""
from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("varbench", "nova", "baselines", "eval")
PLUGIN_FOLDERS = ("nova/", "baselines/", "eval/")
LAYER_NAMES = {0: "core", 1: "backbones", 2: "plug-ins", 3: "harness", 4: "entry"}


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(mod: str) -> tuple[int, str]:
    """(layer, unit): the unit is the package that may import itself freely."""
    p = mod.split(".")
    if p[0] == "varbench":
        if len(p) > 1 and p[1] == "harness":
            return 3, "varbench.harness"
        if len(p) > 2 and p[1] == "backbones" and p[2] != "base":
            return 1, f"varbench.backbones.{p[2]}"
        return 0, "varbench(core)"
    if p[0] in ("nova", "baselines", "eval"):
        return 2, p[0]
    return 4, mod


def project_imports(path: Path):
    """(imported module, line, inside a function?) for every import of a project package in ``path``."""
    tree = ast.parse(path.read_text())
    funcs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                funcs.add(id(sub))
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args and \
                isinstance(node.args[0], ast.Constant) and str(node.args[0].value).split(".")[0] in PACKAGES:
            yield str(node.args[0].value), node.lineno, True
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module + "." + a.name for a in node.names]
            names = [node.module] if not names else names
        for n in names:
            if n.split(".")[0] in PACKAGES:
                yield n, node.lineno, id(node) in funcs


def resolve(name: str, known: set[str]) -> str:
    """The longest known module prefix of ``name`` (``from a.b import c`` may name a function c)."""
    parts = name.split(".")
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in known:
            return ".".join(parts[:k])
    return parts[0]


def folder(mod: str) -> str:
    """The top-level folder of a module (``scripts/``, ``run.py``, a package)."""
    top = mod.split(".")[0]
    return "run.py" if top == "run" else f"{top}/"


def imports():
    """(file, source module, imported module, line, inside a function?) for every project import, once per line."""
    files = [f for pkg in PACKAGES for f in (REPO / pkg).rglob("*.py")] + [REPO / "run.py"] + \
        sorted((REPO / "scripts").glob("*.py"))
    known = {module_name(f) for f in files}
    for f in files:
        seen = set()
        for name, line, in_func in project_imports(f):
            dst = resolve(name, known)
            if (dst, line) not in seen:
                seen.add((dst, line))
                yield f, module_name(f), dst, line, in_func


def folder_edges() -> dict[tuple[str, str], int]:
    """(source folder, imported folder) -> count of import statements, between different top-level folders."""
    out = defaultdict(int)
    for _, src, dst, _, _ in imports():
        if folder(src) != folder(dst):
            out[(folder(src), folder(dst))] += 1
    return dict(out)


def analyse():
    edges, problems = defaultdict(int), []
    graph = defaultdict(set)
    for f, src, dst, line, in_func in imports():
        (ls, us), (ld, ud) = layer(src), layer(dst)
        where = f"{f.relative_to(REPO)}:{line}"
        if folder(src) == "varbench/" and folder(dst) in PLUGIN_FOLDERS:
            problems.append(f"{where}: {src} imports {dst}: varbench/ calls up into a plug-in folder "
                            f"(find plug-ins through the registry's entry points)")
        if in_func and ls < 4:
            problems.append(f"{where}: import of {dst} inside a function")
        if ud == us:
            graph[src].add(dst)
            continue
        edges[(ls, us, ld, ud)] += 1
        graph[src].add(dst)
        if ld > ls:
            problems.append(f"{where}: {src} (layer {ls}) imports {dst} (layer {ld}): upward")
        elif ld == ls and ls < 4:
            problems.append(f"{where}: {src} imports {dst}: two packages of the same layer")
    problems += [f"cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return edges, problems


def cycles(graph) -> list[list[str]]:
    out, state = [], {}

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                out.append(stack[stack.index(m):] + [m] if m in stack else [n, m])
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n, [n])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="the project's import graph, checked")
    ap.add_argument("--folders", action="store_true", help="print arrows between top-level folders")
    a = ap.parse_args(argv)
    edges, problems = analyse()
    if a.folders:
        print("imports between top-level folders (count of import statements):")
        for (src, dst), n in sorted(folder_edges().items()):
            print(f"  {src:<12} -> {dst:<12} {n:3d}")
    else:
        print("imports between units, by layer (count of import statements):")
        for (ls, us, ld, ud), n in sorted(edges.items()):
            print(f"  {LAYER_NAMES[ls]:>9} {us:<26} -> {LAYER_NAMES[ld]:<9} {ud:<26} {n:3d}")
    up = sum(n for (ls, _, ld, _), n in edges.items() if ld > ls)
    print(f"upward edges: {up}; problems: {len(problems)}")
    for p in problems:
        print("  " + p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
