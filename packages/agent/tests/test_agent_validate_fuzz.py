"""Property tests: no input makes ``axoneme policy validate`` crash.

Whatever the bytes or structure, the command exits 0, or 2 with only
``error: ...`` lines on stderr; never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from typing import Any

import yaml
from axoneme.agent.cli import main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Field names of the policy language, so generated structures get deep into the parser.
VOCAB = [
    "apiVersion", "kind", "metadata", "name", "namespace", "spec", "specs", "items",
    "endpointSelector", "nodeSelector", "matchLabels", "matchExpressions", "key", "operator", "values",
    "ingress", "egress", "ingressDeny", "egressDeny", "fromEndpoints", "toEndpoints", "fromEntities",
    "toEntities", "fromCIDR", "toCIDR", "fromCIDRSet", "toCIDRSet", "cidr", "except", "toServices",
    "k8sService", "serviceName", "toFQDNs", "matchName", "matchPattern", "toPorts", "ports", "port",
    "endPort", "protocol", "rules", "http", "kafka", "dns", "method", "path", "host", "headers",
    "headerMatches", "value", "mismatch", "role", "apiKey", "apiVersion", "topic", "clientID", "icmps",
    "fields", "family", "type", "enableDefaultDeny", "description", "labels", "podSelector",
    "namespaceSelector", "ipBlock", "from", "to", "policyTypes", "fromRequires",
]
WORDS = [
    "CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy", "NetworkPolicy", "List", "cilium.io/v2",
    "networking.k8s.io/v1", "TCP", "UDP", "ANY", "SCTP", "In", "NotIn", "Exists", "DoesNotExist", "world",
    "all", "EchoRequest", "IPv6", "10.0.0.0/8", "::/0", "80", "http", "GET", "/.*", "(", "*.x.com", "produce",
    "Ingress", "Egress", "x", "",
]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True),
    st.sampled_from(WORDS), st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(VOCAB), st.text(max_size=6))
structures = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=5),
    ),
    max_leaves=40,
)


def validate(data: bytes, suffix: str = ".yaml", extra: list[str] | None = None) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"input{suffix}")
        with open(path, "wb") as f:
            f.write(data)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["policy", "validate", "-f", path, *(extra or [])])
    assert code in (0, 2), (code, err.getvalue())
    assert "Traceback" not in err.getvalue()
    # bounded output whatever the input: at most 100 problems per document
    # (plus a count), each value an excerpt
    assert len(err.getvalue()) < 200_000, len(err.getvalue())
    assert all(len(line) < 2000 for line in err.getvalue().splitlines())
    if code == 2:
        lines = err.getvalue().splitlines()
        assert lines and all(line.startswith("error: ") for line in lines), err.getvalue()
        assert all(path in line for line in lines)
    else:
        assert err.getvalue() == ""
        assert out.getvalue().startswith(path) or "-o" in (extra or [])


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes(data: bytes) -> None:
    validate(data)


@SETTINGS
@given(st.lists(st.sampled_from(list("{}[]:,-'\"&*!|>#%@`?\n\t \\xyz01.") + ["---\n", "kind: ", "- "]),
                max_size=80))
def test_yamlish_text(pieces: list[str]) -> None:
    validate("".join(pieces).encode())


@SETTINGS
@given(st.binary(max_size=200))
def test_arbitrary_json_bytes(data: bytes) -> None:
    validate(data, ".json", ["-o", "json"])


def dump(obj: Any) -> bytes:
    return yaml.safe_dump(obj, allow_unicode=True).encode()


@SETTINGS
@given(structures)
def test_arbitrary_structures(obj: Any) -> None:
    validate(dump(obj))


@SETTINGS
@given(st.sampled_from(["CiliumNetworkPolicy", "CiliumClusterwideNetworkPolicy"]),
       st.dictionaries(st.sampled_from(["ingress", "egress", "ingressDeny", "egressDeny"]),
                       st.lists(st.dictionaries(keys, structures, max_size=4), max_size=3), max_size=3),
       structures)
def test_structures_inside_cilium_rules(kind: str, directions: dict[str, Any], selector: Any) -> None:
    doc = {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": {"name": "p"},
           "spec": {"endpointSelector": selector, **directions}}
    validate(dump(doc))


@SETTINGS
@given(st.dictionaries(st.sampled_from(["podSelector", "ingress", "egress", "policyTypes"]), structures,
                       max_size=4))
def test_structures_inside_network_policy(spec: dict[str, Any]) -> None:
    doc = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "n"},
           "spec": spec}
    validate(json.dumps(doc).encode(), ".json")


# -- hostile shapes (issue 13): deep nesting, huge integers, aliases -------------------

OPENERS = st.sampled_from(["[", "{a: ", "- ", "{", "[[", "? "])


@SETTINGS
@given(st.lists(OPENERS, min_size=1, max_size=3), st.integers(min_value=50, max_value=40_000),
       st.sampled_from([".yaml", ".json"]))
def test_deep_nesting(openers: list[str], depth: int, suffix: str) -> None:
    """Any mix of flow/block openers, far past the C composer's stack: exit 2
    naming the nesting bound (or another clean error), never a crash."""
    text = "".join(openers[i % len(openers)] for i in range(depth)) + "x"
    validate(text.encode(), suffix)


def _int_literal(draw: st.DrawFn) -> str:
    digits = draw(st.integers(min_value=1, max_value=6000))
    kind = draw(st.sampled_from(["dec", "hex", "oct", "bin", "sexa", "neg", "under", "unicode"]))
    body = {"dec": "9" * digits, "hex": "0x" + "f" * digits, "oct": "0" + "7" * digits,
            "bin": "0b" + "1" * digits, "sexa": "1" + ":59" * (digits // 3 + 1),
            "neg": "-" + "8" * digits, "under": "1_0" * (digits // 3 + 1), "unicode": "²" * digits}
    return body[kind]


int_literals = st.composite(lambda draw: _int_literal(draw))()

INT_FIELDS = [
    ("networking.k8s.io/v1", "NetworkPolicy", "spec: {{podSelector: {{}}, ingress: [{{ports: [{{port: {v}}}]}}]}}"),
    ("networking.k8s.io/v1", "NetworkPolicy",
     "spec: {{podSelector: {{}}, ingress: [{{ports: [{{port: 80, endPort: {v}}}]}}]}}"),
    ("networking.k8s.io/v1", "NetworkPolicy", "spec: {{podSelector: {{}}, policyTypes: [{v}]}}"),
    ("cilium.io/v2", "CiliumNetworkPolicy",
     "spec: {{endpointSelector: {{}}, ingress: [{{icmps: [{{fields: [{{type: {v}}}]}}]}}]}}"),
    ("cilium.io/v2", "CiliumNetworkPolicy",
     "spec: {{endpointSelector: {{}}, ingress: [{{toPorts: [{{ports: [{{port: \"9092\", protocol: TCP}}], "
     "rules: {{kafka: [{{apiVersion: {v}}}]}}}}]}}]}}"),
    ("cilium.io/v2", "CiliumNetworkPolicy", "spec: {{endpointSelector: {{}}}}\nstatus:\n  ? {v}\n  : x"),
]


@SETTINGS
@given(st.sampled_from(INT_FIELDS), int_literals, st.booleans())
def test_huge_integers_in_every_numeric_field(field: tuple[str, str, str], literal: str, quote: bool) -> None:
    api, kind, spec = field
    value = f'"{literal}"' if quote and "? " not in spec else literal
    text = f"apiVersion: {api}\nkind: {kind}\nmetadata: {{name: p}}\n" + spec.format(v=value) + "\n"
    validate(text.encode())


@SETTINGS
@given(st.integers(min_value=1, max_value=12), st.integers(min_value=1, max_value=400),
       st.integers(min_value=0, max_value=20_000), st.booleans())
def test_alias_amplification(levels: int, fanout: int, size: int, cyclic: bool) -> None:
    """Anchors that alias the previous level ``fanout`` times: node and text
    bounds end it (or it is small enough to validate); memory stays bounded
    because values are shown as excerpts and problems are capped."""
    lines = ["apiVersion: cilium.io/v2", "kind: CiliumNetworkPolicy", "metadata: {name: a}", "spec:",
             "  endpointSelector: {}", "  egress:", f"  - toEntities: [&l0 \"{'w' * size}\"]"]
    for i in range(1, levels + 1):
        lines.append(f"  - toEntities: &l{i} [" + ", ".join([f"*l{i - 1}"] * fanout) + "]")
    if cyclic:
        lines.append("  - toEntities: &c [*c]")
    validate(("\n".join(lines) + "\n").encode())
