"""Tests that cannot fail do not come back: an AST scan of every test module.

- every ``test_*`` function asserts: an ``assert``, ``pytest.raises``/``fail``/``warns``,
  or a call of a helper (in the module or a sibling module) that does;
- ``is not None`` is not a test's only check;
- a hypothesis test discards inputs with ``assume``, never ``if ...: return``;
- no ``except Exception: pass`` (bare, Exception, BaseException) nor
  ``contextlib.suppress(Exception)``: catch the errors you expect;
- a netns is made only by tests/_testnet.py (its own resolv.conf) and a fixture's
  HTTP server is never ``-m http.server`` (it looks its address up before listening).

ALLOW lists the exceptions, each with its reason.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKS = {"raises", "fail", "warns", "deprecated_call"}

# (path, rule, function or "") -> why it is fine
ALLOW: dict[tuple[str, str, str], str] = {
    ("tests/integration/test_integration_testnet.py", "http-server-module",
     "test_fixture_http_server_accepts_where_http_server_module_waits"):
        "shows -m http.server not accepting behind a dead resolver (the reason for the rule)",
    ("packages/agent/tests/test_agent_units.py", "http-server-module",
     "test_pod_command_is_everything_after_double_dash"):
        "parses a pod command line; nothing is started",
}


def _test_files() -> list[Path]:
    files = [*ROOT.glob("tests/**/*.py"), *ROOT.glob("packages/*/tests/**/*.py")]
    return sorted(f for f in files if not any(p in f.parts for p in ("corpus", "crashers")))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _call_name(call: ast.Call) -> str:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def _calls(node: ast.AST) -> set[str]:
    return {_call_name(n) for n in ast.walk(node) if isinstance(n, ast.Call)}


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield n


def _asserting(trees: list[ast.Module]) -> set[str]:
    """Names of the functions in ``trees`` that assert, directly or through one another."""
    defs = [fn for t in trees for fn in _functions(t)]
    found: set[str] = set()
    grew = True
    while grew:
        grew = False
        for fn in defs:
            if fn.name not in found and (any(isinstance(n, ast.Assert) for n in ast.walk(fn))
                                         or _calls(fn) & (CHECKS | found)):
                found.add(fn.name)
                grew = True
    return found


def _is_hypothesis(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return any(isinstance(d, ast.Call) and _call_name(d) == "given" for d in fn.decorator_list)


def _only_is_not_none(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    asserts = [n for n in ast.walk(fn) if isinstance(n, ast.Assert)]
    return bool(asserts) and not (_calls(fn) & CHECKS) and all(
        isinstance(a.test, ast.Compare) and len(a.test.ops) == 1
        and isinstance(a.test.ops[0], ast.IsNot)
        and isinstance(a.test.comparators[0], ast.Constant) and a.test.comparators[0].value is None
        for a in asserts)


def _broad(expr: ast.expr | None) -> bool:
    if expr is None:
        return True
    names = [expr] if not isinstance(expr, ast.Tuple) else list(expr.elts)
    return any(isinstance(n, ast.Name) and n.id in ("Exception", "BaseException") for n in names)


def _strings(call: ast.Call) -> list[str]:
    out: list[str] = []
    for arg in call.args:
        items = arg.elts if isinstance(arg, (ast.List, ast.Tuple)) else [arg]
        out += [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]
    return out


def _enclosing(tree: ast.Module) -> dict[ast.AST, str]:
    owner: dict[ast.AST, str] = {}
    for fn in _functions(tree):
        for n in ast.walk(fn):
            owner.setdefault(n, fn.name)
    return owner


def _problems() -> list[str]:
    problems: list[str] = []
    trees = {f: ast.parse(f.read_text(), str(f)) for f in _test_files()}
    by_dir: dict[Path, list[ast.Module]] = {}
    for f, t in trees.items():
        by_dir.setdefault(f.parent, []).append(t)
    for f, tree in trees.items():
        rel = _rel(f)
        ok = _asserting(by_dir[f.parent])
        owner = _enclosing(tree)

        def bad(rule: str, where: ast.AST, what: str, fn: str = "", rel: str = rel) -> None:
            if (rel, rule, fn) not in ALLOW:
                problems.append(f"{rel}:{getattr(where, 'lineno', 0)} {rule}: {what}")

        for fn in _functions(tree):
            if not fn.name.startswith("test"):
                continue
            if fn.name not in ok:
                bad("no-assert", fn, f"{fn.name} asserts nothing", fn.name)
            elif _only_is_not_none(fn):
                bad("only-is-not-none", fn, f"{fn.name} only checks `is not None`", fn.name)
            if _is_hypothesis(fn):
                for n in ast.walk(fn):
                    if isinstance(n, ast.If) and any(isinstance(b, ast.Return) for b in n.body):
                        bad("hypothesis-return", n, f"{fn.name}: `if ...: return` (use assume)",
                            fn.name)
        for n in ast.walk(tree):
            if isinstance(n, ast.ExceptHandler) and _broad(n.type) and \
                    all(isinstance(b, ast.Pass) for b in n.body):
                bad("except-pass", n, "a broad except that passes", owner.get(n, ""))
            if isinstance(n, ast.Call) and _call_name(n) == "suppress" and \
                    any(_broad(a) for a in n.args):
                bad("suppress-exception", n, "contextlib.suppress(Exception)", owner.get(n, ""))
            if isinstance(n, ast.Call) and f.name != "_testnet.py":
                s = _strings(n)
                if any(s[i:i + 2] == ["netns", "add"] for i in range(len(s))) or \
                        any(x.strip().startswith("ip netns add ") for x in s):
                    bad("netns-add", n, "a netns made without tests/_testnet.py add_netns "
                        "(no resolv.conf of its own)", owner.get(n, ""))
                if any(s[i:i + 2] == ["-m", "http.server"] for i in range(len(s))):
                    bad("http-server-module", n, "-m http.server does a reverse lookup before "
                        "listening: use _testnet.http_server_argv", owner.get(n, ""))
    return problems


def test_no_test_that_cannot_fail() -> None:
    problems = _problems()
    assert not problems, "\n".join(["tests that cannot fail (or fixtures that hide errors):",
                                    *problems])


def test_allow_list_entries_are_still_needed() -> None:
    for (path, rule, fn), why in ALLOW.items():
        assert (ROOT / path).is_file(), f"ALLOW names a missing file {path}"
        assert why, (path, rule, fn)
    saved = dict(ALLOW)
    try:
        ALLOW.clear()
        found = _problems()
    finally:
        ALLOW.update(saved)
    for (path, rule, fn) in saved:
        assert any(p.startswith(f"{path}:") and f" {rule}: " in p for p in found), \
            f"ALLOW entry {(path, rule, fn)} matches nothing any more: remove it"


def test_the_scan_finds_each_kind(tmp_path: Path) -> None:
    src = '''
import contextlib, subprocess
from hypothesis import given

def test_nothing():
    x = 1

def test_weak():
    assert f() is not None

@given(1)
def test_h(x):
    if not x:
        return
    assert x

def test_swallow():
    try:
        g()
    except Exception:
        pass
    with contextlib.suppress(BaseException):
        g()
    subprocess.run(["ip", "netns", "add", "x"])
    subprocess.Popen(["python3", "-m", "http.server", "80"])
    assert 1
'''
    tree = ast.parse(src)
    fns = {fn.name: fn for fn in _functions(tree)}
    assert "test_nothing" not in _asserting([tree])
    assert _only_is_not_none(fns["test_weak"])
    assert _is_hypothesis(fns["test_h"])
    handlers = [n for n in ast.walk(tree) if isinstance(n, ast.ExceptHandler)]
    assert _broad(handlers[0].type)
    runs = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _call_name(n) in ("run", "Popen")]
    assert _strings(runs[0])[1:3] == ["netns", "add"]
    assert _strings(runs[1])[1:3] == ["-m", "http.server"]
