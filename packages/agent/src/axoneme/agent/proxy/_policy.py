"""``policy_for`` built from the agent's state: what the proxies ask per request.

The proxy knows the connection (client, original destination) and its own
direction; this decides, from the endpoint's current MapState, which L7 rules
apply right now:

1. The local endpoint is the client (EGRESS) or the original destination
   (INGRESS); the peer is the other side. Its identity, for INGRESS, is the
   ``source_identity`` the datapath put in the connection's mark when the
   proxy passes one (the identity the datapath judged the packet by: for a
   tunnelled packet the VNI's, which this node's ipcache may lack or
   contradict); otherwise, and for EGRESS, the ipcache's.
2. ``MapState.lookup(peer identity, direction, TCP, destination port, peer
   address)`` (the address for address keys, as the datapath looks it up):
   - denied (the L3/L4 policy no longer allows it): None, the proxy refuses;
   - redirected with L7 rules of this parser: those rules;
   - allowed without redirect (an L4-only allow now shadows the L7 rules, or
     the L7 rules were removed): allow every request (empty rules);
   - redirected to another parser: None (this proxy cannot judge it).
3. No local endpoint or no policy for it: None.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from axoneme.core.endpoint import Endpoint
from axoneme.core.flow import FlowEndpoint
from axoneme.core.l7proxy import PolicyFor, ProxyPolicy
from axoneme.core.mapstate import Direction, MapState, Protocol, Verdict
from axoneme.core.plugins import l7_parser


def _canonical(ip: str) -> str | None:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return None


def flow_endpoint(ep: Endpoint) -> FlowEndpoint:
    return FlowEndpoint(identity=ep.identity, namespace=ep.namespace, pod_name=ep.pod_name,
                        labels=tuple(ep.labels.sorted_strings()), id=ep.id)


def make_policy_for(parser: str, *, endpoint_by_ip: Callable[[str], Endpoint | None],
                    identity_of_ip: Callable[[str], int],
                    policy_of: Callable[[Endpoint], MapState | None],
                    peer_endpoint: Callable[[str, int], FlowEndpoint] | None = None,
                    protocol: Protocol | None = None) -> PolicyFor:
    """A ``policy_for`` for the proxies of ``parser`` (see the module doc).

    ``endpoint_by_ip``: local endpoint owning an IP; ``identity_of_ip``: the
    ipcache lookup (world when unknown); ``policy_of``: the endpoint's current
    MapState; ``peer_endpoint(ip, identity)``: flow details of the peer
    (default: the local endpoint owning the IP, else just the identity);
    ``protocol`` of the MapState lookup (default: the parser's last
    ``transport``, e.g. UDP for a TCP+UDP DNS parser, TCP for most).
    """
    proto = protocol if protocol is not None else Protocol.parse(l7_parser(parser).transport[-1])

    def policy_for(src_ip: str, src_port: int, dst_ip: str, dst_port: int,
                   direction: Direction, source_identity: int = 0) -> ProxyPolicy | None:
        egress = Direction(direction) is Direction.EGRESS
        local_ip, peer_ip = (src_ip, dst_ip) if egress else (dst_ip, src_ip)
        local = endpoint_by_ip(local_ip)
        if local is None:
            return None
        state = policy_of(local)
        if state is None:
            return None
        peer_id = source_identity if source_identity and not egress else identity_of_ip(peer_ip)
        decision = state.lookup(peer_id, Direction(direction), proto, dst_port, _canonical(peer_ip))
        if not decision.allowed or decision.entry is None:
            return None
        if decision.verdict is Verdict.REDIRECTED:
            l7 = decision.entry.l7
            if l7 is None or l7.parser != parser:
                return None
            rules: tuple[object, ...] = l7.rules
        else:
            rules = ()
        me = flow_endpoint(local)
        if peer_endpoint is not None:
            peer = peer_endpoint(peer_ip, peer_id)
        else:
            peer_ep = endpoint_by_ip(peer_ip)
            peer = flow_endpoint(peer_ep) if peer_ep else FlowEndpoint(identity=peer_id)
        return ProxyPolicy(rules, me, peer) if egress else ProxyPolicy(rules, peer, me)

    return policy_for


__all__ = ["make_policy_for", "flow_endpoint"]
