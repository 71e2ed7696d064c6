"""Resolution: the rules selecting one endpoint -> its MapState.

Pure function of (endpoint, its selecting rules, the selector cache, the
cluster's addresses and named ports, options); the engine decides when to
call it. The keys' ingredients are ``_peerkeys``'s; the cluster's
addresses ``_addressbook``'s.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from axoneme.core.endpoint import Endpoint
from axoneme.core.errors import PolicyError
from axoneme.core.identity import ReservedIdentity
from axoneme.core.mapstate import (
    ADDRESS_IDENTITY,
    Direction,
    Entry,
    Key,
    L7Rules,
    MapState,
    Protocol,
)
from axoneme.core.policy import _multimap as mm
from axoneme.core.policy._addressbook import AddressBook, ClusterAddress, _peer_addresses
from axoneme.core.policy._peerkeys import (
    _KEY_CACHE,
    _key,
    _named_targets,
    _peer_ids,
    _peer_rule_l4s,
    default_proxy_port,
)
from axoneme.core.policy._selectorcache import Selector, SelectorCache
from axoneme.core.policy.api import ADDRESS_NODES, ADDRESS_PODS, L7Spec, PeerRule, Rule

LOG = logging.getLogger(__name__)

ALLOW_LOCALHOST = "allow-localhost"


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
# 5. Merging: see EndpointPolicy._merge_key (deny > plain allow > L7; L7
#    rules of one parser OR'ed).
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
    if enforcement_mode == "never":
        dirs = (Direction.INGRESS, Direction.EGRESS)
        return Resolved(MapState({Key(0, d): Entry() for d in dirs}), False, False,
                        frozenset(), False, tuple(rules))
    pol = EndpointPolicy(endpoint, cache, lambda: book, enforcement_mode, allow_localhost,
                         proxy_port, cidr_match)
    pol.set_rules(rules)
    conflicts = pol.flush()
    if conflicts and strict:
        raise PolicyError(conflicts[0])
    for msg in conflicts:
        LOG.error("%s", msg)
    return pol.resolved()


CKey = tuple[int, int] | tuple[str, int]  # (id(rule), peer rule index) or a synthetic allow
# One peer rule's contribution to one key: (derived_from text or None, deny,
# plain allow, L7 allows ((parser, rules), ...)); equal ones are shared.
Contrib = tuple[str | None, bool, bool, tuple[tuple[str, tuple[object, ...]], ...]]
Group = tuple[int, str, Direction]  # the keys one deny key can cover
L4Key = tuple[Direction, Protocol, int, int]
_UNENFORCED = "unenforced"
_LOCALHOST = "allow-localhost"
# The synthetic allows of _set_enforcement, made once (not two Keys per change)
_CK_UNENFORCED_IN: CKey = (_UNENFORCED, int(Direction.INGRESS))
_CK_UNENFORCED_EG: CKey = (_UNENFORCED, int(Direction.EGRESS))
_CK_LOCALHOST: CKey = (_LOCALHOST, 0)
_UNENFORCED_IN = (Key(0, Direction.INGRESS), (None, False, True, ()))
_UNENFORCED_EG = (Key(0, Direction.EGRESS), (None, False, True, ()))
_LOCALHOST_IN = (Key(int(ReservedIdentity.HOST), Direction.INGRESS),
                 (ALLOW_LOCALHOST, False, True, ()))
_MANY = mm.MANY


class _PeerRuleState:
    """What one peer rule contributes to one endpoint, and what it read."""

    __slots__ = ("rule", "pr", "keys", "deps", "named", "addresses")

    def __init__(self, rule: Rule | None, pr: PeerRule | None, keys: dict[Key, Contrib],
                 deps: frozenset[Selector] = frozenset(), named: bool = False,
                 addresses: bool = False) -> None:
        self.rule = rule
        self.pr = pr
        self.keys = keys
        self.deps = deps
        self.named = named  # egress named ports: reads every pod's ports
        self.addresses = addresses  # CIDR peers over cluster addresses


class _KeyReuse:
    """The keys of peer rules being replaced (a rule of an edited policy, a
    peer rule recomputed), for the rules that replace them.

    The state, the datapath's index and the handed-out changes keep the first
    instance of each key (a dict keeps its first key on an update); a
    successor computing equal keys anew, once the bounded key cache
    (``_peerkeys``) has let them go, made the agent hold two of each for as
    long as the policy stayed (issue 17, B5HIST: a 100k-peer policy edited
    once, 200k more keys with their hashes, ~25 MB). Indexed by L4 then
    identity on first use; address keys are not reused (few)."""

    __slots__ = ("_states", "_by_l4")

    def __init__(self, states: Iterable[_PeerRuleState]) -> None:
        self._states = states
        self._by_l4: dict[L4Key, dict[int, Key]] | None = None

    def on(self, d: Direction, l4: tuple[Protocol, int, int]) -> dict[int, Key] | None:
        """identity -> key, for the keys on direction ``d`` and ``l4``."""
        if self._by_l4 is None:
            by_l4: dict[L4Key, dict[int, Key]] = {}
            for st in self._states:
                for key in st.keys:
                    if not key.address:
                        l4k = (key.direction, key.protocol, key.port, key.prefix_len)
                        got = by_l4.get(l4k)
                        if got is None:
                            got = by_l4[l4k] = {}
                        got[key.identity] = key
            self._by_l4 = by_l4
        return self._by_l4.get((d, *l4))


def _group(key: Key) -> Group:
    return (key.identity, key.address, key.direction)


class EndpointPolicy:
    """One endpoint's MapState, kept incrementally (Cilium's per-endpoint
    policy with MapChanges: a change computes only the entries it touches).

    Every peer rule that selects the endpoint contributes ``Contrib``s to
    keys; an entry is the merge of its key's contributions (``_merge_key``),
    which also reads the deny keys of its group (a wider deny prunes an
    allow) and, for L7, the wildcard key on the same L4. A change adds or
    withdraws contributions, marks their keys, and ``flush`` re-merges just
    those keys (plus the keys a changed deny or wildcard can affect).
    ``touched`` maps each key whose entry may have changed since the caller
    last looked to its entry then (None: everything, after a rebuild; _handout).
    """

    def __init__(self, endpoint: Endpoint, cache: SelectorCache, book: Callable[[], AddressBook],
                 enforcement_mode: str = "default", allow_localhost: str = "auto",
                 proxy_port: Callable[[str, Direction], int] | None = None,
                 cidr_match: frozenset[str] = frozenset()) -> None:
        self.endpoint = endpoint
        self.cache = cache
        self.book = book
        self.enforcement_mode = enforcement_mode
        self.allow_localhost = allow_localhost
        self.proxy_port = proxy_port or default_proxy_port
        self.cidr_match = cidr_match
        self.rules: tuple[Rule, ...] = ()
        self.ingress = False
        self.egress = False
        self.state: dict[Key, Entry] = {}
        self.touched: dict[Key, Entry | None] | None = None
        self.opaque: Resolved | None = None  # resolved whole by the engine (audit, mode never)
        self.deps_changed: list[tuple[Selector, bool]] = []  # (selector, now used), drained by the engine
        self._prs: dict[CKey, _PeerRuleState] = {}
        # key -> the peer rules contributing to it (a lone one bare, _multimap); the
        # contribution itself is in that peer rule's ``keys`` (``_contribs``): no
        # list and tuple per key (issue 17: a 100k-peer policy has 200k keys)
        self._at: dict[Key, Any] = {}
        self._deny_keys: dict[Group, set[Key]] = {}
        self._l7_keys: dict[L4Key, set[Key]] = {}
        # selector -> the peer rules using it (a lone one without a set: _multimap)
        self._sel_users: dict[Selector, Any] = {}
        self._addr_prs: set[CKey] = set()
        self._dirty: set[Key] = set()
        self._deny_groups: set[Group] = set()
        self._plain: dict[frozenset[str], Entry] = {}
        self._snap: MapState | None = None
        self._enforced: tuple[bool, bool] | None = None  # what _set_enforcement last applied

    # -- what it depends on --------------------------------------------------------
    @property
    def deps(self) -> frozenset[Selector]:
        return frozenset(self._sel_users)

    @property
    def uses_addresses(self) -> bool:
        """Whether some peer rule reads the cluster's addresses or named ports."""
        return bool(self._addr_prs)

    def snapshot(self) -> MapState:
        if self._snap is None:
            self._snap = MapState(self.state)
        return self._snap

    def resolved(self) -> Resolved:
        prs = self._prs.values()
        return Resolved(self.snapshot(), self.ingress, self.egress, self.deps,
                        any(p.named for p in prs), self.rules, any(p.addresses for p in prs))

    # -- changes --------------------------------------------------------------------
    def set_rules(self, rules: Sequence[Rule]) -> None:
        """Make the selecting rules ``rules``: rules no longer there withdraw
        their contributions, new ones add theirs (rules are compared by object)."""
        new = set(map(id, rules))
        old = set(map(id, self.rules))
        gone: list[_PeerRuleState] = []
        for rule in self.rules:
            if id(rule) not in new:
                for i in range(len(rule.rules)):
                    st = self._drop((id(rule), i))
                    if st is not None and st.keys:
                        gone.append(st)
        # a replaced rule's keys serve its successor (an edited policy: B5HIST)
        reuse = _KeyReuse(gone) if gone else None
        for rule in rules:
            if id(rule) not in old:
                for i, pr in enumerate(rule.rules):
                    if not pr.allows_nothing:
                        self._add((id(rule), i), self._compute(rule, pr, reuse))
        self.rules = tuple(rules)
        self._set_enforcement()

    def refresh_selectors(self, selectors: Iterable[Selector]) -> None:
        """Selections of ``selectors`` changed: recompute the peer rules using them."""
        ckeys: set[CKey] = set()
        for sel in selectors:
            ckeys.update(mm.members(self._sel_users, sel))
        for ck in ckeys:
            self._refresh(ck)

    def refresh_addresses(self) -> None:
        """The cluster's addresses or named ports changed."""
        for ck in list(self._addr_prs):
            self._refresh(ck)

    def _set_enforcement(self) -> None:
        ingress = egress = self.enforcement_mode == "always"
        if not ingress:
            # loops, not any() over generators: every change comes here (B5ENGINE)
            for r in self.rules:
                if r.enforce_ingress:
                    ingress = True
                if r.enforce_egress:
                    egress = True
        self.ingress, self.egress = ingress, egress
        if self._enforced == (ingress, egress):
            # the synthetic allows depend on nothing else, and only this
            # method adds or drops them: they are as wanted already
            return
        self._enforced = (ingress, egress)
        wanted: tuple[tuple[CKey, tuple[Key, Contrib] | None], ...] = (
            (_CK_UNENFORCED_IN, None if ingress else _UNENFORCED_IN),
            (_CK_UNENFORCED_EG, None if egress else _UNENFORCED_EG),
            (_CK_LOCALHOST, _LOCALHOST_IN if ingress and self.allow_localhost == "auto" else None),
        )
        for ck, want in wanted:
            if want is None:
                self._drop(ck)
            elif ck not in self._prs:
                self._add(ck, _PeerRuleState(None, None, {want[0]: want[1]}))

    # -- contributions --------------------------------------------------------------
    def _compute(self, rule: Rule, pr: PeerRule, reuse: _KeyReuse | None = None
                 ) -> _PeerRuleState:
        """One peer rule's contributions (rules 3 and 4 above); ``reuse``: the
        keys of the peer rules it replaces, used before the key cache's (see
        _KeyReuse)."""
        deps: set[Selector] = set()
        ids = _peer_ids(pr, self.cache, deps)
        addrs, addr_dep = _peer_addresses(pr, self.book, self.cidr_match)
        keys: dict[Key, Contrib] = {}
        st = _PeerRuleState(rule, pr, keys, frozenset(deps), False, addr_dep)
        if not ids and not addrs:
            return st
        l4s, named_egress = _peer_rule_l4s(pr, self.endpoint)
        st.named = bool(named_egress)
        derived = f"{rule.ref} {pr.path}"
        d = pr.direction
        plain: Contrib = (derived, pr.deny, not pr.deny, ())

        def add(key: Key, l7: L7Spec | None) -> None:
            if l7 is None or pr.deny:
                keys[key] = plain
                return
            cur = keys.get(key)
            if cur is None:
                keys[key] = (derived, False, False, ((l7.parser, l7.rules),))
            elif not cur[2]:
                keys[key] = (derived, False, False, (*cur[3], (l7.parser, l7.rules)))

        # an address whose identity the rule selects anyway needs no key of its own
        extra = [a.address for a in addrs if a.identity not in ids] if addrs else ()
        for l4, l7 in l4s:
            bucket = _KEY_CACHE.get((d, *l4))
            prior = reuse.on(d, l4) if reuse is not None else None
            for ident in ids:
                key = prior.get(ident) if prior else None
                if key is None:
                    key = bucket.get(ident) if bucket is not None else None
                if key is None:
                    key = _key(ident, d, l4)
                    bucket = _KEY_CACHE.get((d, *l4))
                add(key, l7)
            for address in extra:
                add(_key(ADDRESS_IDENTITY, d, l4, address), l7)
        for pp, l7 in named_egress:
            for (ident, address), l4 in _named_targets(pp, ids, addrs, self.book()):
                add(_key(ident, d, l4, address), l7)
        return st

    def _add(self, ck: CKey, st: _PeerRuleState) -> None:
        self._prs[ck] = st
        self._use(ck, st.deps)
        if st.named or st.addresses:
            self._addr_prs.add(ck)
        for key, c in st.keys.items():
            self._contribute(key, ck, c)

    def _drop(self, ck: CKey) -> _PeerRuleState | None:
        st = self._prs.pop(ck, None)
        if st is None:
            return None
        self._unuse(ck, st.deps)
        self._addr_prs.discard(ck)
        for key, c in st.keys.items():
            self._withdraw(key, ck, c)
        return st

    def _use(self, ck: CKey, deps: Iterable[Selector]) -> None:
        users = self._sel_users
        for sel in deps:
            if mm.add(users, sel, ck):
                self.deps_changed.append((sel, True))

    def _unuse(self, ck: CKey, deps: Iterable[Selector]) -> None:
        users = self._sel_users
        for sel in deps:
            if mm.discard(users, sel, ck):
                self.deps_changed.append((sel, False))

    def _refresh(self, ck: CKey) -> None:
        """Recompute one peer rule; only the keys whose contribution changed move."""
        st = self._prs[ck]
        if st.rule is None or st.pr is None:
            return
        new = self._compute(st.rule, st.pr, _KeyReuse((st,)) if st.keys else None)
        self._unuse(ck, st.deps - new.deps)
        self._use(ck, new.deps - st.deps)
        if new.named or new.addresses:
            self._addr_prs.add(ck)
        else:
            self._addr_prs.discard(ck)
        for key, c in st.keys.items():
            if new.keys.get(key) != c:
                self._withdraw(key, ck, c)
        for key, c in new.keys.items():
            if st.keys.get(key) != c:
                self._contribute(key, ck, c)
        self._prs[ck] = new

    def _contribute(self, key: Key, ck: CKey, c: Contrib) -> None:
        mm.add(self._at, key, ck)
        if c[1]:
            deny_keys = self._deny_keys.get(_group(key))
            if deny_keys is None:
                deny_keys = self._deny_keys[_group(key)] = set()
            if key not in deny_keys:
                deny_keys.add(key)
                self._deny_groups.add(_group(key))
        elif c[3] and not c[2]:
            self._l7_keys.setdefault((key.direction, key.protocol, key.port, key.prefix_len),
                                     set()).add(key)
        self._dirty.add(key)

    def _withdraw(self, key: Key, ck: CKey, c: Contrib) -> None:
        gone = mm.discard(self._at, key, ck)
        if c[1] and not any(x[1] for x in self._contribs(key)):
            group = _group(key)
            deny_keys = self._deny_keys[group]
            deny_keys.discard(key)
            if not deny_keys:
                del self._deny_keys[group]
            self._deny_groups.add(group)
        if gone:
            l4 = (key.direction, key.protocol, key.port, key.prefix_len)
            l7_keys = self._l7_keys.get(l4)
            if l7_keys is not None:
                l7_keys.discard(key)
                if not l7_keys:
                    del self._l7_keys[l4]
        self._dirty.add(key)

    # -- merging ----------------------------------------------------------------------
    def flush(self) -> list[str]:
        """Re-merge the keys changes touched; returns L7 conflicts (the first
        parser by name is used for each)."""
        dirty = self._dirty
        if self._deny_groups:
            groups = self._deny_groups
            dirty.update(k for k in self._at if _group(k) in groups)
            self._deny_groups = set()
        if self._l7_keys:
            wild: list[Key] = []
            for k in dirty:  # a loop, not a list comprehension's call (B5ENGINE)
                if k.identity == 0:
                    wild.append(k)
            for k in wild:
                dirty |= self._l7_keys.get((k.direction, k.protocol, k.port, k.prefix_len), set())
        conflicts: list[str] = []
        state, touched = self.state, self.touched
        for k in dirty:
            entry = self._merge_key(k, conflicts)
            if touched is not None and k not in touched:
                touched[k] = state.get(k)  # its entry when last looked at
            if entry is None:
                state.pop(k, None)
            else:
                state[k] = entry
        if dirty:
            self._snap = None
        self._dirty = set()
        return conflicts

    def _denied(self, key: Key) -> bool:
        deny_keys = self._deny_keys.get(_group(key))
        return deny_keys is not None and any(dk.covers(key) for dk in deny_keys)

    def _wildcard_plain(self, key: Key) -> frozenset[str] | None:
        """derived_from of a plain allow for any peer on exactly ``key``'s L4."""
        wk = _key(0, key.direction, (key.protocol, key.port, key.prefix_len))
        at = self._contribs(wk)
        if not at or any(c[1] for c in at) or not any(c[2] for c in at) or self._denied(wk):
            return None
        return frozenset(c[0] for c in at if c[0] is not None)

    def _contribs(self, key: Key) -> list[Contrib]:
        """The contributions to ``key`` now (each from its peer rule's ``keys``)."""
        prs = self._prs
        return [prs[ck].keys[key] for ck in mm.members(self._at, key)]

    def _merge_key(self, key: Key, conflicts: list[str]) -> Entry | None:
        """The entry of one key from its contributions.

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
           conflict (reported; the first parser by name is used).
        """
        cur = self._at.get(key)
        if cur is None:
            return None
        if type(cur) is not _MANY:
            # one contribution (the usual key): rules 1 and 3 without the
            # comprehensions below (issue 17, B5ENGINE)
            c = self._prs[cur].keys[key]
            if c[1]:
                return Entry(deny=True, derived_from=frozenset(() if c[0] is None else (c[0],)))
            if self._deny_keys and self._denied(key):
                return None
            if c[2]:
                derived = frozenset(() if c[0] is None else (c[0],))
                entry = self._plain.get(derived)
                if entry is None:
                    entry = self._plain[derived] = Entry(derived_from=derived)
                return entry
        at = self._contribs(key)
        denied_by = [c[0] for c in at if c[1]]
        if denied_by:
            return Entry(deny=True, derived_from=frozenset(d for d in denied_by if d is not None))
        if self._denied(key):
            return None
        derived = frozenset(c[0] for c in at if c[0] is not None)
        if any(c[2] for c in at):
            entry = self._plain.get(derived)
            if entry is None:
                entry = self._plain[derived] = Entry(derived_from=derived)
            return entry
        moot = self._wildcard_plain(key)
        if moot is not None:
            return Entry(derived_from=derived | moot)
        by_parser: dict[str, list[tuple[str, tuple[object, ...]]]] = {}
        for c in at:
            for parser, rules in c[3]:
                by_parser.setdefault(parser, []).append((c[0] or "", rules))
        parsers = sorted(by_parser)
        if len(parsers) > 1:
            conflicts.append(f"conflicting L7 rule types {', '.join(parsers)} for {key} "
                             f"({'; '.join(sorted(derived))})")
        parser = parsers[0]
        contributions = sorted(by_parser[parser], key=lambda c: (c[0], repr(c[1])))
        merged: list[object] = []
        if not any(not rules for _, rules in contributions):
            for _, rules in contributions:
                merged.extend(r for r in rules if r not in merged)
        return Entry(proxy_port=self.proxy_port(parser, key.direction),
                     l7=L7Rules(parser, tuple(merged)), derived_from=derived)


__all__ = ["AddressBook", "ClusterAddress", "EndpointPolicy", "Resolved", "resolve_endpoint", "default_proxy_port",
           "ALLOW_LOCALHOST", "ADDRESS_NODES", "ADDRESS_PODS"]
