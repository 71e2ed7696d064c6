"""The cluster's addresses as policy sees them: pods' and nodes' addresses
(``AddressBook``) and which of them a rule's CIDR peers match one by one
(ipBlock over pods/nodes, Cilium's policy-cidr-match-mode)."""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from axoneme.core.endpoint import NamedPort
from axoneme.core.policy.api import ADDRESS_PODS, CIDRPeer, PeerRule


@dataclass(frozen=True, slots=True)
class ClusterAddress:
    """One address the cluster knows: a pod's (``pods``) or a node's (``nodes``)."""

    address: str  # canonical text
    identity: int
    kind: str  # ADDRESS_PODS | ADDRESS_NODES
    named_ports: tuple[NamedPort, ...] = ()
    pod: int = 0  # endpoint id of a pod address (its v4 and v6 share it)


class AddressBook:
    """The cluster's addresses, for address keys (ipBlock over pods/nodes, CIDR
    match modes) and per-destination named ports."""

    __slots__ = ("addresses", "_parsed", "_pods")

    def __init__(self, addresses: Iterable[ClusterAddress] = ()) -> None:
        self.addresses = tuple(sorted(addresses, key=lambda a: (a.kind, a.address)))
        # per IP version, sorted by address: a CIDR is one bisected range
        parsed = sorted(((ipaddress.ip_address(a.address), a) for a in self.addresses),
                        key=lambda p: (p[0].version, int(p[0])))
        self._parsed = {v: ([int(ip) for ip, _ in parsed if ip.version == v],
                            [(ip, a) for ip, a in parsed if ip.version == v]) for v in (4, 6)}
        pods: dict[int, dict[int, list[ClusterAddress]]] = {}
        for a in self.addresses:
            if a.kind == ADDRESS_PODS:
                pods.setdefault(a.identity, {}).setdefault(a.pod, []).append(a)
        self._pods = pods

    def in_block(self, peer: CIDRPeer, kinds: frozenset[str]) -> list[ClusterAddress]:
        """The addresses of ``kinds`` in ``peer``'s CIDR and none of its excepts."""
        numbers, entries = self._parsed[peer.cidr.version]
        lo = bisect.bisect_left(numbers, int(peer.cidr.network_address))
        hi = bisect.bisect_right(numbers, int(peer.cidr.broadcast_address))
        return [a for ip, a in entries[lo:hi] if a.kind in kinds and peer.contains(ip)]

    def pods_of(self, identity: int) -> list[list[ClusterAddress]]:
        """Per pod of ``identity`` (0: every pod), its addresses."""
        if identity == 0:
            return [addrs for by_pod in self._pods.values() for addrs in by_pod.values()]
        return list(self._pods.get(identity, {}).values())

    def pod_identities(self) -> list[int]:
        return sorted(self._pods)



def _peer_addresses(pr: PeerRule, book: Callable[[], AddressBook], cidr_match: frozenset[str]
                    ) -> tuple[list[ClusterAddress], bool]:
    """Cluster addresses the rule's CIDR peers match one by one, and whether
    any CIDR peer looks at cluster addresses at all (a dependency).

    Per peer: in its CIDR and in none of its own excepts; another peer (or
    rule) may still match an address one peer excepts (upstream's
    "IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed")."""
    found: dict[str, ClusterAddress] = {}
    uses = False
    for peer in pr.peers or ():
        if not isinstance(peer, CIDRPeer):
            continue
        kinds = peer.match | cidr_match
        if not kinds:
            continue
        uses = True
        for a in book().in_block(peer, kinds):
            found.setdefault(a.address, a)
    if not found:  # the usual peer rule: no sort, no comprehension (B5ENGINE)
        return [], uses
    return [found[k] for k in sorted(found)], uses



__all__ = ["AddressBook", "ClusterAddress"]
