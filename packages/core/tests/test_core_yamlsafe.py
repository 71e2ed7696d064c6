"""The hardened YAML/JSON loader: hostile shapes end in InputError, never a
crash, a freeze or a huge allocation (issue 13 items 2-4)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest
from axoneme.core import yamlsafe
from axoneme.core.yamlsafe import MAX_DEPTH, HugeInt, InputError, load_all, load_json, load_one
from hypothesis import given, settings
from hypothesis import strategies as st


def error_of(data: str | bytes, json_: bool = False) -> InputError:
    with pytest.raises(InputError) as e:
        if json_:
            load_json(data, "in.json")
        else:
            load_all(data, "in.yaml")
    assert e.value.source in ("in.yaml", "in.json")
    return e.value


@pytest.mark.parametrize("text", [
    "[" * 30_000, "[" * 1_000_000, "{" * 30_000, "{" * 1_000_000, "{a: " * 30_000,
    "- " * 30_000 + "x", "? " * 30_000 + "x", "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 200)),
])
def test_deep_nesting_is_refused_before_composition(text: str) -> None:
    t0 = time.monotonic()
    err = error_of(text)
    assert time.monotonic() - t0 < 2
    assert err.message.startswith(f"nesting deeper than {MAX_DEPTH} levels"), err.message
    assert err.document == 0 and "line" in err.message


def test_deep_yaml_in_a_subprocess_exits_cleanly() -> None:
    """Before: the C composer recursed once per level and segfaulted (139)."""
    code = textwrap.dedent("""
        import sys
        from axoneme.core.yamlsafe import InputError, load_all
        for text in ("[" * 30000, "{" * 30000, "- " * 30000 + "x", "[" * 1000000):
            try:
                load_all(text, "p.yaml")
            except InputError as e:
                print(e)
        """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (r.returncode, r.stderr[-500:])
    assert r.stdout.count("p.yaml, document 0: nesting deeper than") == 4


def test_depth_counts_through_aliases() -> None:
    half = MAX_DEPTH // 2 + 5
    text = f"a: &a {'[' * half}1{']' * half}\nb: {'[' * half}*a{']' * half}\n"
    err = error_of(text)
    assert "through aliases" in err.message


def test_nesting_at_the_bound_loads() -> None:
    depth = MAX_DEPTH - 1  # plus the scalar's own level
    want: object = 1
    for _ in range(depth):
        want = [want]
    assert load_all("[" * depth + "1" + "]" * depth)[0] == want


def test_alias_node_bomb_and_cycle() -> None:
    lines = ['l0: &l0 ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 7):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]")
    assert "more than 1000000 nodes" in error_of("\n".join(lines)).message
    assert "recursive YAML aliases" in error_of("a: &a\n  b: *a\n").message
    assert "undefined alias" in error_of("a: *nope\n").message


def test_alias_scalar_bytes_count() -> None:
    """300 x 300 aliases of a 10 KB string: 90,000 nodes (under the node
    bound) but 900 MB of text once expanded."""
    s = "x" * 10240
    text = f"s: &s {s}\nl: &l [{', '.join(['*s'] * 300)}]\nm: [{', '.join(['*l'] * 300)}]\n"
    assert len(text) < 15_000
    err = error_of(text)
    assert "MiB of text once aliases are expanded" in err.message
    assert len(str(err)) < 300


def test_later_document_index_is_reported() -> None:
    err = error_of("a: 1\n---\nb: " + "[" * 500 + "\n")
    assert err.document == 1


@pytest.mark.parametrize("literal", [
    "9" * 5000, "-" + "9" * 5000, "0x" + "f" * 5000, "0b" + "1" * 20000, "0" + "7" * 5000,
    "1" + ":0" * 100_000, "1_000" * 2000,
])
def test_huge_integer_literals_load_as_hugeint(literal: str) -> None:
    t0 = time.monotonic()
    # an explicit key: a plain (simple) key is at most 1024 characters
    (doc,) = load_all(f"a: {literal}\n? {literal}\n: b\n")
    assert time.monotonic() - t0 < 2
    value = doc["a"]
    assert isinstance(value, HugeInt) and isinstance(value, int)
    assert abs(value) > 2**64  # outside every field's range
    assert str(value) == f"{literal[:24]}… ({len(literal)} characters)"
    assert f"{value}" == repr(value) == str(value)
    assert any(isinstance(k, HugeInt) for k in doc)


def test_ordinary_integers_unchanged() -> None:
    (doc,) = load_all("a: [0, 80, -1, 0x1f, 0o17, 017, 1_000, 190:20:30, 9223372036854775807]\n")
    assert doc["a"] == [0, 80, -1, 31, "0o17", 15, 1000, 685230, 9223372036854775807]
    assert not any(isinstance(v, HugeInt) for v in doc["a"])


def test_json_bounds() -> None:
    assert "nesting deeper than" in error_of("[" * 1_000_000, json_=True).message
    assert "nesting deeper than" in error_of("[" * 150 + "]" * 150, json_=True).message
    big = load_json('{"a": ' + "9" * 5000 + "}", "in.json")
    assert isinstance(big["a"], HugeInt)
    assert "not UTF-8" in error_of(b"\xff", json_=True).message


def test_load_one_and_duplicates_and_timestamps() -> None:
    assert load_one("") is None
    assert load_one("a: 2024-01-01T00:00:00Z\n") == {"a": "2024-01-01T00:00:00Z"}
    with pytest.raises(InputError, match="single document"):
        load_one("a: 1\n---\nb: 2\n", "c.yaml")
    with pytest.raises(InputError, match='duplicate key "a"'):
        load_one("a: 1\na: 2\n", "c.yaml")


def test_excerpt_is_bounded_for_every_shape() -> None:
    shared = ["y" * 10_000] * 1000
    nested: list[object] = []
    cur = nested
    for _ in range(5000):
        nxt: list[object] = []
        cur.append(nxt)
        cur = nxt
    for value in ("x" * 100_000, shared, {"k" * 1000: shared}, nested, HugeInt("9" * 9000), 3, None):
        assert len(yamlsafe.excerpt(value)) <= 81


def test_same_objects_as_pyyaml_for_ordinary_documents() -> None:
    import yaml

    text = textwrap.dedent("""\
        a: &x {b: [1, 2.5, true, null, "s", 'q'], c: !!str 5}
        d: *x
        e: {<<: *x, f: g}
        h: !!set {i: null}
        ---
        - plain
        ---
        """)
    assert load_all(text) == list(yaml.safe_load_all(text))


@pytest.mark.parametrize("status,field,what", [
    ({"n": 2**63}, "status.n", "out of range (64-bit)"),
    ({"n": HugeInt("9" * 100)}, "status.n", "out of range (64-bit)"),
    ({"n": [float("nan")]}, "status.n[0]", "is not finite"),
    ({"n": float("-inf")}, "status.n", "is not finite"),
    ({"b": b"\x00"}, "status.b", "bytes value cannot be represented in JSON"),
    ({"s": {1, 2}}, "status.s", "set value cannot be represented in JSON"),
])
def test_accepted_policies_survive_a_json_round_trip(status: object, field: str, what: str) -> None:
    """The parser reads only fields it knows, but the whole document is sent
    as JSON and persisted: what the state file would refuse at the next start
    (or json.dumps cannot write) is refused at validation, with the field."""
    from axoneme.core.errors import InvalidRule
    from axoneme.core.policy.parse import parse_policy_obj

    obj = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p"},
           "spec": {"endpointSelector": {}}}
    assert parse_policy_obj(dict(obj, status={"ok": [1, 2.5, None, "x"]})).ref.name == "p"
    with pytest.raises(InvalidRule) as e:
        parse_policy_obj(dict(obj, status=status))
    (problem,) = e.value.problems
    assert problem.field == field and what in problem.message


def test_deep_api_object_is_refused_without_recursion() -> None:
    from axoneme.core.errors import InvalidRule
    from axoneme.core.policy.parse import parse_policy_obj

    deep: list[object] = []
    cur = deep
    for _ in range(50_000):
        nxt: list[object] = []
        cur.append(nxt)
        cur = nxt
    obj = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": {"name": "p"},
           "spec": {"endpointSelector": {}}, "status": deep}
    with pytest.raises(InvalidRule, match="nesting deeper than 100 levels"):
        parse_policy_obj(obj)


# --- json_text_safe: a proof from the text that json_problem finds nothing ---------------

_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4),
    max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(_JSON_VALUES, st.sampled_from([2, 5, 100]))
def test_json_text_safe_implies_no_json_problem(value: Any, depth: int) -> None:
    """Whatever text json_text_safe passes decodes to a value json_problem
    finds nothing in (at the same depth bound): the parser may skip that walk."""
    text = json.dumps(value).encode()
    if yamlsafe.json_text_safe(text, depth):
        assert yamlsafe.json_problem(json.loads(text), depth) is None


@pytest.mark.parametrize("text,safe", [
    (b'{"a": [1, "x", true, null, 1.5, -7]}', True),
    (b'{"a": NaN}', False),
    (b'{"a": -Infinity}', False),
    (b'{"a": 1e400}', False),  # decodes to inf
    (b'{"a": 9223372036854775808}', False),  # int64 + 1
    (b'{"a": "NaN is a string here"}', False),  # not proven: json_problem decides
    (b"[" * 100 + b"]" * 100, True),
    (b"[" * 101 + b"]" * 101, False),
])
def test_json_text_safe_cases(text: bytes, safe: bool) -> None:
    assert yamlsafe.json_text_safe(text) is safe
    if not safe and b"string" not in text:
        assert yamlsafe.json_problem(json.loads(text)) is not None
