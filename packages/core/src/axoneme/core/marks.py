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
  connections (SO_MARK on the socket). Test with
  ``is_from_proxy(mark)``. A datapath never redirects such a packet to the
  proxy again in the stage that already proxied it, but still applies L3/L4
  policy to it:
  - ``MARK_MAGIC_PROXY_INGRESS`` (0x0A00, also ``MARK_MAGIC_FROM_PROXY``):
    from an ingress proxy. No further redirect at all.
  - ``MARK_MAGIC_PROXY_EGRESS`` (0x0B00): from an egress proxy. The source's
    egress stage is done; the destination's ingress policy still applies,
    including its own L7 redirect (Cilium does the same).
  ``from_proxy_mark(direction, identity)`` gives the mark for a proxy's
  direction; its upper 16 bits carry the source identity the proxy judged
  the connection by (0: none), so the datapath judges the upstream leg by
  the same identity (Cilium's MARK_MAGIC_PROXY_INGRESS | identity).
- The source identity in the to-proxy mark (eBPF; Cilium carries it the same
  way): a datapath that knows the identity it judged a packet by (for a
  tunnelled one, the VNI's: the receiver's ipcache may not know the sender)
  sets ``to_proxy_identity_mark(port, identity)``::

      bits 31..16  source identity (1..65535, a cluster identity)
      bit  15      MARK_TO_PROXY_IDENTITY: this layout
      bits 14..12  proxy port offset, high 3 bits (port - PROXY_MARK_PORT_BASE)
      bits 11..8   MARK_MAGIC_TO_PROXY
      bits  7..0   proxy port offset, low 8 bits

  The port becomes an 11-bit offset from PROXY_MARK_PORT_BASE (the parsers'
  ports 15001, 15002, 15053 and their egress twins +100 fit); a port outside
  the window, or an identity above 16 bits (node-local CIDR identities),
  gets the plain ``to_proxy_mark`` and the proxy falls back to the ipcache.
  The TPROXY rule per port matches the low 16 bits (``identity_port_match``);
  TPROXY keeps the identity, and with ``net.ipv4.tcp_fwmark_accept=1`` the
  accepted socket inherits the SYN's mark: the proxy reads it with
  getsockopt(SO_MARK) (``identity_of_to_proxy_mark``). The plain rules match
  ``MARK_TO_PROXY_PORT_MATCH``, which includes the flag, so an identity
  equal to a proxy port never matches another port's plain rule.
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
# The identity layout of a to-proxy mark (see the module doc).
MARK_TO_PROXY_IDENTITY = 0x8000
PROXY_MARK_PORT_BASE = 15000
PROXY_MARK_PORT_SPAN = 2048  # 11 bits of port offset
# The plain per-port TPROXY rules: port half, magic, and the identity flag clear.
MARK_TO_PROXY_PORT_MATCH = MARK_TO_PROXY_MASK | MARK_TO_PROXY_IDENTITY
# The identity-carrying per-port rules: flag, offset and magic (identity ignored).
MARK_IDENTITY_PORT_MASK = 0x0000FFFF
MAX_MARK_IDENTITY = 0xFFFF
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


def identity_port_match(proxy_port: int) -> int | None:
    """The low 16 bits an identity-carrying mark for ``proxy_port`` has (what
    its TPROXY rule matches under MARK_IDENTITY_PORT_MASK); None when the port
    is outside the window (such ports only get plain marks)."""
    off = proxy_port - PROXY_MARK_PORT_BASE
    if not 0 <= off < PROXY_MARK_PORT_SPAN:
        return None
    return MARK_TO_PROXY_IDENTITY | ((off >> 8) << 12) | MARK_MAGIC_TO_PROXY | (off & 0xFF)


def to_proxy_identity_mark(proxy_port: int, identity: int) -> int:
    """The to-proxy mark carrying the source ``identity`` (the plain
    ``to_proxy_mark`` when the identity or the port does not fit)."""
    low = identity_port_match(proxy_port)
    if low is None or not 0 < identity <= MAX_MARK_IDENTITY:
        return to_proxy_mark(proxy_port)
    return (identity << 16) | low


def identity_of_to_proxy_mark(mark: int) -> int:
    """The source identity a to-proxy mark carries (also after TPROXY, on the
    accepted socket); 0 for a plain mark or any other mark."""
    if mark & MARK_MAGIC_HOST_MASK != MARK_MAGIC_TO_PROXY or not mark & MARK_TO_PROXY_IDENTITY:
        return 0
    return (mark >> 16) & MAX_MARK_IDENTITY


def is_from_proxy(mark: int) -> bool:
    """Whether a packet was sent by an L7 proxy's upstream socket (either direction)."""
    return mark & MARK_MAGIC_HOST_MASK in (MARK_MAGIC_PROXY_INGRESS, MARK_MAGIC_PROXY_EGRESS)


def from_proxy_mark(direction: int, identity: int = 0) -> int:
    """The SO_MARK of a proxy's upstream sockets; ``direction`` is a core Direction
    (INGRESS=0, EGRESS=1) of the policy the proxy enforces, ``identity`` the
    source identity it judged the connection by (kept when it fits 16 bits)."""
    magic = MARK_MAGIC_PROXY_EGRESS if direction == 1 else MARK_MAGIC_PROXY_INGRESS
    return with_source_identity(magic, identity)


def with_source_identity(from_mark: int, identity: int) -> int:
    """A from-proxy mark with ``identity`` in its upper 16 bits (unchanged when
    the identity is 0 or does not fit, or the mark is no from-proxy mark)."""
    if not 0 < identity <= MAX_MARK_IDENTITY or not is_from_proxy(from_mark):
        return from_mark
    return (from_mark & 0xFFFF) | (identity << 16)


def identity_of_from_proxy_mark(mark: int) -> int:
    """The source identity a from-proxy mark carries (0: none)."""
    return (mark >> 16) & MAX_MARK_IDENTITY if is_from_proxy(mark) else 0


__all__ = [
    "MARK_MAGIC_HOST_MASK", "MARK_MAGIC_TO_PROXY", "MARK_MAGIC_FROM_PROXY", "MARK_MAGIC_CHECKED",
    "MARK_MAGIC_PROXY_INGRESS", "MARK_MAGIC_PROXY_EGRESS", "MARK_TO_PROXY_MASK", "from_proxy_mark",
    "TPROXY_MARK", "TPROXY_MASK", "PROXY_ROUTE_TABLE", "to_proxy_mark", "proxy_port_of",
    "is_from_proxy", "MARK_TO_PROXY_IDENTITY", "PROXY_MARK_PORT_BASE", "PROXY_MARK_PORT_SPAN",
    "MARK_TO_PROXY_PORT_MATCH", "MARK_IDENTITY_PORT_MASK", "MAX_MARK_IDENTITY",
    "identity_port_match", "to_proxy_identity_mark", "identity_of_to_proxy_mark",
    "with_source_identity", "identity_of_from_proxy_mark",
]
