"""Hubble-shaped flow JSON and policy attribution (no root: a real engine, fake store)."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace
from typing import Any

from axoneme.agent._flowattr import FlowAttributor, fqdn_names
from axoneme.agent._flowstore import flow_from_json
from axoneme.core.endpoint import Endpoint
from axoneme.core.flow import DropReason, Flow, FlowEndpoint, FlowPolicy, FlowVerdict
from axoneme.core.labels import Labels
from axoneme.core.mapstate import Direction
from axoneme.core.policy.api import (
    EndpointPeer,
    PeerRule,
    Policy,
    PolicyKind,
    PolicyRef,
    PortProtocol,
    PortRule,
    Rule,
)
from axoneme.core.policy.engine import PolicyEngine
from axoneme.core.selectors import LabelSelector

IN, EG = Direction.INGRESS, Direction.EGRESS


def _sel(app: str) -> LabelSelector:
    return LabelSelector.build({"k8s:app": app})


def _flow(verdict: FlowVerdict = FlowVerdict.FORWARDED, port: int = 80, *,
          direction: str = "INGRESS", reason: DropReason | None = None,
          src: tuple[int, int] = (0, 0), dst: tuple[int, int] = (0, 0), **kw: Any) -> Flow:
    """src/dst: (identity, endpoint id); pods a=10.244.0.1, b=10.244.0.2."""
    return Flow(time=1_700_000_000.25, verdict=verdict, ip_source="10.244.0.2",
                ip_destination="10.244.0.1",
                source=FlowEndpoint(src[0], "default", "b" if src[1] else "", (), src[1]),
                destination=FlowEndpoint(dst[0], "default", "a" if dst[1] else "", (), dst[1]),
                traffic_direction=direction, drop_reason=reason,
                event_type="drop" if verdict is FlowVerdict.DROPPED else "policy-verdict",
                l4={"TCP": {"source_port": 40000, "destination_port": port,
                            "flags": {"SYN": True}}}, **kw)


def test_flow_json_has_hubbles_types() -> None:
    pol = FlowPolicy("web", "default", "CiliumNetworkPolicy", "spec.ingress", default_deny=True)
    f = _flow(FlowVerdict.DROPPED, reason=DropReason.POLICY_DENIED, match_type="L3_L4",
              uuid="u-1", node_name="n1", trace_observation_point="TO_ENDPOINT",
              interface=(7, "lxc0"), ethernet=("aa:bb:cc:dd:ee:01", "aa:bb:cc:dd:ee:02"),
              ingress_denied_by=(pol,))
    d = f.to_json()
    assert d["event_type"] == {"type": 1, "sub_type": 133}
    assert d["policy_match_type"] == 2
    assert d["uuid"] == "u-1" and d["node_name"] == "n1"
    assert d["trace_observation_point"] == "TO_ENDPOINT"
    assert d["interface"] == {"index": 7, "name": "lxc0"}
    assert d["ethernet"] == {"source": "aa:bb:cc:dd:ee:01", "destination": "aa:bb:cc:dd:ee:02"}
    assert d["ingress_denied_by"] == [{
        "name": "web", "namespace": "default", "kind": "CiliumNetworkPolicy",
        "labels": ["k8s:io.cilium.k8s.policy.derived-from=CiliumNetworkPolicy",
                   "k8s:io.cilium.k8s.policy.name=web",
                   "k8s:io.cilium.k8s.policy.namespace=default",
                   "axoneme:rule=spec.ingress", "axoneme:default-deny=true"]}]
    # the documented fields stay as they were
    assert d["drop_reason_desc"] == "POLICY_DENIED" and d["verdict"] == "DROPPED"
    assert d["Type"] == "L3_L4" and d["IP"]["source"] == "10.244.0.2"
    again = flow_from_json(json.loads(json.dumps(d)))
    assert again.to_json() == d and again.ingress_denied_by == (pol,)
    assert " DROPPED BY web (CiliumNetworkPolicy) " in f.compact()
    assert _flow().to_json()["event_type"] == {"type": 5}
    l7 = _flow(type="L7", l7={"type": "REQUEST", "http": {"method": "GET"}})
    assert l7.to_json()["event_type"] == {"type": 129}
    # our older JSON (event_type as a name, match type as a name) still reads
    old = flow_from_json({**_flow().to_json(), "event_type": "drop", "policy_match_type": "L4_ONLY"})
    assert old.event_type == "drop" and old.match_type == "L4_ONLY"


def test_rule_refs_parse_to_policies() -> None:
    p = FlowPolicy.from_rule_ref("CiliumClusterwideNetworkPolicy cw spec.egress[2]")
    assert p == FlowPolicy("cw", "", "CiliumClusterwideNetworkPolicy", "spec.egress[2]")
    assert FlowPolicy.from_rule_ref("allow-localhost") is None
    q = FlowPolicy.from_rule_ref("NetworkPolicy prod/np spec.ingress[0]")
    assert q is not None and (q.namespace, q.name, q.kind) == ("prod", "np", "NetworkPolicy")


class _World:
    """An engine with pods a (endpoint 1) and b (endpoint 2) and an attributor over it."""

    def __init__(self) -> None:
        self.engine = PolicyEngine()
        self.ids: dict[str, int] = {}
        recs = {}
        for n, app in enumerate("ab", 1):
            ident = self.engine.allocator.allocate(Labels.from_strings([f"k8s:app={app}"]))
            self.engine.upsert_endpoint(Endpoint(n, ident.id, ident.labels, ipv4=f"10.244.0.{n}",
                                                 pod_name=app, namespace="default"))
            self.ids[app] = ident.id
            recs[f"10.244.0.{n}"] = SimpleNamespace(host_ifname=f"lxc{app}", host_ifindex=10 + n,
                                      host_mac=f"02:00:00:00:00:{n}0", pod_mac=f"02:00:00:00:00:{n}1")
        store = SimpleNamespace(endpoint_by_ip=recs.get)
        self.attr = FlowAttributor(lambda f: f, store, self.engine, "node1")

    def put(self, name: str, app: str, *rules: PeerRule, kind: PolicyKind =
            PolicyKind.CILIUM_NETWORK_POLICY, ns: str = "default") -> None:
        ref = PolicyRef(kind, ns, name)
        self.engine.upsert_policy(Policy(ref, (Rule(
            ref, _sel(app), rules, enforce_ingress=any(r.direction is IN for r in rules),
            enforce_egress=any(r.direction is EG for r in rules)),)))

    def ab(self, verdict: FlowVerdict, port: int = 80, **kw: Any) -> Flow:
        """b -> a, decided at a's ingress."""
        return self.attr(_flow(verdict, port, src=(self.ids["b"], 2), dst=(self.ids["a"], 1), **kw))


def _port(p: int) -> tuple[PortRule, ...]:
    return (PortRule((PortProtocol(p, protocol="TCP"),)),)


def test_attribution_allowed_denied_and_default_deny() -> None:
    w = _World()
    w.put("allow-b", "a", PeerRule(IN, peers=(EndpointPeer(_sel("b")),), ports=_port(80),
                                   path="spec.ingress[0]"))
    w.put("deny-8080", "a", PeerRule(IN, peers=(EndpointPeer(_sel("b")),), ports=_port(8080),
                                     deny=True, path="spec.ingressDeny[0]"),
          kind=PolicyKind.CILIUM_CLUSTERWIDE_NETWORK_POLICY, ns="")
    ok = w.ab(FlowVerdict.FORWARDED)
    assert ok.ingress_allowed_by == (FlowPolicy("allow-b", "default", "CiliumNetworkPolicy",
                                                "spec.ingress[0]"),)
    assert ok.uuid and ok.node_name == "node1" and not ok.ingress_denied_by
    # a packet from the local pod b is seen leaving b's interface
    assert ok.trace_observation_point == "FROM_ENDPOINT" and ok.interface == (12, "lxcb")
    assert ok.ethernet == ("02:00:00:00:00:21", "02:00:00:00:00:20")  # pod b -> its gateway

    deny = w.ab(FlowVerdict.DROPPED, 8080, reason=DropReason.POLICY_DENY)
    assert [p.name for p in deny.ingress_denied_by] == ["deny-8080"]
    assert deny.ingress_denied_by[0].rule == "spec.ingressDeny[0]"

    # default deny: both policies select a and enforce its ingress
    dd = w.ab(FlowVerdict.DROPPED, 9999, reason=DropReason.POLICY_DENIED)
    assert [(p.name, p.rule, p.default_deny) for p in dd.ingress_denied_by] == [
        ("deny-8080", "spec.ingressDeny", True), ("allow-b", "spec.ingress", True)]
    assert "DROPPED BY deny-8080 (CiliumClusterwideNetworkPolicy), allow-b" in dd.compact()
    j = dd.to_json()
    assert "axoneme:default-deny=true" in j["ingress_denied_by"][0]["labels"]

    # egress of a is not enforced: an allowed egress flow names no policy
    out = w.attr(_flow(FlowVerdict.FORWARDED, direction="EGRESS", src=(w.ids["a"], 1),
                       dst=(w.ids["b"], 0)))
    assert not out.egress_allowed_by and not out.ingress_allowed_by
    # replies carry no attribution; flows of unknown endpoints pass through untouched
    assert not w.ab(FlowVerdict.FORWARDED, is_reply=True).ingress_allowed_by
    assert not w.attr(_flow(FlowVerdict.DROPPED, reason=DropReason.POLICY_DENIED)).ingress_denied_by


def test_fqdn_names_of_an_address() -> None:
    entries = [SimpleNamespace(name="api.example.com.", ip="198.51.100.7"),
               SimpleNamespace(name="www.example.com.", ip="198.51.100.7"),
               SimpleNamespace(name="other.org.", ip="198.51.100.8")]
    fqdn = SimpleNamespace(cache=SimpleNamespace(entries=lambda: entries))
    assert fqdn_names(fqdn, "198.51.100.7") == ("api.example.com", "www.example.com")
    assert fqdn_names(fqdn, "10.0.0.1") == ()
    assert fqdn_names(SimpleNamespace(cache=None), "198.51.100.7") == ()
    w = _World()
    w.attr.names = lambda ip: fqdn_names(fqdn, ip)
    f = w.attr(_flow(direction="EGRESS", src=(w.ids["b"], 2)))
    assert f.destination_names == () and f.source_names == ()
    out = w.attr(dataclasses.replace(_flow(direction="EGRESS", src=(w.ids["b"], 2)),
                                     ip_destination="198.51.100.8"))
    assert out.destination_names == ("other.org",)
    assert out.to_json()["destination_names"] == ["other.org"]
