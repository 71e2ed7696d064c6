"""Validation: every problem is reported with its file, document and field path."""

from __future__ import annotations

from typing import Any

import pytest
from axoneme.core.errors import InvalidRule, Problem
from axoneme.core.policy.parse import Document, parse_policy


def cnp(spec: Any, kind: str = "CiliumNetworkPolicy") -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": {"name": "p", "namespace": "ns"}, "spec": spec}


def np_(spec: Any) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "n"}, "spec": spec}


def problems(obj: Any, file: str = "x.yaml", index: int = 4) -> list[Problem]:
    with pytest.raises(InvalidRule) as e:
        parse_policy(Document(file, index, obj))
    for p in e.value.problems:
        assert p.file == file and p.document == index
    return e.value.problems


def fields(obj: Any) -> dict[str, str]:
    return {p.field: p.message for p in problems(obj)}


def one(obj: Any) -> Problem:
    probs = problems(obj)
    assert len(probs) == 1, probs
    return probs[0]


def ing(rule: dict[str, Any]) -> dict[str, Any]:
    return cnp({"endpointSelector": {}, "ingress": [rule]})


def egr(rule: dict[str, Any]) -> dict[str, Any]:
    return cnp({"endpointSelector": {}, "egress": [rule]})


def tcp(port: Any = "80", **kw: Any) -> dict[str, Any]:
    return {"ports": [{"port": port, "protocol": "TCP"}], **kw}


# --- document level ----------------------------------------------------------------------

@pytest.mark.parametrize("obj", [[], "text", 3, True])
def test_not_a_mapping(obj: Any) -> None:
    p = one(obj)
    assert p.field == "" and "expected a Kubernetes object" in p.message


def test_unsupported_and_missing_kind() -> None:
    p = one({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}})
    assert (p.field, p.message.startswith("unsupported kind \"Pod\"")) == ("kind", True)
    assert one({"apiVersion": "v1"}).field == "kind"


def test_wrong_api_version_and_missing_fields() -> None:
    obj = cnp({"endpointSelector": {}})
    obj["apiVersion"] = "cilium.io/v1"
    del obj["metadata"]
    f = fields(obj)
    assert "unsupported apiVersion" in f["apiVersion"]
    assert "missing required field" in f["metadata.name"]


def test_unknown_fields_are_named() -> None:
    obj = cnp({"endpointSelector": {}, "ingres": [], "ingress": [{"fromEndpoint": [{}]}]})
    obj["extra"] = 1
    f = fields(obj)
    assert f == {
        "extra": 'unknown field "extra"',
        "spec.ingres": 'unknown field "ingres"',
        "spec.ingress[0].fromEndpoint": 'unknown field "fromEndpoint"',
    }


@pytest.mark.parametrize("name", ["Upper", "-x", "x_y", "a" * 254, ""])
def test_invalid_metadata_name(name: str) -> None:
    obj = cnp({"endpointSelector": {}})
    obj["metadata"]["name"] = name
    assert one(obj).field == "metadata.name"


def test_invalid_namespace_and_wrong_types() -> None:
    obj = cnp({"endpointSelector": {}})
    obj["metadata"] = {"name": 5, "namespace": "Bad_NS"}
    f = fields(obj)
    assert f["metadata.name"] == "expected a string, got integer"
    assert "invalid namespace" in f["metadata.namespace"]


def test_all_problems_reported_at_once() -> None:
    spec = {"endpointSelector": {}, "ingress": [
        {"toPorts": [{"ports": [{"port": 70000}, {"port": "80", "protocol": "XYZ"}]}]},
        {"fromEntities": ["mars"]},
    ], "egress": [{"toCIDR": ["300.0.0.0/8"]}]}
    assert set(fields(cnp(spec))) == {
        "spec.ingress[0].toPorts[0].ports[0].port",
        "spec.ingress[0].toPorts[0].ports[1].protocol",
        "spec.ingress[1].fromEntities[0]",
        "spec.egress[0].toCIDR[0]",
    }


def test_missing_spec() -> None:
    obj = cnp(None)
    assert one(obj).field == "spec"
    assert one(np_(None)).field == "spec"


# --- selectors ---------------------------------------------------------------------------

def test_endpoint_selector_required_and_exclusive() -> None:
    assert one(cnp({"ingress": [{}]})).field == "spec.endpointSelector"
    p = one(cnp({"endpointSelector": {}, "nodeSelector": {}}))
    assert "nodeSelector is only allowed" in p.message and p.field == "spec.nodeSelector"
    p = one(cnp({"endpointSelector": {}, "nodeSelector": {}}, kind="CiliumClusterwideNetworkPolicy"))
    assert "both" in p.message and p.field == "spec"


@pytest.mark.parametrize(("selector", "field", "text"), [
    ({"matchLabels": {"bad key!": "x"}}, "matchLabels.bad key!", "invalid label key"),
    ({"matchLabels": {"foo:bar": "x"}}, "matchLabels.foo:bar", "invalid label key"),
    ({"matchLabels": {"app": "bad value!"}}, "matchLabels.app", "invalid label value"),
    ({"matchLabels": {"app": 3}}, "matchLabels.app", "expected a string label value"),
    ({"matchLabels": ["a"]}, "matchLabels", "expected a mapping"),
    ({"matchExpressions": [{"key": "a", "operator": "In"}]}, "matchExpressions[0].values", "requires at least one"),
    ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": []}]}, "matchExpressions[0].values",
     "requires at least one"),
    ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}, "matchExpressions[0].values",
     "must not have values"),
    ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist", "values": ["x"]}]},
     "matchExpressions[0].values", "must not have values"),
    ({"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["x"]}]}, "matchExpressions[0].operator",
     "invalid operator"),
    ({"matchExpressions": [{"operator": "Exists"}]}, "matchExpressions[0].key", "missing required"),
    ({"matchExpressions": [{"key": "a"}]}, "matchExpressions[0].operator", "missing required"),
    ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["ok", "no way"]}]},
     "matchExpressions[0].values[1]", "invalid label value"),
    ({"matchLabel": {}}, "matchLabel", "unknown field"),
])
def test_bad_selectors(selector: dict[str, Any], field: str, text: str) -> None:
    p = one(cnp({"endpointSelector": selector}))
    assert p.field == f"spec.endpointSelector.{field}"
    assert text in p.message
    p = one(ing({"fromEndpoints": [{}, selector]}))
    assert p.field == f"spec.ingress[0].fromEndpoints[1].{field}"


def test_np_selector_keys_must_be_plain_label_keys() -> None:
    p = one(np_({"podSelector": {"matchLabels": {"k8s:app": "x"}}}))
    assert p.field == "spec.podSelector.matchLabels.k8s:app"


# --- ports -------------------------------------------------------------------------------

@pytest.mark.parametrize(("port", "field", "text"), [
    ({"port": 70000}, "port", "out of range"),
    ({"port": -1}, "port", "out of range"),
    ({"port": "65536"}, "port", "out of range"),
    ({"port": "my_port"}, "port", "invalid port"),
    ({"port": "a-very-long-port-name"}, "port", "invalid port"),
    ({"port": "-http"}, "port", "invalid port"),
    ({"port": "ht--tp"}, "port", "invalid port"),
    ({"port": 1.5}, "port", "expected a port number or name"),
    ({"port": True}, "port", "expected a port number or name"),
    ({"port": "80", "endPort": 79}, "endPort", "less than port"),
    ({"port": "http", "endPort": 90}, "endPort", "named port"),
    ({"port": "80", "endPort": 70000}, "endPort", "out of range"),
    ({"port": "80", "endPort": "90"}, "endPort", "expected an integer"),
    ({"port": "80", "protocol": "ICMP"}, "protocol", "invalid protocol"),
    ({"port": "80", "protocol": "HTTP"}, "protocol", "invalid protocol"),
    ({"port": "80", "prot": "TCP"}, "prot", "unknown field"),
])
def test_bad_cilium_ports(port: dict[str, Any], field: str, text: str) -> None:
    p = one(ing({"toPorts": [{"ports": [{"port": "1"}, port]}]}))
    assert p.field == f"spec.ingress[0].toPorts[0].ports[1].{field}"
    assert text in p.message


@pytest.mark.parametrize(("port", "field", "text"), [
    ({"port": 0x10000}, "port", "out of range"),
    ({"port": "bad name"}, "port", "invalid port"),
    ({"port": 80, "endPort": 10}, "endPort", "less than port"),
    ({"port": "http", "endPort": 90}, "endPort", "named port"),
    ({"endPort": 90}, "endPort", "requires a port"),
    ({"port": 80, "protocol": "ANY"}, "protocol", "invalid protocol"),
    ({"port": 80, "protocol": "tcp"}, "protocol", "invalid protocol"),
])
def test_bad_np_ports(port: dict[str, Any], field: str, text: str) -> None:
    p = one(np_({"podSelector": {}, "ingress": [{"ports": [{"port": 1}, port]}]}))
    assert p.field == f"spec.ingress[0].ports[1].{field}"
    assert text in p.message


# --- CIDRs -------------------------------------------------------------------------------

@pytest.mark.parametrize(("rule", "field", "text"), [
    ({"toCIDR": ["10.0.0.0/33"]}, "toCIDR[0]", "invalid CIDR"),
    ({"toCIDR": ["nonsense"]}, "toCIDR[0]", "invalid CIDR"),
    ({"toCIDR": [10]}, "toCIDR[0]", "expected a string"),
    ({"toCIDRSet": [{"cidr": "10.0.0.1"}]}, "toCIDRSet[0].cidr", "prefix length is required"),
    ({"toCIDRSet": [{"except": ["10.0.0.0/8"]}]}, "toCIDRSet[0].cidr", "missing required"),
    ({"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16"]}]}, "toCIDRSet[0].except[0]",
     "not inside"),
    ({"toCIDRSet": [{"cidr": "10.0.0.0/16", "except": ["10.0.0.0/8"]}]}, "toCIDRSet[0].except[0]",
     "not inside"),
    ({"toCIDRSet": [{"cidr": "10.0.0.0/8", "except": ["::/64"]}]}, "toCIDRSet[0].except[0]", "not inside"),
    ({"toCIDRSet": [{"cidrGroupRef": "g"}]}, "toCIDRSet[0].cidrGroupRef", "not supported"),
])
def test_bad_cidrs(rule: dict[str, Any], field: str, text: str) -> None:
    p = one(egr(rule))
    assert p.field == f"spec.egress[0].{field}"
    assert text in p.message


def test_np_ipblock_problems() -> None:
    f = fields(np_({"podSelector": {}, "ingress": [{"from": [
        {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["192.168.0.0/16"]}},
        {"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}},
        {},
    ]}]}))
    assert set(f) == {"spec.ingress[0].from[0].ipBlock.except[0]", "spec.ingress[0].from[1]",
                      "spec.ingress[0].from[2]"}


# --- entities, fqdns, services, requires -----------------------------------------------

def test_unknown_entity() -> None:
    p = one(ing({"fromEntities": ["world", "everything"]}))
    assert p.field == "spec.ingress[0].fromEntities[1]" and 'unknown entity "everything"' in p.message


@pytest.mark.parametrize(("fqdn", "field"), [
    ({"matchName": "bad name.com"}, "matchName"),
    ({"matchName": "*.x.com"}, "matchName"),
    ({"matchPattern": "x?.com"}, "matchPattern"),
    ({"matchPattern": "x/y"}, "matchPattern"),
])
def test_bad_fqdn(fqdn: dict[str, str], field: str) -> None:
    p = one(egr({"toFQDNs": [fqdn]}))
    assert p.field == f"spec.egress[0].toFQDNs[0].{field}"


def test_fqdn_needs_exactly_one_match() -> None:
    f = fields(egr({"toFQDNs": [{}, {"matchName": "a.com", "matchPattern": "*.a.com"}]}))
    assert set(f) == {"spec.egress[0].toFQDNs[0]", "spec.egress[0].toFQDNs[1]"}


def test_fqdn_mixed_with_other_l3() -> None:
    p = one(egr({"toFQDNs": [{"matchName": "a.com"}], "toCIDR": ["1.1.1.1/32"]}))
    assert p.field == "spec.egress[0].toFQDNs" and "toCIDR" in p.message


def test_fqdn_in_deny_rule() -> None:
    p = one(cnp({"endpointSelector": {}, "egressDeny": [{"toFQDNs": [{"matchName": "a.com"}]}]}))
    assert p.field == "spec.egressDeny[0].toFQDNs" and "deny" in p.message


def test_fqdn_on_ingress_is_unknown() -> None:
    assert one(ing({"toFQDNs": [{"matchName": "a.com"}]})).field == "spec.ingress[0].toFQDNs"


def test_to_services_problems() -> None:
    # with toPorts: only the missing Service source (current Cilium enforces the combination)
    f = fields(egr({"toServices": [{"k8sService": {"serviceName": "db"}}], "toPorts": [tcp()]}))
    assert set(f) == {"spec.egress[0].toServices[0]"}
    # well-formed, and still refused: no Service source in an offline parse
    p = one(egr({"toServices": [{"k8sService": {"serviceName": "db"}}]}))
    assert p.field == "spec.egress[0].toServices[0]" and "no Service source" in p.message
    f = fields(egr({"toServices": [{}, {"k8sService": {}}, {"k8sServiceSelector": {"selector": {"x": 1}}}]}))
    assert set(f) == {"spec.egress[0].toServices[0]", "spec.egress[0].toServices[1].k8sService.serviceName",
                      "spec.egress[0].toServices[2].k8sServiceSelector.selector.x"}


@pytest.mark.parametrize(("direction", "field"), [("ingress", "fromRequires"), ("egress", "toRequires"),
                                                  ("ingressDeny", "fromRequires")])
def test_requires_rejected(direction: str, field: str) -> None:
    p = one(cnp({"endpointSelector": {}, direction: [{field: [{}]}]}))
    assert p.field == f"spec.{direction}[0].{field}"
    assert "not supported (deprecated in Cilium 1.17)" in p.message


def test_unsupported_fields() -> None:
    f = fields(ing({"fromNodes": [{}], "authentication": {"mode": "required"},
                    "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}], "serverNames": ["x"]}]}))
    assert set(f) == {"spec.ingress[0].fromNodes", "spec.ingress[0].authentication",
                      "spec.ingress[0].toPorts[0].serverNames"}
    assert all("not supported" in m for m in f.values())


# --- ICMP --------------------------------------------------------------------------------

@pytest.mark.parametrize(("field", "path", "text"), [
    ({"type": "EchoRequests"}, "type", "unknown IPv4 ICMP type"),
    ({"family": "IPv6", "type": "Echo"}, "type", "unknown IPv6 ICMP type"),
    ({"family": "IPv4", "type": "PacketTooBig"}, "type", "unknown IPv4 ICMP type"),
    ({"type": 256}, "type", "out of range"),
    ({"type": -1}, "type", "out of range"),
    ({"type": "300"}, "type", "out of range"),
    ({"type": True}, "type", "expected an ICMP type"),
    ({"family": "IPv5", "type": 8}, "family", "invalid family"),
    ({"family": "IPv4"}, "type", "missing required"),
])
def test_bad_icmp(field: dict[str, Any], path: str, text: str) -> None:
    p = one(egr({"icmps": [{"fields": [{"type": 8}, field]}]}))
    assert p.field == f"spec.egress[0].icmps[0].fields[1].{path}"
    assert text in p.message


# --- L7 ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("http", "field"), [
    ({"method": "GET("}, "method"),
    ({"path": "/a[b"}, "path"),
    ({"host": "*.x.com"}, "host"),
    ({"path": "(?P<x"}, "path"),
])
def test_bad_http_regex(http: dict[str, str], field: str) -> None:
    p = one(ing({"toPorts": [tcp(rules={"http": [{}, http]})]}))
    assert p.field == f"spec.ingress[0].toPorts[0].rules.http[1].{field}"
    assert "invalid regular expression" in p.message


def test_bad_http_header_matches() -> None:
    f = fields(ing({"toPorts": [tcp(rules={"http": [{"headerMatches": [
        {"value": "x"}, {"name": "a", "mismatch": "DROP"}, {"name": "a", "secret": {"name": "s"}}],
        "headers": [3]}]})]}))
    base = "spec.ingress[0].toPorts[0].rules.http[0]"
    assert set(f) == {f"{base}.headerMatches[0].name", f"{base}.headerMatches[1].mismatch",
                      f"{base}.headerMatches[2].secret", f"{base}.headers[0]"}


@pytest.mark.parametrize("proto", ["UDP", "SCTP", "ANY"])
def test_http_on_non_tcp(proto: str) -> None:
    p = one(ing({"toPorts": [{"ports": [{"port": "80", "protocol": proto}], "rules": {"http": [{}]}}]}))
    assert p.field == "spec.ingress[0].toPorts[0].ports[0].protocol"
    assert "only apply to TCP" in p.message


def test_http_without_protocol_is_any_and_rejected() -> None:
    p = one(ing({"toPorts": [{"ports": [{"port": "80"}], "rules": {"http": [{}]}}]}))
    assert p.field == "spec.ingress[0].toPorts[0].ports[0].protocol"


@pytest.mark.parametrize("proto", ["UDP", "ANY", "TCP"])
def test_dns_allows_udp_and_any(proto: str) -> None:
    pol = parse_policy(Document("f", 0, egr({"toPorts": [
        {"ports": [{"port": "53", "protocol": proto}], "rules": {"dns": [{"matchPattern": "*"}]}}]})))
    (port_rule,) = pol.rules[0].rules[0].ports
    assert [(p.port, p.protocol) for p in port_rule.ports] == [(53, proto)]
    assert port_rule.l7 is not None and port_rule.l7.parser == "dns"
    assert [r.match_pattern for r in port_rule.l7.rules] == ["*"]


def test_dns_problems() -> None:
    p = one(ing({"toPorts": [{"ports": [{"port": "53", "protocol": "UDP"}], "rules": {"dns": [{"matchName": "a"}]}}]}))
    assert p.field == "spec.ingress[0].toPorts[0].rules.dns" and "ingress" in p.message
    p = one(egr({"toPorts": [{"rules": {"dns": [{"matchName": "a"}]}}]}))
    assert p.field == "spec.egress[0].toPorts[0].ports" and "53" in p.message
    p = one(egr({"toPorts": [{"ports": [{"port": "53"}], "rules": {"dns": [{"matchName": "bad name"}]}}]}))
    assert p.field == "spec.egress[0].toPorts[0].rules.dns[0].matchName"


def test_more_than_one_l7_type() -> None:
    p = one(ing({"toPorts": [tcp(rules={"http": [{}], "kafka": [{}]})]}))
    assert p.field == "spec.ingress[0].toPorts[0].rules" and "more than one L7" in p.message


def test_l7_with_port_range_and_port_zero() -> None:
    p = one(ing({"toPorts": [{"ports": [{"port": "80", "endPort": 90, "protocol": "TCP"}],
                              "rules": {"http": [{}]}}]}))
    assert p.field == "spec.ingress[0].toPorts[0].ports[0].endPort" and "range" in p.message
    p = one(ing({"toPorts": [{"ports": [{"port": "0", "protocol": "TCP"}], "rules": {"http": [{}]}}]}))
    assert p.field == "spec.ingress[0].toPorts[0].ports[0].port"


def test_l7_in_deny_rule() -> None:
    p = one(cnp({"endpointSelector": {}, "ingressDeny": [{"toPorts": [tcp(rules={"http": [{}]})]}]}))
    assert p.field == "spec.ingressDeny[0].toPorts[0].rules" and "deny" in p.message


def test_l7_in_host_policy() -> None:
    probs = problems(cnp({"nodeSelector": {}, "ingress": [{"toPorts": [tcp(rules={"http": [{}]})]}]},
                         kind="CiliumClusterwideNetworkPolicy"))
    # L7 in a host policy is refused (as Cilium, which allows only DNS there)
    assert [p.field for p in probs] == ["spec.ingress[0].toPorts[0].rules.http"]


@pytest.mark.parametrize(("kafka", "field", "text"), [
    ({"role": "admin"}, "role", "invalid role"),
    ({"role": "produce", "apiKey": "produce"}, "apiKey", "role and apiKey"),
    ({"apiKey": "nonsense"}, "apiKey", "unknown Kafka apiKey"),
    ({"apiVersion": "x"}, "apiVersion", "invalid apiVersion"),
    ({"topic": "bad topic"}, "topic", "invalid topic"),
    ({"topic": "t" * 256}, "topic", "invalid topic"),
    ({"clientId": "x"}, "clientId", "unknown field"),
])
def test_bad_kafka(kafka: dict[str, str], field: str, text: str) -> None:
    p = one(ing({"toPorts": [tcp("9092", rules={"kafka": [kafka]})]}))
    assert p.field == f"spec.ingress[0].toPorts[0].rules.kafka[0].{field}"
    assert text in p.message


def test_generic_l7_unknown_parser() -> None:
    p = one(ing({"toPorts": [tcp(rules={"l7proto": "r2d2", "l7": [{"cmd": "READ"}]})]}))
    assert p.field == "spec.ingress[0].toPorts[0].rules.l7proto"
    assert "unknown L7 parser \"r2d2\"" in p.message and "installed: " in p.message


# --- types, enableDefaultDeny, NP specifics ----------------------------------------------------

@pytest.mark.parametrize(("spec", "field", "text"), [
    ({"endpointSelector": {}, "ingress": {}}, "spec.ingress", "expected a list"),
    ({"endpointSelector": {}, "ingress": ["x"]}, "spec.ingress[0]", "expected a mapping"),
    ({"endpointSelector": [], "ingress": []}, "spec.endpointSelector", "expected a mapping"),
    ({"endpointSelector": {}, "enableDefaultDeny": {"ingress": "no"}}, "spec.enableDefaultDeny.ingress",
     "expected a boolean"),
    ({"endpointSelector": {}, "enableDefaultDeny": {"both": True}}, "spec.enableDefaultDeny.both", "unknown"),
    ({"endpointSelector": {}, "description": 5}, "spec.description", "expected a string"),
    ({"endpointSelector": {}, "labels": [{"value": "x"}]}, "spec.labels[0].key", "missing required"),
    ({"endpointSelector": {}, "ingress": [{"toPorts": [{"ports": "80"}]}]}, "spec.ingress[0].toPorts[0].ports",
     "expected a list"),
])
def test_wrong_types(spec: dict[str, Any], field: str, text: str) -> None:
    p = one(cnp(spec))
    assert p.field == field and text in p.message


def test_np_problems() -> None:
    f = fields(np_({"podSelector": {}, "policyTypes": ["Ingress", "Both"], "egress": [{"from": []}],
                    "ingress": [{"to": []}]}))
    assert set(f) == {"spec.policyTypes[1]", "spec.egress[0].from", "spec.ingress[0].to"}
    obj = np_({"podSelector": {}})
    obj["specs"] = []
    assert one(obj).field == "specs"


def test_metadata_labels_checked() -> None:
    obj = cnp({"endpointSelector": {}})
    obj["metadata"]["labels"] = {"ok": "yes", "bad key": "x", "k": "bad value", "n": 5}
    assert set(fields(obj)) == {"metadata.labels.bad key", "metadata.labels.k", "metadata.labels.n"}


def test_null_cidrset_item_is_a_problem_not_a_crash(tmp_path):
    # found by the CLI fuzz test: toCIDRSet: [null] crashed the parser
    from axoneme.core.errors import InvalidRule
    from axoneme.core.policy.parse import parse_policies

    f = tmp_path / "p.yaml"
    f.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\n"
                 "spec:\n  endpointSelector: {}\n  egress:\n  - toCIDRSet: [null]\n")
    import pytest as _pytest
    with _pytest.raises(InvalidRule) as e:
        parse_policies([str(f)])
    assert any(p.field == "spec.egress[0].toCIDRSet[0].cidr" for p in e.value.problems)
