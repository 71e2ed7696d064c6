"""skb mark values shared by the datapaths and the L7 proxies (one place).

DO NOT CHANGE: these values are the contract between the datapaths (eBPF and
iptables set/recognise them) and the agent's proxy plumbing
(``axoneme.agent.proxy``: the TPROXY rules and the upstream sockets). They
mirror Cilium's bpf/lib/common.h ``MARK_MAGIC_*``:

- ``MARK_MAGIC_TO_PROXY | (proxy_port << 16)``: set by a datapath on a packet
  that must go to the L7 proxy listening on ``proxy_port`` (the entry's
  ``Entry.proxy_port``). The agent's mangle/PREROUTING chain ``AXON-PROXY``
  matches ``mark/MARK_TO_PROXY_MASK`` per port and TPROXYs the packet to the
  listener; ``ip rule fwmark 0x200/0xf00 lookup 2004`` delivers it locally.
- From-proxy marks, carried by every packet of a proxy's upstream
  connections (SO_MARK on the socket; the upper 16 bits are 0). Test with
  ``is_from_proxy(mark)``. A datapath never redirects such a packet to the
  proxy again in the stage that already proxied it, but still applies L3/L4
  policy to it:
  - ``MARK_MAGIC_PROXY_INGRESS`` (0x0A00, also ``MARK_MAGIC_FROM_PROXY``):
    from an ingress proxy. No further redirect at all.
  - ``MARK_MAGIC_PROXY_EGRESS`` (0x0B00): from an egress proxy. The source's
    egress stage is done; the destination's ingress policy still applies,
    including its own L7 redirect (Cilium does the same).
  ``from_proxy_mark(direction)`` gives the mark for a proxy's direction.
"""

from __future__ import annotations

MARK_MAGIC_HOST_MASK = 0x0F00  # the "magic" nibble
MARK_MAGIC_TO_PROXY = 0x0200  # datapath -> proxy redirect (Cilium MARK_MAGIC_TO_PROXY)
MARK_MAGIC_PROXY_INGRESS = 0x0A00  # ingress proxy -> upstream (Cilium MARK_MAGIC_PROXY_INGRESS)
MARK_MAGIC_PROXY_EGRESS = 0x0B00  # egress proxy -> upstream (Cilium MARK_MAGIC_PROXY_EGRESS)
MARK_MAGIC_FROM_PROXY = MARK_MAGIC_PROXY_INGRESS
# Set by a datapath that already applied the destination's ingress policy on
# the source's side (eBPF from-container), so the to-container stage skips it.
MARK_MAGIC_CHECKED = 0x0E00
# A redirect mark is matched on the magic nibble plus the port half.
MARK_TO_PROXY_MASK = 0xFFFF0F00
# What TPROXY sets on the packets it diverts (and the ip rule matches).
TPROXY_MARK = MARK_MAGIC_TO_PROXY
TPROXY_MASK = MARK_MAGIC_HOST_MASK
# The routing table holding ``local 0.0.0.0/0 dev lo`` for diverted packets.
PROXY_ROUTE_TABLE = 2004


def to_proxy_mark(proxy_port: int) -> int:
    """The skb mark a datapath sets to redirect a packet to ``proxy_port``."""
    if not 0 < proxy_port <= 0xFFFF:
        raise ValueError(f"bad proxy port {proxy_port}")
    return MARK_MAGIC_TO_PROXY | (proxy_port << 16)


def proxy_port_of(mark: int) -> int:
    """The proxy port a to-proxy mark carries, 0 if ``mark`` is not one."""
    if mark & MARK_MAGIC_HOST_MASK != MARK_MAGIC_TO_PROXY:
        return 0
    return (mark >> 16) & 0xFFFF


def is_from_proxy(mark: int) -> bool:
    """Whether a packet was sent by an L7 proxy's upstream socket (either direction)."""
    return mark & MARK_MAGIC_HOST_MASK in (MARK_MAGIC_PROXY_INGRESS, MARK_MAGIC_PROXY_EGRESS)


def from_proxy_mark(direction: int) -> int:
    """The SO_MARK of a proxy's upstream sockets; ``direction`` is a core Direction
    (INGRESS=0, EGRESS=1) of the policy the proxy enforces."""
    return MARK_MAGIC_PROXY_EGRESS if direction == 1 else MARK_MAGIC_PROXY_INGRESS


__all__ = [
    "MARK_MAGIC_HOST_MASK", "MARK_MAGIC_TO_PROXY", "MARK_MAGIC_FROM_PROXY", "MARK_MAGIC_CHECKED",
    "MARK_MAGIC_PROXY_INGRESS", "MARK_MAGIC_PROXY_EGRESS", "MARK_TO_PROXY_MASK", "from_proxy_mark",
    "TPROXY_MARK", "TPROXY_MASK", "PROXY_ROUTE_TABLE", "to_proxy_mark", "proxy_port_of",
    "is_from_proxy",
]
