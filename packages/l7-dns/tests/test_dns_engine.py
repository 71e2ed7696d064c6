"""toFQDNs end to end without a kernel: a DNS answer through the proxy puts the
learned IPs into the policy engine before the client gets the answer."""

from __future__ import annotations

from axoneme.core.endpoint import Endpoint
from axoneme.core.identity import ReservedIdentity
from axoneme.core.labels import Labels
from axoneme.core.mapstate import Direction, Protocol, Verdict
from axoneme.core.policy.api import (
    FQDNPeer,
    L7Spec,
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
from axoneme.l7.dns import DnsParser, DnsProxy, DnsProxyConfig, DNSRule, FQDNCache, FQDNSelectorSync

EG = Direction.EGRESS
PEER = FQDNPeer(match_pattern="*.example.com")


def _world() -> tuple[PolicyEngine, int]:
    engine = PolicyEngine()
    ident = engine.allocator.allocate(Labels.from_strings(["k8s:app=client"]))
    engine.upsert_endpoint(Endpoint(1, ident.id, ident.labels, ipv4="10.244.0.1",
                                    pod_name="client", namespace="default"))
    ref = PolicyRef(PolicyKind.CILIUM_NETWORK_POLICY, "default", "fqdn")
    dns_port = (PortRule((PortProtocol(53, protocol="UDP"),),
                         L7Spec("dns", (DNSRule(match_pattern="*"),))),)
    https = (PortRule((PortProtocol(443, protocol="TCP"),)),)
    rules = (PeerRule(EG, peers=None, ports=dns_port), PeerRule(EG, peers=(PEER,), ports=https))
    sel = LabelSelector.build({"k8s:app": "client"})
    engine.upsert_policy(Policy(ref, (Rule(ref, sel, rules, enforce_ingress=False,
                                           enforce_egress=True),)))
    return engine, ident.id


def _verdict(engine: PolicyEngine, ip: str) -> Verdict:
    return engine.explain(1, EG, engine.identity_of_ip(ip), Protocol.TCP, 443).verdict


def test_answer_reaches_the_engine_before_the_client(upstream, dnsutil, dns_loop):
    engine, _ = _world()
    cache = FQDNCache()
    sync = FQDNSelectorSync(cache, engine)
    assert _verdict(engine, "198.51.100.12") is Verdict.DENIED
    at_hook: list[Verdict] = []

    async def on_answer(name, ips, ttl):
        # the proxy has recorded the answer; the engine already selects the IP
        at_hook.extend(_verdict(engine, ip) for ip in ips)

    proxy = DnsProxy(DnsProxyConfig(upstream=upstream.addr), policy_for=lambda *a: (),
                     cache=cache, on_answer=on_answer)
    dns_loop.run(proxy.start())
    try:
        r = dnsutil.udp_ask(proxy.address, "sub.example.com")
        assert r is not None and [str(x.rdata) for x in r.rr] == ["198.51.100.12"]
        assert at_hook == [Verdict.ALLOWED]
        # a name outside the selector teaches the engine nothing
        dnsutil.udp_ask(proxy.address, "example.com")
        assert _verdict(engine, "198.51.100.13") is Verdict.DENIED
    finally:
        dns_loop.run(proxy.stop())
    assert _verdict(engine, "198.51.100.12") is Verdict.ALLOWED
    # expiry revokes
    cache.expire(now=10**12)
    assert engine.identity_of_ip("198.51.100.12") == ReservedIdentity.WORLD
    assert _verdict(engine, "198.51.100.12") is Verdict.DENIED
    sync.close()


def test_resync_after_restore_and_via_parser_helpers():
    engine, _ = _world()
    parser = DnsParser()
    old = parser.new_fqdn_cache()
    old.record("sub.example.com", ["198.51.100.12"], 600)
    snap = old.snapshot()
    # the agent restarts: a new cache restored from its state dir, then bound
    cache = parser.new_fqdn_cache()
    cache.restore(snap)
    sync = parser.bind_engine(cache, engine)
    assert _verdict(engine, "198.51.100.12") is Verdict.ALLOWED
    sync.close()
    cache.record("other.example.com", ["198.51.100.20"], 600)  # unbound: engine unaware
    assert _verdict(engine, "198.51.100.20") is Verdict.DENIED


def test_no_event_loop_needed_for_the_sync():
    engine, _ = _world()
    cache = FQDNCache()
    FQDNSelectorSync(cache, engine)
    cache.record("a.example.com", ["198.51.100.30"], 60)
    assert _verdict(engine, "198.51.100.30") is Verdict.ALLOWED
