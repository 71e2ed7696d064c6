"""A policy replaced by an equal or overlapping one (a 100k-peer list edited by
one line; B5's base policy replaced at 50k -> 100k) leaves the engine holding
one instance of each CIDR peer and of each key, as a fresh load would: before,
the selector cache kept the old peers, the state the old keys, the new policy
its own equal copies (issue 17, B5HIST: an agent at 100k peers 206 -> 280 MB
anon after one edit)."""

from __future__ import annotations

import gc
import ipaddress
import sys

import pytest
from axoneme.core.endpoint import Endpoint
from axoneme.core.labels import Labels
from axoneme.core.mapstate import Direction, Key
from axoneme.core.policy import _multimap as mm
from axoneme.core.policy import _peerkeys
from axoneme.core.policy.api import (
    CIDRPeer,
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

NET = ipaddress.ip_network("198.18.0.0/16")


def _policy(n: int, name: str = "peers", app: str = "srv",
            peers: tuple[CIDRPeer, ...] = ()) -> Policy:
    ref = PolicyRef(PolicyKind.CILIUM_NETWORK_POLICY, "default", name)
    peers = peers or tuple(CIDRPeer(ipaddress.ip_network(f"198.18.{i // 250}.{i % 250 + 1}/32"))
                           for i in range(n))
    ports = (PortRule((PortProtocol(80, protocol="TCP"), PortProtocol(80, protocol="UDP"))),)
    rule = PeerRule(Direction.INGRESS, peers=peers, ports=ports, path="spec.ingress[0]")
    return Policy(ref, (Rule(ref, LabelSelector.build({"k8s:app": app}), (rule,),
                             enforce_ingress=True),))


def _engine() -> PolicyEngine:
    e = PolicyEngine()
    for n, app in ((1, "srv"), (2, "other")):
        ident = e.allocator.allocate(Labels.from_strings([f"k8s:app={app}"]))
        e.upsert_endpoint(Endpoint(n, ident.id, ident.labels, ipv4=f"10.244.0.{n}"))
    return e


def _ours() -> tuple[int, int]:
    """Live CIDR peers inside NET and keys of a CIDR identity (1 << 24 | n) on port 80."""
    gc.collect()
    objs = gc.get_objects()
    peers = sum(1 for o in objs if type(o) is CIDRPeer and o.cidr.subnet_of(NET))
    keys = sum(1 for o in objs if type(o) is Key and o.identity >> 24 == 1 and o.port == 80)
    return peers, keys


@pytest.fixture
def small_key_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The key cache lets keys go, as it does past its bound at 100k peers."""
    _peerkeys._KEY_CACHE.clear()
    monkeypatch.setattr(_peerkeys, "_key_count", 0)
    monkeypatch.setattr(_peerkeys, "_KEY_CACHE_MAX", 16)
    yield
    _peerkeys._KEY_CACHE.clear()


@pytest.mark.parametrize("first", [300, 150], ids=["edited", "grown"])
def test_a_replaced_policy_leaves_one_instance_each(small_key_cache: None, first: int) -> None:
    e = _engine()
    e.upsert_policy(_policy(first))  # no reference kept: the agent keeps none either
    e.pending_changes()
    assert _ours() == (first, 2 * first)
    e.upsert_policy(_policy(301))
    e.pending_changes()
    state = e.resolve(1)
    assert len([k for k in state if k.identity >> 24 == 1]) == 2 * 301
    del state
    assert _ours() == (301, 2 * 301)
    # what the replacement referenced twice for a while is given back too
    assert sys.getsizeof(e._cidr_more) < 4096


def test_a_recomputed_peer_rule_keeps_its_keys(small_key_cache: None) -> None:
    """A wide CIDR peer whose selection grows (another policy brings a prefix
    inside it) has its peer rule recomputed: the keys it had are kept, not
    made again beside the state's."""
    e = _engine()
    e.upsert_policy(_policy(300, app="other"))  # the CIDR identities, for endpoint 2
    e.upsert_policy(_policy(0, "wide", peers=(CIDRPeer(NET),)))  # endpoint 1: all of them
    e.pending_changes()
    assert _ours()[1] <= 2 * 300 + 2 * 301  # each endpoint's (the /16's own identity too), some shared
    e.upsert_policy(_policy(301, app="other"))  # one more inside the /16
    e.pending_changes()
    assert len([k for k in e.resolve(1) if k.identity >> 24 == 1]) == 2 * 302
    assert _ours()[1] <= 2 * 301 + 2 * 302


def test_unref_gives_back_a_burst_of_references() -> None:
    more: dict[int, int] = {}
    for i in range(20_000):
        mm.ref(more, i)
    mm.ref(more, 7)
    big = sys.getsizeof(more)
    for i in range(20_000):
        mm.unref(more, i)
    assert more == {7: 1}
    assert sys.getsizeof(more) < 4096 < big
    mm.unref(more, 7)
    assert more == {}
