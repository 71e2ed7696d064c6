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

This module: policies, toFQDNs and toServices in. The rest of the facade,
by job: ``_engine_state`` (state, options, per-endpoint recomputation),
``_engine_ipcache`` (CIDR identities, addresses, the ipcache),
``_engine_endpoints`` (local, remote and host endpoints),
``_engine_handout`` (reads and ``pending_changes``).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping

from axoneme.core.endpoint import HOST_ENDPOINT_ID
from axoneme.core.errors import PolicyError
from axoneme.core.identity import Identity
from axoneme.core.policy._engine_endpoints import EngineEndpoints
from axoneme.core.policy._engine_handout import EngineHandout
from axoneme.core.policy._engine_state import CIDR_MATCH_MODES, EngineOptions, parse_cidr_match_mode
from axoneme.core.policy.api import CIDRPeer, FQDNPeer, Peer, Policy, PolicyRef
from axoneme.core.policy.repository import policy_cidrs, policy_selectors, with_peers
from axoneme.core.policy.services import (
    Service,
    ServiceKey,
    has_service_peers,
    policy_uses,
    translate,
)

LOG = logging.getLogger(__name__)


class PolicyEngine(EngineEndpoints, EngineHandout):
    """Policies and endpoints in, per-endpoint MapStates (and changes) out. Thread-safe."""

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
            cidrs = policy_cidrs(policy)
            changed = self._add_cidrs(cidrs) if cidrs else set()
            # the policy keeps the selectors the cache already holds, not equal
            # copies: a replaced (edited) policy would leave both (B5HIST)
            held: dict[int, Peer] = {}
            for sel in policy_selectors(policy):
                cached = self._cache.add_selector(sel)
                if cached is not sel and isinstance(cached, CIDRPeer):
                    held[id(sel)] = cached
            if held:
                policy = with_peers(policy, held)
            self._repo.put(policy)
            affected = self._endpoints_selected(policy) | self._dependents(changed)
            if old is not None:
                affected |= self._endpoints_selected(old)
            if self._deferred is not None:
                self._deferred |= affected
                if old is not None:
                    self._release_policy(old)
                return self._repo.revision
            conflicts: list[str] = []
            for eid in sorted(affected):  # a loop, not a comprehension's call (B5ENGINE)
                if eid in self._endpoints:
                    conflicts += self._update(eid, changed)
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
            if LOG.isEnabledFor(logging.DEBUG):  # one call, not two (B5ENGINE)
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
        cidrs = policy_cidrs(old)
        changed = self._remove_cidrs(cidrs) if cidrs else set()
        if changed:
            self._recompute(self._dependents(changed), sels=changed)

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


__all__ = ["CIDR_MATCH_MODES", "EngineOptions", "PolicyEngine", "parse_cidr_match_mode"]
