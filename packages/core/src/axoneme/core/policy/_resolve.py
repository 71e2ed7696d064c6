"""Resolution: the rules selecting one endpoint -> its MapState.

Pure function of (endpoint, its selecting rules, the selector cache, the
cluster's addresses and named ports, options); the engine decides when to
call it.
"""

from __future__ import annotations

import bisect
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from axoneme.core.endpoint import Endpoint, NamedPort
from axoneme.core.errors import PolicyError
from axoneme.core.identity import ReservedIdentity
from axoneme.core.l7 import default_proxy_port as l7_default_proxy_port
from axoneme.core.mapstate import (
    ADDRESS_IDENTITY,
    PORT_BITS,
    PORT_PROTOCOLS,
    Direction,
    Entry,
    Key,
    L7Rules,
    MapState,
    Protocol,
    port_range_to_prefixes,
)
from axoneme.core.policy._selectorcache import Selector, SelectorCache
from axoneme.core.policy.api import (
    ADDRESS_NODES,
    ADDRESS_PODS,
    CIDRPeer,
    EndpointPeer,
    L7Spec,
    PeerRule,
    PortProtocol,
    Rule,
)

LOG = logging.getLogger(__name__)

ALLOW_LOCALHOST = "allow-localhost"

L4 = tuple[Protocol, int, int]  # protocol, port, prefix length


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


@dataclass(frozen=True, slots=True)
class Resolved:
    """One endpoint's resolved policy and what it depends on."""

    state: MapState
    ingress: bool
    egress: bool
    deps: frozenset[Selector]  # peer selectors whose selection feeds the state
    uses_named_ports: bool  # egress named ports (depend on every endpoint's ports)
    rules: tuple[Rule, ...] = ()  # the selecting rules
    uses_addresses: bool = False  # CIDR peers over cluster addresses (depend on every address)


# Keys are immutable and validated on construction, which costs more than the
# rest of resolution; keys are interned per L4 template and identity (bounded:
# cleared when it grows past _KEY_CACHE_MAX).
_KEY_CACHE: dict[tuple[Direction, Protocol, int, int], dict[int, Key]] = {}
_KEY_CACHE_MAX = 1 << 18
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
        key = bucket[identity] = Key(identity, d, *l4)
        _key_count += 1
    return key


def default_proxy_port(parser: str, direction: Direction) -> int:
    """Proxy port used when the engine is not told (offline tools, tests): the
    parser's own ``default_proxy_port``. The agent passes
    EngineOptions.proxy_port with the ports its proxies listen on."""
    return l7_default_proxy_port(parser)


class _Allow:
    __slots__ = ("plain", "l7", "derived")

    def __init__(self) -> None:
        self.plain = False
        self.l7: dict[str, list[tuple[str, tuple[object, ...]]]] = {}
        self.derived: set[str] = set()


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
    return [(p, port, plen) for p in protos for port, plen in blocks]


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
            else:
                out.extend((l4, l7) for l4 in _port_l4s(pp, endpoint))
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
        ids |= cache.selected(sel)
    return ids


def _peer_addresses(pr: PeerRule, book: AddressBook, cidr_match: frozenset[str]
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
        for a in book.in_block(peer, kinds):
            found.setdefault(a.address, a)
    return [found[k] for k in sorted(found)], uses


# Resolution (Cilium semantics), for one endpoint:
# 1. Rules select the endpoint when their subject matches its identity labels
#    (nodeSelector rules never select pods; the repository skips them).
# 2. A direction is enforced if any selecting rule enforces it, or the mode is
#    "always"; mode "never" enforces nothing and installs no denies. An
#    unenforced direction gets the wildcard allow Key(0, D) (denies still apply).
# 3. Peers become identity sets through the selector cache: no peers = {0}
#    (any), endpoint selectors by labels (pods and reserved identities),
#    entities by reserved number (world = 2, 9, 10 and every CIDR identity;
#    cluster = every non-world identity; all = {0}; none = {}), CIDRs by
#    prefix containment minus excepts (a /0 also selects world).
#    CIDR peers also match cluster addresses of the kinds in their ``match``
#    (ipBlock: pods and nodes) plus the engine's ``cidr_match`` (Cilium's
#    policy-cidr-match-mode, for Cilium's CIDR fields): one address key per
#    address in the CIDR and none of that peer's excepts.
# 4. Ports: none = L3-only Key(id, D); protocol ANY with a port = TCP, UDP and
#    SCTP keys; port 0 with a protocol = that whole protocol; endPort = prefix
#    blocks; named ports: ingress from the endpoint's own ports, egress per
#    destination pod (_named_targets; unknown name: no key); ICMP type in
#    the port field with prefix 16.
# 5. Merging: see _merge (deny > plain allow > L7; L7 rules of one parser OR'ed).
# 6. allow-localhost "auto": an enforced ingress also allows the host (Key(1, INGRESS)).
# 7. Replies and a pod's traffic to itself are not policy's business.
def resolve_endpoint(
    endpoint: Endpoint,
    rules: Sequence[Rule],
    cache: SelectorCache,
    book: AddressBook,
    enforcement_mode: str = "default",
    allow_localhost: str = "auto",
    proxy_port: Callable[[str, Direction], int] | None = None,
    strict: bool = True,
    cidr_match: frozenset[str] = frozenset(),
) -> Resolved:
    """Resolve the rules selecting ``endpoint`` into its MapState.

    ``strict``: different L7 parsers on one key raise PolicyError (policy
    admission); otherwise the first parser by name wins and it is logged.
    """
    dirs = (Direction.INGRESS, Direction.EGRESS)
    if enforcement_mode == "never":
        return Resolved(MapState({Key(0, d): Entry() for d in dirs}), False, False,
                        frozenset(), False, tuple(rules))
    enforce = {d: enforcement_mode == "always" or any(r.enforces(d) for r in rules) for d in dirs}
    allows: dict[Key, _Allow] = {}
    denies: dict[Key, set[str]] = {}
    deps: set[Selector] = set()
    uses_named = False

    uses_addresses = False

    def add(target: Target, l4: L4, l7: L7Spec | None, pr: PeerRule, derived: str) -> None:
        ident, address = target
        d = pr.direction
        key = None
        if not address:
            bucket = _KEY_CACHE.get((d, *l4))
            key = bucket.get(ident) if bucket is not None else None
        if key is None:
            key = _key(ident, d, l4, address)
        if pr.deny:
            denies.setdefault(key, set()).add(derived)
            return
        acc = allows.get(key)
        if acc is None:
            acc = allows[key] = _Allow()
        acc.derived.add(derived)
        if l7 is None:
            acc.plain = True
        else:
            acc.l7.setdefault(l7.parser, []).append((derived, l7.rules))

    for rule in rules:
        for pr in rule.rules:
            if pr.allows_nothing:
                continue
            ids = _peer_ids(pr, cache, deps)
            addrs, addr_dep = _peer_addresses(pr, book, cidr_match)
            uses_addresses = uses_addresses or addr_dep
            if not ids and not addrs:
                continue
            l4s, named_egress = _peer_rule_l4s(pr, endpoint)
            uses_named = uses_named or bool(named_egress)
            derived = f"{rule.ref} {pr.path}"
            # an address whose identity the rule selects anyway needs no key of its own
            extra = [(ADDRESS_IDENTITY, a.address) for a in addrs if a.identity not in ids]
            targets: list[Target] = [(ident, "") for ident in ids] + extra
            for l4, l7 in l4s:
                for target in targets:
                    add(target, l4, l7, pr, derived)
            for pp, l7 in named_egress:
                for target, l4 in _named_targets(pp, ids, addrs, book):
                    add(target, l4, l7, pr, derived)

    # An unenforced direction allows everything except what a deny names.
    for d in dirs:
        if not enforce[d]:
            allows.setdefault(Key(0, d), _Allow()).plain = True
    if enforce[Direction.INGRESS] and allow_localhost == "auto":
        acc = allows.setdefault(Key(int(ReservedIdentity.HOST), Direction.INGRESS), _Allow())
        acc.plain = True
        acc.derived.add(ALLOW_LOCALHOST)

    return Resolved(_merge(allows, denies, proxy_port or default_proxy_port, strict),
                    enforce[Direction.INGRESS], enforce[Direction.EGRESS], frozenset(deps),
                    uses_named, tuple(rules), uses_addresses)


def _merge(allows: dict[Key, _Allow], denies: dict[Key, set[str]],
           proxy_port: Callable[[str, Direction], int], strict: bool) -> MapState:
    """Merge contributions into entries.

    Precedence (Cilium's policy map semantics; MapState.lookup relies on it):
    1. A deny key wins over an allow on the same key.
    2. An allow key covered by a deny key of the same identity and direction
       (same or wider L4) is dropped: otherwise the longer-prefix allow would
       shadow the deny in the LPM lookup. Denies of another identity
       (incl. the wildcard) need no pruning: lookup checks both and deny wins.
    3. Among allows on one key, a plain (L4-only) allow beats L7 rules: the
       L4 allow already admits every request, so L7 is moot.
    4. A plain allow for the wildcard identity on the exact same
       (protocol, port, prefix) also makes L7 on that port moot for every peer.
    5. L7 allows of one parser on one key merge (OR); an empty rule list
       (allow all, proxied) absorbs the others. Two parsers on one key are a
       conflict (PolicyError).
    """
    deny_index: dict[tuple[int, Direction], list[Key]] = {}
    for dk in denies:
        deny_index.setdefault((dk.identity, dk.direction), []).append(dk)

    def denied(key: Key) -> bool:
        if not denies:
            return False
        same = deny_index.get((key.identity, key.direction))
        return key in denies or (same is not None and any(dk.covers(key) for dk in same))

    wildcard_plain = {(k.direction, k.protocol, k.port, k.prefix_len): a.derived
                      for k, a in allows.items() if k.identity == 0 and a.plain and not denied(k)}
    out: dict[Key, Entry] = {k: Entry(deny=True, derived_from=frozenset(v)) for k, v in denies.items()}
    plain: dict[frozenset[str], Entry] = {}  # entries are immutable: share equal ones
    for key, acc in allows.items():
        if denied(key):
            continue
        derived = frozenset(acc.derived)
        if acc.plain:
            entry = plain.get(derived)
            if entry is None:
                entry = plain[derived] = Entry(derived_from=derived)
            out[key] = entry
            continue
        moot = wildcard_plain.get((key.direction, key.protocol, key.port, key.prefix_len))
        if moot is not None:
            out[key] = Entry(derived_from=derived | moot)
            continue
        parsers = sorted(acc.l7)
        if len(parsers) > 1:
            msg = (f"conflicting L7 rule types {', '.join(parsers)} for {key} "
                   f"({'; '.join(sorted(derived))})")
            if strict:
                raise PolicyError(msg)
            LOG.error("%s: using %s", msg, parsers[0])
        parser = parsers[0]
        contributions = sorted(acc.l7[parser], key=lambda c: (c[0], repr(c[1])))
        merged: list[object] = []
        if not any(not rules for _, rules in contributions):
            for _, rules in contributions:
                merged.extend(r for r in rules if r not in merged)
        out[key] = Entry(proxy_port=proxy_port(parser, key.direction),
                         l7=L7Rules(parser, tuple(merged)), derived_from=derived)
    return MapState(out)


__all__ = ["AddressBook", "ClusterAddress", "Resolved", "resolve_endpoint", "default_proxy_port",
           "ALLOW_LOCALHOST", "ADDRESS_NODES", "ADDRESS_PODS"]
