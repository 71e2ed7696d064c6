"""The engine's endpoints: this node's (``upsert_endpoint``), other nodes'
pods (``upsert_remote_endpoint``, Kubernetes mode), the host endpoint (host
firewall) and per-endpoint audit mode; each change recomputes the endpoints
whose policy reads it."""

from __future__ import annotations

from axoneme.core.endpoint import HOST_ENDPOINT_ID, Endpoint, NamedPort
from axoneme.core.errors import PolicyError
from axoneme.core.identity import Identity, ReservedIdentity
from axoneme.core.policy._engine_ipcache import EngineIPCache
from axoneme.core.policy._selectorcache import Selector


class EngineEndpoints(EngineIPCache):
    """Endpoints in: local, remote and host."""

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

    def host_endpoint(self) -> Endpoint | None:
        with self._lock:
            return self._endpoints.get(HOST_ENDPOINT_ID)

    def endpoint(self, endpoint_id: int) -> Endpoint | None:
        with self._lock:
            return self._endpoints.get(endpoint_id)

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


def _address_facts(ep: Endpoint) -> tuple[object, ...]:
    """What the AddressBook holds of an endpoint."""
    return (ep.ipv4, ep.ipv6, ep.identity, frozenset(ep.named_ports))


__all__ = ["EngineEndpoints"]
