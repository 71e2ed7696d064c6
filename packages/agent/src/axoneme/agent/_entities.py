"""Kubernetes mode: the entities the cluster defines, from the API server.

- ``remote-node`` (6): every address (InternalIP, ExternalIP) of every Node
  object but this node's;
- ``kube-apiserver`` (7): the addresses of the ``default/kubernetes``
  Service's EndpointSlices (the API server's endpoints, as Cilium tracks
  them); while none is known, the address this agent reaches the API server
  at, if it is an IP address;
- ``host`` (1) stays this node's own addresses (the kernel's, followed by the
  agent's tick; its Node object's InternalIP is one of them), and wins over
  both: an API server running on this node is host, whose identity then also
  carries ``reserved:kube-apiserver``;
- ``cluster`` selects all of them (and every pod) through their identities.

Both feed ``PolicyEngine.set_cluster_addresses``; a change reaches the
datapath's ipcache through the regenerator, under the agent's lock.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from axoneme.agent._k8sinformer import Event, Obj

LOG = logging.getLogger(__name__)

API_SERVICE = ("default", "kubernetes")
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
NODE_ADDRESS_TYPES = ("InternalIP", "ExternalIP")


def _ip(text: object) -> str | None:
    try:
        return str(ipaddress.ip_address(str(text)))
    except ValueError:
        return None


def node_addresses(obj: Obj) -> set[str]:
    """A Node object's InternalIP and ExternalIP addresses."""
    out = set()
    for a in (obj.get("status") or {}).get("addresses") or []:
        if isinstance(a, dict) and a.get("type") in NODE_ADDRESS_TYPES:
            ip = _ip(a.get("address"))
            if ip is not None:
                out.add(ip)
    return out


def apiserver_addresses(obj: Obj) -> set[str] | None:
    """The endpoint addresses of an EndpointSlice of ``default/kubernetes``,
    None for any other slice. Endpoints whose ready condition is false are left out."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    if (meta.get("namespace"), labels.get(SERVICE_NAME_LABEL)) != API_SERVICE:
        return None
    out = set()
    for ep in obj.get("endpoints") or []:
        if not isinstance(ep, dict) or (ep.get("conditions") or {}).get("ready") is False:
            continue
        for addr in ep.get("addresses") or []:
            ip = _ip(addr)
            if ip is not None:
                out.add(ip)
    return out


def _name(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name") or "")


class ClusterEntities:
    """Follows Nodes and the API server's EndpointSlices (``KubernetesSource.listen``)."""

    def __init__(self, node: str, engine: Any, regenerator: Any, store: Any,
                 server: Callable[[], str]) -> None:
        self.node = node
        self.engine = engine
        self.regen = regenerator
        self.store = store
        self.server = server  # the API server URL the agent uses
        self.nodes: dict[str, set[str]] = {}
        self.slices: dict[str, set[str]] = {}

    async def on_nodes(self, events: Sequence[Event], initial: bool) -> None:
        for kind, obj in events:
            if kind == "DELETED":
                self.nodes.pop(_name(obj), None)
            else:
                self.nodes[_name(obj)] = node_addresses(obj)
        await self._push()

    async def on_slices(self, events: Sequence[Event], initial: bool) -> None:
        touched = False
        for kind, obj in events:
            addrs = apiserver_addresses(obj)
            if addrs is None:
                continue
            touched = True
            if kind == "DELETED":
                self.slices.pop(_name(obj), None)
            else:
                self.slices[_name(obj)] = addrs
        if touched or initial:
            await self._push()

    def remote_nodes(self) -> list[str]:
        return sorted({a for name, addrs in self.nodes.items() if name != self.node
                       for a in addrs})

    def apiserver(self) -> list[str]:
        found = {a for addrs in self.slices.values() for a in addrs}
        if not found:
            ip = _ip(urlsplit(self.server() or "").hostname or "")
            if ip is not None:
                found.add(ip)
        return sorted(found)

    async def _push(self) -> None:
        remote, api = self.remote_nodes(), self.apiserver()
        async with self.store.lock:
            if self.engine.set_cluster_addresses(remote, api):
                LOG.info("cluster entities: remote-node %s, kube-apiserver %s",
                         ", ".join(remote) or "none", ", ".join(api) or "none")
                await self.regen.regenerate()

    def view(self) -> dict[str, Any]:
        return {"remote_node": self.remote_nodes(), "kube_apiserver": self.apiserver()}
