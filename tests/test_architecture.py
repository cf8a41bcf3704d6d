"""The import graph of the package: no cycle between packages, and the import-linter contracts of
``pyproject.toml`` cover every built-in method (issue #17).

``lint-imports`` (run by ``.ci/run``) checks the layer and forbidden contracts; these tests check
what a contract cannot say: that no two packages import each other through any chain (function-local
imports included, which is how the old ``methods`` <-> ``platform`` cycle hid), and that the list of
concrete method modules the runtime may not import is complete.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import grimp
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("weakbench", cache_dir=None)


def _children(graph, package: str) -> set[str]:
    depth = package.count(".") + 1
    return {m for m in graph.modules if m.startswith(package + ".") and m.count(".") == depth}


def _is_package(graph, module: str) -> bool:
    return any(m.startswith(module + ".") for m in graph.modules)


def cycles_between_children(graph, package: str, packages_only: bool) -> list[tuple[str, str]]:
    """Pairs ``(a, b)`` of ``package``'s children (each squashed with its descendants) where ``a``
    reaches ``b`` and ``b`` reaches ``a`` through direct imports, sorted; with ``packages_only``,
    only children that are packages themselves."""
    kids = _children(graph, package)
    if packages_only:
        kids = {k for k in kids if _is_package(graph, k)}

    def owner(module: str) -> str | None:
        return next((k for k in kids if module == k or module.startswith(k + ".")), None)

    edges: dict[str, set[str]] = {k: set() for k in kids}
    for m in graph.modules:
        a = owner(m)
        if a is None:
            continue
        for imported in graph.find_modules_directly_imported_by(m):
            b = owner(imported)
            if b is not None and b != a:
                edges[a].add(b)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reached = {k: reach(k) for k in kids}
    return sorted({tuple(sorted((a, b))) for a in kids for b in reached[a] if a != b and a in reached[b]})


def test_no_import_cycle_between_the_layers(graph):
    # weakbench's children: core, methods, platform, dashboards, cli, __main__
    assert cycles_between_children(graph, "weakbench", packages_only=False) == []


def test_no_import_cycle_between_subpackages(graph):
    packages = sorted(m for m in graph.modules if _is_package(graph, m))
    assert any(p.count(".") >= 2 for p in packages)  # the walk sees nested packages (core.data, core.metrics)
    found = {p: cycles_between_children(graph, p, packages_only=True) for p in packages}
    assert {p: c for p, c in found.items() if c} == {}


def test_no_import_cycle_inside_the_core(graph):
    # the pure leaves: not even two modules of the core import each other
    packages = sorted(m for m in graph.modules if m == "weakbench.core" or (m.startswith("weakbench.core.") and _is_package(graph, m)))
    found = {p: cycles_between_children(graph, p, packages_only=False) for p in packages}
    assert {p: c for p, c in found.items() if c} == {}


def _contract(contract_id: str) -> dict:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return next(c for c in config["tool"]["importlinter"]["contracts"] if c["id"] == contract_id)


def test_runtime_contract_forbids_every_concrete_method_module(graph):
    """Every module of ``weakbench.methods`` is either the contract (the registry and the modules it
    hands to the runtime) or listed as forbidden to the runtime, so a new method module cannot be
    imported by the engine without the contract saying so."""
    contract = {"weakbench.methods", "weakbench.methods.base", "weakbench.methods.pipeline", "weakbench.methods.instance",
                "weakbench.methods.classifier", "weakbench.methods.evaluate", "weakbench.methods.metric_specs",
                "weakbench.methods.metric_declarations"}
    forbidden = set(_contract("methods-through-registry")["forbidden_modules"])
    methods = {m for m in graph.modules if m == "weakbench.methods" or m.startswith("weakbench.methods.")}
    assert methods - contract == forbidden
    # the contract itself names no concrete method, built-ins included
    builtins = {value.split(":")[0] for value in
                tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["weakbench.methods"].values()}
    assert builtins <= set(_contract("contract-names-no-method")["forbidden_modules"])


def test_every_builtin_method_is_an_entry_point():
    from weakbench.methods import base

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["weakbench.methods"]
    # other tests register toy methods at import (tests/test_pipeline.py): every method that lives
    # in the package must be declared, and every declared one must be registered
    assert set(declared) <= set(base.list_methods())
    in_package = {n for n in base.list_methods() if base.get_method_class(n).__module__.startswith("weakbench.")}
    assert in_package == set(declared)
    for name, value in declared.items():
        module, _, attr = value.partition(":")
        cls = base.get_method_class(name)
        assert (cls.__module__, cls.__name__, cls.name) == (module, attr, name)


def module_cycles(graph, prefix: str) -> list[list[str]]:
    """The groups of modules under ``prefix`` that import each other through some chain of direct
    imports (function-local ones included): strongly connected components of more than one module,
    each sorted (Tarjan's algorithm, iterative)."""
    mods = sorted(m for m in graph.modules if m == prefix or m.startswith(prefix + "."))
    edges = {m: sorted(i for i in graph.find_modules_directly_imported_by(m) if i in mods and i != m) for m in mods}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    for root in mods:
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(edges[nxt])))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    group.append(m)
                    if m == node:
                        break
                if len(group) > 1:
                    found.append(sorted(group))
    return sorted(found)


def test_module_cycles_finds_a_cycle():
    import types

    edges = {"p.a": ["p.b"], "p.b": ["p.c"], "p.c": ["p.a"], "p.d": ["p.a"]}
    fake = types.SimpleNamespace(modules=set(edges), find_modules_directly_imported_by=lambda m: set(edges[m]))
    assert module_cycles(fake, "p") == [["p.a", "p.b", "p.c"]]


@pytest.mark.parametrize("package", ["weakbench.core", "weakbench.methods", "weakbench.dashboards"])
def test_no_import_cycle_between_modules(graph, package):
    # not even two modules import each other, through function-local imports either
    assert module_cycles(graph, package) == []
