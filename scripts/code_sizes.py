"""Module sizes, sizes per package and the longest functions of a package, as Markdown tables.

Usage: ``python scripts/code_sizes.py [PACKAGE_DIR] [--top N]`` (default ``weakbench``, 15).
Reads source with :mod:`ast` only (nothing is imported). A module's size is its line count
(``wc -l``); a function's length is ``end_lineno - lineno + 1`` of its ``def`` (decorators
excluded, nested functions counted inside their parent and listed on their own too). Used for the
before/after tables of the architecture note (issue #17).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def module_sizes(root: Path) -> list[tuple[str, int]]:
    """``(module path relative to root's parent, lines)`` for every ``*.py`` under ``root``, sorted by path."""
    rows = []
    for f in sorted(root.rglob("*.py")):
        rows.append((str(f.relative_to(root.parent)), len(f.read_text().splitlines())))
    return rows


def longest_functions(root: Path, top: int) -> list[tuple[str, int]]:
    """The ``top`` longest ``def``s under ``root`` as ``("path:Qual.name", lines)``, longest first."""
    rows: list[tuple[str, int]] = []
    for f in sorted(root.rglob("*.py")):
        rel = str(f.relative_to(root.parent))

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    rows.append((f"{rel}:{name}", child.end_lineno - child.lineno + 1))
                    visit(child, name + ".")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")

        visit(ast.parse(f.read_text()), "")
    rows.sort(key=lambda r: (-r[1], r[0]))
    return rows[:top]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="weakbench")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    root = Path(args.root)
    sizes = module_sizes(root)
    print(f"| module | lines |\n| --- | ---: |")
    for path, n in sizes:
        print(f"| `{path}` | {n} |")
    print(f"| total ({len(sizes)} files) | {sum(n for _, n in sizes)} |\n")
    layers: dict[str, list[int]] = {}
    for path, n in sizes:  # weakbench/<layer>/... or weakbench/<module>.py
        parts = Path(path).parts
        layers.setdefault(parts[1] if len(parts) > 2 else parts[1].removesuffix(".py"), []).append(n)
    print("| package or top-level module | files | lines |\n| --- | ---: | ---: |")
    for name, ns in sorted(layers.items(), key=lambda kv: -sum(kv[1])):
        print(f"| `{name}` | {len(ns)} | {sum(ns)} |")
    print()
    print(f"| function | lines |\n| --- | ---: |")
    for name, n in longest_functions(root, args.top):
        print(f"| `{name}` | {n} |")


if __name__ == "__main__":
    main()
