"""PolicyEngine with hand-built rules: resolution, precedence, incremental updates."""

from __future__ import annotations

import ipaddress

import pytest
from axoneme.core.endpoint import Endpoint, NamedPort
from axoneme.core.errors import PolicyError
from axoneme.core.identity import ReservedIdentity
from axoneme.core.labels import Labels
from axoneme.core.mapstate import Direction, Entry, Key, MapState, Protocol, Verdict
from axoneme.core.policy.api import (
    CIDRPeer,
    EndpointPeer,
    EntityPeer,
    ICMPField,
    L7Spec,
    PeerRule,
    Policy,
    PolicyKind,
    PolicyRef,
    PortProtocol,
    PortRule,
    Rule,
)
from axoneme.core.policy.engine import EngineOptions, PolicyEngine
from axoneme.core.selectors import LabelSelector
from axoneme.l7.http import HTTPRule
from axoneme.l7.kafka import KafkaRule

IN, EG = Direction.INGRESS, Direction.EGRESS
TCP, UDP = Protocol.TCP, Protocol.UDP


def sel(**labels: str) -> LabelSelector:
    return LabelSelector.build({f"k8s:{k}": v for k, v in labels.items()})


def ref(name: str, kind: PolicyKind = PolicyKind.CILIUM_NETWORK_POLICY) -> PolicyRef:
    return PolicyRef(kind, "default", name)


def policy(name: str, subject: LabelSelector, *rules: PeerRule, ingress: bool | None = None,
           egress: bool | None = None, kind: PolicyKind = PolicyKind.CILIUM_NETWORK_POLICY) -> Policy:
    r = ref(name, kind)
    ei = any(p.direction is IN for p in rules) if ingress is None else ingress
    ee = any(p.direction is EG for p in rules) if egress is None else egress
    return Policy(r, (Rule(r, subject, tuple(rules), enforce_ingress=ei, enforce_egress=ee),))


def ports(*specs: tuple[int, str], l7: L7Spec | None = None) -> tuple[PortRule, ...]:
    return (PortRule(tuple(PortProtocol(p, protocol=proto) for p, proto in specs), l7),)


class World:
    """An engine with pods app=a,b,c (endpoints 1..3)."""

    def __init__(self, options: EngineOptions | None = None) -> None:
        self.engine = PolicyEngine(options=options or EngineOptions())
        self.ids: dict[str, int] = {}
        for n, app in enumerate("abc", 1):
            self.add(n, app)

    def add(self, n: int, app: str, named: tuple[NamedPort, ...] = ()) -> Endpoint:
        ident = self.engine.allocator.allocate(Labels.from_strings([f"k8s:app={app}"]))
        ep = Endpoint(n, ident.id, ident.labels, ipv4=f"10.244.0.{n}", pod_name=app,
                      namespace="default", named_ports=named)
        self.engine.upsert_endpoint(ep)
        self.ids[app] = ident.id
        return ep

    def verdict(self, ep: int, d: Direction, peer: str | int, proto: Protocol = TCP, port: int = 80) -> Verdict:
        ident = self.ids[peer] if isinstance(peer, str) else peer
        return self.engine.explain(ep, d, ident, proto, port).verdict


def test_no_policy_allows_everything() -> None:
    w = World()
    assert w.engine.resolve(1) == MapState({Key(0, IN): Entry(), Key(0, EG): Entry()})
    assert w.engine.enforcement(1) == (False, False)


def test_l3_l4_allow_and_default_deny() -> None:
    w = World()
    w.engine.upsert_policy(policy("p", sel(app="a"), PeerRule(IN, peers=(EndpointPeer(sel(app="b")),),
                                                                 ports=ports((80, "TCP")), path="spec.ingress[0]")))
    assert w.engine.enforcement(1) == (True, False)
    assert w.verdict(1, IN, "b") is Verdict.ALLOWED
    assert w.verdict(1, IN, "b", port=81) is Verdict.DENIED
    assert w.verdict(1, IN, "c") is Verdict.DENIED
    assert w.verdict(1, IN, int(ReservedIdentity.HOST), port=1234) is Verdict.ALLOWED  # allow-localhost
    assert w.verdict(1, EG, "c") is Verdict.ALLOWED  # egress not enforced
    dec = w.engine.explain(1, IN, w.ids["b"], TCP, 80)
    assert dec.entry is not None and dec.entry.derived_from == {"CiliumNetworkPolicy default/p spec.ingress[0]"}
    # endpoints the policy does not select are untouched
    assert w.engine.enforcement(2) == (False, False)


def test_allow_localhost_policy_mode() -> None:
    w = World(EngineOptions(allow_localhost="policy"))
    w.engine.upsert_policy(policy("p", sel(app="a"), PeerRule(IN, peers=(EndpointPeer(sel(app="b")),))))
    assert w.verdict(1, IN, int(ReservedIdentity.HOST)) is Verdict.DENIED


def test_enforcement_modes() -> None:
    w = World(EngineOptions(enforcement_mode="always"))
    assert w.engine.enforcement(1) == (True, True)
    assert w.verdict(1, EG, "b") is Verdict.DENIED
    w = World(EngineOptions(enforcement_mode="never"))
    w.engine.upsert_policy(policy("p", sel(app="a"), PeerRule(IN, deny=True, peers=None)))
    assert w.engine.enforcement(1) == (False, False)
    assert w.verdict(1, IN, "b") is Verdict.ALLOWED
    with pytest.raises(PolicyError):
        EngineOptions(enforcement_mode="sometimes")


def test_deny_beats_allow_and_prunes_covered_allows() -> None:
    w = World()
    w.engine.upsert_policy(policy("allow", sel(app="a"), PeerRule(IN, peers=(EndpointPeer(sel(app="b")),),
                                                                     ports=ports((80, "TCP")))))
    w.engine.upsert_policy(policy("deny", sel(app="a"), PeerRule(IN, deny=True, peers=(EndpointPeer(sel(app="b")),))))
    state = w.engine.resolve(1)
    assert Key(w.ids["b"], IN, TCP, 80, 16) not in state
    assert state[Key(w.ids["b"], IN)].deny
    assert w.verdict(1, IN, "b") is Verdict.DENIED_BY_RULE


def test_wildcard_deny_in_unenforced_direction() -> None:
    w = World()
    w.engine.upsert_policy(policy("deny", sel(app="a"), PeerRule(EG, deny=True, peers=None, ports=ports((53, "UDP"))),
                                  egress=False))
    assert w.engine.enforcement(1) == (False, False)
    assert w.verdict(1, EG, "b", UDP, 53) is Verdict.DENIED_BY_RULE
    assert w.verdict(1, EG, "b", TCP, 53) is Verdict.ALLOWED


def test_port_any_protocol_expands_and_ranges() -> None:
    w = World()
    w.engine.upsert_policy(policy("p", sel(app="a"), PeerRule(IN, peers=None, ports=(
        PortRule((PortProtocol(53), PortProtocol(8000, end_port=8010, protocol="TCP"))),))))
    state = w.engine.resolve(1)
    for proto in (TCP, UDP, Protocol.SCTP):
        assert Key(0, IN, proto, 53, 16) in state
    for port, want in ((7999, Verdict.DENIED), (8000, Verdict.ALLOWED), (8005, Verdict.ALLOWED),
                       (8010, Verdict.ALLOWED), (8011, Verdict.DENIED)):
        assert w.verdict(1, IN, "b", TCP, port) is want, port


def test_icmp_keys() -> None:
    w = World()
    w.engine.upsert_policy(policy("p", sel(app="a"), PeerRule(IN, peers=None, icmps=(ICMPField("IPv4", 8),))))
    assert Key(0, IN, Protocol.ICMP, 8, 16) in w.engine.resolve(1)
    assert w.verdict(1, IN, "b", Protocol.ICMP, 8) is Verdict.ALLOWED
    assert w.verdict(1, IN, "b", Protocol.ICMP, 0) is Verdict.DENIED


def test_named_ports_ingress_own_egress_global() -> None:
    w = World()
    w.add(2, "b", (NamedPort("web", 8080),))
    w.engine.upsert_policy(policy("p", LabelSelector(), PeerRule(IN, peers=None, ports=(
        PortRule((PortProtocol(0, protocol="TCP", name="web"),)),)),
        PeerRule(EG, peers=None, ports=(PortRule((PortProtocol(0, protocol="TCP", name="web"),)),))))
    assert w.verdict(2, IN, "a", TCP, 8080) is Verdict.ALLOWED
    assert w.verdict(1, IN, "b", TCP, 8080) is Verdict.DENIED  # a has no port named web
    assert w.verdict(1, EG, "b", TCP, 8080) is Verdict.ALLOWED
    w.add(3, "c", (NamedPort("web", 9090),))  # egress named ports follow the cluster
    assert w.verdict(1, EG, "c", TCP, 9090) is Verdict.ALLOWED


def test_cidr_except_and_entities() -> None:
    w = World()
    w.engine.upsert_policy(policy("p", sel(app="a"), PeerRule(EG, peers=(CIDRPeer(
        ipaddress.ip_network("198.51.100.0/24"), (ipaddress.ip_network("198.51.100.128/25"),)),)),
        PeerRule(EG, peers=(EntityPeer("host"),))))
    e = w.engine
    assert w.verdict(1, EG, e.identity_of_ip("198.51.100.5")) is Verdict.ALLOWED
    assert w.verdict(1, EG, e.identity_of_ip("198.51.100.200")) is Verdict.DENIED
    assert w.verdict(1, EG, e.identity_of_ip("203.0.113.1")) is Verdict.DENIED
    assert e.identity_of_ip("203.0.113.1") == ReservedIdentity.WORLD
    assert e.identity_of_ip("10.244.0.2") == w.ids["b"]
    assert w.verdict(1, EG, int(ReservedIdentity.HOST)) is Verdict.ALLOWED
    assert w.verdict(1, EG, "b") is Verdict.DENIED
    changes = e.pending_ipcache_changes()
    assert ipaddress.ip_network("198.51.100.128/25") in changes.upserts
    e.delete_policy(ref("p"))
    assert ipaddress.ip_network("198.51.100.128/25") in e.pending_ipcache_changes().deletes


def test_entity_cluster_and_world() -> None:
    w = World()
    w.engine.upsert_policy(policy("p", sel(app="a"), PeerRule(EG, peers=(EntityPeer("cluster"),))))
    assert w.verdict(1, EG, "b") is Verdict.ALLOWED
    assert w.verdict(1, EG, int(ReservedIdentity.HOST)) is Verdict.ALLOWED
    assert w.verdict(1, EG, int(ReservedIdentity.WORLD)) is Verdict.DENIED
    w.add(4, "d")  # a new pod joins "cluster"
    assert w.verdict(1, EG, "d") is Verdict.ALLOWED


def test_l7_merge_and_l4_only_makes_l7_moot() -> None:
    w = World()
    get = L7Spec("http", (HTTPRule(method="GET", path="/public"),))
    post = L7Spec("http", (HTTPRule(method="POST"),))
    w.engine.upsert_policy(policy("l7a", sel(app="a"), PeerRule(IN, peers=(EndpointPeer(sel(app="b")),),
                                                                   ports=ports((80, "TCP"), l7=get))))
    w.engine.upsert_policy(policy("l7b", sel(app="a"), PeerRule(IN, peers=(EndpointPeer(sel(app="b")),),
                                                                   ports=ports((80, "TCP"), l7=post))))
    entry = w.engine.resolve(1)[Key(w.ids["b"], IN, TCP, 80, 16)]
    assert entry.is_redirect and entry.l7 is not None
    assert set(entry.l7.rules) == {HTTPRule(method="GET", path="/public"), HTTPRule(method="POST")}
    assert w.verdict(1, IN, "b") is Verdict.REDIRECTED
    w.engine.upsert_policy(policy("l4", sel(app="a"), PeerRule(IN, peers=None, ports=ports((80, "TCP")))))
    assert w.verdict(1, IN, "b") is Verdict.ALLOWED
    assert not w.engine.resolve(1)[Key(w.ids["b"], IN, TCP, 80, 16)].is_redirect


def test_l7_parser_conflict_rejected_without_change() -> None:
    w = World()
    w.engine.upsert_policy(policy("h", sel(app="a"), PeerRule(IN, peers=None, ports=ports(
        (9092, "TCP"), l7=L7Spec("http")))))
    rev = w.engine.revision
    before = w.engine.resolve(1)
    with pytest.raises(PolicyError, match="conflicting L7"):
        w.engine.upsert_policy(policy("k", sel(app="a"), PeerRule(IN, peers=None, ports=ports(
            (9092, "TCP"), l7=L7Spec("kafka", (KafkaRule(topic="t"),))))))
    assert w.engine.revision == rev
    assert w.engine.resolve(1) == before
    assert [p.ref.name for p in w.engine.policies()] == ["h"]


def test_pending_changes_are_incremental() -> None:
    w = World()
    w.engine.pending_changes()
    rev = w.engine.upsert_policy(policy("p", sel(app="a"), PeerRule(IN, peers=(EndpointPeer(sel(app="b")),))))
    assert rev == w.engine.revision
    changes = w.engine.pending_changes()
    assert set(changes) == {1}
    assert Key(0, IN) in changes[1].deletes
    assert Key(w.ids["b"], IN) in changes[1].adds
    assert w.engine.pending_changes() == {}
    # a new pod matching the peer selector only touches the endpoint using it
    w.add(5, "b")
    changes = w.engine.pending_changes()
    assert set(changes) == {5}  # b's identity exists already: only the new endpoint
    w.engine.remove_endpoint(2)
    w.engine.remove_endpoint(5)
    changes = w.engine.pending_changes()
    assert set(changes) == {1} and Key(w.ids["b"], IN) in changes[1].deletes
    with pytest.raises(PolicyError):
        w.engine.delete_policy(ref("nope"))


def test_recomputes_only_affected_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    w = World()
    w.add(4, "d")
    computed: list[int] = []
    real = w.engine._update

    def counting(eid: int, *args, **kwargs):  # type: ignore[no-untyped-def]
        computed.append(eid)
        return real(eid, *args, **kwargs)

    monkeypatch.setattr(w.engine, "_update", counting)
    w.engine.upsert_policy(policy("p", sel(app="a"), PeerRule(IN, peers=(EndpointPeer(sel(app="b")),))))
    assert computed == [1]
    computed.clear()
    w.engine.upsert_policy(policy("q", sel(app="c"), PeerRule(EG, peers=(EntityPeer("world"),))))
    assert computed == [3]
    computed.clear()
    # a new identity selected by p's peer: only the endpoint whose rules use it (and itself)
    w.add(5, "b2")
    assert computed == [5]
    computed.clear()
    ident = w.engine.allocator.allocate(Labels.from_strings(["k8s:app=b", "k8s:extra=1"]))
    w.engine.upsert_endpoint(Endpoint(6, ident.id, ident.labels, ipv4="10.244.0.6"))
    assert sorted(computed) == [1, 6]
    computed.clear()
    # a CIDR identity only touches endpoints with world/CIDR selectors
    w.engine.upsert_policy(policy("r", sel(app="d"), PeerRule(EG, peers=(CIDRPeer(ipaddress.ip_network("192.0.2.0/24")),))))
    assert sorted(computed) == [3, 4]
    computed.clear()
    w.engine.delete_policy(ref("p"))
    assert computed == [1]


def test_batch_defers_and_computes_once(monkeypatch: pytest.MonkeyPatch) -> None:
    w = World()
    computed: list[int] = []
    real = w.engine._update
    monkeypatch.setattr(w.engine, "_update", lambda eid, *a, **k: computed.append(eid) or real(eid, *a, **k))
    with w.engine.batch():
        for n in range(5):
            w.engine.upsert_policy(policy(f"p{n}", LabelSelector(), PeerRule(IN, peers=None, ports=ports((80 + n, "TCP")))))
        assert computed == []
    assert sorted(computed) == [1, 2, 3]
    assert w.verdict(2, IN, "a", TCP, 84) is Verdict.ALLOWED
    assert w.engine.regenerate(2) == w.engine.resolve(2)


def test_fqdn_hook_selects_learned_ips() -> None:
    from axoneme.core.policy.api import FQDNPeer

    w = World()
    peer = FQDNPeer(match_name="example.com")
    w.engine.upsert_policy(policy("dns", sel(app="a"), PeerRule(EG, peers=(peer,), ports=ports((443, "TCP")))))
    assert w.engine.fqdn_selectors() == [peer]
    assert w.verdict(1, EG, w.engine.identity_of_ip("198.51.100.10"), port=443) is Verdict.DENIED
    w.engine.pending_changes()
    w.engine.update_fqdn(peer, ["198.51.100.10", "198.51.100.11"])
    assert set(w.engine.pending_changes()) == {1}
    ident = w.engine.identity_of_ip("198.51.100.10")
    assert ident != ReservedIdentity.WORLD
    assert w.verdict(1, EG, ident, port=443) is Verdict.ALLOWED
    assert ipaddress.ip_network("198.51.100.10/32") in w.engine.pending_ipcache_changes().upserts
    w.engine.update_fqdn(peer, ["198.51.100.11"])
    assert w.engine.identity_of_ip("198.51.100.10") == ReservedIdentity.WORLD
    assert w.verdict(1, EG, w.engine.identity_of_ip("198.51.100.11"), port=443) is Verdict.ALLOWED
    assert ipaddress.ip_network("198.51.100.10/32") in w.engine.pending_ipcache_changes().deletes


def test_node_addresses_are_the_host_identity_in_the_ipcache():
    import ipaddress as _ip

    from axoneme.core.identity import ReservedIdentity as _R
    from axoneme.core.policy.engine import PolicyEngine as _PE

    eng = _PE()
    assert eng.set_host_addresses(["198.51.100.1", "192.0.2.7"])
    assert not eng.set_host_addresses(["192.0.2.7", "198.51.100.1"])  # same set: no change
    ipc = eng.ipcache()
    assert ipc[_ip.ip_network("198.51.100.1/32")] == int(_R.HOST)
    assert eng.identity_of_ip("198.51.100.1") == int(_R.HOST)
    assert eng.identity_of_ip("198.51.100.2") == int(_R.WORLD)
    changes = eng.pending_ipcache_changes()
    assert changes.upserts[_ip.ip_network("192.0.2.7/32")] == int(_R.HOST)
    assert eng.set_host_addresses(["198.51.100.1"])
    assert _ip.ip_network("192.0.2.7/32") in eng.pending_ipcache_changes().deletes


def test_synthetic_allows_follow_enforcement_through_changes() -> None:
    """The unenforced-direction and allow-localhost entries are kept only when the
    endpoint's enforcement changes (B5ENGINE): through a sequence of edits each
    endpoint's state equals a fresh engine's for the same policies."""
    b = EndpointPeer(sel(app="b"))
    steps = [
        [policy("in", sel(app="a"), PeerRule(IN, peers=(b,), ports=ports((80, "TCP"))))],
        [policy("in", sel(app="a"), PeerRule(IN, peers=(b,), ports=ports((81, "TCP"))))],  # edit, same enforcement
        [policy("in", sel(app="a"), PeerRule(IN, peers=(b,))),
         policy("eg", sel(app="a"), PeerRule(EG, peers=(b,)))],  # egress enforced too
        [policy("eg", sel(app="a"), PeerRule(EG, peers=(b,)))],  # ingress no longer
        [],  # nothing enforced
        [policy("in", sel(app="a"), PeerRule(IN, peers=(b,)))],  # ingress again
    ]
    w = World()
    applied: set[PolicyRef] = set()
    for pols in steps:
        for p in pols:
            w.engine.upsert_policy(p)
        for r in applied - {p.ref for p in pols}:
            w.engine.delete_policy(r)
        applied = {p.ref for p in pols}
        fresh = World()
        for p in pols:
            fresh.engine.upsert_policy(p)
        for ep in (1, 2, 3):
            assert w.engine.resolve(ep) == fresh.engine.resolve(ep)
            assert w.engine.enforcement(ep) == fresh.engine.enforcement(ep)
        ingress, egress = w.engine.enforcement(1)
        state = w.engine.resolve(1)
        assert (Key(0, IN) in state) is not ingress
        assert (Key(0, EG) in state) is not egress
        assert (Key(int(ReservedIdentity.HOST), IN) in state) is ingress
