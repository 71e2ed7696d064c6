"""CIDR identities are released with their prefix's last reference (issue 17):
the allocator, the selector cache and the ipcache forget a /32 no policy uses."""

from __future__ import annotations

import ipaddress

from axoneme.core.mapstate import Direction
from axoneme.core.policy.api import CIDRPeer, PeerRule, Policy, PolicyKind, PolicyRef, Rule
from axoneme.core.policy.engine import PolicyEngine
from axoneme.core.selectors import LabelSelector

REF = PolicyRef(PolicyKind.CILIUM_NETWORK_POLICY, "default", "peers")


def peers_policy(*hosts: int, name: str = "peers") -> Policy:
    ref = PolicyRef(PolicyKind.CILIUM_NETWORK_POLICY, "default", name)
    peers = tuple(CIDRPeer(ipaddress.ip_network(f"198.51.100.{h}/32")) for h in hosts)
    rule = PeerRule(Direction.INGRESS, peers=peers, path="spec.ingress[0]")
    return Policy(ref, (Rule(ref, LabelSelector.build({"k8s:app": "srv"}), (rule,),
                             enforce_ingress=True, enforce_egress=False),))


def net(h: int) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(f"198.51.100.{h}/32")


def held(e: PolicyEngine) -> dict[ipaddress.IPv4Network, int]:
    return {n: i.id for n, i in e.allocator.cidr_identities().items()}


def test_a_replaced_policys_old_peers_are_released() -> None:
    e = PolicyEngine()
    e.upsert_policy(peers_policy(1, 2, 3))
    first = held(e)
    assert set(first) == {net(1), net(2), net(3)}
    e.pending_ipcache_changes()
    e.upsert_policy(peers_policy(3, 4, 5))  # the same policy, other peers
    now = held(e)
    assert set(now) == {net(3), net(4), net(5)}
    assert now[net(3)] == first[net(3)]  # still referenced: the same number
    for h in (1, 2):
        assert e.allocator.get(first[net(h)]) is None
        assert e.identity_of_ip(f"198.51.100.{h}") != first[net(h)]
    changes = e.pending_ipcache_changes()
    assert {net(1), net(2)} <= set(changes.deletes)
    assert {net(1), net(2)}.isdisjoint(e.ipcache())
    # asked for again: a new number (a released one is not given out again)
    e.upsert_policy(peers_policy(1, name="again"))
    assert held(e)[net(1)] not in first.values()


def test_a_prefix_two_policies_use_stays_until_the_last_goes() -> None:
    e = PolicyEngine()
    e.upsert_policy(peers_policy(7))
    e.upsert_policy(peers_policy(7, 8, name="other"))
    number = held(e)[net(7)]
    e.delete_policy(REF)
    assert held(e)[net(7)] == number and e.ipcache()[net(7)] == number
    e.delete_policy(PolicyRef(PolicyKind.CILIUM_NETWORK_POLICY, "default", "other"))
    assert held(e) == {} and e.allocator.get(number) is None
    assert net(7) not in e.ipcache() and net(8) not in e.ipcache()
    assert number not in e.allocator.snapshot()  # nor in the state file
