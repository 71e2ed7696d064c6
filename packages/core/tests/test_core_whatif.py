"""What-if (core.policy.diff), observed flows (core.policy.observed), recommendations
(core.policy.recommend), and the property that ties them: the policies recommended
from a flow set flip none of its forwarded flows."""

from __future__ import annotations

from typing import Any

import pytest
from axoneme.core.cluster import Cluster
from axoneme.core.mapstate import Protocol
from axoneme.core.policy.api import PolicyKind, PolicyRef
from axoneme.core.policy.diff import compose, diff, probe_ports
from axoneme.core.policy.observed import observe
from axoneme.core.policy.parse import parse_policy_obj
from axoneme.core.policy.recommend import recommend, stable_selector
from axoneme.core.policy.trace import OfflineCluster, TraceInputError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

CLUSTER = [
    {"kind": "Namespace", "metadata": {"name": "shop", "labels": {"team": "shop"}}},
    {"kind": "Pod", "metadata": {"name": "web-1", "namespace": "shop",
                                 "labels": {"app": "web", "pod-template-hash": "7d9c"}},
     "status": {"podIP": "10.244.0.10"}},
    {"kind": "Pod", "metadata": {"name": "db-0", "namespace": "shop",
                                 "labels": {"app": "db", "statefulset.kubernetes.io/pod-name": "db-0"}},
     "status": {"podIP": "10.244.0.11"}},
    {"kind": "Pod", "metadata": {"name": "client", "namespace": "default", "labels": {"app": "client"}},
     "status": {"podIP": "10.244.0.12"}},
]
IPS = {"shop/web-1": "10.244.0.10", "shop/db-0": "10.244.0.11", "default/client": "10.244.0.12"}
LABELS = {"shop/web-1": {"app": "web", "pod-template-hash": "7d9c"},
          "shop/db-0": {"app": "db", "statefulset.kubernetes.io/pod-name": "db-0"},
          "default/client": {"app": "client"}}

DENY_SHOP = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "default-deny", "namespace": "shop"},
             "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}
ALLOW_WEB_80 = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                         "ingress": [{"from": [{"namespaceSelector": {}}],
                                      "ports": [{"port": 80}, {"port": 8000, "endPort": 8010}]}]}}


def cluster() -> Cluster:
    return Cluster.from_objects(CLUSTER)


def side(pod_or_ip: str, identity: int = 0) -> dict[str, Any]:
    if pod_or_ip in IPS:
        ns, name = pod_or_ip.split("/")
        return {"identity": identity or 300, "namespace": ns, "pod_name": name,
                "labels": [f"k8s:{k}={v}" for k, v in LABELS[pod_or_ip].items()]
                + [f"k8s:io.kubernetes.pod.namespace={ns}"]}
    return {"identity": identity or 2}


def flow(src: str, dst: str, port: int, proto: str = "TCP", verdict: str = "FORWARDED",
         **extra: Any) -> dict[str, Any]:
    l4 = ({"ICMPv4": {"type": port, "code": 0}} if proto == "ICMPv4"
          else {proto: {"source_port": 40000, "destination_port": port}})
    d = {"time": "2026-12-04T15:00:00.000000Z", "verdict": verdict, "Type": "L3_L4",
         "traffic_direction": "EGRESS", "is_reply": False,
         "IP": {"source": IPS.get(src, src), "destination": IPS.get(dst, dst)},
         "l4": l4, "source": side(src), "destination": side(dst)}
    d.update(extra)
    return d


def dns_answer(client: str, name: str, ips: list[str]) -> dict[str, Any]:
    return {"time": "2026-12-04T15:00:00Z", "verdict": "FORWARDED", "Type": "L7",
            "IP": {"source": "198.51.100.53", "destination": IPS[client]},
            "l4": {"UDP": {"source_port": 53, "destination_port": 40001}},
            "source": {"identity": 2}, "destination": side(client),
            "l7": {"type": "RESPONSE", "dns": {"query": name + ".", "ips": ips, "rcode": 0}}}


# -- compose ---------------------------------------------------------------------------

def test_compose_replaces_same_named_removes_and_replaces_all() -> None:
    deny, web = parse_policy_obj(DENY_SHOP), parse_policy_obj(ALLOW_WEB_80)
    web2 = parse_policy_obj({**ALLOW_WEB_80, "spec": {"podSelector": {}}})
    cand = compose([deny, web], [web2])
    assert cand.replaced == [web.ref] and not cand.added
    assert [p.spec if hasattr(p, "spec") else p for p in cand.policies] == [deny, web2]
    cand = compose([deny, web], [], remove=[deny.ref])
    assert cand.policies == [web] and cand.removed == [deny.ref]
    cand = compose([deny, web], [web2], replace=True)
    assert cand.policies == [web2] and cand.removed == sorted([deny.ref, web.ref])
    with pytest.raises(TraceInputError, match="not in force.*--remove"):
        compose([deny], [], remove=[PolicyRef(PolicyKind.NETWORK_POLICY, "shop", "nope")])


# -- probes ----------------------------------------------------------------------------

def test_probe_ports_take_every_boundary_and_one_uncovered_port() -> None:
    env = OfflineCluster.build(cluster(), [parse_policy_obj(DENY_SHOP), parse_policy_obj(ALLOW_WEB_80)])
    specs, others = probe_ports([env], [(Protocol.UDP, 53)])
    tcp = sorted(s.port for s in specs if s.protocol is Protocol.TCP)
    assert 80 in tcp and 8000 in tcp and 8010 in tcp  # the range's first and last port
    assert (Protocol.UDP, 53) in {(s.protocol, s.port) for s in specs}
    # unenforced directions are wildcards: one port no key covers stands for the rest
    other_tcp = [s.port for s in others if s.protocol is Protocol.TCP]
    assert len(other_tcp) == 1 and other_tcp[0] not in (80, *range(8000, 8011))


# -- the truth-table delta -------------------------------------------------------------

def test_diff_default_deny_flips_pairs_with_reasons() -> None:
    cand = compose([], [parse_policy_obj(DENY_SHOP)])
    res = diff(cluster(), [], cand)
    assert res.flipped
    flips = {(f.src, f.dst): f for f in res.flips}
    f = flips[("default/client", "shop/web-1")]
    assert f.before.verdict == "allowed" and f.after.verdict == "denied"
    assert f.after.ingress.reason == "default deny: no rule allows"
    assert "no policy selects default/client for egress" in f.after.egress.reason
    # nothing into or out of default flips but what touches shop
    assert not any(f.src == f.dst for f in res.flips)
    assert all("shop/" in f.src + f.dst for f in res.flips)
    j = res.to_json()
    assert j["summary"]["allowed_to_denied"] == len(res.flips) and j["summary"]["denied_to_allowed"] == 0
    assert j["flips"][0]["after_trace"]["ingress"]["reason"]


def test_diff_allow_on_top_of_deny_flips_back_naming_the_rule() -> None:
    deny = parse_policy_obj(DENY_SHOP)
    res = diff(cluster(), [deny], compose([deny], [parse_policy_obj(ALLOW_WEB_80)]))
    back = [f for f in res.flips if f.dst == "shop/web-1"]
    assert back and all(f.before.verdict == "denied" and f.after.verdict == "allowed" for f in back)
    assert {f.port for f in back} >= {80, 8000, 8010}
    assert all(f.after.ingress.rules == ("NetworkPolicy shop/web spec.ingress[0]",) for f in back
               if f.src == "default/client")
    # web's egress is still denied (db's ingress too): nothing else flips
    assert all(f.dst == "shop/web-1" for f in res.flips)


def test_diff_same_set_flips_nothing() -> None:
    deny = parse_policy_obj(DENY_SHOP)
    res = diff(cluster(), [deny], compose([deny], [deny]))
    assert not res.flipped and res.probes > 0


# -- observed flows --------------------------------------------------------------------

def test_observe_merges_counts_and_skips_what_says_nothing() -> None:
    flows = [
        flow("default/client", "shop/web-1", 80),
        flow("default/client", "shop/web-1", 80, traffic_direction="INGRESS"),
        flow("shop/web-1", "default/client", 40000, is_reply=True),
        flow("default/client", "shop/db-0", 5432, "TCP", "DROPPED", drop_reason_desc="POLICY_DENIED"),
        flow("default/client", "shop/db-0", 5433, "TCP", "DROPPED", drop_reason_desc="CT_MAP_INSERTION_FAILED"),
        {"flow": flow("shop/web-1", "198.51.100.7", 443)},  # observe -o jsonpb
        {"time": "2026-12-04T15:00:00Z", "verdict": "FORWARDED"},  # no addresses
        dns_answer("shop/web-1", "api.example.com", ["198.51.100.7"]),
    ]
    obs = observe(flows)
    conns = {(c.source.name, c.destination.name, c.port): c for c in obs.connections}
    assert conns[("default/client", "shop/web-1", 80)].count == 2
    assert conns[("default/client", "shop/web-1", 80)].passed
    assert not conns[("default/client", "shop/db-0", 5432)].passed
    assert ("default/client", "shop/db-0", 5433) not in conns
    assert conns[("shop/web-1", "198.51.100.7", 443)].protocol is Protocol.TCP
    assert obs.skipped == {"reply": 1, "not a policy verdict": 1, "no addresses or ports": 1,
                           "L7 record without a request to decide (a response, or unknown)": 1}
    assert obs.dns == {"api.example.com": {"198.51.100.7"}}
    assert obs.names_for("shop/web-1", "198.51.100.7") == {"api.example.com"}
    assert obs.dns_proxied == {"shop/web-1"}


def test_observe_since() -> None:
    old = flow("default/client", "shop/web-1", 80, time=1000.0)
    new = flow("default/client", "shop/web-1", 81, time=2000.0)
    obs = observe([old, new], since=1500.0)
    assert [c.port for c in obs.connections] == [81] and obs.skipped == {"older than --since": 1}


def test_diff_decides_observed_flows_with_the_candidate() -> None:
    flows = [flow("default/client", "shop/web-1", 80),
             flow("default/client", "shop/db-0", 5432, "TCP", "DROPPED", drop_reason_desc="POLICY_DENIED"),
             flow("shop/web-1", "198.51.100.7", 443),
             flow("10.244.0.99", "shop/web-1", 80) | {"source": {"namespace": "default", "pod_name": "gone"}}]
    res = diff(cluster(), [], compose([], [parse_policy_obj(DENY_SHOP)]), observed=observe(flows))
    flipped = {(f.connection.source.name, f.connection.destination.name): f for f in res.flow_flips}
    assert set(flipped) == {("default/client", "shop/web-1"), ("shop/web-1", "198.51.100.7")}
    assert flipped[("shop/web-1", "198.51.100.7")].change == "would drop"
    assert res.flows_skipped["pod no longer exists"] == 1
    allow_all = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": {"name": "all", "namespace": "shop"},
                 "spec": {"podSelector": {}, "ingress": [{}], "egress": [{}]}}
    deny = parse_policy_obj(DENY_SHOP)
    res = diff(cluster(), [deny], compose([deny], [parse_policy_obj(allow_all)]), observed=observe(flows))
    assert [(f.connection.destination.name, f.change) for f in res.flow_flips] == [("shop/db-0", "would admit")]


# -- recommendations -------------------------------------------------------------------

def test_stable_selector() -> None:
    assert stable_selector({"app": "web", "pod-template-hash": "7d9c", "tier": "fe"}) == {"app": "web"}
    assert stable_selector({"app.kubernetes.io/name": "db", "app.kubernetes.io/instance": "main",
                            "app": "x", "controller-revision-hash": "1"}) == {
        "app.kubernetes.io/name": "db", "app.kubernetes.io/instance": "main"}
    assert stable_selector({"tier": "fe", "statefulset.kubernetes.io/pod-name": "db-0",
                            "io.kubernetes.pod.namespace": "x"}) == {"tier": "fe"}
    assert stable_selector({"pod-template-hash": "1"}) == {}


def _sample_flows() -> list[dict[str, Any]]:
    return [flow("default/client", "shop/web-1", 80),
            flow("shop/web-1", "shop/db-0", 5432),
            flow("shop/web-1", "198.51.100.53", 53, "UDP", "REDIRECTED"),
            dns_answer("shop/web-1", "api.example.com", ["198.51.100.7"]),
            flow("shop/web-1", "198.51.100.7", 443),
            flow("shop/web-1", "198.51.100.9", 8443),
            flow("default/client", "shop/web-1", 8, "ICMPv4"),
            flow("default/client", "shop/db-0", 5432, "TCP", "DROPPED", drop_reason_desc="POLICY_DENIED")]


def test_recommend_np_shapes_and_validates() -> None:
    rec = recommend(observe(_sample_flows()), "np")
    docs = {d["metadata"]["name"]: d for d in rec.documents}
    assert set(docs) == {"recommend-client", "recommend-db", "recommend-web"}
    for d in rec.documents:
        parse_policy_obj(d)  # valid
    web = docs["recommend-web"]["spec"]
    assert web["podSelector"] == {"matchLabels": {"app": "web"}}  # pod-template-hash dropped
    assert web["ingress"] == [{"from": [{"podSelector": {"matchLabels": {"app": "client"}},
                                         "namespaceSelector": {"matchLabels": {
                                             "kubernetes.io/metadata.name": "default"}}}],
                               "ports": [{"protocol": "TCP", "port": 80}]}]
    assert {"to": [{"ipBlock": {"cidr": "198.51.100.7/32"}}],
            "ports": [{"protocol": "TCP", "port": 443}]} in web["egress"]
    assert {"to": [{"podSelector": {"matchLabels": {"app": "db"}}}],
            "ports": [{"protocol": "TCP", "port": 5432}]} in web["egress"]
    # db was seen only receiving: its egress is closed; the dropped client->db is not allowed
    assert docs["recommend-db"]["spec"]["egress"] == []
    assert len(docs["recommend-db"]["spec"]["ingress"]) == 1
    assert any("ICMP" in n for n in rec.notes)


def test_recommend_cnp_fqdn_entities_icmp() -> None:
    flows = [*_sample_flows(), flow("shop/db-0", "10.0.0.1", 9100) | {"destination": {"identity": 1}}]
    rec = recommend(observe(flows), "cnp", namespaces=["shop"])
    for d in rec.documents:
        parse_policy_obj(d)
    docs = {d["metadata"]["name"]: d for d in rec.documents}
    assert set(docs) == {"recommend-db", "recommend-web"}  # --namespace shop
    web = docs["recommend-web"]["spec"]
    assert {"toFQDNs": [{"matchName": "api.example.com"}],
            "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]} in web["egress"]
    dns = next(r for r in web["egress"] if r.get("toCIDR") == ["198.51.100.53/32"])
    assert dns["toPorts"][0]["rules"] == {"dns": [{"matchPattern": "*"}]}
    assert any(r.get("icmps") for r in web["ingress"])
    assert {"toEntities": ["host"], "toPorts": [{"ports": [{"port": "9100", "protocol": "TCP"}]}]} \
        in docs["recommend-db"]["spec"]["egress"]
    assert not rec.notes


@pytest.mark.parametrize("kind", ["np", "cnp"])
def test_recommended_policies_flip_no_observed_flow(kind: str) -> None:
    flows = [f for f in _sample_flows() if kind == "cnp" or "ICMPv4" not in f["l4"]]
    obs = observe(flows)
    rec = recommend(obs, kind)
    policies = [parse_policy_obj(d) for d in rec.documents]
    res = diff(cluster(), [], compose([], policies), observed=obs)
    assert res.flow_flips == []
    # ... and they are least privilege: an unobserved connection flips to denied
    assert any(f.src == "shop/db-0" and f.dst == "shop/web-1" for f in res.flips)


# -- the property, on random clusters and traffic --------------------------------------

_APPS = ("a", "b", "c")
_NSS = ("x", "y")


@st.composite
def traffic(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    n = draw(st.integers(2, 6))
    objs: list[dict[str, Any]] = []
    pods: list[tuple[str, str, dict[str, str]]] = []
    for i in range(n):
        ns = draw(st.sampled_from(_NSS))
        labels = {"pod-template-hash": f"h{i}"}
        app = draw(st.sampled_from((*_APPS, None)))  # None: no stable label unless a tier
        if app is not None:
            labels["app"] = app
        if draw(st.booleans()):
            labels["tier"] = draw(st.sampled_from(("fe", "be")))
        ip = f"10.244.1.{i + 1}"
        objs.append({"kind": "Pod", "metadata": {"name": f"p{i}", "namespace": ns, "labels": labels},
                     "status": {"podIP": ip}})
        pods.append((f"{ns}/p{i}", ip, labels))
    peers = [*pods, ("", "198.51.100.5", {}), ("", "198.51.100.6", {})]
    flows: list[dict[str, Any]] = []
    for _ in range(draw(st.integers(1, 12))):
        s = draw(st.sampled_from(pods))
        d = draw(st.sampled_from(peers))
        if d[0] == s[0]:
            continue
        proto = draw(st.sampled_from(("TCP", "UDP")))
        port = draw(st.sampled_from((53, 80, 443, 8080)))

        def ep(p: tuple[str, str, dict[str, str]]) -> dict[str, Any]:
            if not p[0]:
                return {"identity": 2}
            ns, name = p[0].split("/")
            return {"identity": 300, "namespace": ns, "pod_name": name,
                    "labels": [f"k8s:{k}={v}" for k, v in p[2].items()]}
        flows.append({"time": 0, "verdict": "FORWARDED", "is_reply": False,
                      "IP": {"source": s[1], "destination": d[1]},
                      "l4": {proto: {"source_port": 40000, "destination_port": port}},
                      "source": ep(s), "destination": ep(d)})
    return objs, flows


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(traffic(), st.sampled_from(["np", "cnp"]))
def test_property_recommended_policies_flip_nothing_observed(
        data: tuple[list[dict[str, Any]], list[dict[str, Any]]], kind: str) -> None:
    objs, flows = data
    obs = observe(flows)
    rec = recommend(obs, kind)
    policies = [parse_policy_obj(d) for d in rec.documents]
    res = diff(Cluster.from_objects(objs), [], compose([], policies), observed=obs)
    assert res.flow_flips == [], [f.to_json() for f in res.flow_flips]


def test_promote_a_staged_policy() -> None:
    staged_doc = {**DENY_SHOP, "metadata": {**DENY_SHOP["metadata"],
                                            "annotations": {"policy.axoneme.io/mode": "audit"}}}
    staged = parse_policy_obj(staged_doc)
    assert staged.audit
    # staged: in force but enforcing nothing; promoted: the default deny
    flows = [flow("default/client", "shop/web-1", 80)]
    cand = compose([staged], [], promote=[staged.ref])
    assert cand.promoted == [staged.ref] and cand.replaced == [staged.ref]
    assert not cand.policies[0].audit
    assert staged_doc["metadata"]["annotations"]  # the document in force is left alone
    res = diff(cluster(), [staged], cand, observed=observe(flows))
    assert [f.change for f in res.flow_flips] == ["would drop"]
    assert all(f.before.verdict == "allowed" and f.after.verdict == "denied" for f in res.flips)
    with pytest.raises(TraceInputError, match=r"not staged.*\(--promote\)"):
        compose([parse_policy_obj(DENY_SHOP)], [], promote=[staged.ref])
    with pytest.raises(TraceInputError, match=r"not in force.*\(--promote\)"):
        compose([], [], promote=[staged.ref])


def http_request(src: str, dst: str, method: str, path: str, verdict: str = "FORWARDED") -> dict[str, Any]:
    return {"time": "2026-12-04T15:00:00Z", "verdict": verdict, "Type": "L7", "is_reply": False,
            "IP": {"source": IPS[src], "destination": IPS[dst]},
            "l4": {"TCP": {"source_port": 40000, "destination_port": 80}},
            "source": side(src), "destination": side(dst),
            "l7": {"type": "REQUEST", "http": {"method": method, "url": f"http://{IPS[dst]}{path}",
                                               "headers": [{"key": "X-Token", "value": "HUBBLE_REDACTED"},
                                                           {"key": "Accept", "value": "*/*"}]}}}


def test_diff_decides_observed_http_requests_with_the_candidates_l7_rules() -> None:
    pytest.importorskip("axoneme.l7.http")  # the http parser decides
    l7 = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
          "metadata": {"name": "web-l7", "namespace": "shop"},
          "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                   "ingress": [{"fromEndpoints": [{"matchLabels": {
                       "k8s:io.kubernetes.pod.namespace": "default"}}],
                                "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}],
                                             "rules": {"http": [{"method": "GET", "path": "/public.*"}]}}]}]}}
    flows = [flow("default/client", "shop/web-1", 80, verdict="REDIRECTED"),
             http_request("default/client", "shop/web-1", "GET", "/public/a"),
             http_request("default/client", "shop/web-1", "GET", "/public/a"),
             http_request("default/client", "shop/web-1", "POST", "/private?x=1"),
             http_request("default/client", "shop/web-1", "DELETE", "/public/a", "DROPPED")]
    obs = observe(flows)
    assert [(r.parser, dict(r.fields)["method"], r.count) for r in obs.requests] == [
        ("http", "DELETE", 1), ("http", "GET", 2), ("http", "POST", 1)]
    post = next(r for r in obs.requests if dict(r.fields)["method"] == "POST")
    assert dict(post.fields) == {"method": "POST", "path": "/private?x=1", "host": "10.244.0.10",
                                 "header": ("Accept: */*",)}  # redacted values are left out
    res = diff(cluster(), [], compose([], [parse_policy_obj(l7)]), observed=obs)
    flips = [(f.connection.what(), f.change) for f in res.flow_flips]
    assert flips == [("80/TCP http method=POST path=/private?x=1 host=10.244.0.10", "would drop")]
    assert res.flow_flips[0].to_json()["l7"]["method"] == "POST"
    assert res.flow_flips[0].after.l7 is not None and res.flow_flips[0].after.l7.verdict == "denied"
    # a candidate that denies the connection reports it once, as a connection
    res = diff(cluster(), [], compose([], [parse_policy_obj(DENY_SHOP)]), observed=obs)
    assert [type(f.connection).__name__ for f in res.flow_flips] == ["Connection"]
    # traffic the candidate newly sends to a proxy: counted as decided at L3/L4 only
    res = diff(cluster(), [], compose([], [parse_policy_obj(l7)]),
               observed=observe([flow("default/client", "shop/web-1", 80)]))
    assert not res.flow_flips and any("L7 proxy" in why for why in res.flows_skipped)
