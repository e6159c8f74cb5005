"""No import cycle inside `quietstar_jax/`.

The graph is read from the source with `ast` (nothing is imported). An edge A -> B is
any `import` / `from ... import` statement in module A that names a module B of the
package, wherever the statement stands: at module level, inside a function or class,
under `try`. Function-level imports count because they are the usual way a cycle is
hidden, not removed (the module still cannot be understood without the other).
Only imports under `if TYPE_CHECKING:` are skipped: they never run.

`from pkg import name` is an edge to `pkg.name` when that is a module, else to `pkg`
(its `__init__`); that a submodule's import first imports its parent packages is
Python's doing and is not an edge. Relative imports are resolved against the module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "quietstar_jax"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, name: str, is_pkg: bool, mods: dict[str, Path]) -> set[str]:
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in mods:
                    out.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in mods:
                    out.add(full)
                elif base in mods:
                    out.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out.discard(name)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = _modules(root)
    return {name: _imports(ast.parse(path.read_text(), str(path)), name,
                           path.name == "__init__.py", mods)
            for name, path in mods.items()}


def knots(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    sccs: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(sccs)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (a path a -> ... -> a) through the first module of each knot."""
    cycles = []
    for comp in knots(graph):
        members = set(comp)
        start = comp[0]
        # breadth-first search back to `start` inside the component: a shortest cycle
        prev: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        found = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        chain = [found]
        while chain[-1] != start:
            chain.append(prev[chain[-1]])
        path = [*reversed(chain), start]
        cycles.append(path)
    return cycles


def test_graph_sees_the_package() -> None:
    graph = import_graph()
    assert "quietstar_jax.model" in graph and "quietstar_jax.train.loop" in graph
    assert "quietstar_jax.model" in graph["quietstar_jax.thought.parallel"]


def test_the_decoder_knows_nothing_of_thoughts() -> None:
    """model.py is a plain decoder: nothing of `quietstar_jax.thought` (config, rollout,
    replay, loss) is imported by it or by the modules it imports."""
    graph = import_graph()
    seen, todo = set(), ["quietstar_jax.model"]
    while todo:
        mod = todo.pop()
        if mod not in seen:
            seen.add(mod)
            todo.extend(graph[mod])
    assert not [m for m in seen if m.startswith("quietstar_jax.thought")], sorted(seen)


def test_find_cycles_reports_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_and_relative_imports_are_edges(tmp_path: Path) -> None:
    pkg = tmp_path / PACKAGE
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from quietstar_jax import b\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from quietstar_jax import c\n"
                              "from quietstar_jax.sub import x\n")
    (pkg / "sub" / "__init__.py").write_text("from .x import thing\n")
    (pkg / "sub" / "x.py").write_text("from .. import a\n")
    graph = import_graph(pkg)
    assert graph["quietstar_jax.b"] == {"quietstar_jax.sub.x"}
    assert graph["quietstar_jax.sub"] == {"quietstar_jax.sub.x"}
    assert find_cycles(graph) == [["quietstar_jax.a", "quietstar_jax.b",
                                   "quietstar_jax.sub.x", "quietstar_jax.a"]]


def test_no_import_cycle() -> None:
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in quietstar_jax/:\n" + "\n".join(
        " -> ".join(c) + f"   (modules in this knot: {', '.join(k)})"
        for c, k in zip(cycles, knots(graph), strict=True))


def test_every_package_is_shipped() -> None:
    """pyproject.toml's package discovery finds every package under quietstar_jax/."""
    import tomllib

    from setuptools import find_packages

    find = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())[
        "tool"]["setuptools"]["packages"]["find"]
    shipped = set(find_packages(str(ROOT.parent), include=find["include"]))
    found = {".".join(p.parent.relative_to(ROOT.parent).parts) for p in ROOT.rglob("__init__.py")}
    assert found <= shipped
