"""Pods of other nodes in this node's ipcache (Kubernetes mode).

A packet from a pod on another node arrives with that pod's address as its
source; the receiving node judges it by identity only if its ipcache maps
the address to the pod's identity (Cilium fills its ipcache from the
CiliumEndpoints of every node, or the kvstore). Here the API's Pods are that
source: the metadata cache of ``KubernetesSource`` holds every pod of the
cluster, and for each pod scheduled on another node (not host-network, with
addresses) on a node the API still has, this keeps
``PolicyEngine.upsert_remote_endpoint`` current:

- its identity comes from its labels, its namespace's labels, its service
  account and the cluster name, exactly as a local endpoint's
  (``pod_identity_labels``), allocated through the agent's allocator (the
  same labels get the same number on every node: that is the allocator's
  job, and this node holds a reference while the pod exists);
- a pod added, relabelled, moved or deleted, its namespace relabelled, or
  its node deleted (its pods stay in the API until the pod garbage collector
  comes, 40 s or more later; their addresses leave the ipcache at once),
  updates the entry; then the regenerator pushes the ipcache change (and the
  policies whose selection changed) to the datapath.

Pods of this node are the endpoints' business (their addresses win in the
ipcache); a remote pod's policy is enforced by its own node.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from axoneme.agent._k8sinformer import Event, obj_key
from axoneme.core.cluster import Namespace, namespace_labels, pod_identity_labels
from axoneme.core.endpoint import NamedPort
from axoneme.core.errors import AxonemeError
from axoneme.core.identity import Identity, IdentityAllocator
from axoneme.core.policy.engine import PolicyEngine

LOG = logging.getLogger(__name__)


class PodCache(Protocol):
    """What this reads of ``KubernetesSource``."""

    node: str
    pods: dict[str, Any]  # "ns/name" -> _k8s.PodMeta
    nodes: set[str]  # the Node objects' names

    def namespace(self, name: str) -> Namespace | None: ...


@dataclass(frozen=True, slots=True)
class _Entry:
    identity: Identity
    ipv4: str | None
    ipv6: str | None
    ports: tuple[NamedPort, ...]


class RemotePods:
    """Other nodes' pods -> the engine's ipcache, following the pod and
    namespace informers (``KubernetesSource.listen``)."""

    def __init__(self, cache: PodCache, engine: PolicyEngine, allocator: IdentityAllocator,
                 regenerator: Any, lock: Any, cluster_name: str = "default") -> None:
        self.cache = cache
        self.engine = engine
        self.allocator = allocator
        self.regenerator = regenerator
        self.lock = lock  # the agent's store lock: every engine mutation holds it
        self.cluster_name = cluster_name
        self.entries: dict[str, _Entry] = {}

    # -- informer listeners (on the agent's loop, after the cache is updated) ----------------
    async def on_pods(self, events: Sequence[Event], initial: bool) -> None:
        await self._sync({obj_key(obj) for _, obj in events}, initial)

    async def on_nodes(self, events: Sequence[Event], initial: bool) -> None:
        names = {str((obj.get("metadata") or {}).get("name") or "") for _, obj in events}
        keys = {k for k, m in self.cache.pods.items() if m.node in names}
        await self._sync(keys, initial)

    async def on_namespaces(self, events: Sequence[Event], initial: bool) -> None:
        names = {str((obj.get("metadata") or {}).get("name") or "") for _, obj in events}
        keys = {k for k in (*self.cache.pods, *self.entries) if k.split("/", 1)[0] in names}
        await self._sync(keys, initial)

    async def _sync(self, keys: Iterable[str], initial: bool) -> None:
        async with self.lock:
            changed = sum(self.update(key) for key in sorted(set(keys)))
            # the first list: endpoints are adopted next, with a full sync
            if changed and not initial:
                await self.regenerator.regenerate()

    async def renumbered(self, numbers: set[int]) -> None:
        """CRD identities: a lower number now holds the labels of ``numbers``
        (``_identityk8s``): the pods holding one of them take it."""
        await self._sync({k for k, e in self.entries.items() if e.identity.id in numbers}, False)

    # -- one pod ----------------------------------------------------------------------------------
    def update(self, key: str) -> bool:
        """Bring ``key``'s entry in step with the cache; True when it changed."""
        meta = self.cache.pods.get(key)
        old = self.entries.get(key)
        try:
            new = self._entry(meta) if meta is not None else None
        except AxonemeError as e:  # the identity store did not answer: keep what we had
            LOG.warning("pod %s of another node: no identity: %s", key, e)
            return False
        if new == old:
            if new is not None:  # the reference taken by _entry is not needed twice
                self.allocator.release(new.identity)
            return False
        if new is None:
            del self.entries[key]
            self.engine.remove_remote_endpoint(key)
        else:
            self.entries[key] = new
            self.engine.upsert_remote_endpoint(key, new.identity, new.ipv4, new.ipv6, new.ports)
        if old is not None:
            self.allocator.release(old.identity)
        return True

    def _entry(self, meta: Any) -> _Entry | None:
        """The entry of a pod of another node (None: not one, or no address)."""
        if meta.host_network or not meta.node or meta.node == self.cache.node \
                or meta.node not in self.cache.nodes:
            return None
        ipv4 = ipv6 = None
        for text in meta.pod.ips:
            try:
                ip = ipaddress.ip_address(text)
            except ValueError:
                continue
            if ip.version == 4 and ipv4 is None:
                ipv4 = str(ip)
            elif ip.version == 6 and ipv6 is None:
                ipv6 = str(ip)
        if ipv4 is None and ipv6 is None:
            return None
        ns = meta.pod.namespace
        namespace = self.cache.namespace(ns) or Namespace(ns, namespace_labels(ns))
        labels = pod_identity_labels(meta.pod, namespace, self.cluster_name)
        return _Entry(self.allocator.allocate(labels), ipv4, ipv6, tuple(meta.pod.ports))

    def view(self) -> dict[str, Any]:
        return {"remote_pods": len(self.entries)}
