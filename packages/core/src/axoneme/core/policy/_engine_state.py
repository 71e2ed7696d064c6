"""The policy engine's state and recomputation: what ``PolicyEngine`` holds
(endpoints, computed policies, dependency and address indexes, the ipcache's
bookkeeping) and how one endpoint's policy is brought up to date
(``_update``: incremental, or rebuilt whole), batched (``batch``) and indexed
(``_track``). The engine's parts (``engine``, ``_engine_*``) build on it."""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from axoneme.core.endpoint import HOST_ENDPOINT_ID, Endpoint
from axoneme.core.errors import PolicyError
from axoneme.core.identity import RESERVED_IDENTITIES, IdentityAllocator, ReservedIdentity
from axoneme.core.mapstate import Direction, Entry, Key
from axoneme.core.policy import _multimap as mm
from axoneme.core.policy._addressbook import AddressBook, ClusterAddress
from axoneme.core.policy._handout import handed_out
from axoneme.core.policy._resolve import EndpointPolicy, Resolved, resolve_endpoint
from axoneme.core.policy._selectorcache import Selector, SelectorCache
from axoneme.core.policy.api import ADDRESS_NODES, ADDRESS_PODS, FQDNPeer, Policy, PolicyRef, Rule
from axoneme.core.policy.audit import resolve_audited
from axoneme.core.policy.repository import PolicyRepository
from axoneme.core.policy.services import Service, ServiceKey

LOG = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
WORLD_PREFIXES: dict[IPNetwork, int] = {
    ipaddress.ip_network("0.0.0.0/0"): int(ReservedIdentity.WORLD),
    ipaddress.ip_network("::/0"): int(ReservedIdentity.WORLD),
}
ENFORCEMENT_MODES = ("default", "always", "never")
ALLOW_LOCALHOST_MODES = ("auto", "policy")
CIDR_MATCH_MODES = (ADDRESS_NODES, ADDRESS_PODS)


def parse_cidr_match_mode(text: str) -> frozenset[str]:
    """``""``, ``nodes``, ``pods`` or ``nodes,pods`` (Cilium's
    policy-cidr-match-mode, which knows ``nodes``): which cluster addresses
    Cilium's CIDR fields (toCIDR, toCIDRSet, fromCIDR, fromCIDRSet) also match."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in CIDR_MATCH_MODES]
    if bad:
        raise PolicyError(f"unknown policy-cidr-match-mode {', '.join(map(repr, bad))} "
                          f"(empty, or a comma-separated list of {', '.join(CIDR_MATCH_MODES)})")
    return frozenset(parts)


@dataclass(frozen=True, slots=True)
class EngineOptions:
    enforcement_mode: str = "default"  # default | always | never
    allow_localhost: str = "auto"  # auto: host -> local endpoint ingress always allowed; policy
    cluster_name: str = "default"
    proxy_port: Callable[[str, Direction], int] | None = None  # (parser, direction) -> port
    cidr_match_mode: str = ""  # "", nodes, pods, nodes,pods (parse_cidr_match_mode)
    policy_audit_mode: bool = False  # every endpoint: would-be drops forwarded, reported AUDIT

    def __post_init__(self) -> None:
        parse_cidr_match_mode(self.cidr_match_mode)
        if self.enforcement_mode not in ENFORCEMENT_MODES:
            raise PolicyError(f"unknown enforcement mode {self.enforcement_mode!r} "
                              f"(one of {', '.join(ENFORCEMENT_MODES)})")
        if self.allow_localhost not in ALLOW_LOCALHOST_MODES:
            raise PolicyError(f"unknown allow-localhost mode {self.allow_localhost!r}")


class EngineState:
    """The engine's state and per-endpoint recomputation (``PolicyEngine`` is
    the public facade: see ``engine``)."""

    def __init__(self, allocator: IdentityAllocator | None = None,
                 options: EngineOptions = EngineOptions()) -> None:
        self.allocator = allocator if allocator is not None else IdentityAllocator()
        self.options = options
        self._lock = threading.RLock()
        self._cache = SelectorCache()
        for ident in RESERVED_IDENTITIES:
            self._cache.add_identity(ident)
        self._repo = PolicyRepository()
        self._endpoints: dict[int, Endpoint] = {}
        self._by_identity: dict[int, set[int]] = {}  # identity -> endpoint ids
        self._policies: dict[int, EndpointPolicy] = {}  # endpoint id -> its computed policy
        # peer selector -> endpoint ids (a lone one without a set: _multimap)
        self._dep_index: dict[Selector, Any] = {}
        self._address_users: set[int] = set()  # endpoints whose policy reads the AddressBook
        self._book: AddressBook | None = None  # built on demand, dropped when an address changes
        self._cidr_match = parse_cidr_match_mode(options.cidr_match_mode)
        # prefix -> references beyond the first (its identity is in the selector cache)
        self._cidr_more: dict[IPNetwork, int] = {}
        self._fqdn_nets: dict[FQDNPeer, frozenset[IPNetwork]] = {}
        # a rebuilt endpoint: what was handed out of its previous policy (_handout)
        self._base: dict[int, dict[Key, Entry]] = {}
        self._dirty: set[int] = set()
        self._ipcache: dict[IPNetwork, int] = dict(WORLD_PREFIXES)  # kept current via _ipc_dirty
        self._ipc_dirty: set[IPNetwork] = set()  # prefixes whose ipcache identity may have changed
        # prefixes changed since pending_ipcache_changes -> their identity it handed out
        # then (None: none; no copy of the whole hand-out, issue 17)
        self._ipc_before: dict[IPNetwork, int | None] = dict.fromkeys(WORLD_PREFIXES)
        self._ipc_lens: Counter[tuple[int, int]] = Counter((n.version, n.prefixlen)
                                                           for n in WORLD_PREFIXES)
        self._ep_nets: dict[IPNetwork, dict[int, int]] = {}  # endpoint address -> {ep id: identity}
        self._host_nets: frozenset[IPNetwork] = frozenset()
        # Kubernetes mode (``set_cluster_addresses``): other nodes, the API server
        self._node_nets: frozenset[IPNetwork] = frozenset()
        self._apiserver_nets: frozenset[IPNetwork] = frozenset()
        self._deferred: set[int] | None = None  # endpoints to recompute when a batch ends
        self._audit_endpoints: set[int] = set()  # per-endpoint audit mode (PolicyAuditMode)
        # pods of other nodes (``upsert_remote_endpoint``): key -> Endpoint with a negative id
        self._remote: dict[str, Endpoint] = {}
        self._remote_nets: dict[IPNetwork, dict[str, int]] = {}  # address -> {key: identity}
        self._remote_ids = 0
        self._services: dict[ServiceKey, Service] = {}  # toServices: what the source said
        self._svc_sources: dict[PolicyRef, Policy] = {}  # policies with toServices, as given

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Defer recomputation until the block ends (bulk loads: each endpoint once).

        Inside a batch an L7 conflict is not rolled back: it raises PolicyError
        when the batch ends, after every other endpoint has been recomputed."""
        with self._lock:
            if self._deferred is not None:
                yield
                return
            self._deferred = set()
            try:
                yield
            finally:
                pending, self._deferred = self._deferred, None
                self._recompute(pending, strict=True, full=True)

    # -- properties ----------------------------------------------------------------
    @property
    def revision(self) -> int:
        return self._repo.revision

    @property
    def selector_cache(self) -> SelectorCache:
        return self._cache

    def _rules_of(self, ep: Endpoint) -> list[Rule]:
        """The rules selecting an endpoint: pods by identity, the host by node labels."""
        if ep.id == HOST_ENDPOINT_ID:
            return self._repo.host_rules(ep.labels)
        return self._repo.rules_for(ep.identity, self._cache)

    def _address_book(self) -> AddressBook:
        if self._book is None:
            out = [ClusterAddress(str(net.network_address), int(ReservedIdentity.HOST), ADDRESS_NODES)
                   for net in self._host_nets if net.prefixlen == net.max_prefixlen]
            out += [ClusterAddress(str(net.network_address), number, ADDRESS_NODES)
                    for nets, number in ((self._apiserver_nets, ReservedIdentity.KUBE_APISERVER),
                                         (self._node_nets - self._apiserver_nets,
                                          ReservedIdentity.REMOTE_NODE))
                    for net in nets - self._host_nets if net.prefixlen == net.max_prefixlen]
            for ep in (*self._endpoints.values(), *self._remote.values()):
                out += [ClusterAddress(str(ipaddress.ip_address(ip)), ep.identity, ADDRESS_PODS,
                                       ep.named_ports, ep.id) for ip in (ep.ipv4, ep.ipv6) if ip]
            self._book = AddressBook(out)
        return self._book

    # -- resolution ------------------------------------------------------------------
    def _dependents(self, selectors: Iterable[Selector]) -> set[int]:
        out: set[int] = set()
        dep = self._dep_index
        for sel in selectors:
            out.update(mm.members(dep, sel))
        return out

    def _compute(self, endpoint_id: int, strict: bool) -> Resolved:
        ep = self._endpoints[endpoint_id]
        rules = self._rules_of(ep)

        def resolve(rules: Sequence[Rule]) -> Resolved:
            return resolve_endpoint(ep, rules, self._cache, self._address_book(),
                                    self.options.enforcement_mode, self.options.allow_localhost,
                                    self.options.proxy_port, strict, self._cidr_match)

        audit_mode = self.audit_mode(endpoint_id)
        if audit_mode or any(r.audit for r in rules):
            return resolve_audited(rules, audit_mode, resolve)
        return resolve(rules)

    def audit_mode(self, endpoint_id: int) -> bool:
        """Whether the endpoint is in audit mode (agent-wide or its own)."""
        return self.options.policy_audit_mode or endpoint_id in self._audit_endpoints

    def _new_policy(self, ep: Endpoint) -> EndpointPolicy:
        return EndpointPolicy(ep, self._cache, self._address_book, self.options.enforcement_mode,
                              self.options.allow_localhost, self.options.proxy_port,
                              self._cidr_match)

    def _update(self, endpoint_id: int, sels: Iterable[Selector] = (), addresses: bool = False,
                full: bool = False) -> list[str]:
        """Bring one endpoint's policy up to date; returns L7 conflicts (each
        resolved with the first parser by name).

        The selecting rules are always re-read (cheap: compared by object);
        ``sels``: selectors whose selection changed; ``addresses``: the
        cluster's addresses changed; ``full``: rebuild from scratch."""
        ep = self._endpoints[endpoint_id]
        rules = self._rules_of(ep)
        pol = self._policies.get(endpoint_id)
        # resolved whole, not incrementally: mode never, audit mode (``audit_mode``
        # inline), staged rules
        opts = self.options
        opaque = (opts.enforcement_mode == "never" or opts.policy_audit_mode
                  or endpoint_id in self._audit_endpoints)
        if not opaque:
            for r in rules:  # a loop, not any() over a generator (B5ENGINE)
                if r.audit:
                    opaque = True
                    break
        if opaque:
            conflicts: list[str] = []
            try:
                res = self._compute(endpoint_id, strict=True)
            except PolicyError as e:
                conflicts.append(str(e))
                res = self._compute(endpoint_id, strict=False)
            fresh = self._new_policy(ep)
            fresh.rules, fresh.ingress, fresh.egress = res.rules, res.ingress, res.egress
            fresh.state = dict(res.state.items())
            fresh.opaque = res
            self._install(endpoint_id, fresh)
            return conflicts
        if pol is None or full or pol.opaque is not None or pol.endpoint is not ep:
            pol = self._new_policy(ep)
            pol.set_rules(rules)
            conflicts = pol.flush()
            self._install(endpoint_id, pol)
            return conflicts
        pol.set_rules(rules)
        if sels:
            pol.refresh_selectors(sels)
        if addresses:
            pol.refresh_addresses()
        conflicts = pol.flush()
        self._track(endpoint_id, pol)
        return conflicts

    def _install(self, endpoint_id: int, pol: EndpointPolicy) -> None:
        """A rebuilt policy replaces the endpoint's previous one."""
        old = self._policies.get(endpoint_id)
        if old is not None:
            self._unindex(endpoint_id, old)
            if (base := handed_out(old)) is not None:
                self._base[endpoint_id] = base
        self._policies[endpoint_id] = pol
        pol.touched = None  # pending_changes diffs it whole, against _base
        deps = pol.opaque.deps if pol.opaque is not None else None
        if deps is not None:
            pol.deps_changed = [(sel, True) for sel in deps]
        self._track(endpoint_id, pol)

    def _track(self, endpoint_id: int, pol: EndpointPolicy) -> None:
        """Index what the policy reads (selectors, addresses); note it changed."""
        dep = self._dep_index
        for sel, used in pol.deps_changed:
            if used:
                mm.add(dep, sel, endpoint_id)
            else:
                mm.discard(dep, sel, endpoint_id)
        pol.deps_changed = []
        res = pol.opaque
        uses = (res.uses_named_ports or res.uses_addresses) if res is not None \
            else bool(pol._addr_prs)  # pol.uses_addresses without the property's call
        if uses:
            self._address_users.add(endpoint_id)
        else:
            self._address_users.discard(endpoint_id)
        if pol.touched is None or pol.touched:
            self._dirty.add(endpoint_id)

    def _unindex(self, endpoint_id: int, pol: EndpointPolicy) -> None:
        deps = pol.opaque.deps if pol.opaque is not None else pol.deps
        for sel in deps:
            mm.discard(self._dep_index, sel, endpoint_id)

    def _forget(self, endpoint_id: int) -> None:
        old = self._policies.pop(endpoint_id, None)
        if old is not None:
            self._unindex(endpoint_id, old)
        self._address_users.discard(endpoint_id)
        self._dirty.discard(endpoint_id)
        self._base.pop(endpoint_id, None)

    def _recompute(self, endpoint_ids: Iterable[int], strict: bool = False,
                   sels: Iterable[Selector] = (), addresses: bool = False,
                   full: bool = False) -> None:
        if self._deferred is not None:
            self._deferred.update(endpoint_ids)
            return
        sels = frozenset(sels)
        error: PolicyError | None = None
        for eid in sorted(endpoint_ids):
            if eid not in self._endpoints:
                continue
            for msg in self._update(eid, sels, addresses, full):
                LOG.error("endpoint %d: %s", eid, msg)
                error = error or PolicyError(msg)
        if strict and error is not None:
            raise error

    def _policy(self, endpoint_id: int) -> EndpointPolicy:
        pol = self._policies.get(endpoint_id)
        if pol is None:
            raise PolicyError(f"no endpoint {endpoint_id}")
        return pol


__all__ = ["ALLOW_LOCALHOST_MODES", "CIDR_MATCH_MODES", "ENFORCEMENT_MODES", "WORLD_PREFIXES",
           "EngineOptions", "EngineState", "IPNetwork", "parse_cidr_match_mode"]
