#!/usr/bin/env python
"""Small functions, checked: no function or method in ``soco_det/`` longer than ``--max`` lines (80).

A function's length is counted with :mod:`ast` from its ``def`` line to its last line (docstring and
comments included, decorators not); nested functions count on their own and inside their parent.
Numba kernels (decorated with ``njit`` / ``jit``, e.g. ``@numba.njit(cache=True)``) are left out: a
kernel is one loop nest that numba compiles as a whole, and splitting it costs speed.

    python tools/check_function_length.py          # lists the long functions; exit 1 if there are any
    python tools/check_function_length.py --max 60 --top 10

``make test`` runs it.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 80
KERNEL_DECORATORS = ("njit", "jit")


def _is_kernel(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    for deco in node.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name in KERNEL_DECORATORS:
            return True
    return False


def function_lengths(package: Path) -> list[tuple[int, str, str]]:
    """``(lines, "path:line", qualified name)`` of every function of ``package`` but the numba kernels."""
    found: list[tuple[int, str, str]] = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    if not _is_kernel(child):
                        where = f"{path.relative_to(package.parent)}:{child.lineno}"
                        found.append((child.end_lineno - child.lineno + 1, where, name))
                    visit(child, f"{name}.")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")
                else:
                    visit(child, prefix)

        visit(tree, "")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max", type=int, default=MAX_LINES, help="longest allowed function, in lines")
    parser.add_argument("--top", type=int, default=0, help="also print the N longest functions")
    parser.add_argument("--package", type=Path, default=ROOT / "soco_det")
    args = parser.parse_args(argv)
    lengths = sorted(function_lengths(args.package), reverse=True)
    long = [item for item in lengths if item[0] > args.max]
    for lines, where, name in long:
        print(f"{where}: {name} is {lines} lines (max {args.max})")
    for lines, where, name in lengths[: args.top]:
        print(f"  {lines:4d}  {where}  {name}")
    print(f"{len(lengths)} functions, {len(long)} longer than {args.max} lines (numba kernels not counted)")
    return 1 if long else 0


if __name__ == "__main__":
    sys.exit(main())
