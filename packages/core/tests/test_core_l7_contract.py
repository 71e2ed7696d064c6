"""The L7 parser contract: a parser no code names, selected by ``l7proto``, owns its rules.

A fake ``verbs`` parser is added to the installed ``axoneme.l7`` entry points
(a registry whose source is the real one plus fakes); the built-ins keep
their Cilium fields (``http``, ``kafka``, ``dns``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pytest
from axoneme.core import plugins
from axoneme.core.cluster import Cluster
from axoneme.core.errors import InvalidRule
from axoneme.core.l7 import GenericRule, L7Parser, L7Request, L7Verdict, default_proxy_port
from axoneme.core.mapstate import Direction, Protocol
from axoneme.core.plugins import GROUP_L7, Registry
from axoneme.core.policy.parse import parse_policy_obj
from axoneme.core.policy.trace import OfflineCluster, TraceInputError, resolve_peer, trace


class VerbsParser(L7Parser):
    name = "verbs"
    default_proxy_port = 15123
    rule_fields = frozenset({"verb"})
    trace_inputs = {"verb": "the verb"}
    directions = frozenset({Direction.INGRESS})

    def check_field(self, key: str, value: str) -> str | None:
        return "must be upper case" if value != value.upper() else None

    def match(self, rules: Sequence[Any], request: L7Request) -> L7Verdict:
        verb = request.fields.get("verb")
        for i, r in enumerate(rules):
            if r.get("verb") == verb:
                return L7Verdict(True, i, f"rule {i}")
        return L7Verdict(not rules, None, "no rule")


@dataclass
class FakeEP:
    name: str
    obj: Any
    value: str = "fake:Parser"
    dist: Any = field(default=None)

    def load(self) -> Any:
        if isinstance(self.obj, BaseException):
            raise self.obj
        return self.obj


@pytest.fixture(autouse=True)
def fake_parsers(monkeypatch: pytest.MonkeyPatch) -> None:
    def source(group: str) -> list[Any]:
        eps: list[Any] = list(entry_points(group=group))
        if group == GROUP_L7:
            eps += [FakeEP("verbs", VerbsParser), FakeEP("broken", ImportError("no module named 'x'"))]
        return eps

    monkeypatch.setattr(plugins, "_REGISTRY", Registry(source=source))


def cnp(rules: Any, port: str = "7000", protocol: str = "TCP", direction: str = "ingress") -> dict[str, Any]:
    peer = "fromEndpoints" if direction == "ingress" else "toEndpoints"
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": "p", "namespace": "default"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "srv"}},
                     direction: [{peer: [{"matchLabels": {"app": "cli"}}],
                                  "toPorts": [{"ports": [{"port": port, "protocol": protocol}],
                                               "rules": rules}]}]}}


def problems(obj: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidRule) as e:
        parse_policy_obj(obj)
    return {p.field: p.message for p in e.value.problems}


BASE = "spec.ingress[0].toPorts[0]"


def test_l7proto_selects_an_installed_parser_that_parses_its_rules() -> None:
    pol = parse_policy_obj(cnp({"l7proto": "verbs", "l7": [{"verb": "GET"}, {"verb": "PUT"}]}))
    (port_rule,) = pol.rules[0].rules[0].ports
    assert port_rule.l7 is not None and port_rule.l7.parser == "verbs"
    assert port_rule.l7.rules == (GenericRule((("verb", "GET"),)), GenericRule((("verb", "PUT"),)))
    # an empty rule allows every request: the whole list does (still proxied)
    pol = parse_policy_obj(cnp({"l7proto": "verbs", "l7": [{"verb": "GET"}, {}]}))
    assert pol.rules[0].rules[0].ports[0].l7.rules == ()  # type: ignore[union-attr]


def test_the_parser_validates_its_fields_with_paths() -> None:
    got = problems(cnp({"l7proto": "verbs", "l7": [{"verb": "get"}, {"path": "/x"}, "x"]}))
    assert got.keys() == {f"{BASE}.rules.l7[0].verb", f"{BASE}.rules.l7[1].path", f"{BASE}.rules.l7[2]"}
    assert got[f"{BASE}.rules.l7[0].verb"] == "must be upper case"


def test_selection_problems_name_the_field() -> None:
    got = problems(cnp({"l7proto": "nope", "l7": [{"verb": "GET"}]}))
    msg = got[f"{BASE}.rules.l7proto"]
    assert 'unknown L7 parser "nope"' in msg and "verbs" in msg and "http" in msg
    assert f"{BASE}.rules.l7proto" in problems(cnp({"l7": [{"verb": "GET"}]}))
    broken = problems(cnp({"l7proto": "broken", "l7": []}))[f"{BASE}.rules.l7proto"]
    assert "'broken'" in broken and "no module named 'x'" in broken
    # a parser without a Cilium field is only reachable through l7proto
    assert "unknown field" in problems(cnp({"verbs": [{"verb": "GET"}]}))[f"{BASE}.rules.verbs"]
    got = problems(cnp({"http": [{}], "l7proto": "verbs"}))
    assert "more than one L7 rule type" in got[f"{BASE}.rules"]
    # built-ins through l7proto parse their own schema
    pol = parse_policy_obj(cnp({"l7proto": "http", "l7": [{"method": "GET"}]}))
    assert pol.rules[0].rules[0].ports[0].l7.parser == "http"  # type: ignore[union-attr]


def test_the_parser_declares_where_it_applies() -> None:
    got = problems(cnp({"l7proto": "verbs", "l7": []}, direction="egress"))
    assert "not allowed on egress" in got["spec.egress[0].toPorts[0].rules.l7"]
    got = problems(cnp({"l7proto": "verbs", "l7": []}, protocol="UDP"))
    assert "can only apply to TCP" in got[f"{BASE}.ports[0].protocol"]


CLUSTER = [
    {"kind": "Pod", "metadata": {"name": "srv", "namespace": "default", "labels": {"app": "srv"}}},
    {"kind": "Pod", "metadata": {"name": "cli", "namespace": "default", "labels": {"app": "cli"}}},
]


def test_resolution_and_trace_use_the_parser() -> None:
    assert default_proxy_port("verbs") == 15123
    env = OfflineCluster.build(Cluster.from_objects(CLUSTER),
                               [parse_policy_obj(cnp({"l7proto": "verbs", "l7": [{"verb": "GET"}]}))])
    src, dst = resolve_peer(env, "default/cli", "--from"), resolve_peer(env, "default/srv", "--to")
    side = trace(env, src, dst, Protocol.TCP, 7000).ingress
    assert side.entry is not None and side.entry.proxy_port == 15123
    got = trace(env, src, dst, Protocol.TCP, 7000, {"verb": "GET"})
    assert got.verdict == "allowed" and got.l7 is not None
    assert got.l7.to_json()["rules"] == [{"parser": "verbs", "verb": "GET"}]
    assert trace(env, src, dst, Protocol.TCP, 7000, {"verb": "PUT"}).verdict == "denied"
    assert trace(env, src, dst, Protocol.TCP, 7000).verdict == "redirected"
    # shorthand flags of other parsers are ignored, unknown --l7 keys refused
    assert trace(env, src, dst, Protocol.TCP, 7000, {"verb": "GET", "http_method": "X"}).verdict == "allowed"
    with pytest.raises(TraceInputError, match=r"'path'.*it takes: verb"):
        trace(env, src, dst, Protocol.TCP, 7000, {"verb": "GET", "path": "/"})


def test_builtins_take_l7_inputs_like_their_shorthands() -> None:
    http = plugins.registry().l7_parser("http")
    assert http.request_from_trace({"method": "PUT", "path": "/a"}).fields["method"] == "PUT"
    assert http.request_from_trace({"method": "PUT", "http_method": "GET"}).fields["method"] == "GET"
    kafka = plugins.registry().l7_parser("kafka")
    req = kafka.request_from_trace({"role": "produce", "topic": "t"})
    assert req.fields["topics"] == ("t",) and req.fields["api_keys"]
