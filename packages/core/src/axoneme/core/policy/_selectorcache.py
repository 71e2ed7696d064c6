"""The selector cache: every selector policies use -> the identities it selects.

Selectors are the peer objects of the policy model (``LabelSelector`` for
subjects and endpoint peers, ``EntityPeer``, ``CIDRPeer``, ``FQDNPeer``);
they are frozen and hashable, so they are their own cache keys. The cache
knows a set of identities (reserved ones, the engine's endpoints, CIDR
identities); adding or removing one updates every cached selection and
reports which selectors changed, so the engine recomputes only the endpoints
whose policy uses one of them (Cilium's SelectorCache + identity notifications).

Matching a new selector against every identity (or a new identity against
every selector) would make loading thousands of policies quadratic, so both
sides are indexed:
- identities by label ``key=value`` (a selector with an ``In`` requirement
  only checks the identities carrying one of its values) and CIDR identities
  by prefix (a CIDR selector only checks the prefixes inside it);
- selectors the same way round: a new identity is checked only against the
  label selectors indexed under one of its labels, the CIDR selectors whose
  prefix contains its own, and the few selectors no index covers (entities,
  toFQDNs, label selectors without an ``In`` requirement, /0 CIDRs).
A 50k-peer CIDR policy therefore loads in O(N), and a new identity costs the
selectors that may select it, not every selector (Cilium: CIDR identities
are added without re-resolving every rule).
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Collection, Hashable, Iterable, Set
from typing import Any, cast

from axoneme.core.identity import Identity, ReservedIdentity
from axoneme.core.labels import SOURCE_FQDN, SOURCE_RESERVED, PrefixLabels
from axoneme.core.policy import _multimap as mm
from axoneme.core.policy.api import CLUSTER_ADDRESS_CLASSES, CIDRPeer, EntityPeer, FQDNPeer
from axoneme.core.selectors import LabelSelector, Operator, split_selector_key

Selector = Hashable  # LabelSelector | EntityPeer | CIDRPeer | FQDNPeer
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

R = ReservedIdentity
WORLD_IDS = frozenset({int(R.WORLD), int(R.WORLD_IPV4), int(R.WORLD_IPV6)})
_ENTITY_IDS: dict[str, frozenset[int]] = {
    "host": frozenset({int(R.HOST)}),
    "init": frozenset({int(R.INIT)}),
    "health": frozenset({int(R.HEALTH)}),
    "unmanaged": frozenset({int(R.UNMANAGED)}),
    "ingress": frozenset({int(R.INGRESS)}),
    "all": frozenset({0}),
    "none": frozenset(),
}


LABELLED_ENTITIES = frozenset({"remote-node", "kube-apiserver"})
# every CIDRPeer.match: a host prefix's selectors are found by trying each (_host_selectors)
_MATCHES = tuple(frozenset(c) for r in range(len(CLUSTER_ADDRESS_CLASSES) + 1)
                 for c in itertools.combinations(sorted(CLUSTER_ADDRESS_CLASSES), r))


def _entity_matches(entity: str, ident: Identity) -> bool:
    """Whether a (non-wildcard) entity selects an identity that is not listed in _ENTITY_IDS."""
    if entity == "world":
        return ident.is_world
    if entity == "world-ipv4":
        return ident.id in (R.WORLD, R.WORLD_IPV4) or (ident.cidr is not None and ident.cidr.version == 4)
    if entity == "world-ipv6":
        return ident.id in (R.WORLD, R.WORLD_IPV6) or (ident.cidr is not None and ident.cidr.version == 6)
    if entity == "cluster":
        return not ident.is_world and ident.id != 0
    if entity in LABELLED_ENTITIES:
        # by their reserved label, as Cilium: kube-apiserver (7) carries
        # remote-node too, and host carries kube-apiserver while the API server
        # runs on this node (PolicyEngine.set_cluster_addresses)
        return ident.labels.lookup(SOURCE_RESERVED, entity) is not None
    return False


def _cidr_matches(peer: CIDRPeer, ident: Identity) -> bool:
    if ident.cidr is None:
        if peer.cidr.prefixlen != 0:
            return False
        # A /0 selects world (Cilium: 0.0.0.0/0 == entity world).
        fam = R.WORLD_IPV4 if peer.cidr.version == 4 else R.WORLD_IPV6
        return ident.id in (R.WORLD, fam)
    net = ident.cidr
    if not _inside(net, peer.cidr):
        return False
    return not any(_inside(net, e) for e in peer.excepts)


def _inside(net: IPNetwork, outer: IPNetwork) -> bool:
    """``net.subnet_of(outer)`` on integers (no ipaddress object churn: a
    100k-prefix policy checks 100k of these)."""
    if net.version != outer.version or net.prefixlen < outer.prefixlen:
        return False
    shift = outer.max_prefixlen - outer.prefixlen
    return int(net.network_address) >> shift == int(outer.network_address) >> shift


def _fqdn_matches(peer: FQDNPeer, ident: Identity) -> bool:
    # toFQDNs selects the identities the engine was told about
    # (SelectorCache.set_fqdn, fed from the DNS cache) and, as a second hook,
    # identities labelled ``fqdn:<matchName or matchPattern>`` (Cilium 1.16 style).
    want = peer.match_name if peer.match_name is not None else peer.match_pattern
    return any(lab.source == SOURCE_FQDN and lab.key == want for lab in ident.labels.values())


def selector_matches(sel: Selector, ident: Identity) -> bool:
    """Whether a selector selects an identity (the wildcard 0 aside)."""
    if isinstance(sel, LabelSelector):
        return sel.matches(ident.labels)
    if isinstance(sel, EntityPeer):
        fixed = _ENTITY_IDS.get(sel.entity)
        if fixed is not None:
            return ident.id in fixed and ident.id != 0
        return _entity_matches(sel.entity, ident)
    if isinstance(sel, CIDRPeer):
        return _cidr_matches(sel, ident)
    if isinstance(sel, FQDNPeer):
        return _fqdn_matches(sel, ident)
    raise TypeError(f"not a selector: {sel!r}")


class SelectorCache:
    """Selector -> selected identity ids, kept current as identities come and go."""

    def __init__(self) -> None:
        self._idents: dict[int, Identity] = {}
        self._more_refs: dict[int, int] = {}  # references beyond the first (_multimap.ref)
        # (label key, value) -> ids carrying it (any source); candidates for In.
        # CIDR identities with PrefixLabels are not in it: found by prefix (_label_ids)
        self._kv: dict[tuple[str, str], Any] = {}
        # selector -> its selection: a set, or a lone id bare (a CIDR peer's /32
        # selects one identity: no 216-byte set per peer of a 100k-peer policy)
        self._sel: dict[Selector, set[int] | int] = {}
        self._sel_more: dict[Selector, int] = {}  # references beyond the first
        # id -> selectors selecting it (a lone one without a set: _multimap)
        self._by_id: dict[int, Any] = {}
        self._fqdn: dict[FQDNPeer, frozenset[int]] = {}  # learned IP identities per toFQDNs selector
        # CIDR identities: (version, prefix length) -> network address -> id
        self._cidr_ids: dict[tuple[int, int], dict[int, int]] = {}
        # selectors by what a matching identity must carry (see _sel_slots)
        self._sel_by_kv: dict[tuple[str, str], set[Selector]] = {}
        self._sel_by_cidr: dict[tuple[int, int], dict[int, Any]] = {}  # ... -> _multimap
        self._sel_general: set[Selector] = set()
        self._fqdn_sels: set[FQDNPeer] = set()  # toFQDNs selectors referenced now

    def _matches(self, sel: Selector, ident: Identity) -> bool:
        if isinstance(sel, FQDNPeer) and ident.id in self._fqdn.get(sel, frozenset()):
            return True
        return selector_matches(sel, ident)

    def set_fqdn(self, peer: FQDNPeer, ids: frozenset[int]) -> set[Selector]:
        """Set the identities a toFQDNs selector stands for; returns {peer} if its selection changed."""
        self._fqdn[peer] = frozenset(ids)
        if not ids:
            del self._fqdn[peer]
        if peer not in self._sel:
            return set()
        cur = self.selected(peer)
        new = {i for i in self._idents if self._matches(peer, self._idents[i])}
        if new == cur:
            return set()
        for i in cur - new:
            mm.discard(self._by_id, i, peer)
        for i in new - cur:
            mm.add(self._by_id, i, peer)
        self._sel[peer] = _packed(new)
        return {peer}

    # -- identities --------------------------------------------------------------
    def identities(self) -> list[Identity]:
        return list(self._idents.values())

    def identity(self, number: int) -> Identity | None:
        return self._idents.get(number)

    def __contains__(self, number: object) -> bool:
        return number in self._idents

    def add_identity(self, ident: Identity) -> set[Selector]:
        """Reference an identity; returns the selectors whose selection changed."""
        if ident.id in self._idents:
            mm.ref(self._more_refs, ident.id)
            return set()
        self._idents[ident.id] = ident
        if not isinstance(ident.labels, PrefixLabels):
            for lab in ident.labels.values():
                mm.add(self._kv, (lab.key, lab.value), ident.id)
        if ident.cidr is not None:
            net = ident.cidr
            self._cidr_ids.setdefault((net.version, net.prefixlen), {})[
                int(net.network_address)] = ident.id
        changed: set[Selector] = set()
        for sel in self._selector_candidates(ident):
            if self._matches(sel, ident):
                cur = self._sel[sel]
                if isinstance(cur, set):
                    if cur:
                        cur.add(ident.id)
                    else:
                        self._sel[sel] = ident.id
                elif cur != ident.id:
                    self._sel[sel] = {cur, ident.id}
                changed.add(sel)
        for sel in changed:
            mm.add(self._by_id, ident.id, sel)
        return changed

    def replace_identity(self, ident: Identity) -> set[Selector]:
        """The labels of a known identity changed (the host's, when the API
        server runs on it): its references stay, its selections are redone."""
        if ident.id not in self._idents:
            return set()
        more = self._more_refs.pop(ident.id, None)
        changed = self.remove_identity(ident.id)
        changed |= self.add_identity(ident)
        if more:
            self._more_refs[ident.id] = more
        return changed

    def remove_identity(self, number: int) -> set[Selector]:
        """Drop one reference; when the last goes, returns the selectors that lost it."""
        if number not in self._idents or mm.unref(self._more_refs, number):
            return set()
        ident = self._idents.pop(number)
        if not isinstance(ident.labels, PrefixLabels):
            for lab in ident.labels.values():
                mm.discard(self._kv, (lab.key, lab.value), number)
        if ident.cidr is not None:
            net = ident.cidr
            by_addr = self._cidr_ids.get((net.version, net.prefixlen))
            if by_addr is not None and by_addr.get(int(net.network_address)) == number:
                del by_addr[int(net.network_address)]
                if not by_addr:
                    del self._cidr_ids[(net.version, net.prefixlen)]
        changed = set(mm.pop(self._by_id, number))
        for sel in changed:
            cur = self._sel[sel]
            if isinstance(cur, set):
                cur.discard(number)
                if len(cur) == 1:
                    self._sel[sel] = next(iter(cur))
            elif cur == number:
                self._sel[sel] = set()
        return changed

    # -- selectors ---------------------------------------------------------------
    @staticmethod
    def _wildcard(sel: Selector) -> frozenset[int] | None:
        """The fixed answer of selectors that do not depend on identities."""
        if isinstance(sel, EntityPeer) and sel.entity in ("all", "none"):
            return _ENTITY_IDS[sel.entity]
        return None

    def _candidates(self, sel: Selector) -> Iterable[int]:
        if isinstance(sel, LabelSelector):
            best: set[int] | None = None
            for req in sel.requirements:
                if req.operator is not Operator.IN:
                    continue
                key = split_selector_key(req.key)[1]
                cand: set[int] = set()
                for v in req.values:
                    # a value: the index alone (``_label_ids`` without its call)
                    cand.update(mm.members(self._kv, (key, v)) if v else self._label_ids(key, v))
                if best is None or len(cand) < len(best):
                    best = cand
                    if not best:
                        break
            if best is not None:
                return list(best)
        if isinstance(sel, CIDRPeer):
            if sel.cidr.prefixlen == 0:
                return list(self._idents)
            return self._cidr_inside(sel.cidr)
        if isinstance(sel, EntityPeer):
            fixed = _ENTITY_IDS.get(sel.entity)
            if fixed is not None:
                return [i for i in fixed if i in self._idents]
            if sel.entity in LABELLED_ENTITIES:
                return list(mm.members(self._kv, (sel.entity, "")))
        return list(self._idents)

    def add_selector(self, sel: Selector) -> Selector:
        """Reference a selector (computing its selection on first use); returns
        the instance the cache holds for it (``held``): ``sel`` itself when new."""
        if sel in self._sel:
            mm.ref(self._sel_more, sel)
            return self.held(sel) or sel
        if isinstance(sel, FQDNPeer):
            self._fqdn_sels.add(sel)
        fixed = self._wildcard(sel)
        if fixed is not None:
            self._sel[sel] = set(fixed)
            return sel
        ids: set[int] = set()
        idents = self._idents
        for i in self._candidates(sel):  # a loop, not a set comprehension's call (B5ENGINE)
            if self._matches(sel, idents[i]):
                ids.add(i)
        self._sel[sel] = _packed(ids)
        for i in ids:
            mm.add(self._by_id, i, sel)
        self._index_selector(sel, add=True)
        return sel

    def held(self, sel: Selector) -> Selector | None:
        """The cached instance equal to ``sel`` (the one the cache's tables
        keep), found through the indexes for a CIDR peer; None otherwise.

        A policy replaced by an equal or overlapping one (a 100k-peer list
        edited, B5's 50k -> 100k) brings new, equal selectors: the cache keeps
        the first instances as its keys, so unless the new policy uses those,
        the agent holds both (issue 17, B5HIST: a /32 peer with its prefix
        and address ~230 B, 23 MB at 100k). Label selectors are not looked
        for: a policy has few."""
        if not isinstance(sel, CIDRPeer) or sel.cidr.prefixlen == 0:
            return None
        net = sel.cidr
        addr = int(net.network_address)
        if net.prefixlen == net.max_prefixlen:
            number = self._cidr_ids.get((net.version, net.prefixlen), {}).get(addr)
            found = () if number is None else mm.members(self._by_id, number)
        else:
            found = mm.members(self._sel_by_cidr.get((net.version, net.prefixlen), {}), addr)
        for cached in found:
            if cached == sel:
                return cast("Selector", cached)
        return None

    def fqdn_selectors(self) -> frozenset[FQDNPeer]:
        """The toFQDNs selectors referenced now (O(their number), not O(policies))."""
        return frozenset(self._fqdn_sels)

    def remove_selector(self, sel: Selector) -> None:
        if sel not in self._sel or mm.unref(self._sel_more, sel):
            return
        ids = self._sel.pop(sel)
        self._fqdn_sels.discard(sel)
        if self._wildcard(sel) is not None:
            return
        self._index_selector(sel, add=False)
        for i in ids if isinstance(ids, set) else (ids,):
            mm.discard(self._by_id, i, sel)

    def _label_ids(self, key: str, value: str) -> Collection[int]:
        """Ids carrying a label ``key=value`` (any source), a superset: the
        index, and the CIDR identities it leaves out (reserved:world, their
        prefix: a 100k-prefix policy keeps no index entry per identity)."""
        found = mm.members(self._kv, (key, value))
        if value:
            return found
        if key == "world":
            return [*found, *(i for by_addr in self._cidr_ids.values() for i in by_addr.values())]
        ident = self.cidr_identity(key.replace("-", ":"))
        return found if ident is None else [*found, ident.id]

    def cidr_identity(self, net: IPNetwork | str) -> Identity | None:
        """The CIDR identity known for prefix ``net`` (text: None when not a prefix)."""
        if isinstance(net, str):
            try:
                net = ipaddress.ip_network(net)
            except ValueError:
                return None
        found = self._cidr_ids.get((net.version, net.prefixlen), {}).get(int(net.network_address))
        return None if found is None else self._idents[found]

    def _cidr_inside(self, net: IPNetwork) -> list[int]:
        """CIDR identities whose prefix lies inside ``net`` (excepts not applied)."""
        bits = net.max_prefixlen
        base = int(net.network_address)
        if net.prefixlen == bits:  # a host prefix holds only itself
            found = self._cidr_ids.get((net.version, bits), {}).get(base)
            return [] if found is None else [found]
        out: list[int] = []
        for (version, plen), by_addr in self._cidr_ids.items():
            if version != net.version or plen < net.prefixlen:
                continue
            span = plen - net.prefixlen
            if span < 16 and (1 << span) < len(by_addr):
                step = 1 << (bits - plen)
                for n in range(1 << span):
                    found = by_addr.get(base + n * step)
                    if found is not None:
                        out.append(found)
            else:
                shift = bits - net.prefixlen
                out.extend(i for addr, i in by_addr.items() if addr >> shift == base >> shift)
        return out

    @staticmethod
    def _sel_slots(sel: Selector) -> list[tuple[str, str]] | IPNetwork | None:
        """What an identity a selector selects must carry: one of some label
        ``key=value`` pairs (a label selector's first ``In`` requirement, by
        key), a prefix inside a CIDR; None: no index applies."""
        if isinstance(sel, LabelSelector):
            # loops; sorted only when there is a choice (B5ENGINE: a change's
            # new selector is indexed on the way in and out)
            reqs = []
            keys = []
            for r in sel.requirements:
                if r.operator is Operator.IN:
                    reqs.append(r)
                    keys.append(r.key)
            if len(reqs) > 1:
                if len(set(keys)) == len(keys):  # distinct keys: the least key comes first
                    reqs = [reqs[keys.index(min(keys))]]
                else:
                    reqs.sort(key=lambda r: (r.key, sorted(r.values)))
            if reqs:
                key = split_selector_key(reqs[0].key)[1]
                slots = []
                for v in reqs[0].values:
                    slots.append((key, v))
                return slots
        if isinstance(sel, CIDRPeer) and sel.cidr.prefixlen != 0:
            return sel.cidr
        return None

    def _index_selector(self, sel: Selector, add: bool) -> None:
        slots = self._sel_slots(sel)
        buckets: list[set[Selector]] = []
        if slots is None:
            buckets.append(self._sel_general)
        elif isinstance(slots, list):
            for kv in slots:
                bucket = self._sel_by_kv.get(kv)
                if bucket is None:
                    bucket = self._sel_by_kv[kv] = set()
                buckets.append(bucket)
        elif slots.prefixlen == slots.max_prefixlen:
            return  # a host prefix: found by trying its few selectors (_host_selectors)
        else:
            slot = (slots.version, slots.prefixlen)
            if add:
                mm.add(self._sel_by_cidr.setdefault(slot, {}), int(slots.network_address), sel)
            elif slot in self._sel_by_cidr:
                by_addr = self._sel_by_cidr[slot]
                mm.discard(by_addr, int(slots.network_address), sel)
                if not by_addr:
                    del self._sel_by_cidr[slot]
            return
        for bucket in buckets:
            if add:
                bucket.add(sel)
            else:
                bucket.discard(sel)
        if not add:
            self._prune_selector_index(slots)

    def _prune_selector_index(self, slots: list[tuple[str, str]] | IPNetwork | None) -> None:
        if isinstance(slots, list):
            for kv in slots:
                if not self._sel_by_kv.get(kv, True):
                    del self._sel_by_kv[kv]

    def _selector_candidates(self, ident: Identity) -> set[Selector]:
        """Cached selectors that may select ``ident`` (the indexes' superset)."""
        out = set(self._sel_general)
        for lab in ident.labels.values():
            bucket = self._sel_by_kv.get((lab.key, lab.value))
            if bucket:
                out |= bucket
        net = ident.cidr
        if net is not None:
            addr = int(net.network_address)
            for (version, plen), by_addr in self._sel_by_cidr.items():
                if version == net.version and plen <= net.prefixlen:
                    shift = net.max_prefixlen - plen
                    out.update(mm.members(by_addr, addr >> shift << shift))
            if net.prefixlen == net.max_prefixlen:
                out.update(self._host_selectors(net))
        return out

    def _host_selectors(self, net: IPNetwork) -> list[Selector]:
        """The cached selectors of host prefix ``net`` itself, not indexed (a
        100k-peer fromCIDR policy: no index entry per peer). One with excepts
        (only ``net`` itself fits in it) selects nothing: not needed."""
        return [peer for match in _MATCHES if (peer := CIDRPeer(net, (), match)) in self._sel]

    def selected(self, sel: Selector) -> Set[int]:
        """Ids a cached selector selects (0 = wildcard). Do not mutate."""
        found = self._sel.get(sel)
        if found is None:
            fixed = self._wildcard(sel)
            if fixed is not None:
                return set(fixed)
            return {i for i in self._candidates(sel) if self._matches(sel, self._idents[i])}
        return found if isinstance(found, set) else frozenset((found,))

    def selectors_of(self, number: int) -> Collection[Selector]:
        """Cached selectors (other than the fixed all/none) selecting an identity. Do not mutate."""
        return mm.members(self._by_id, number)

    def selects(self, sel: Selector, number: int) -> bool:
        return number in self.selected(sel)


def _packed(ids: set[int]) -> set[int] | int:
    """A selection as ``SelectorCache._sel`` keeps it: one id bare."""
    return next(iter(ids)) if len(ids) == 1 else ids


def cidr_prefixes(peer: CIDRPeer) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """Prefixes of a CIDR peer that need identities (a /0 is world, not a CIDR identity)."""
    return [n for n in (peer.cidr, *peer.excepts) if n.prefixlen != 0]


__all__ = ["SelectorCache", "selector_matches", "cidr_prefixes", "WORLD_IDS"]
