#!/usr/bin/env python
"""The floor plan, checked: import cycles among ``soco_det`` modules and imports against the layer order.

Every ``import`` and ``from ... import`` in ``soco_det/`` is read with :mod:`ast`, at module level and
inside functions alike (a function-level import that only hides a cycle is still a cycle). An import of
``a.b.c`` is an edge to the module ``a.b.c``; ``from a.b import c`` is an edge to ``a.b.c`` when that is a
module, else to ``a.b`` (the package's ``__init__``). Imports under ``if TYPE_CHECKING:`` are skipped: they
never run.

The layer order is read from the "Dependency direction" section of ``docs/architecture.md`` (one line per
layer: ``N. name: pattern pattern ...``, patterns are module names with ``*`` wildcards), so the document
and the check cannot drift apart. A module may import its own layer and the layers listed before it.

    python tools/check_imports.py            # prints the cycles and violations; exit 1 if there are any
    python tools/check_imports.py --graph    # also prints which layer imports which

``make test`` runs it.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "soco_det"
DOC = ROOT / "docs" / "architecture.md"
LAYER_LINE = re.compile(r"^\s*(\d+)\.\s+`?([\w-]+)`?\s*:\s*(.+?)\s*$")


def module_names(package_dir: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file of the package."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if not all(part.isidentifier() for part in parts):  # e.g. a shipped mmdet config file, not a module
            continue
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Import nodes of ``tree``, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve_relative(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``{module: {imported soco_det modules}}``, function-level imports included."""
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve_relative(name, path.name == "__init__.py", node) if node.level else node.module
                if base is None:
                    continue
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` where only a.b exists, etc.
                    target = target.rpartition(".")[0]
                if target.split(".")[0] == PACKAGE and target != name:
                    edges[name].add(target)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return sorted(out)


def read_layers(doc: Path) -> list[tuple[str, list[str]]]:
    """``[(layer name, [module patterns])]`` from the doc's "Dependency direction" section, in order."""
    text = doc.read_text(encoding="utf-8")
    match = re.search(r"^## Dependency direction\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    if match is None:
        raise SystemExit(f"{doc}: no '## Dependency direction' section")
    layers = []
    for line in match.group(1).splitlines():
        m = LAYER_LINE.match(line)
        if m:
            patterns = [p.strip("`,") for p in m.group(3).split() if p.strip("`,")]
            layers.append((m.group(2), patterns))
    if not layers:
        raise SystemExit(f"{doc}: the 'Dependency direction' section lists no layers ('1. name: patterns')")
    return layers


def layer_of(module: str, layers: list[tuple[str, list[str]]]) -> int | None:
    """Index of the layer whose most specific pattern matches ``module`` (longest pattern wins)."""
    best, best_len = None, -1
    for i, (_, patterns) in enumerate(layers):
        for pattern in patterns:
            if (fnmatch.fnmatchcase(module, pattern) or module == pattern.removesuffix(".*")) and len(
                pattern
            ) > best_len:
                best, best_len = i, len(pattern)
    return best


def check(modules: dict[str, Path], edges: dict[str, set[str]], layers) -> tuple[list, list, list]:
    """(cycles, upward imports as ``(module, target, layer, target layer)``, modules in no layer)."""
    unplaced = sorted(m for m in modules if layer_of(m, layers) is None)
    upward = []
    for module, targets in sorted(edges.items()):
        mine = layer_of(module, layers)
        for target in sorted(targets):
            theirs = layer_of(target, layers)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append((module, target, layers[mine][0], layers[theirs][0]))
    return cycles(edges), upward, unplaced


def layer_graph(edges: dict[str, set[str]], layers) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for module, targets in edges.items():
        a = layer_of(module, layers)
        for target in targets:
            b = layer_of(target, layers)
            if a is not None and b is not None and a != b:
                out[layers[a][0]].add(layers[b][0])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", action="store_true", help="print which layer imports which")
    args = parser.parse_args(argv)
    modules = module_names(ROOT / PACKAGE)
    edges = import_edges(modules)
    layers = read_layers(DOC)
    found_cycles, upward, unplaced = check(modules, edges, layers)
    n_edges = sum(len(t) for t in edges.values())
    print(f"{len(modules)} modules, {n_edges} internal imports, {len(layers)} layers ({DOC.relative_to(ROOT)})")
    for component in found_cycles:
        print("cycle: " + " <-> ".join(component))
    for module, target, mine, theirs in upward:
        print(f"upward: {module} ({mine}) imports {target} ({theirs})")
    for module in unplaced:
        print(f"unplaced: {module} matches no layer of {DOC.name}")
    if args.graph:
        graph = layer_graph(edges, layers)
        for name, _ in layers:
            print(f"  {name} -> {', '.join(sorted(graph.get(name, ()), key=[n for n, _ in layers].index)) or '-'}")
    print(f"{len(found_cycles)} cycles, {len(upward)} upward imports, {len(unplaced)} unplaced modules")
    return 1 if found_cycles or upward or unplaced else 0


if __name__ == "__main__":
    sys.exit(main())
