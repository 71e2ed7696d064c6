"""The resolver's key cache stays within its bound (issue 17: a 100k-peer
policy's 200k keys were also held by the cache's tables, ~10 MB) and a
policy past the bound resolves to the same state as one within it."""

from __future__ import annotations

import ipaddress

import pytest
from axoneme.core.endpoint import Endpoint
from axoneme.core.labels import Labels
from axoneme.core.mapstate import Direction, MapState
from axoneme.core.policy import _peerkeys
from axoneme.core.policy.api import CIDRPeer, PeerRule, Policy, PolicyKind, PolicyRef, Rule
from axoneme.core.policy.engine import PolicyEngine
from axoneme.core.selectors import LabelSelector


def _policy(n: int) -> Policy:
    ref = PolicyRef(PolicyKind.CILIUM_NETWORK_POLICY, "default", "peers")
    peers = tuple(CIDRPeer(ipaddress.ip_network(f"198.51.{i // 250}.{i % 250 + 1}/32"))
                  for i in range(n))
    rule = PeerRule(Direction.INGRESS, peers=peers, path="spec.ingress[0]")
    return Policy(ref, (Rule(ref, LabelSelector.build({"k8s:app": "srv"}), (rule,),
                             enforce_ingress=True, enforce_egress=False),))


def _resolved(n: int) -> MapState:
    e = PolicyEngine()
    ident = e.allocator.allocate(Labels.from_strings(["k8s:app=srv"]))
    e.upsert_endpoint(Endpoint(1, ident.id, ident.labels, ipv4="10.244.0.1"))
    e.upsert_policy(_policy(n))
    return e.resolve(1)


def _cached() -> int:
    return sum(len(b) for b in _peerkeys._KEY_CACHE.values())


def test_key_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    # the resolver holds the module's dict itself: emptied in place (a cache)
    _peerkeys._KEY_CACHE.clear()
    monkeypatch.setattr(_peerkeys, "_key_count", 0)
    within = _resolved(300)
    assert _cached() >= 300  # one key per peer, all kept
    _peerkeys._KEY_CACHE.clear()
    monkeypatch.setattr(_peerkeys, "_key_count", 0)
    monkeypatch.setattr(_peerkeys, "_KEY_CACHE_MAX", 64)
    past = _resolved(300)
    assert _cached() <= 64 + 1
    assert past == within and len(past) > 300
    # the cache at its module's bound holds fewer keys than a 100k-peer policy makes
    assert _peerkeys._KEY_CACHE_MAX < 200_000 // 2
