"""The PolicyEngine facade: repository + selector cache + identities -> MapStates.

Incremental, as Cilium: the engine keeps each endpoint's policy as an
``EndpointPolicy`` (per peer rule contributions, merged per key) and a
change computes only the entries it touches:
- a policy upsert/delete: for the endpoints selected by the old or new
  version, the contributions of the rules that came or went (and, when the
  policy brings new CIDR identities, the peer rules of other endpoints
  whose selectors select them);
- an endpoint add/remove/identity change: the endpoint itself (rebuilt),
  the peer rules using a selector that gained/lost the identity, and the
  peer rules that look at the cluster's addresses (egress named ports,
  CIDR peers over pod/node addresses) when an address, its identity or its
  named ports changed (node addresses too);
- a selector's selection change (identities, toFQDNs): the peer rules using it;
- a Service change (toServices, ``update_services``): the policies whose
  toServices match it are translated again (``services``) and, when their
  rules changed, upserted as above.
Changed keys accumulate until ``pending_changes()`` hands them out, so the
cost of a change follows the entries it changes, not the endpoint's size.
Bulk loads (``batch``), audit mode and staged policies rebuild whole
endpoints.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from axoneme.core.datapath import IPCacheChanges
from axoneme.core.endpoint import HOST_ENDPOINT_ID, Endpoint, NamedPort
from axoneme.core.errors import PolicyError
from axoneme.core.identity import (
    RESERVED_IDENTITIES,
    RESERVED_NAMES,
    Identity,
    IdentityAllocator,
    ReservedIdentity,
)
from axoneme.core.labels import SOURCE_RESERVED, Label, Labels
from axoneme.core.mapstate import Decision, Direction, Entry, Key, MapChanges, MapState, Protocol
from axoneme.core.policy import _multimap as mm
from axoneme.core.policy._handout import handed_out, touched_changes
from axoneme.core.policy._resolve import (
    AddressBook,
    ClusterAddress,
    EndpointPolicy,
    Resolved,
    resolve_endpoint,
)
from axoneme.core.policy._selectorcache import Selector, SelectorCache
from axoneme.core.policy.api import ADDRESS_NODES, ADDRESS_PODS, FQDNPeer, Policy, PolicyRef, Rule
from axoneme.core.policy.audit import resolve_audited
from axoneme.core.policy.repository import PolicyRepository, policy_cidrs, policy_selectors
from axoneme.core.policy.services import (
    Service,
    ServiceKey,
    has_service_peers,
    policy_uses,
    translate,
)

LOG = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_K = TypeVar("_K", int, str)  # an address index's owner: endpoint id or remote key
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


class PolicyEngine:
    """Policies and endpoints in, per-endpoint MapStates (and changes) out. Thread-safe."""

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

    # -- policies ------------------------------------------------------------------
    def policies(self) -> list[Policy]:
        """The applied policies as given (toServices not translated)."""
        with self._lock:
            return [self._svc_sources.get(p.ref, p) for p in self._repo.policies()]

    def policy_count(self) -> int:
        with self._lock:
            return len(self._repo)

    def get_policy(self, ref: PolicyRef) -> Policy | None:
        """The policy as given (toServices not translated)."""
        with self._lock:
            return self._svc_sources.get(ref) or self._repo.get(ref)

    def upsert_policy(self, policy: Policy) -> int:
        """Add or replace (by ref). Raises PolicyError (and changes nothing) on an L7 conflict.

        A policy with toServices is kept as given and enforced translated
        with the Services known now (``services.translate``)."""
        with self._lock:
            if not has_service_peers(policy):
                rev = self._put_policy(policy)
                self._svc_sources.pop(policy.ref, None)
                return rev
            rev = self._put_policy(translate(policy, self._services))
            self._svc_sources[policy.ref] = policy
            return rev

    def _put_policy(self, policy: Policy) -> int:
        with self._lock:
            old = self._repo.get(policy.ref)
            changed = self._add_cidrs(policy_cidrs(policy))
            for sel in policy_selectors(policy):
                self._cache.add_selector(sel)
            self._repo.put(policy)
            affected = self._endpoints_selected(policy) | self._dependents(changed)
            if old is not None:
                affected |= self._endpoints_selected(old)
            if self._deferred is not None:
                self._deferred |= affected
                if old is not None:
                    self._release_policy(old)
                return self._repo.revision
            conflicts = [msg for eid in sorted(affected) if eid in self._endpoints
                         for msg in self._update(eid, changed)]
            if conflicts:
                # refused: put the repository and cache back, then rebuild
                # what the partial change touched (equal to the state before)
                self._repo.restore(policy.ref, old)
                for sel in policy_selectors(policy):
                    self._cache.remove_selector(sel)
                self._remove_cidrs(policy_cidrs(policy))
                for eid in affected:
                    if eid in self._endpoints:
                        self._update(eid, full=True)
                raise PolicyError(conflicts[0])
            if old is not None:
                self._release_policy(old)
            LOG.debug("policy %s applied: revision %d, %d endpoints recomputed",
                      policy.ref, self._repo.revision, len(affected))
            return self._repo.revision

    def delete_policy(self, ref: PolicyRef) -> int:
        with self._lock:
            old = self._repo.remove(ref)
            if old is None:
                raise PolicyError(f"no policy {ref}")
            self._svc_sources.pop(ref, None)
            self._recompute(self._endpoints_selected(old))
            self._release_policy(old)
            return self._repo.revision

    def _release_policy(self, old: Policy) -> None:
        for sel in policy_selectors(old):
            self._cache.remove_selector(sel)
        changed = self._remove_cidrs(policy_cidrs(old))
        self._recompute(self._dependents(changed), sels=changed)

    def _add_cidrs(self, nets: Iterable[IPNetwork]) -> set[Selector]:
        changed: set[Selector] = set()
        for net in nets:
            if self._cache.cidr_identity(net) is not None:
                mm.ref(self._cidr_more, net)
            else:
                self._ipc_dirty.add(net)
                changed |= self._cache.add_identity(self.allocator.allocate_cidr(net))
        return changed

    def _remove_cidrs(self, nets: Iterable[IPNetwork]) -> set[Selector]:
        changed: set[Selector] = set()
        for net in nets:
            if not mm.unref(self._cidr_more, net):
                ident = self._cache.cidr_identity(net)
                if ident is None:
                    raise KeyError(net)
                self._ipc_dirty.add(net)  # its ipcache entry goes with it
                changed |= self._cache.remove_identity(ident.id)
                self.allocator.release_cidr(ident)
        return changed

    def _endpoints_selected(self, policy: Policy) -> set[int]:
        out: set[int] = set()
        host = self._endpoints.get(HOST_ENDPOINT_ID)
        for rule in policy.rules:
            if rule.node_selector:
                if host is not None and rule.subject.matches(host.labels):
                    out.add(HOST_ENDPOINT_ID)
                continue
            for ident in self._cache.selected(rule.subject):
                out |= self._by_identity.get(ident, set())
        return out

    # -- toFQDNs -------------------------------------------------------------------
    def fqdn_selectors(self) -> list[FQDNPeer]:
        """toFQDNs selectors used by the applied policies (what to ask the DNS cache about)."""
        with self._lock:
            # the selector cache counts references: O(toFQDNs selectors), not
            # O(policy size) (called after every policy change)
            out = self._cache.fqdn_selectors()
            return sorted(out, key=lambda p: (p.match_name or "", p.match_pattern or ""))

    def update_fqdn(self, peer: FQDNPeer, ips: Iterable[str]) -> None:
        """Set the IPs a toFQDNs selector currently stands for (from the DNS cache).

        Each IP gets a /32 (/128) CIDR identity in the ipcache; endpoints whose
        rules use the selector (or a world/CIDR selector covering the IP) are
        recomputed."""
        with self._lock:
            nets = frozenset(ipaddress.ip_network(ip) for ip in ips)
            old = self._fqdn_nets.get(peer, frozenset())
            if nets == old:
                return
            changed = self._add_cidrs(nets - old)
            if nets:
                self._fqdn_nets[peer] = nets
            else:
                self._fqdn_nets.pop(peer, None)
            changed |= self._cache.set_fqdn(peer, frozenset(
                self._cache.cidr_identity(n).id for n in nets))  # type: ignore[union-attr]
            changed |= self._remove_cidrs(old - nets)
            self._recompute(self._dependents(changed), sels=changed)

    # -- toServices ------------------------------------------------------------------
    def services(self) -> list[Service]:
        with self._lock:
            return [self._services[k] for k in sorted(self._services)]

    def set_services(self, services: Iterable[Service]) -> None:
        """Replace every known Service (a full list); see ``update_services``."""
        with self._lock:
            new = {s.key: s for s in services}
            changed: dict[ServiceKey, Service | None] = {
                k: new.get(k) for k in self._services.keys() | new.keys()
                if self._services.get(k) != new.get(k)}
            self.update_services(changed)

    def update_services(self, changed: Mapping[ServiceKey, Service | None]) -> list[PolicyRef]:
        """Services changed (None: deleted): the policies whose toServices match
        the old or new version are translated again and, when their rules
        changed, upserted (Cilium's updateToServicesPolicies). Returns those
        refs; one the engine refuses (an L7 conflict) keeps its previous
        translation and is logged."""
        with self._lock:
            olds = {k: self._services.get(k) for k in changed}
            for k, svc in changed.items():
                if svc is None:
                    self._services.pop(k, None)
                else:
                    self._services[k] = svc
            out = []
            for ref, src in sorted(self._svc_sources.items()):
                if not any(policy_uses(src, s) for k, new in changed.items()
                           for s in (olds[k], new)):
                    continue
                pol = translate(src, self._services)
                cur = self._repo.get(ref)
                if cur is not None and cur.rules == pol.rules:
                    continue
                try:
                    self._put_policy(pol)
                    out.append(ref)
                except PolicyError as e:
                    LOG.error("%s: toServices after a Service change refused: %s", ref, e)
            return out

    def identities(self) -> list[Identity]:
        """Every identity the engine knows (reserved, endpoints, CIDR, extra)."""
        with self._lock:
            return sorted(self._cache.identities(), key=lambda i: i.id)

    # -- endpoints -----------------------------------------------------------------
    def _identity_for(self, ep: Endpoint) -> Identity:
        found = self.allocator.get(ep.identity)
        return found if found is not None else Identity(ep.identity, ep.labels)

    def upsert_endpoint(self, endpoint: Endpoint) -> None:
        with self._lock:
            old = self._endpoints.get(endpoint.id)
            self._endpoints[endpoint.id] = endpoint
            changed: set[Selector] = set()
            if old is None or old.identity != endpoint.identity:
                changed |= self._cache.add_identity(self._identity_for(endpoint))
                self._by_identity.setdefault(endpoint.identity, set()).add(endpoint.id)
                if old is not None:
                    self._unlink_identity(old)
                    changed |= self._cache.remove_identity(old.identity)
            self._link_addresses(self._ep_nets, endpoint.id, old, endpoint)
            moved = old is None or _address_facts(old) != _address_facts(endpoint)
            if moved:
                self._book = None
            # the endpoint itself: rebuilt when it changed (identity, ports)
            self._recompute({endpoint.id}, full=old != endpoint)
            self._recompute(self._dependents(changed) - {endpoint.id}, sels=changed)
            if moved:
                self._recompute(self._address_users - {endpoint.id}, addresses=True)

    def remove_endpoint(self, endpoint_id: int) -> None:
        with self._lock:
            old = self._endpoints.pop(endpoint_id, None)
            if old is None:
                return
            self._unlink_identity(old)
            self._link_addresses(self._ep_nets, old.id, old, None)
            changed = self._cache.remove_identity(old.identity)
            self._forget(endpoint_id)
            self._audit_endpoints.discard(endpoint_id)
            self._book = None
            self._recompute(self._dependents(changed), sels=changed)
            self._recompute(set(self._address_users), addresses=True)

    def _unlink_identity(self, ep: Endpoint) -> None:
        users = self._by_identity.get(ep.identity)
        if users is not None:
            users.discard(ep.id)
            if not users:
                del self._by_identity[ep.identity]

    def _link_addresses(self, index: dict[IPNetwork, dict[_K, int]], owner: _K,
                        old: Endpoint | None, new: Endpoint | None) -> None:
        """Keep an address index for the ipcache current: ``_ep_nets`` (this
        node's endpoints, by id) or ``_remote_nets`` (other nodes' pods, by key)."""
        for ep, add in ((old, False), (new, True)):
            if ep is None:
                continue
            for ip in (ep.ipv4, ep.ipv6):
                if not ip:
                    continue
                net = ipaddress.ip_network(ip)
                self._ipc_dirty.add(net)
                owners = index.setdefault(net, {})
                if add:
                    owners[owner] = ep.identity
                else:
                    owners.pop(owner, None)
                    if not owners:
                        del index[net]

    # -- endpoints of other nodes -----------------------------------------------------
    def upsert_remote_endpoint(self, key: str, identity: Identity, ipv4: str | None = None,
                               ipv6: str | None = None,
                               named_ports: tuple[NamedPort, ...] = ()) -> None:
        """A pod of another node (Kubernetes mode; ``key`` names it, e.g.
        ``ns/pod``): its addresses map to ``identity`` in the ipcache (below
        this node's endpoints, above host and CIDR identities) and join the
        AddressBook (ipBlock over pods, named ports per destination), so this
        node's policies judge its traffic by identity. Its identity selects
        like any other; no policy is computed for it (its own node does that)."""
        with self._lock:
            old = self._remote.get(key)
            if old is None:
                self._remote_ids += 1
            rid = old.id if old is not None else -self._remote_ids
            new = Endpoint(id=rid, identity=identity.id, labels=identity.labels, ipv4=ipv4,
                           ipv6=ipv6, named_ports=tuple(named_ports))
            if old == new:
                return
            self._remote[key] = new
            changed: set[Selector] = set()
            if old is None or old.identity != new.identity:
                changed |= self._cache.add_identity(identity)
                if old is not None:
                    changed |= self._cache.remove_identity(old.identity)
            self._link_addresses(self._remote_nets, key, old, new)
            if old is None or _address_facts(old) != _address_facts(new):
                self._book = None
                self._recompute(set(self._address_users), addresses=True)
            self._recompute(self._dependents(changed), sels=changed)

    def remove_remote_endpoint(self, key: str) -> None:
        """A pod of another node is gone (or no longer has addresses)."""
        with self._lock:
            old = self._remote.pop(key, None)
            if old is None:
                return
            self._link_addresses(self._remote_nets, key, old, None)
            changed = self._cache.remove_identity(old.identity)
            self._book = None
            self._recompute(set(self._address_users), addresses=True)
            self._recompute(self._dependents(changed), sels=changed)

    def remote_endpoints(self) -> dict[str, Endpoint]:
        with self._lock:
            return dict(self._remote)

    def endpoints(self) -> list[Endpoint]:
        """This node's pod endpoints (not the host endpoint)."""
        with self._lock:
            return [self._endpoints[i] for i in sorted(self._endpoints) if i != HOST_ENDPOINT_ID]

    # -- the host endpoint (host firewall) ---------------------------------------------
    def set_host_endpoint(self, endpoint: Endpoint | None) -> None:
        """The node's own endpoint (``HOST_ENDPOINT_ID``, identity host), or None
        (the host firewall is off). Its ``labels`` are the node's (plus
        ``reserved:host``): host policies (CCNP ``nodeSelector``) whose selector
        matches them select it, with the same per-direction default deny as a
        pod. Its identity is the reserved host identity, already known to the
        selector cache; it has no address of its own in the ipcache (the node's
        addresses are ``set_host_addresses``)."""
        with self._lock:
            old = self._endpoints.get(HOST_ENDPOINT_ID)
            if endpoint is None:
                if old is not None:
                    del self._endpoints[HOST_ENDPOINT_ID]
                    self._audit_endpoints.discard(HOST_ENDPOINT_ID)
                    self._forget(HOST_ENDPOINT_ID)
                return
            if endpoint.id != HOST_ENDPOINT_ID or endpoint.identity != int(ReservedIdentity.HOST):
                raise PolicyError("the host endpoint has id HOST_ENDPOINT_ID and identity host (1)")
            self._endpoints[HOST_ENDPOINT_ID] = endpoint
            self._recompute({HOST_ENDPOINT_ID}, full=old != endpoint)

    def mark_synced(self, endpoint_id: int) -> None:
        """The datapath was just made to hold the endpoint's whole resolved
        policy (a full ``sync``): nothing of it is pending any more, and the
        next change is a diff against it."""
        with self._lock:
            pol = self._policies.get(endpoint_id)
            if pol is None:
                return
            self._base.pop(endpoint_id, None)
            pol.touched = {}
            self._dirty.discard(endpoint_id)

    def host_endpoint(self) -> Endpoint | None:
        with self._lock:
            return self._endpoints.get(HOST_ENDPOINT_ID)

    def _rules_of(self, ep: Endpoint) -> list[Rule]:
        """The rules selecting an endpoint: pods by identity, the host by node labels."""
        if ep.id == HOST_ENDPOINT_ID:
            return self._repo.host_rules(ep.labels)
        return self._repo.rules_for(ep.identity, self._cache)

    def endpoint(self, endpoint_id: int) -> Endpoint | None:
        with self._lock:
            return self._endpoints.get(endpoint_id)

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

    def set_audit_mode(self, endpoint_id: int, enabled: bool) -> bool:
        """Per-endpoint audit mode (Cilium's ``PolicyAuditMode``); returns
        whether it changed (then push ``pending_changes``)."""
        with self._lock:
            if endpoint_id not in self._endpoints:
                raise PolicyError(f"no endpoint {endpoint_id}")
            if (endpoint_id in self._audit_endpoints) == enabled:
                return False
            if enabled:
                self._audit_endpoints.add(endpoint_id)
            else:
                self._audit_endpoints.discard(endpoint_id)
            self._recompute({endpoint_id})
            return True

    def _opaque(self, endpoint_id: int, rules: Sequence[Rule]) -> bool:
        """Endpoints resolved whole, not incrementally: mode never, audit mode, staged rules."""
        return (self.options.enforcement_mode == "never" or self.audit_mode(endpoint_id)
                or any(r.audit for r in rules))

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
        if self._opaque(endpoint_id, rules):
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
            else pol.uses_addresses
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

    def regenerate(self, endpoint_id: int) -> MapState:
        """Recompute one endpoint from scratch (drift, restart, benchmarks); returns its MapState."""
        with self._lock:
            if endpoint_id not in self._endpoints:
                raise PolicyError(f"no endpoint {endpoint_id}")
            self._recompute({endpoint_id}, full=True)
            return self._policy(endpoint_id).snapshot()

    def resolve(self, endpoint_id: int) -> MapState:
        with self._lock:  # a copy, not kept (a 100k-peer policy's is 10 MB)
            return MapState(self._policy(endpoint_id).state)

    def entry_count(self, endpoint_id: int) -> int:
        """How many entries the endpoint's MapState holds (O(1))."""
        with self._lock:
            return len(self._policy(endpoint_id).state)

    def enforcement(self, endpoint_id: int) -> tuple[bool, bool]:
        with self._lock:
            pol = self._policy(endpoint_id)
            return pol.ingress, pol.egress

    def selecting_rules(self, endpoint_id: int) -> list[Rule]:
        """The rules that select an endpoint (for trace and endpoint get)."""
        with self._lock:
            return list(self._policy(endpoint_id).rules)

    def pending_size(self) -> int:
        """An upper bound of what ``pending_changes`` + ``pending_ipcache_changes``
        would hand out now (keys and prefixes; O(changed endpoints))."""
        with self._lock:
            size = len(self._ipc_dirty) + len(self._ipc_before)
            for eid in self._dirty:
                pol = self._policies.get(eid)
                if pol is not None:
                    size += len(pol.state) + len(self._base.get(eid, ())) \
                        if pol.touched is None else len(pol.touched)
            return size

    def pending_changes(self) -> dict[int, MapChanges]:
        """Per endpoint, the MapState changes since the last call (new endpoints: everything).

        Removed endpoints are not listed: the datapath drops their state on
        ``endpoint_removed``. Only the keys a change touched are compared."""
        with self._lock:
            out: dict[int, MapChanges] = {}
            for eid in sorted(self._dirty):
                pol = self._policies.get(eid)
                if pol is None:
                    continue
                if pol.touched is None:  # rebuilt (or new): against the previous hand-out
                    changes = MapState.view(self._base.pop(eid, {})).diff(
                        MapState.view(pol.state))
                else:
                    changes = touched_changes(pol)
                pol.touched = {}
                if changes:
                    out[eid] = changes
            self._dirty.clear()
            return out

    def explain(self, endpoint_id: int, direction: Direction, peer_identity: int,
                protocol: Protocol, port: int, peer_address: str | None = None) -> Decision:
        """The decision for one packet and the entry that made it (derived_from names rules).

        On the live entries under the lock (no O(entries) snapshot per flow:
        every allowed flow's attribution asks this)."""
        with self._lock:
            return MapState.view(self._policy(endpoint_id).state).lookup(
                peer_identity, direction, protocol, port, peer_address)

    # -- ipcache ---------------------------------------------------------------------
    def set_host_addresses(self, addresses: Iterable[str]) -> bool:
        """The node's own addresses: the ipcache maps them to the host identity (1),
        so ``toEntities: host`` selects traffic to the node on every datapath.
        Returns whether they changed (then push ``pending_ipcache_changes``)."""
        nets = frozenset(ipaddress.ip_network(a) for a in addresses)
        with self._lock:
            changed = nets != self._host_nets
            self._ipc_dirty |= nets ^ self._host_nets
            self._host_nets = nets
            if changed:
                self._book = None
                self._recompute(set(self._address_users), addresses=True)
                self._host_carries_apiserver()
            return changed

    def set_cluster_addresses(self, remote_nodes: Iterable[str],
                              apiserver: Iterable[str]) -> bool:
        """Kubernetes mode: other nodes' addresses map to remote-node (6) and the
        API server's to kube-apiserver (7) in the ipcache, below endpoints and
        this node's own addresses (host wins: an API server running here is
        host, whose identity then also carries ``reserved:kube-apiserver``, so
        ``toEntities: kube-apiserver`` selects it, as Cilium). Returns whether
        they changed (then push ``pending_ipcache_changes``)."""
        nodes = frozenset(ipaddress.ip_network(a) for a in remote_nodes)
        api = frozenset(ipaddress.ip_network(a) for a in apiserver)
        with self._lock:
            changed = (nodes, api) != (self._node_nets, self._apiserver_nets)
            self._ipc_dirty |= (nodes ^ self._node_nets) | (api ^ self._apiserver_nets)
            self._node_nets, self._apiserver_nets = nodes, api
            if changed:
                self._book = None
                self._recompute(set(self._address_users), addresses=True)
                self._host_carries_apiserver()
            return changed

    def _host_carries_apiserver(self) -> None:
        """The host identity's labels: ``reserved:kube-apiserver`` too while one
        of the API server's addresses is this node's."""
        host = self._cache.identity(int(ReservedIdentity.HOST))
        if host is None:
            return
        mark = Label(SOURCE_RESERVED, RESERVED_NAMES[ReservedIdentity.KUBE_APISERVER])
        want = bool(self._apiserver_nets & self._host_nets)
        if (mark in host.labels.values()) == want:
            return
        labels = host.labels.union([mark]) if want else Labels(
            [lab for lab in host.labels.values() if lab != mark])
        changed = self._cache.replace_identity(Identity(host.id, labels))
        self._recompute(self._dependents(changed), sels=changed)

    def _ipcache_value(self, net: IPNetwork) -> int | None:
        """The identity the ipcache maps ``net`` to (precedence as ``ipcache``)."""
        owners = self._ep_nets.get(net)
        if owners:
            # two endpoints on one address: the later one (engine order) wins
            last = [eid for eid in self._endpoints if eid in owners][-1:]
            if last:
                return owners[last[0]]
        remote = self._remote_nets.get(net)
        if remote:
            return list(remote.values())[-1]  # two on one address: the later one
        if net in self._host_nets:
            return int(ReservedIdentity.HOST)
        if net in self._apiserver_nets:
            return int(ReservedIdentity.KUBE_APISERVER)
        if net in self._node_nets:
            return int(ReservedIdentity.REMOTE_NODE)
        ident = self._cache.cidr_identity(net)
        if ident is not None:
            return ident.id
        return WORLD_PREFIXES.get(net)

    def _ipcache_current(self) -> dict[IPNetwork, int]:
        """The ipcache, brought up to date for the prefixes that changed."""
        before = self._ipc_before
        for net in self._ipc_dirty:
            value = self._ipcache_value(net)
            had = self._ipcache.get(net)
            if net not in before:
                before[net] = had  # what was handed out (nothing changed it since)
            if value is None:
                if had is not None:
                    del self._ipcache[net]
                    self._ipc_lens[(net.version, net.prefixlen)] -= 1
            else:
                if had is None:
                    self._ipc_lens[(net.version, net.prefixlen)] += 1
                self._ipcache[net] = value
        self._ipc_dirty.clear()
        return self._ipcache

    def ipcache(self) -> dict[IPNetwork, int]:
        """Prefix -> identity: world prefixes, CIDR identities, node addresses
        (host, even inside a CIDR rule's prefix, as Cilium), other nodes' pods,
        local endpoints' addresses (they win)."""
        with self._lock:
            return dict(self._ipcache_current())

    def pending_ipcache_changes(self) -> IPCacheChanges:
        """What changed since the last call; costs the prefixes that changed."""
        with self._lock:
            cur = self._ipcache_current()
            before, self._ipc_before = self._ipc_before, {}
            upserts: dict[IPNetwork, int] = {}
            deletes: set[IPNetwork] = set()
            for net, was in before.items():
                value = cur.get(net)
                if value is None:
                    if was is not None:
                        deletes.add(net)
                elif was != value:
                    upserts[net] = value
            return IPCacheChanges(upserts, frozenset(deletes))

    def identity_of_ip(self, ip: str) -> int:
        """The ipcache's longest-prefix match for an address (world when none)."""
        addr = ipaddress.ip_address(ip)
        with self._lock:
            cur = self._ipcache_current()
            lens = sorted((plen for (v, plen), n in self._ipc_lens.items()
                           if v == addr.version and n > 0), reverse=True)
            for plen in lens:
                found = cur.get(ipaddress.ip_network((addr, plen), strict=False))
                if found is not None:
                    return found
        return int(ReservedIdentity.WORLD)


def _address_facts(ep: Endpoint) -> tuple[object, ...]:
    """What the AddressBook holds of an endpoint."""
    return (ep.ipv4, ep.ipv6, ep.identity, frozenset(ep.named_ports))


__all__ = ["CIDR_MATCH_MODES", "EngineOptions", "PolicyEngine", "parse_cidr_match_mode"]
