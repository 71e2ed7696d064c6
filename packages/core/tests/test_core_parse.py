"""Translation tests: each policy kind and field into the normalized model."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path

import pytest
from axoneme.core.errors import InvalidRule
from axoneme.core.labels import Labels
from axoneme.core.mapstate import Direction
from axoneme.core.policy.api import (
    CIDRPeer,
    EndpointPeer,
    EntityPeer,
    FQDNPeer,
    ICMPField,
    PolicyKind,
    PolicyRef,
    PortProtocol,
)
from axoneme.core.policy.parse import (
    Document,
    load_documents,
    parse_policies,
    parse_policy,
    parse_policy_obj,
)
from axoneme.core.selectors import LabelSelector, Operator, Requirement
from axoneme.l7.dns import DNSRule
from axoneme.l7.http import HeaderMatch, HTTPRule
from axoneme.l7.kafka import KafkaRule


def cnp(spec: dict, name: str = "p", namespace: str | None = "ns1", kind: str = "CiliumNetworkPolicy",
        key: str = "spec") -> dict:
    meta: dict = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta, key: spec}


def np_(spec: dict, name: str = "np", namespace: str | None = "ns1") -> dict:
    meta: dict = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": meta, "spec": spec}


def ns_req(ns: str) -> Requirement:
    return Requirement("k8s:io.kubernetes.pod.namespace", Operator.IN, frozenset({ns}))


def pod_labels(ns: str, ns_labels: dict[str, str] | None = None, **labels: str) -> Labels:
    texts = [f"k8s:{k}={v}" for k, v in labels.items()]
    texts.append(f"k8s:io.kubernetes.pod.namespace={ns}")
    for k, v in (ns_labels or {}).items():
        texts.append(f"k8s:io.cilium.k8s.namespace.labels.{k}={v}")
    return Labels.from_strings(texts)


def test_cnp_subject_is_scoped_to_namespace() -> None:
    pol = parse_policy_obj(cnp({"endpointSelector": {"matchLabels": {"app": "web"}}, "ingress": [{}]}))
    assert pol.ref == PolicyRef(PolicyKind.CILIUM_NETWORK_POLICY, "ns1", "p")
    (rule,) = pol.rules
    assert rule.subject == LabelSelector.build({"app": "web"}).with_requirement(ns_req("ns1"))
    assert rule.subject.matches(pod_labels("ns1", app="web"))
    assert not rule.subject.matches(pod_labels("ns2", app="web"))


def test_missing_namespace_defaults_to_default() -> None:
    pol = parse_policy_obj(cnp({"endpointSelector": {}}, namespace=None))
    assert pol.ref.namespace == "default"
    assert pol.rules[0].subject == LabelSelector(frozenset({ns_req("default")}))


def test_specs_list_gives_one_rule_per_item_with_paths() -> None:
    obj = cnp([
        {"endpointSelector": {}, "ingress": [{"fromEntities": ["host"]}]},
        {"endpointSelector": {}, "egressDeny": [{"toEntities": ["world"]}, {"toCIDR": ["1.2.3.4"]}]},
    ], key="specs")
    pol = parse_policy_obj(obj)
    assert [r.index for r in pol.rules] == [0, 1]
    assert [pr.path for pr in pol.rules[0].rules] == ["specs[0].ingress[0]"]
    assert [pr.path for pr in pol.rules[1].rules] == ["specs[1].egressDeny[0]", "specs[1].egressDeny[1]"]
    assert all(pr.deny for pr in pol.rules[1].rules)
    assert pol.rules[1].rules[1].peers == (CIDRPeer(ipaddress.ip_network("1.2.3.4/32")),)


def test_spec_and_specs_together() -> None:
    obj = cnp({"endpointSelector": {}, "ingress": [{}]})
    obj["specs"] = [{"endpointSelector": {}, "egress": [{}]}]
    pol = parse_policy_obj(obj)
    assert len(pol.rules) == 2
    assert pol.rules[1].rules[0].path == "specs[0].egress[0]"


def test_peer_selectors_scoped_unless_namespace_mentioned() -> None:
    spec = {"endpointSelector": {}, "ingress": [{"fromEndpoints": [
        {"matchLabels": {"app": "a"}},
        {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "other", "app": "b"}},
        {"matchExpressions": [{"key": "io.cilium.k8s.namespace.labels.team", "operator": "Exists"}]},
        {},
    ]}]}
    (peers,) = [pr.peers for pr in parse_policy_obj(cnp(spec)).rules[0].rules]
    assert peers is not None
    assert peers[0] == EndpointPeer(LabelSelector.build({"app": "a"}).with_requirement(ns_req("ns1")))
    assert peers[1] == EndpointPeer(LabelSelector.build({"k8s:io.kubernetes.pod.namespace": "other", "app": "b"}))
    assert ns_req("ns1") not in peers[2].selector.requirements  # type: ignore[union-attr]
    assert peers[3] == EndpointPeer(LabelSelector(frozenset({ns_req("ns1")})))
    assert peers[2].selector.matches(pod_labels("x", {"team": "t"}))  # type: ignore[union-attr]


def test_ccnp_has_no_namespace_but_empty_peer_selects_pods_only() -> None:
    spec = {"endpointSelector": {"matchLabels": {"app": "a"}},
            "egress": [{"toEndpoints": [{}, {"matchLabels": {"app": "b"}}]}]}
    pol = parse_policy_obj(cnp(spec, namespace="ignored", kind="CiliumClusterwideNetworkPolicy"))
    assert pol.ref == PolicyRef(PolicyKind.CILIUM_CLUSTERWIDE_NETWORK_POLICY, "", "p")
    rule = pol.rules[0]
    assert rule.subject == LabelSelector.build({"app": "a"})
    peers = rule.rules[0].peers
    assert peers == (
        EndpointPeer(LabelSelector(frozenset({Requirement("k8s:io.kubernetes.pod.namespace", Operator.EXISTS)}))),
        EndpointPeer(LabelSelector.build({"app": "b"})),
    )


def test_ccnp_node_selector_is_a_host_policy() -> None:
    """A CCNP nodeSelector parses as a host policy rule (the host firewall enforces it)."""
    spec = {"nodeSelector": {"matchLabels": {"node-role": "worker"}}, "ingress": [{"fromEntities": ["cluster"]}]}
    pol = parse_policy_obj(cnp(spec, kind="CiliumClusterwideNetworkPolicy", namespace=None))
    [rule] = pol.rules
    assert rule.node_selector and rule.enforce_ingress and not rule.enforce_egress
    assert rule.subject == LabelSelector.build({"node-role": "worker"})


def test_selector_key_sources_are_kept() -> None:
    spec = {"endpointSelector": {"matchLabels": {"k8s:app": "x", "any:tier": "y"}},
            "ingress": [{"fromEndpoints": [{"matchLabels": {"reserved:host": ""}}]}]}
    rule = parse_policy_obj(cnp(spec)).rules[0]
    keys = {r.key for r in rule.subject.requirements}
    assert keys == {"k8s:app", "any:tier", "k8s:io.kubernetes.pod.namespace"}
    peer = rule.rules[0].peers[0]  # type: ignore[index]
    assert Requirement("reserved:host", Operator.IN, frozenset({""})) in peer.selector.requirements


def test_match_expressions_all_operators() -> None:
    exprs = [
        {"key": "a", "operator": "In", "values": ["1", "2"]},
        {"key": "b", "operator": "NotIn", "values": ["3"]},
        {"key": "c", "operator": "Exists"},
        {"key": "d", "operator": "DoesNotExist"},
    ]
    rule = parse_policy_obj(cnp({"endpointSelector": {"matchExpressions": exprs}})).rules[0]
    assert {
        Requirement("a", Operator.IN, frozenset({"1", "2"})),
        Requirement("b", Operator.NOT_IN, frozenset({"3"})),
        Requirement("c", Operator.EXISTS),
        Requirement("d", Operator.DOES_NOT_EXIST),
    } <= rule.subject.requirements


@pytest.mark.parametrize(("spec", "ingress", "egress"), [
    ({}, False, False),
    ({"ingress": []}, False, False),  # present but empty = no rules
    ({"ingress": [{}]}, True, False),
    ({"egressDeny": [{"toEntities": ["world"]}]}, False, True),
    ({"ingressDeny": [{"fromEntities": ["world"]}]}, True, False),
    ({"ingress": [{}], "enableDefaultDeny": {"ingress": False}}, False, False),
    ({"egress": [{}], "enableDefaultDeny": {"ingress": True}}, True, True),
    ({"egress": [{}], "ingress": [{}], "enableDefaultDeny": {"egress": False}}, True, False),
])
def test_cnp_enforce_flags(spec: dict, ingress: bool, egress: bool) -> None:
    rule = parse_policy_obj(cnp({"endpointSelector": {}, **spec})).rules[0]
    assert (rule.enforce_ingress, rule.enforce_egress) == (ingress, egress)


def test_cilium_empty_rule_allows_nothing_and_ports_only_rule_any_peer() -> None:
    spec = {"endpointSelector": {}, "ingress": [
        {},
        {"toPorts": [{"ports": [{"port": 80, "protocol": "TCP"}]}]},
        {"icmps": [{"fields": [{"type": 8}]}]},
        {"fromEndpoints": []},  # empty list = absent
    ]}
    rules = parse_policy_obj(cnp(spec)).rules[0].rules
    assert rules[0].allows_nothing and rules[0].peers is None
    assert not rules[1].allows_nothing and rules[1].peers is None
    assert rules[1].ports[0].ports == (PortProtocol(port=80, protocol="TCP"),)
    assert not rules[2].allows_nothing and rules[2].icmps == (ICMPField("IPv4", 8),)
    assert rules[3].allows_nothing


def test_entities_all_kinds() -> None:
    ents = ["host", "remote-node", "cluster", "kube-apiserver", "init", "health", "unmanaged",
            "world", "world-ipv4", "world-ipv6", "all", "ingress"]
    spec = {"endpointSelector": {}, "ingress": [{"fromEntities": ents}], "egress": [{"toEntities": ents}]}
    rules = parse_policy_obj(cnp(spec)).rules[0].rules
    for pr in rules:
        assert pr.peers == tuple(EntityPeer(e) for e in ents)


def test_cidr_and_cidrset() -> None:
    spec = {"endpointSelector": {}, "egress": [
        {"toCIDR": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.1"]},
        {"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16", "10.2.3.0/24"]}]},
    ], "ingress": [{"fromCIDRSet": [{"cidr": "0.0.0.0/0"}]}]}
    rule = parse_policy_obj(cnp(spec)).rules[0]
    n = ipaddress.ip_network
    egress = rule.peer_rules(Direction.EGRESS)
    assert egress[0].peers == (CIDRPeer(n("10.0.0.0/8")), CIDRPeer(n("2001:db8::/32")),
                               CIDRPeer(n("192.0.2.1/32")))
    assert egress[1].peers == (CIDRPeer(n("10.0.0.0/8"), (n("10.1.0.0/16"), n("10.2.3.0/24"))),)
    assert rule.peer_rules(Direction.INGRESS)[0].peers == (CIDRPeer(n("0.0.0.0/0")),)


def test_fqdns_normalized() -> None:
    spec = {"endpointSelector": {}, "egress": [{"toFQDNs": [
        {"matchName": "API.Example.com."}, {"matchPattern": "*.Example.COM"}, {"matchPattern": "*"}]}]}
    peers = parse_policy_obj(cnp(spec)).rules[0].rules[0].peers
    assert peers == (FQDNPeer(match_name="api.example.com"), FQDNPeer(match_pattern="*.example.com"),
                     FQDNPeer(match_pattern="*"))


def test_ports_forms() -> None:
    spec = {"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": [
        {"port": "80"}, {"port": 443, "protocol": "tcp"}, {"port": "8000", "endPort": 8080, "protocol": "UDP"},
        {"port": "HTTP-alt", "protocol": "TCP"}, {"port": "0", "protocol": "SCTP"}, {"protocol": "ANY"},
        {"port": 53, "endPort": 53},
    ]}]}]}
    ports = parse_policy_obj(cnp(spec)).rules[0].rules[0].ports[0].ports
    assert ports == (
        PortProtocol(80, None, "ANY"), PortProtocol(443, None, "TCP"), PortProtocol(8000, 8080, "UDP"),
        PortProtocol(0, None, "TCP", "http-alt"), PortProtocol(0, None, "SCTP"), PortProtocol(0, None, "ANY"),
        PortProtocol(53, None, "ANY"),
    )


def test_icmp_names_and_numbers_both_families() -> None:
    fields = [{"type": "EchoRequest"}, {"family": "IPv4", "type": "DestinationUnreachable"},
              {"family": "IPv4", "type": "TimeExceeded"}, {"family": "IPv6", "type": "EchoRequest"},
              {"family": "IPv6", "type": "EchoReply"}, {"family": "IPv6", "type": "DestinationUnreachable"},
              {"type": "0"}, {"type": 255}, {"family": "IPv6", "type": "NeighborSolicitation"}]
    spec = {"endpointSelector": {}, "egress": [{"icmps": [{"fields": fields[:4]}, {"fields": fields[4:]}]}]}
    icmps = parse_policy_obj(cnp(spec)).rules[0].rules[0].icmps
    assert icmps == (ICMPField("IPv4", 8), ICMPField("IPv4", 3), ICMPField("IPv4", 11), ICMPField("IPv6", 128),
                     ICMPField("IPv6", 129), ICMPField("IPv6", 1), ICMPField("IPv4", 0), ICMPField("IPv4", 255),
                     ICMPField("IPv6", 135))


def test_http_rules() -> None:
    http = [{"method": "GET", "path": "/api/.*", "host": "api\\.example\\.com",
             "headers": ["X-Token: abc", "X-Present"],
             "headerMatches": [{"name": "X-A", "value": "1"}, {"name": "X-B", "value": "2", "mismatch": "LOG"}]},
            {"method": "POST"}]
    spec = {"endpointSelector": {}, "ingress": [{"toPorts": [
        {"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": http}}]}]}
    l7 = parse_policy_obj(cnp(spec)).rules[0].rules[0].ports[0].l7
    assert l7 is not None and l7.parser == "http"
    assert l7.rules == (
        HTTPRule(method="GET", path="/api/.*", host="api\\.example\\.com", headers=("X-Token: abc", "X-Present"),
                 header_matches=(HeaderMatch("X-A", "1"), HeaderMatch("X-B", "2", "LOG"))),
        HTTPRule(method="POST"),
    )


@pytest.mark.parametrize("http", [[], [{}], [{"method": "GET"}, {}]])
def test_empty_http_rules_allow_all_but_redirect(http: list) -> None:
    spec = {"endpointSelector": {}, "ingress": [{"toPorts": [
        {"ports": [{"port": "80", "protocol": "TCP"}], "rules": {"http": http}}]}]}
    l7 = parse_policy_obj(cnp(spec)).rules[0].rules[0].ports[0].l7
    assert l7 is not None and l7.parser == "http" and l7.rules == ()


def test_kafka_rules() -> None:
    kafka = [{"role": "produce", "topic": "orders"},
             {"apiKey": "Fetch", "apiVersion": "1", "clientID": "c1", "topic": "t.x-1"}]
    spec = {"endpointSelector": {}, "ingress": [{"toPorts": [
        {"ports": [{"port": "9092", "protocol": "TCP"}], "rules": {"kafka": kafka}}]}]}
    l7 = parse_policy_obj(cnp(spec)).rules[0].rules[0].ports[0].l7
    assert l7 is not None and l7.parser == "kafka"
    assert l7.rules == (KafkaRule(role="produce", topic="orders"),
                        KafkaRule(api_key="fetch", api_version="1", client_id="c1", topic="t.x-1"))


def test_dns_rules_on_udp_and_any() -> None:
    spec = {"endpointSelector": {}, "egress": [{
        "toEndpoints": [{"matchLabels": {"k8s:io.kubernetes.pod.namespace": "kube-system", "k8s-app": "kube-dns"}}],
        "toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}, {"port": "53", "protocol": "ANY"}],
                     "rules": {"dns": [{"matchPattern": "*.Example.com."}, {"matchName": "x.org"}]}}]}]}
    l7 = parse_policy_obj(cnp(spec)).rules[0].rules[0].ports[0].l7
    assert l7 is not None and l7.parser == "dns"
    assert l7.rules == (DNSRule(match_pattern="*.example.com"), DNSRule(match_name="x.org"))


def test_to_services_refused_without_a_service_source() -> None:
    spec = {"endpointSelector": {}, "egress": [
        {"toServices": [{"k8sService": {"serviceName": "db", "namespace": "x"}},
                        {"k8sServiceSelector": {"selector": {"matchLabels": {"a": "b"}}}}]}]}
    with pytest.raises(InvalidRule) as e:
        parse_policy_obj(cnp(spec))
    fields = [p.field for p in e.value.problems]
    assert fields == ["spec.egress[0].toServices[0]", "spec.egress[0].toServices[1]"]
    assert all("no Service source" in p.message for p in e.value.problems)


def test_description_and_labels() -> None:
    spec = {"endpointSelector": {}, "description": "hello",
            "labels": [{"key": "team", "value": "a", "source": "k8s"}]}
    rule = parse_policy_obj(cnp(spec)).rules[0]
    assert rule.description == "hello"


def test_rule_origin_and_document() -> None:
    pol = parse_policy(Document("f.yaml", 3, cnp({"endpointSelector": {}})))
    assert pol.origin == "f.yaml"
    assert pol.rules[0].origin == "f.yaml" and pol.rules[0].document == 3
    assert pol.raw["kind"] == "CiliumNetworkPolicy"


# --- Kubernetes NetworkPolicy ----------------------------------------------------------------

def test_np_subject_and_default_policy_types() -> None:
    rule = parse_policy_obj(np_({"podSelector": {"matchLabels": {"app": "db"}}})).rules[0]
    assert rule.subject == LabelSelector.build({"k8s:app": "db"}).with_requirement(ns_req("ns1"))
    assert rule.enforce_ingress and not rule.enforce_egress and rule.rules == ()


def test_np_empty_pod_selector_selects_namespace() -> None:
    rule = parse_policy_obj(np_({"podSelector": {}}, namespace=None)).rules[0]
    assert rule.subject == LabelSelector(frozenset({ns_req("default")}))


@pytest.mark.parametrize(("spec", "ingress", "egress"), [
    ({"podSelector": {}}, True, False),
    ({"podSelector": {}, "egress": [{}]}, True, True),
    ({"podSelector": {}, "egress": []}, True, False),
    ({"podSelector": {}, "policyTypes": ["Egress"]}, False, True),
    ({"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}, True, True),
])
def test_np_policy_types(spec: dict, ingress: bool, egress: bool) -> None:
    rule = parse_policy_obj(np_(spec)).rules[0]
    assert (rule.enforce_ingress, rule.enforce_egress) == (ingress, egress)


def test_np_rules_of_unlisted_direction_are_ignored() -> None:
    rule = parse_policy_obj(np_({"podSelector": {}, "policyTypes": ["Egress"],
                                 "ingress": [{}], "egress": [{}]})).rules[0]
    assert [pr.direction for pr in rule.rules] == [Direction.EGRESS]


def test_np_empty_rule_allows_all_peers_and_ports() -> None:
    rule = parse_policy_obj(np_({"podSelector": {}, "ingress": [{}, {"from": [], "ports": []}]})).rules[0]
    for pr in rule.rules:
        assert pr.peers is None and pr.ports == () and not pr.allows_nothing
    assert [pr.path for pr in rule.rules] == ["spec.ingress[0]", "spec.ingress[1]"]


def test_np_peers() -> None:
    spec = {"podSelector": {}, "ingress": [{"from": [
        {"podSelector": {"matchLabels": {"app": "a"}}},
        {"namespaceSelector": {"matchLabels": {"team": "x"}}},
        {"namespaceSelector": {"matchLabels": {"team": "x"}}, "podSelector": {"matchLabels": {"app": "b"}}},
        {"namespaceSelector": {}},
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.9.0.0/16"]}},
        {"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]}},
    ]}]}
    peers = parse_policy_obj(np_(spec)).rules[0].rules[0].peers
    assert peers is not None
    # podSelector alone: the policy's namespace.
    assert peers[0] == EndpointPeer(LabelSelector.build({"k8s:app": "a"}).with_requirement(ns_req("ns1")))
    # namespaceSelector alone: any pod in matching namespaces.
    assert peers[1] == EndpointPeer(LabelSelector.build({"k8s:io.cilium.k8s.namespace.labels.team": "x"}))
    # both: AND in one selector.
    assert peers[2] == EndpointPeer(LabelSelector.build(
        {"k8s:io.cilium.k8s.namespace.labels.team": "x", "k8s:app": "b"}))
    assert peers[2].selector.matches(pod_labels("other", {"team": "x"}, app="b"))  # type: ignore[union-attr]
    assert not peers[2].selector.matches(pod_labels("other", {"team": "y"}, app="b"))  # type: ignore[union-attr]
    # empty namespaceSelector: every pod of every namespace.
    assert peers[3] == EndpointPeer(LabelSelector(frozenset(
        {Requirement("k8s:io.kubernetes.pod.namespace", Operator.EXISTS)})))
    # ipBlock matches pod and node addresses too (upstream Kubernetes)
    assert peers[4] == CIDRPeer(ipaddress.ip_network("10.0.0.0/8"), (ipaddress.ip_network("10.9.0.0/16"),),
                                frozenset({"pods", "nodes"}))
    assert peers[5] == EndpointPeer(LabelSelector(frozenset({Requirement(
        "k8s:io.cilium.k8s.namespace.labels.env", Operator.IN, frozenset({"prod"}))})))


def test_np_ports() -> None:
    spec = {"podSelector": {}, "egress": [{"to": [{"podSelector": {}}], "ports": [
        {"port": 80}, {"protocol": "UDP", "port": 53}, {"port": "http"}, {"protocol": "SCTP"},
        {"port": 30000, "endPort": 32767},
    ]}]}
    pr = parse_policy_obj(np_(spec)).rules[0].rules[0]
    assert len(pr.ports) == 1
    assert pr.ports[0].ports == (PortProtocol(80, None, "TCP"), PortProtocol(53, None, "UDP"),
                                 PortProtocol(0, None, "TCP", "http"), PortProtocol(0, None, "SCTP"),
                                 PortProtocol(30000, 32767, "TCP"))
    assert pr.direction is Direction.EGRESS and pr.path == "spec.egress[0]"


# --- files -------------------------------------------------------------------------------

def write(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def test_load_multi_document_list_and_directory(tmp_path: Path) -> None:
    write(tmp_path, "b.yaml", """\
        apiVersion: v1
        kind: List
        items:
        - {apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {name: l1}, spec: {endpointSelector: {}}}
        - {apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {name: l2}, spec: {endpointSelector: {}}}
        """)
    write(tmp_path, "a.yml", """\
        apiVersion: v1
        kind: Namespace
        metadata: {name: x}
        ---
        ---
        apiVersion: v1
        kind: Pod
        metadata: {name: p}
        """)
    write(tmp_path, "c.json", '{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", '
                              '"metadata": {"name": "j"}, "spec": {"podSelector": {}}}')
    write(tmp_path, "ignored.txt", "not: yaml: [")
    docs = load_documents([str(tmp_path)])
    assert [(Path(d.file).name, d.index) for d in docs] == [
        ("a.yml", 0), ("a.yml", 1), ("b.yaml", 0), ("b.yaml", 1), ("c.json", 0)]
    assert docs[1].obj["kind"] == "Pod"  # no kind filtering
    with pytest.raises(InvalidRule) as e:
        parse_policies([str(tmp_path)])
    assert [(Path(p.file).name, p.document, p.field) for p in e.value.problems] == [
        ("a.yml", 0, "kind"), ("a.yml", 1, "kind")]
    assert "unsupported kind" in e.value.problems[0].message
    pols = parse_policies([str(tmp_path / "b.yaml"), str(tmp_path / "c.json")])
    assert [p.ref.name for p in pols] == ["l1", "l2", "j"]


def test_load_errors_name_file_and_line(tmp_path: Path) -> None:
    bad = write(tmp_path, "bad.yaml", "a: 1\n---\nb: [\n  c\n")
    badj = write(tmp_path, "bad.json", '{"a": }')
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(InvalidRule) as e:
        load_documents([bad, missing, badj])
    probs = e.value.problems
    assert {p.file for p in probs} == {bad, missing, badj}
    byfile = {p.file: p for p in probs}
    assert "line" in byfile[bad].message and byfile[bad].document == 1
    assert "no such file" in byfile[missing].message
    assert "invalid JSON" in byfile[badj].message and "line 1" in byfile[badj].message


def test_api_list_kinds_and_yaml_merge_keys(tmp_path: Path) -> None:
    write(tmp_path, "l.yaml", """\
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicyList
        items:
        - &base {apiVersion: cilium.io/v2, kind: CiliumNetworkPolicy, metadata: {name: a}, spec: {endpointSelector: {}}}
        - <<: *base
          metadata: {name: b}
        """)
    pols = parse_policies([str(tmp_path / "l.yaml")])
    assert [p.ref.name for p in pols] == ["a", "b"]


def test_init_selector_is_not_namespace_scoped() -> None:
    spec = {"endpointSelector": {}, "ingress": [{"fromEndpoints": [{"matchLabels": {"reserved:init": ""}}]}]}
    peer = parse_policy_obj(cnp(spec)).rules[0].rules[0].peers[0]  # type: ignore[index]
    assert peer == EndpointPeer(LabelSelector.build({"reserved:init": ""}))


def test_alias_bombs_and_cycles_are_problems(tmp_path: Path) -> None:
    lines = ['l0: &l0 ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 7):
        lines.append(f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]")
    bomb = write(tmp_path, "bomb.yaml", "\n".join(lines) + "\n")
    cycle = write(tmp_path, "cycle.yaml", "a: &a\n  b: *a\n")
    with pytest.raises(InvalidRule) as e:
        load_documents([bomb, cycle])
    msgs = {p.file: p.message for p in e.value.problems}
    assert "too large" in msgs[bomb] and "recursive" in msgs[cycle]


def test_timestamps_stay_strings(tmp_path: Path) -> None:
    f = write(tmp_path, "ts.yaml", """\
        apiVersion: networking.k8s.io/v1
        kind: NetworkPolicy
        metadata: {name: x, creationTimestamp: 2024-01-01T00:00:00Z}
        spec: {}
        """)
    (doc,) = load_documents([f])
    assert doc.obj["metadata"]["creationTimestamp"] == "2024-01-01T00:00:00Z"
    assert parse_policy(doc).ref.name == "x"
