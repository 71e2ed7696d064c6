"""A peer rule's key ingredients: interned keys, the L4 parts of port rules
(ranges, named ports, ICMP), egress named ports per destination, and the
identities its peers select."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from axoneme.core.endpoint import Endpoint, NamedPort
from axoneme.core.l7 import default_proxy_port as l7_default_proxy_port
from axoneme.core.mapstate import (
    ADDRESS_IDENTITY,
    PORT_BITS,
    PORT_PROTOCOLS,
    PROTOCOL_NAMES,
    Direction,
    Key,
    Protocol,
    port_range_to_prefixes,
)
from axoneme.core.policy._addressbook import AddressBook, ClusterAddress
from axoneme.core.policy._selectorcache import Selector, SelectorCache
from axoneme.core.policy.api import EndpointPeer, L7Spec, PeerRule, PortProtocol

L4 = tuple[Protocol, int, int]  # protocol, port, prefix length

# Keys are immutable and validated on construction, which costs more than the
# rest of resolution; keys are interned per L4 template and identity (bounded:
# cleared when it grows past _KEY_CACHE_MAX). 64k keys: a 100k-peer policy's
# 200k keys are not held by the cache's tables too (~10 MB at the former
# 1 << 18, issue 17); past the bound, endpoints selected by the same rule no
# longer share its keys.
_KEY_CACHE: dict[tuple[Direction, Protocol, int, int], dict[int, Key]] = {}
_KEY_CACHE_MAX = 1 << 16
_key_count = 0


def _key(identity: int, d: Direction, l4: L4, address: str = "") -> Key:
    global _key_count
    if address:
        return Key(ADDRESS_IDENTITY, d, *l4, address=address)
    bucket = _KEY_CACHE.get((d, *l4))
    if bucket is None:
        bucket = _KEY_CACHE[(d, *l4)] = {}
    key = bucket.get(identity)
    if key is None:
        if _key_count > _KEY_CACHE_MAX:
            _KEY_CACHE.clear()
            _key_count = 0
            bucket = _KEY_CACHE[(d, *l4)] = {}
        template = next(iter(bucket.values()), None)
        if template is None or identity == ADDRESS_IDENTITY:
            key = Key(identity, d, *l4)  # validated
        else:
            key = _with_identity(template, identity)
        bucket[identity] = key
        _key_count += 1
    return key


_new_object = object.__new__
_set_field = object.__setattr__


def _with_identity(template: Key, identity: int) -> Key:
    """``template`` for another (non-address) identity: the L4 part was
    validated when the template was made, so skip Key's checks (a 100k-peer
    policy makes 100k keys)."""
    key = _new_object(Key)
    _set_field(key, "identity", identity)
    _set_field(key, "direction", template.direction)
    _set_field(key, "protocol", template.protocol)
    _set_field(key, "port", template.port)
    _set_field(key, "prefix_len", template.prefix_len)
    _set_field(key, "address", "")
    _set_field(key, "_hash", hash((identity, template.direction, template.protocol,
                                   template.port, template.prefix_len, "")))
    return key


def default_proxy_port(parser: str, direction: Direction) -> int:
    """Proxy port used when the engine is not told (offline tools, tests): the
    parser's own ``default_proxy_port``. The agent passes
    EngineOptions.proxy_port with the ports its proxies listen on."""
    return l7_default_proxy_port(parser)


def _protocols(pp: PortProtocol) -> tuple[Protocol, ...]:
    return PORT_PROTOCOLS if pp.protocol.upper() == "ANY" else (Protocol.parse(pp.protocol),)


def _named_l4s(pp: PortProtocol, ports: Iterable[NamedPort]) -> list[L4]:
    """The numbers a set of container ports gives the name ``pp.name``."""
    protos = _protocols(pp)
    return sorted({(proto, np.port, PORT_BITS) for np in ports if np.name == pp.name
                   for proto in (Protocol.parse(np.protocol),) if proto in protos})


def _port_l4s(pp: PortProtocol, endpoint: Endpoint) -> list[L4]:
    protos = _protocols(pp)
    if pp.name:
        # A named port here is ingress's: the endpoint's own container ports
        # (egress named ports resolve per destination, _named_targets).
        return _named_l4s(pp, endpoint.named_ports)
    if pp.port == 0:
        if pp.protocol.upper() == "ANY":
            return [(Protocol.ANY, 0, 0)]
        return [(p, 0, 0) for p in protos]
    if pp.end_port is not None and pp.end_port > pp.port:
        blocks = port_range_to_prefixes(pp.port, pp.end_port)
    else:
        blocks = [(pp.port, PORT_BITS)]
    out: list[L4] = []
    for p in protos:  # loops, not a comprehension's call (B5ENGINE)
        for port, plen in blocks:
            out.append((p, port, plen))
    return out


Target = tuple[int, str]  # (identity, "") or (ADDRESS_IDENTITY, address)
NamedEgress = tuple[PortProtocol, L7Spec | None]


def _peer_rule_l4s(pr: PeerRule, endpoint: Endpoint
                   ) -> tuple[list[tuple[L4, L7Spec | None]], list[NamedEgress]]:
    """The L4 parts of one rule (with L7 specs) common to every peer, and its
    egress named ports (resolved per destination)."""
    if not pr.ports and not pr.icmps:
        return [((Protocol.ANY, 0, 0), None)], []
    out: list[tuple[L4, L7Spec | None]] = []
    named: list[NamedEgress] = []
    for port_rule in pr.ports:
        l7 = None if pr.deny else port_rule.l7
        if not port_rule.ports:
            out.append(((Protocol.ANY, 0, 0), l7))
            continue
        for pp in port_rule.ports:
            if pp.name and pr.direction is Direction.EGRESS:
                named.append((pp, l7))
                continue
            # one numbered port of one protocol (the usual one): _port_l4s's
            # answer without its three calls (issue 17, B5ENGINE)
            proto = None if pp.name or not pp.port or (
                pp.end_port is not None and pp.end_port > pp.port) \
                else PROTOCOL_NAMES.get(pp.protocol)
            if proto is not None and proto is not Protocol.ANY:
                out.append(((proto, pp.port, PORT_BITS), l7))
            else:
                for l4 in _port_l4s(pp, endpoint):  # no generator's call (B5ENGINE)
                    out.append((l4, l7))
    for icmp in pr.icmps:
        proto = Protocol.ICMPV6 if icmp.family.lower() == "ipv6" else Protocol.ICMP
        out.append(((proto, icmp.type, PORT_BITS), None))
    return out, named


def _named_targets(pp: PortProtocol, ids: set[int], addrs: Sequence[ClusterAddress],
                   book: AddressBook) -> list[tuple[Target, L4]]:
    """An egress named port, per destination (upstream Kubernetes): each
    destination pod allows only the numbers it names ``pp.name`` itself.

    1. A peer identity whose pods all name it the same numbers: identity keys.
    2. Pods of one identity naming different numbers (or some not at all):
       address keys, each pod's own numbers for its addresses.
    3. The any-peer wildcard stands for every pod identity; non-pod peers
       (world, nodes) have no named ports: nothing.
    4. Addresses a CIDR peer matched: that pod's own numbers.
    """
    out: list[tuple[Target, L4]] = []
    idents = book.pod_identities() if 0 in ids else sorted(ids)
    for ident in idents:
        pods = book.pods_of(ident)
        if not pods:
            continue
        per_pod = [_named_l4s(pp, pod[0].named_ports) for pod in pods]
        if per_pod[0] and all(p == per_pod[0] for p in per_pod[1:]):
            out.extend(((ident, ""), l4) for l4 in per_pod[0])
            continue
        for pod, l4s in zip(pods, per_pod, strict=True):
            out.extend(((ADDRESS_IDENTITY, a.address), l4) for a in pod for l4 in l4s)
    for a in addrs:
        out.extend(((ADDRESS_IDENTITY, a.address), l4) for l4 in _named_l4s(pp, a.named_ports))
    return out


def _peer_ids(pr: PeerRule, cache: SelectorCache, deps: set[Selector]) -> set[int]:
    if pr.peers is None:
        return {0}
    ids: set[int] = set()
    for peer in pr.peers:
        sel: Selector = peer.selector if isinstance(peer, EndpointPeer) else peer
        deps.add(sel)
        ids.update(cache.selected(sel))
    return ids


__all__ = ["L4", "default_proxy_port"]
