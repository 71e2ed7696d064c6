"""Longest-prefix-match semantics of the ipcache, rendered for iptables.

iptables has no LPM: a rule matching 10.0.0.0/8 also matches 10.96.0.0/12
even when the ipcache maps the latter to another identity. This module turns
the ipcache (prefix -> identity) into, per identity, the exact set of
addresses whose longest-prefix match is that identity:

- ``identity_sets``: for ipset ``hash:net`` sets (which do LPM themselves):
  the identity's own prefixes plus ``nomatch`` entries for every more
  specific prefix of another identity nested inside one of them;
- ``effective_ranges``: for plain mode: the identity's prefixes minus every
  more specific prefix nested inside, as a list of disjoint CIDRs.

Addresses not covered by any prefix belong to world (2): unless the ipcache
maps the zero prefix itself, an implicit ``0.0.0.0/0 -> world`` is added.

Prefixes are ``(network as int, prefix length)`` tuples per family.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping

WORLD = 2

Prefix = tuple[int, int]
BITS = {4: 32, 6: 128}


def to_prefix(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Prefix:
    return int(net.network_address), net.prefixlen


def to_cidr(prefix: Prefix, family: int) -> str:
    net, plen = prefix
    addr = ipaddress.IPv4Address(net) if family == 4 else ipaddress.IPv6Address(net)
    return f"{addr}/{plen}"


def _mask(plen: int, bits: int) -> int:
    return ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)


def with_world(table: Mapping[Prefix, int]) -> dict[Prefix, int]:
    out = dict(table)
    out.setdefault((0, 0), WORLD)
    return out


def _ancestors(table: Mapping[Prefix, int], bits: int) -> Iterator[tuple[Prefix, list[Prefix]]]:
    """Each prefix with its strict ancestors present in ``table``, nearest first."""
    lengths = sorted({plen for _, plen in table}, reverse=True)
    for prefix in table:
        net, plen = prefix
        found = []
        for length in lengths:
            if length >= plen:
                continue
            anc = (net & _mask(length, bits), length)
            if anc in table:
                found.append(anc)
        yield prefix, found


def identity_sets(table: Mapping[Prefix, int], family: int
                  ) -> dict[int, tuple[set[Prefix], set[Prefix]]]:
    """identity -> (match prefixes, nomatch prefixes) for an LPM hash:net set.

    hash:net cannot hold a /0: it is split into its two /1 halves (a half that
    is itself in the table is left to that entry).
    """
    bits = BITS[family]
    full = with_world(table)
    out: dict[int, tuple[set[Prefix], set[Prefix]]] = defaultdict(lambda: (set(), set()))
    for prefix, ancestors in _ancestors(full, bits):
        ident = full[prefix]
        if prefix[1] == 0:
            for half in ((0, 1), (1 << (bits - 1), 1)):
                if half not in full:
                    out[ident][0].add(half)
        else:
            out[ident][0].add(prefix)
        for anc in ancestors:
            if full[anc] != ident:
                out[full[anc]][1].add(prefix)
    return dict(out)


def _complement(prefix: Prefix, holes: list[Prefix], bits: int) -> Iterator[Prefix]:
    """``prefix`` minus the disjoint, sorted, strictly nested ``holes``."""
    if not holes:
        yield prefix
        return
    net, plen = prefix
    if holes[0] == prefix:
        return
    half = plen + 1
    right = net | (1 << (bits - half))
    split = bisect.bisect_left(holes, (right, -1))
    yield from _complement((net, half), holes[:split], bits)
    yield from _complement((right, half), holes[split:], bits)


def effective_ranges(table: Mapping[Prefix, int], family: int) -> dict[int, list[Prefix]]:
    """identity -> disjoint CIDRs whose longest-prefix match is that identity."""
    bits = BITS[family]
    full = with_world(table)
    children: dict[Prefix, list[Prefix]] = defaultdict(list)
    for prefix, ancestors in _ancestors(full, bits):
        if ancestors:
            children[ancestors[0]].append(prefix)
    out: dict[int, list[Prefix]] = defaultdict(list)
    for prefix, ident in full.items():
        out[ident].extend(_complement(prefix, sorted(children.get(prefix, ())), bits))
    for ranges in out.values():
        ranges.sort()
    return dict(out)


def split_by_family(entries: Iterable[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int]]
                    ) -> dict[int, dict[Prefix, int]]:
    out: dict[int, dict[Prefix, int]] = {4: {}, 6: {}}
    for net, ident in entries:
        out[net.version][to_prefix(net)] = ident
    return out
