"""CiliumNetworkPolicy toServices (issue 16, "nothing accepted and then ignored"):
parsed where a Service source exists and refused elsewhere; Cilium's
translation (selector -> endpoint selector in the Service's namespace,
no selector -> its EndpointSlices' addresses as CIDRs); re-translation when
Services or EndpointSlices change."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from axoneme.core.cluster import Cluster
from axoneme.core.errors import InvalidRule
from axoneme.core.mapstate import ADDRESS_IDENTITY, Direction, Protocol
from axoneme.core.policy.api import CIDRPeer, EndpointPeer, ServicePeer
from axoneme.core.policy.engine import EngineOptions
from axoneme.core.policy.parse import parse_policy_obj
from axoneme.core.policy.services import (
    Service,
    ServiceCatalog,
    service_matches,
    service_peers,
    slice_addresses,
    translate,
)
from axoneme.core.policy.trace import OfflineCluster, matrix, parse_port
from axoneme.core.selectors import LabelSelector

EG = Direction.EGRESS
EXTERNAL = "198.51.100.10"


def pod(ns: str, name: str, ip: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"containers": [{}]}, "status": {"podIP": ip}}


# y/db1 and z/db2 carry the same labels: only the Service's namespace tells them apart
CLUSTER = [
    {"kind": "Namespace", "metadata": {"name": n}} for n in ("x", "y", "z")
] + [
    pod("x", "client", "10.244.1.1", {"app": "client"}),
    pod("y", "db1", "10.244.2.1", {"app": "db"}),
    pod("y", "web", "10.244.2.2", {"app": "web"}),
    pod("z", "db2", "10.244.3.1", {"app": "db"}),
]


def service(name: str, ns: str = "y", selector: dict[str, str] | None = None,
            labels: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"ports": [{"port": 80}]}
    if selector is not None:
        spec["selector"] = selector
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}}, "spec": spec}


def endpoint_slice(name: str, svc: str, *addrs: str | tuple[str, dict[str, bool]],
                   ns: str = "y", family: str = "IPv4") -> dict[str, Any]:
    eps = []
    for a in addrs:
        ip, cond = a if isinstance(a, tuple) else (a, {})
        eps.append({"addresses": [ip], **({"conditions": cond} if cond else {})})
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns,
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": family, "endpoints": eps, "ports": [{"port": 80}]}


def cnp(*to_services: dict[str, Any], ports: list[str] | None = None,
        kind: str = "CiliumNetworkPolicy") -> dict[str, Any]:
    rule: dict[str, Any] = {"toServices": list(to_services)}
    if ports:
        rule["toPorts"] = [{"ports": [{"port": p, "protocol": "TCP"} for p in ports]}]
    meta = {"name": "to-svc"} if kind != "CiliumNetworkPolicy" else {"name": "to-svc", "namespace": "x"}
    return {"apiVersion": "cilium.io/v2", "kind": kind, "metadata": meta,
            "spec": {"endpointSelector": {"matchLabels": {"app": "client"}}, "egress": [rule]}}


def by_name(name: str, ns: str | None = None) -> dict[str, Any]:
    return {"k8sService": {"serviceName": name, **({"namespace": ns} if ns is not None else {})}}


def by_labels(labels: dict[str, str], ns: str | None = None) -> dict[str, Any]:
    return {"k8sServiceSelector": {"selector": {"matchLabels": labels},
                                   **({"namespace": ns} if ns is not None else {})}}


def build(policies: list[dict[str, Any]], objs: list[dict[str, Any]], mode: str = "") -> OfflineCluster:
    return OfflineCluster.build(Cluster.from_objects(CLUSTER),
                                [parse_policy_obj(p, services=True) for p in policies],
                                EngineOptions(cidr_match_mode=mode),
                                ServiceCatalog.from_objects(objs).services())


def verdicts(env: OfflineCluster, port: str = "80") -> dict[str, str]:
    return {p.dst: p.verdict for p in matrix(env, [parse_port(port)]) if p.src == "x/client"}


# -- parsing and refusal ------------------------------------------------------------------

def test_refused_without_a_service_source_with_file_and_field() -> None:
    with pytest.raises(InvalidRule) as e:
        parse_policy_obj(cnp(by_name("db", "y")), "pol.yaml")
    [p] = e.value.problems
    assert (p.file, p.field) == ("pol.yaml", "spec.egress[0].toServices[0]")
    assert "no Service source" in p.message


def test_parsed_where_a_source_exists() -> None:
    pol = parse_policy_obj(cnp(by_name("db", "y"), by_labels({"tier": "data"}), by_name("x", "")),
                           services=True)
    peers = pol.rules[0].rules[0].peers
    assert peers == (ServicePeer(name="db", namespace="y"),
                     ServicePeer(selector=LabelSelector.build({"tier": "data"})),
                     ServicePeer(name="x"))  # an empty namespace: every namespace (Cilium)
    assert peers is not None and peers[1].path == "spec.egress[0].toServices[1]"
    # with toPorts: accepted (current Cilium enforces both: no widening to any peer)
    parse_policy_obj(cnp(by_name("db"), ports=["80"]), services=True)


def test_deny_rules_and_bad_items_are_refused_even_with_a_source() -> None:
    deny = cnp(by_name("db"))
    deny["spec"]["egressDeny"] = deny["spec"].pop("egress")
    with pytest.raises(InvalidRule) as e:
        parse_policy_obj(deny, services=True)
    assert [(p.field, p.message) for p in e.value.problems] == [
        ("spec.egressDeny[0].toServices", "toServices is not allowed in deny rules")]
    with pytest.raises(InvalidRule) as e:
        parse_policy_obj(cnp({"k8sService": {"namespace": "y"}}, {}), services=True)
    assert {p.field for p in e.value.problems} == {
        "spec.egress[0].toServices[0].k8sService.serviceName", "spec.egress[0].toServices[1]"}


# -- Cilium's matching and translation ----------------------------------------------------

def test_which_services_a_peer_matches() -> None:
    db_y = Service("y", "db", (("tier", "data"),))
    db_z = Service("z", "db")
    assert service_matches(ServicePeer(name="db"), db_y) and service_matches(ServicePeer(name="db"), db_z)
    assert not service_matches(ServicePeer(name="db", namespace="y"), db_z)
    sel = ServicePeer(selector=LabelSelector.build({"tier": "data"}))
    assert service_matches(sel, db_y) and not service_matches(sel, db_z)
    # label sources are ignored on the Service's side (Cilium's labelsMatcher)
    assert service_matches(ServicePeer(selector=LabelSelector.build({"k8s:tier": "data"})), db_y)


def test_peers_of_a_service_with_and_without_selector() -> None:
    [peer] = service_peers(Service("y", "db", selector=(("app", "db"),), addresses=("10.244.2.1",)))
    assert isinstance(peer, EndpointPeer)
    assert str(peer.selector) == "{app In (db), k8s:io.kubernetes.pod.namespace In (y)}"
    got = service_peers(Service("y", "ext", addresses=("198.51.100.10", "2001:db8::1")))
    assert got == (CIDRPeer(ipaddress.ip_network("198.51.100.10/32")),
                   CIDRPeer(ipaddress.ip_network("2001:db8::1/128")))


def test_translate_keeps_other_peers_and_drops_what_matches_nothing() -> None:
    pol = parse_policy_obj(cnp(by_name("ext"), by_name("missing")), services=True)
    out = translate(pol, {("y", "ext"): Service("y", "ext", addresses=(EXTERNAL,))})
    assert out.rules[0].rules[0].peers == (CIDRPeer(ipaddress.ip_network(f"{EXTERNAL}/32")),)
    nothing = translate(pol, {})
    assert nothing.rules[0].rules[0].peers == ()  # selects no peer; egress still enforced
    assert nothing.rules[0].enforce_egress


def test_endpoint_slice_addresses_ready_or_serving() -> None:
    eps = endpoint_slice("s", "ext", "10.0.0.1", ("10.0.0.2", {"ready": False}),
                         ("10.0.0.3", {"ready": False, "serving": True, "terminating": True}),
                         ("10.0.0.4", {"ready": True}), "not-an-ip")
    assert slice_addresses(eps) == ("10.0.0.1", "10.0.0.3", "10.0.0.4")
    assert slice_addresses({**eps, "addressType": "FQDN"}) == ()
    cat = ServiceCatalog.from_objects([service("ext"), eps,
                                       endpoint_slice("s6", "ext", "2001:db8::2", family="IPv6"),
                                       endpoint_slice("other", "nope", "10.9.9.9")])
    [svc] = cat.services()  # a slice without its Service gives nothing
    assert svc.addresses == ("10.0.0.1", "10.0.0.3", "10.0.0.4", "2001:db8::2")
    # a slice moving to another Service changes both
    assert cat.apply("EndpointSlice", "MODIFIED", endpoint_slice("s6", "other6", "2001:db8::2",
                                                                  family="IPv6")) == {
        ("y", "ext"), ("y", "other6")}
    assert cat.get(("y", "ext")).addresses == ("10.0.0.1", "10.0.0.3", "10.0.0.4")  # type: ignore[union-attr]
    cat.apply("Service", "DELETED", service("ext"))
    assert cat.services() == [] and not cat.has_services


# -- resolution -----------------------------------------------------------------------------

def test_service_with_selector_allows_its_pods_in_its_namespace_only() -> None:
    objs = [service("db", selector={"app": "db"}), service("web", selector={"app": "web"})]
    got = verdicts(build([cnp(by_name("db"))], objs))
    assert got["y/db1"] == "allowed"
    assert got["z/db2"] == "denied"  # same labels, not the Service's namespace
    assert got["y/web"] == "denied"  # another Service
    # by the Service's labels, in one namespace or all
    objs = [service("db", selector={"app": "db"}, labels={"tier": "data"}),
            service("db", ns="z", selector={"app": "db"}, labels={"tier": "data"})]
    assert verdicts(build([cnp(by_labels({"tier": "data"}, "z"))], objs))["y/db1"] == "denied"
    got = verdicts(build([cnp(by_labels({"tier": "data"}))], objs))
    assert got["y/db1"] == got["z/db2"] == "allowed" and got["y/web"] == "denied"


def test_service_without_selector_selects_its_addresses_with_cidr_meaning() -> None:
    objs = [service("ext"), endpoint_slice("ext-1", "ext", EXTERNAL, "10.244.2.2")]
    env = build([cnp(by_name("ext", "y"), kind="CiliumClusterwideNetworkPolicy")], objs)
    client = env.endpoints["x/client"].id
    state = env.engine.resolve(client)
    ext_id = env.engine.identity_of_ip(EXTERNAL)
    assert state.lookup(ext_id, EG, Protocol.TCP, 443).allowed
    assert not state.lookup(env.engine.identity_of_ip("198.51.100.11"), EG, Protocol.TCP, 443).allowed
    # a pod address: CIDR selectors cannot select pods (Cilium), unless the match mode says so
    assert verdicts(env)["y/web"] == "denied"
    got = verdicts(build([cnp(by_name("ext"))], objs, mode="pods"))
    assert got["y/web"] == "allowed" and got["y/db1"] == "denied"


def test_to_ports_apply_to_the_services_peers() -> None:
    objs = [service("db", selector={"app": "db"})]
    env = build([cnp(by_name("db"), ports=["5432"])], objs)
    assert verdicts(env, "5432")["y/db1"] == "allowed"
    assert verdicts(env, "80")["y/db1"] == "denied"
    assert verdicts(env, "5432")["y/web"] == "denied"  # no widening to every peer (cilium#20067)


def test_re_resolution_when_endpoint_slices_and_services_change() -> None:
    policy = cnp(by_name("ext"), by_name("db"))
    env = build([policy], [])
    engine, client = env.engine, env.endpoints["x/client"].id
    engine.pending_changes()
    assert verdicts(env)["y/db1"] == "denied"  # nothing known yet: nothing allowed
    cat = ServiceCatalog()

    def feed(kind: str, etype: str, obj: dict[str, Any]) -> list[str]:
        changed = cat.apply(kind, etype, obj)
        return [r.name for r in engine.update_services({k: cat.get(k) for k in changed})]

    assert feed("Service", "ADDED", service("ext")) == []  # no address yet: same rules
    assert feed("EndpointSlice", "ADDED", endpoint_slice("e1", "ext", EXTERNAL)) == ["to-svc"]
    ext_id = engine.identity_of_ip(EXTERNAL)
    changes = engine.pending_changes()[client]
    assert {k.identity for k in changes.adds} == {ext_id} and not changes.deletes
    # the endpoint moves: the old address goes, the new one comes
    assert feed("EndpointSlice", "MODIFIED", endpoint_slice("e1", "ext", "198.51.100.20")) == ["to-svc"]
    new_id = engine.identity_of_ip("198.51.100.20")
    changes = engine.pending_changes()[client]
    assert {k.identity for k in changes.adds} == {new_id}
    assert {k.identity for k in changes.deletes} == {ext_id}
    assert engine.identity_of_ip(EXTERNAL) == 2  # its CIDR identity is released: world again
    # a Service with a selector comes; unrelated Services change nothing
    assert feed("Service", "ADDED", service("db", selector={"app": "db"})) == ["to-svc"]
    assert verdicts(env)["y/db1"] == "allowed"
    assert feed("Service", "ADDED", service("other", selector={"app": "web"})) == []
    assert feed("Service", "DELETED", service("db")) == ["to-svc"]
    assert verdicts(env)["y/db1"] == "denied"
    # the policy as given stays the engine's answer (a rollback re-translates it)
    got = engine.get_policy(engine.policies()[0].ref)
    assert got is not None and isinstance(got.rules[0].rules[0].peers[0], ServicePeer)  # type: ignore[index]
    engine.upsert_policy(got)
    assert engine.resolve(client).lookup(new_id, EG, Protocol.TCP, 80).allowed
    engine.delete_policy(got.ref)
    assert engine.update_services({("y", "ext"): None}) == []  # forgotten with its policy


def test_set_services_replaces_the_whole_list() -> None:
    env = build([cnp(by_name("ext"))], [service("ext"), endpoint_slice("e", "ext", EXTERNAL)])
    engine, client = env.engine, env.endpoints["x/client"].id
    ext_id = engine.identity_of_ip(EXTERNAL)
    assert ext_id != 2 and engine.resolve(client).lookup(ext_id, EG, Protocol.TCP, 80).allowed
    engine.set_services([])
    assert engine.services() == [] and engine.identity_of_ip(EXTERNAL) == 2
    assert not engine.resolve(client).lookup(2, EG, Protocol.TCP, 80).allowed


def test_pod_addresses_in_pods_mode_are_address_keys() -> None:
    env = build([cnp(by_name("ext"))], [service("ext"), endpoint_slice("e", "ext", "10.244.2.2")],
                mode="pods")
    keys = env.engine.resolve(env.endpoints["x/client"].id).keys()
    assert any(k.identity == ADDRESS_IDENTITY and k.address == "10.244.2.2" for k in keys)
