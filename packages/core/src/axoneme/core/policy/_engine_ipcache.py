"""The engine's ipcache and CIDR identities: prefix -> identity (world,
CIDR identities, node and API server addresses, other nodes' pods, local
endpoints' addresses), kept current per changed prefix and handed out as
changes (``pending_ipcache_changes``); CIDR identities allocated and
released by reference (``_add_cidrs``/``_remove_cidrs``)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import TypeVar

from axoneme.core.datapath import IPCacheChanges
from axoneme.core.endpoint import Endpoint
from axoneme.core.identity import RESERVED_NAMES, Identity, ReservedIdentity
from axoneme.core.labels import SOURCE_RESERVED, Label, Labels
from axoneme.core.policy import _multimap as mm
from axoneme.core.policy._engine_state import WORLD_PREFIXES, EngineState, IPNetwork
from axoneme.core.policy._selectorcache import Selector

_K = TypeVar("_K", int, str)  # an address index's owner: endpoint id or remote key


class EngineIPCache(EngineState):
    """CIDR identity bookkeeping, address indexes and the ipcache."""

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


__all__ = ["EngineIPCache"]
