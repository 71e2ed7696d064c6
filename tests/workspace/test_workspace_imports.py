"""The import graph of ``packages/*/src``: no cycle, no private import across
distributions (issue 14).

Every import counts: module level, inside functions and under
``TYPE_CHECKING`` alike, because an in-function import only hides a cycle
from the interpreter, not from the design. An edge goes to the most specific
module the statement names (``from a.b import c`` is an edge to ``a.b.c``
when that is a module, else to ``a.b``); a package's ``__init__`` importing
its own submodules (re-exports) is the one kind of edge not followed back up.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC_ROOTS = sorted(p / "src" for p in (ROOT / "packages").iterdir() if (p / "src").is_dir())


def _modules() -> dict[str, tuple[Path, str]]:
    """module name -> (file, the distribution folder that ships it)."""
    out: dict[str, tuple[Path, str]] = {}
    for src in SRC_ROOTS:
        for f in src.rglob("*.py"):
            if "_hubble_pb" in f.parts:  # generated at bootstrap (scripts/hubble-build), not in git
                continue
            parts = list(f.relative_to(src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = (f, src.parent.name)
    return out


def _imported(f: Path, module: str, is_pkg: bool, known: set[str]) -> set[str]:
    """Modules of ours that ``f`` imports anywhere in its body."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text(), str(f))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".") if is_pkg else module.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.add(full if full in known else base)
    out = set()
    for name in names:
        while name and name not in known:  # `import a.b.c` of a function/attr
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, tuple[Path, str]]]:
    mods = _modules()
    known = set(mods)
    graph = {}
    for name, (f, _) in mods.items():
        graph[name] = _imported(f, name, f.name == "__init__.py", known)
    return graph, mods


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_edges_ok(a: str, b: str) -> bool:
    """A package ``__init__`` re-exporting its own submodule."""
    return b.startswith(a + ".")


def test_import_graph_has_no_cycle() -> None:
    graph, _ = _graph()
    # a package's __init__ importing its own submodules is how a public API
    # is re-exported (STYLE.md); a submodule importing its package back would
    # close a loop through it, so only that direction is dropped
    pruned = {a: {b for b in bs if not _package_edges_ok(a, b)} for a, bs in graph.items()}
    cycles = _cycles(pruned)
    assert not cycles, "import cycles in packages/*/src:\n" + "\n".join(
        " <-> ".join(c) for c in cycles)


def test_no_private_import_across_distributions() -> None:
    graph, mods = _graph()
    bad = []
    for name, targets in graph.items():
        dist = mods[name][1]
        for t in targets:
            if mods[t][1] != dist and any(p.startswith("_") for p in t.split(".")):
                bad.append(f"{name} ({dist}) imports private {t} ({mods[t][1]})")
    assert not bad, "\n".join(sorted(bad))


def test_cycle_finder_finds_a_cycle() -> None:
    # the checker itself can fail
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
