"""Endpoints: CNI ADD/DEL/CHECK/GC, identities from labels, adoption at start.

An endpoint is a pod's host-side veth plus its IP (IPAM), its security
identity (from the pod's and namespace's labels) and its policy, written by
the regenerator. ADD is write-ahead: the record (status ``creating``) is in
the state file before the veth exists, so the next start undoes a killed
ADD (``reconcile_interrupted``) and an IP is never handed out twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from axoneme.agent import _tracing as tracing
from axoneme.agent._config import AgentConfig
from axoneme.agent._errors import BadRequest, Conflict, NotFound, TryAgain
from axoneme.agent._ipam import IPAM
from axoneme.agent._metrics import AgentMetrics
from axoneme.agent._netlink import EndpointNetlink
from axoneme.agent._records import EndpointRecord
from axoneme.agent._regenerator import Regenerator
from axoneme.agent._state import StateStore
from axoneme.core.cluster import Namespace, Pod, namespace_labels, pod_identity_labels
from axoneme.core.endpoint import Endpoint
from axoneme.core.errors import AxonemeError, DatapathError, IdentityError
from axoneme.core.identity import Identity, IdentityAllocator
from axoneme.core.labels import Labels
from axoneme.core.names import (
    container_id_problem,
    dns_label_problem,
    ifname_problem,
    pod_name_problem,
)
from axoneme.core.policy.engine import PolicyEngine

LOG = logging.getLogger(__name__)


class PodMetadata(Protocol):
    """Where pods' and namespaces' labels come from in Kubernetes mode (the
    API server's cache, ``_k8s.KubernetesSource``) instead of the standalone
    records."""

    def pod(self, namespace: str, name: str) -> Pod | None: ...

    def namespace(self, name: str) -> Namespace | None: ...

    async def wait_for_pod(self, namespace: str, name: str) -> None:
        """Return once the pod is known; TryAgain when it is not in time."""

    async def pod_ready(self, netns_path: str) -> None:
        """The pod's endpoint is ready: set up what its namespace needs (services)."""


class EndpointService:
    """The endpoints of this node (the agent's lock is held by every mutation).

    ``metadata`` (Kubernetes mode) replaces the standalone records as the
    source of pod and namespace labels."""

    def __init__(self, config: AgentConfig, store: StateStore, engine: PolicyEngine,
                 allocator: IdentityAllocator, regen: Regenerator, netlink: EndpointNetlink,
                 metrics: AgentMetrics, hooks: Any, on_change: Callable[[], None]) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        self.allocator = allocator
        self.regen = regen
        self.nl = netlink
        self.metrics = metrics
        self.hooks = hooks  # pluggy hook relay: axoneme_endpoint_added/removed
        self.on_change = on_change  # gauges
        self.ipam = IPAM(config.pod_cidr)
        # where the IPAM range comes from: "config" (pod_cidr) or, in Kubernetes
        # mode, "node" (this Node's spec.podCIDR, ``use_pod_cidr``)
        self.ipam_source = "config"
        self.ipam_note = ""
        self.metadata: PodMetadata | None = None

    # -- identities ------------------------------------------------------------------
    def namespace_obj(self, name: str) -> Namespace:
        if self.metadata is not None:
            return self.metadata.namespace(name) or Namespace(name, namespace_labels(name))
        return Namespace(name, namespace_labels(name, self.store.namespaces.get(name, {})))

    def namespace_known(self, name: str) -> bool:
        return name in self.store.namespaces or (
            self.metadata is not None and self.metadata.namespace(name) is not None)

    def pod_obj(self, namespace: str, pod_name: str) -> Pod:
        if self.metadata is not None:
            return self.metadata.pod(namespace, pod_name) or Pod(pod_name, namespace, {}, ())
        rec = self.store.pods.get(f"{namespace}/{pod_name}")
        if rec is not None:
            return Pod(pod_name, namespace, dict(rec.labels), (), rec.named_ports(),
                       rec.service_account)
        return Pod(pod_name, namespace, {}, ())

    def identity_labels(self, namespace: str, pod_name: str) -> Labels:
        return pod_identity_labels(self.pod_obj(namespace, pod_name),
                                   self.namespace_obj(namespace), self.config.cluster_name)

    def build_endpoint(self, rec: EndpointRecord, identity: Identity | None = None) -> Endpoint:
        """The engine's Endpoint for a record (allocating its identity if not given)."""
        labels = self.identity_labels(rec.namespace, rec.pod_name)
        if identity is None:
            identity = self.allocator.allocate(labels)
        rec.identity = identity.id
        pod = self.pod_obj(rec.namespace, rec.pod_name)
        return Endpoint(id=rec.id, identity=identity.id, labels=labels, ipv4=rec.ipv4,
                        host_ifname=rec.host_ifname, host_ifindex=rec.host_ifindex,
                        host_mac=rec.host_mac, pod_mac=rec.pod_mac, netns=rec.netns_path,
                        namespace=rec.namespace, pod_name=rec.pod_name,
                        named_ports=pod.ports,
                        container_id=rec.container_id)

    # -- start ---------------------------------------------------------------------------
    def restore_ipam(self) -> None:
        """IPAM from the loaded records (their IPs stay theirs)."""
        self.ipam = IPAM(self.config.pod_cidr, {e.ipv4: e.container_id
                                                for e in self.store.endpoints.values() if e.ipv4})

    def use_pod_cidr(self, cidr: str, source: str, note: str = "") -> None:
        """Allocate from ``cidr`` from now on (Kubernetes mode: this node's
        Node.spec.podCIDR, so two nodes never hand out one address); the
        addresses already handed out stay reserved to their owners."""
        self.ipam = IPAM(cidr, self.ipam.allocated())
        self.ipam_source = source
        self.ipam_note = note

    def ipam_view(self) -> dict[str, Any]:
        return {"pod_cidr": str(self.ipam.network), "source": self.ipam_source,
                "allocated": len(self.ipam.allocated()), "note": self.ipam_note}

    async def reconcile_interrupted(self) -> None:
        """An endpoint still ``creating`` when the agent stopped: its veth (by
        name) is removed and its IP released; the runtime retries ADD."""
        for rec in [r for r in self.store.endpoints.values() if r.status == "creating"]:
            LOG.warning("endpoint %d (%s) was being created when the agent stopped: removing it",
                        rec.id, rec.container_id[:12])
            await self.forget(rec)

    async def forget(self, rec: EndpointRecord) -> None:
        """Drop an endpoint we will not adopt: veth, datapath state, IP, record."""
        await asyncio.to_thread(self.nl.teardown_endpoint, rec.host_ifname)
        await self.regen.endpoint_removed(self._bare_endpoint(rec))
        self.ipam.release(rec.ipv4)
        self.store.endpoints.pop(rec.container_id, None)

    def _bare_endpoint(self, rec: EndpointRecord) -> Endpoint:
        return Endpoint(id=rec.id, identity=rec.identity, labels=Labels(), ipv4=rec.ipv4,
                        host_ifname=rec.host_ifname, host_ifindex=rec.host_ifindex,
                        namespace=rec.namespace, pod_name=rec.pod_name,
                        container_id=rec.container_id)

    async def adopt(self) -> None:
        """Take over the endpoints of the state file whose veth still exists and
        make the kernel hold exactly their resolved policy."""
        for rec in self.store.endpoints.values():
            idx = self.nl.link_index(rec.host_ifname)
            if not idx:
                LOG.warning("endpoint %d (%s): host interface %s is gone", rec.id,
                            rec.container_id[:12], rec.host_ifname)
                rec.status = "disconnected"
                continue
            rec.host_ifindex = idx
            self.store.endpoint_objs[rec.id] = self.build_endpoint(rec)
            rec.status = "ready"
        # in a worker thread: at scale the batch's resolution takes seconds, and
        # a restart adopting the kernel's state answers health checks meanwhile
        await asyncio.to_thread(self._resolve_adopted)
        self.store.reindex()
        errors = await asyncio.to_thread(self.regen.sync_all,
                                         list(self.store.endpoint_objs.values()))
        for rec in self.store.endpoints.values():
            if rec.id in errors:
                LOG.error("endpoint %d: policy not applied at start: %s", rec.id, errors[rec.id])
                rec.status = f"not-ready: {errors[rec.id]}"

    def _resolve_adopted(self) -> None:
        with self.engine.batch():
            for ep in self.store.endpoint_objs.values():
                self.engine.upsert_endpoint(ep)
            for rec in self.store.endpoints.values():
                if rec.policy_audit_mode and rec.id in self.store.endpoint_objs:
                    self.engine.set_audit_mode(rec.id, True)

    # -- CNI ---------------------------------------------------------------------------
    @tracing.traced("cni.add", lambda self, req: {
        "pod": f"{req.get('namespace') or 'default'}/{req.get('pod_name') or ''}",
        "container": req.get("container_id")},
        lambda res: {"endpoint": res.get("endpoint_id"), "identity": res.get("identity")})
    async def cni_add(self, req: Mapping[str, Any]) -> dict[str, Any]:
        container_id = str(req.get("container_id") or "")
        netns_path = str(req.get("netns") or "")
        ifname = str(req.get("ifname") or "eth0")
        network = str(req.get("network") or "")
        namespace = str(req.get("namespace") or "default")
        pod_name = str(req.get("pod_name") or "") or container_id[:12]
        if not container_id or not netns_path:
            raise BadRequest("container_id and netns are required")
        # the socket's clients are the CNI plugin and the CLI, but any root
        # process can call it: the names become labels and state keys
        for what, value, check in (("container_id", container_id, container_id_problem),
                                   ("ifname", ifname, ifname_problem),
                                   ("namespace", namespace, dns_label_problem),
                                   ("pod_name", str(req.get("pod_name") or ""),
                                    pod_name_problem)):
            problem = check(value) if value or what != "pod_name" else None
            if problem:
                raise BadRequest(f"invalid {what}: {problem}")
        t0 = time.perf_counter()
        if self.metadata is not None:
            # fail closed: no endpoint before its labels (so its identity) are known
            await self.metadata.wait_for_pod(namespace, pod_name)
        store = self.store
        async with store.lock:
            if container_id in store.endpoints:
                raise Conflict(f"container {container_id} already has an endpoint "
                               f"(id {store.endpoints[container_id].id}); DEL it first")
            pod = store.pods.get(f"{namespace}/{pod_name}")
            if pod is not None and pod.container_id and pod.container_id != container_id:
                raise Conflict(f"pod {namespace}/{pod_name} is already attached to container "
                               f"{pod.container_id[:12]}")
            for other in store.endpoints.values():
                if other.namespace == namespace and other.pod_name == pod_name:
                    raise Conflict(f"pod {namespace}/{pod_name} already has an endpoint "
                                   f"(container {other.container_id[:12]})")
            ip = self.ipam.allocate(container_id)
            rec = EndpointRecord(id=store.new_endpoint_id(), container_id=container_id,
                                 ifname=ifname, netns_path=netns_path, namespace=namespace,
                                 pod_name=pod_name, ipv4=ip, network=network, created=time.time(),
                                 host_ifname=self.nl.host_ifname(container_id), status="creating")
            # write-ahead: a SIGKILL from here on leaves a record that the
            # next start undoes (the IP is never handed out twice)
            store.endpoints[container_id] = rec
            try:
                await store.persist()
                link = await asyncio.to_thread(self.nl.setup_endpoint, container_id, netns_path,
                                               ifname, ip, self.config.pod_mtu)
            except BaseException:
                store.endpoints.pop(container_id, None)
                self.ipam.release(ip)
                try:
                    await store.persist()
                except Exception:
                    LOG.warning("state write after a failed ADD failed", exc_info=True)
                raise
            rec.host_ifname, rec.host_ifindex = link.host_ifname, link.host_ifindex
            rec.host_mac, rec.pod_mac = link.host_mac, link.pod_mac
            identity: Identity | None = None
            try:
                identity = await self._allocate(self.identity_labels(namespace, pod_name))
                ep = self.build_endpoint(rec, identity)
                self.engine.upsert_endpoint(ep)
                store.endpoints[container_id] = rec
                store.endpoint_objs[rec.id] = ep
                store.reindex()
                await self.regen.endpoint_added(ep)
                errors = await self.regen.regenerate()
                if rec.id in errors:
                    raise DatapathError(f"policy for endpoint {rec.id} could not be applied: "
                                        f"{errors[rec.id]}")
                rec.status = "ready"
                rec.ready_ms = round((time.perf_counter() - t0) * 1000, 3)
                if pod is not None:
                    pod.container_id = container_id
                await store.persist()
            except BaseException:
                await self._rollback(rec, identity)
                raise
            self.on_change()
        if self.metadata is not None:
            # Kubernetes mode: ClusterIP translation in its namespace before it runs
            await self.metadata.pod_ready(netns_path)
        self.metrics.endpoint_ready.observe(time.perf_counter() - t0)
        try:
            self.hooks.axoneme_endpoint_added(endpoint=ep)
        except Exception:
            LOG.warning("axoneme_endpoint_added hook failed", exc_info=True)
        LOG.info("endpoint %d ready: %s/%s %s identity %d", rec.id, namespace, pod_name, ip,
                 rec.identity)
        return self.cni_result(rec)

    async def _allocate(self, labels: Labels) -> Identity:
        """A shared store (the API server) answers over the network: off the loop,
        and a failure of it is worth retrying (503: the CNI plugin says try again)."""
        if not self.allocator.shared:
            return self.allocator.allocate(labels)
        try:
            return await asyncio.to_thread(self.allocator.allocate, labels)
        except IdentityError as e:
            raise TryAgain(str(e)) from e

    async def _rollback(self, rec: EndpointRecord, identity: Identity | None) -> None:
        self.store.endpoints.pop(rec.container_id, None)
        ep = self.store.endpoint_objs.pop(rec.id, None)
        self.store.reindex()
        try:
            self.engine.remove_endpoint(rec.id)
        except Exception:
            pass
        if ep is not None:
            await self.regen.endpoint_removed(ep)
        try:
            await asyncio.to_thread(self.nl.teardown_endpoint, rec.host_ifname)
        except Exception:
            LOG.warning("rollback: cannot remove %s", rec.host_ifname, exc_info=True)
        self.ipam.release(rec.ipv4)
        if identity is not None:
            self.allocator.release(identity)
        try:
            await self.regen.regenerate()
        except Exception:
            LOG.warning("rollback: regenerate failed", exc_info=True)
        try:
            await self.store.persist()
        except Exception:
            LOG.warning("rollback: state write failed", exc_info=True)

    def cni_result(self, rec: EndpointRecord) -> dict[str, Any]:
        gateway = self.nl.GATEWAY_IP
        return {
            "interfaces": [
                {"name": rec.host_ifname, "mac": rec.host_mac},
                {"name": rec.ifname, "mac": rec.pod_mac, "sandbox": rec.netns_path},
            ],
            "ips": [{"address": f"{rec.ipv4}/32", "gateway": gateway, "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": gateway}],
            "dns": {"nameservers": [self.config.dns_server]},
            "endpoint_id": rec.id,
            "identity": rec.identity,
        }

    @tracing.traced("cni.del", lambda self, req: {"container": req.get("container_id")},
                    lambda res: {"deleted": res.get("deleted")})
    async def cni_del(self, req: Mapping[str, Any]) -> dict[str, Any]:
        container_id = str(req.get("container_id") or "")
        async with self.store.lock:
            rec = self.store.endpoints.get(container_id)
            if rec is None:
                # unknown container or a second DEL: nothing to do (idempotent)
                host = self.nl.host_ifname(container_id) if container_id else ""
                if host and self.nl.link_index(host):
                    await asyncio.to_thread(self.nl.teardown_endpoint, host)
                return {"deleted": False}
            await self.remove(rec)
            await self.store.persist()
        return {"deleted": True}

    async def remove(self, rec: EndpointRecord) -> None:
        """Remove one endpoint (lock held)."""
        tracing.annotate(endpoint=rec.id, identity=rec.identity,
                         pod=f"{rec.namespace}/{rec.pod_name}")
        store = self.store
        ep = store.endpoint_objs.pop(rec.id, None)
        store.endpoints.pop(rec.container_id, None)
        store.reindex()
        try:
            self.engine.remove_endpoint(rec.id)
        except Exception:
            LOG.debug("engine had no endpoint %d", rec.id)
        if ep is not None:
            await self.regen.endpoint_removed(ep)
        await asyncio.to_thread(self.nl.teardown_endpoint, rec.host_ifname)
        self.ipam.release(rec.ipv4)
        ident = self.allocator.get(rec.identity)
        if ident is not None:
            self.allocator.release(ident)
        for pod in store.pods.values():
            if pod.container_id == rec.container_id:
                pod.container_id = ""
        await self.regen.regenerate()
        self.on_change()
        if ep is not None:
            try:
                self.hooks.axoneme_endpoint_removed(endpoint=ep)
            except Exception:
                LOG.warning("axoneme_endpoint_removed hook failed", exc_info=True)

    async def cni_check(self, req: Mapping[str, Any]) -> dict[str, Any]:
        container_id = str(req.get("container_id") or "")
        rec = self.store.endpoints.get(container_id)
        if rec is None:
            raise NotFound(f"container {container_id} has no endpoint")
        if not self.nl.link_index(rec.host_ifname):
            raise AxonemeError(f"host interface {rec.host_ifname} of endpoint {rec.id} is missing")
        return self.cni_result(rec)

    async def cni_gc(self, req: Mapping[str, Any]) -> dict[str, Any]:
        network = str(req.get("network") or "")
        valid = {(str(a.get("containerID", "")), str(a.get("ifname", "eth0")))
                 for a in req.get("valid_attachments") or []}
        removed = []
        async with self.store.lock:
            for rec in list(self.store.endpoints.values()):
                if rec.network != network or (rec.container_id, rec.ifname) in valid:
                    continue
                await self.remove(rec)
                removed.append(rec.container_id)
            if removed:
                await self.store.persist()
        return {"removed": removed}

    async def relabel(self, which: Callable[[EndpointRecord], bool]) -> None:
        """Recompute the identities of matching endpoints (lock held)."""
        for rec in self.store.endpoints.values():
            if not which(rec) or rec.id not in self.store.endpoint_objs:
                continue
            old = self.allocator.get(rec.identity)
            ep = self.build_endpoint(rec)
            if old is not None:
                self.allocator.release(old)
            self.engine.upsert_endpoint(ep)
            self.store.endpoint_objs[rec.id] = ep
            await self.regen.endpoint_added(ep)
        await self.regen.regenerate()
        self.on_change()
