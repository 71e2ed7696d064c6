"""Standalone namespaces and pods (what Kubernetes holds in Kubernetes mode).

A namespace's labels are part of its pods' identities: relabelling one
recomputes its endpoints' identities. A pod is a record (write-ahead: in the
state file before its netns exists), a netns wired through CNI and a process
(``PodRuntime``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

from axoneme.agent._endpoints import EndpointService
from axoneme.agent._errors import BadRequest, Conflict, NotFound
from axoneme.agent._records import PodRecord, check_labels, check_name, netns_name, parse_port
from axoneme.agent._runtime import PodRuntime, process_alive
from axoneme.agent._state import StateStore
from axoneme.core.cluster import namespace_labels

LOG = logging.getLogger(__name__)


class NamespaceService:
    def __init__(self, store: StateStore, endpoints: EndpointService) -> None:
        self.store = store
        self.endpoints = endpoints

    async def create(self, name: str, labels: Mapping[str, str]) -> dict[str, Any]:
        check_name(name, "namespace")
        labels = check_labels(labels)
        async with self.store.lock:
            if name in self.store.namespaces:
                raise Conflict(f"namespace {name} already exists")
            self.store.namespaces[name] = labels
            await self.store.persist()
        return self.view(name)

    async def label(self, name: str, labels: Mapping[str, str],
                    remove: Sequence[str] = ()) -> dict[str, Any]:
        labels = check_labels(labels)
        async with self.store.lock:
            if name not in self.store.namespaces:
                raise NotFound(f"namespace {name} not found")
            new = dict(self.store.namespaces[name])
            new.update(labels)
            for key in remove:
                new.pop(key, None)
            self.store.namespaces[name] = new
            await self.endpoints.relabel(lambda rec: rec.namespace == name)
            await self.store.persist()
        return self.view(name)

    async def delete(self, name: str) -> None:
        store = self.store
        async with store.lock:
            if name not in store.namespaces:
                raise NotFound(f"namespace {name} not found")
            busy = [p.name for p in store.pods.values() if p.namespace == name]
            busy += [e.pod_name for e in store.endpoints.values() if e.namespace == name]
            if busy:
                raise Conflict(f"namespace {name} still has pods: {', '.join(sorted(set(busy)))}")
            del store.namespaces[name]
            await store.persist()

    def view(self, name: str) -> dict[str, Any]:
        return {"name": name, "labels": namespace_labels(name, self.store.namespaces.get(name, {}))}

    def listing(self) -> list[dict[str, Any]]:
        return [self.view(n) for n in sorted(self.store.namespaces)]


class PodService:
    def __init__(self, store: StateStore, endpoints: EndpointService, runtime: PodRuntime) -> None:
        self.store = store
        self.endpoints = endpoints
        self.runtime = runtime
        self._deleting: set[str] = set()

    async def reconcile_interrupted(self) -> None:
        """Undo what a killed agent left half-done (write-ahead records).

        - a pod still ``Creating`` without a ready endpoint: `pod run` failed
          for its caller, so everything of it goes.
        - a pod ``Deleting``: the deletion is finished.
        """
        store, nl = self.store, self.endpoints.nl
        for key, pod in list(store.pods.items()):
            ep = store.endpoints.get(pod.container_id) if pod.container_id else None
            if pod.status == "Deleting" or (pod.status == "Creating" and ep is None):
                LOG.warning("pod %s was %s when the agent stopped: removing it", key,
                            pod.status.lower())
                await self.runtime.stop_pod(pod, cni_del=False)
                if ep is not None:
                    await self.endpoints.forget(ep)
                host = nl.host_ifname(pod.container_id) if pod.container_id else ""
                if host and nl.link_index(host):
                    await asyncio.to_thread(nl.teardown_endpoint, host)
                del store.pods[key]
            elif pod.status == "Creating":
                # the endpoint was ready; only the process start may be missing
                pod.status = "Running" if process_alive(pod.pid, pod.pid_start) else "Failed"

    def refresh(self, rec: PodRecord) -> None:
        """Has the pod's process exited? (reaps the agent's own children)"""
        if rec.status != "Running":
            return
        child = self.runtime.children.get(rec.pid)
        if child is not None:
            code = child.poll()
            if code is not None:
                rec.status, rec.exit_code = "Exited", code
                self.runtime.children.pop(rec.pid, None)
            return
        if not process_alive(rec.pid, rec.pid_start):
            rec.status = "Exited"

    def refresh_all(self) -> None:
        for rec in list(self.store.pods.values()):
            self.refresh(rec)

    async def run(self, req: Mapping[str, Any]) -> dict[str, Any]:
        name = str(req.get("name") or "")
        namespace = str(req.get("namespace") or "default")
        check_name(name, "pod")
        labels = check_labels(req.get("labels") or {})
        ports = [str(p) for p in req.get("ports") or []]
        for p in ports:
            parse_port(p)
        sa = str(req.get("service_account") or "default")
        command = [str(c) for c in req.get("command") or []]
        if not command:
            raise BadRequest("pod run needs a command after --")
        store = self.store
        async with store.lock:
            if not self.endpoints.namespace_known(namespace):
                raise NotFound(f"namespace {namespace} not found (create it with: axoneme "
                               f"namespace create {namespace})")
            key = f"{namespace}/{name}"
            if key in store.pods:
                raise Conflict(f"pod {key} already exists")
            rec = PodRecord(name=name, namespace=namespace, labels=labels, ports=ports,
                            service_account=sa, netns=netns_name(namespace, name),
                            container_id=secrets.token_hex(32), command=command,
                            cwd=str(req.get("cwd") or "/"), created=time.time(),
                            log=os.path.join(store.config.state_dir, "pods", namespace,
                                             f"{name}.log"))
            store.pods[key] = rec
            await store.persist()
        try:
            ip = await self.runtime.start_pod(rec, dict(req.get("env") or {}))
        except BaseException:
            async with store.lock:
                store.pods.pop(key, None)
                await store.persist()
            try:
                await self.runtime.stop_pod(rec, cni_del=True)
            except Exception:
                LOG.warning("cleanup of failed pod %s failed", key, exc_info=True)
            raise
        async with store.lock:
            rec.status = "Running"
            await store.persist()
        view = self.view(rec)
        view["ip"] = ip
        return view

    async def delete(self, namespace: str, name: str) -> dict[str, Any]:
        key = f"{namespace}/{name}"
        store = self.store
        async with store.lock:
            rec = store.pods.get(key)
            if rec is None:
                raise NotFound(f"pod {key} not found")
            if key in self._deleting:
                raise Conflict(f"pod {key} is being deleted")
            self._deleting.add(key)
            rec.status = "Deleting"
            await store.persist()
        try:
            await self.runtime.stop_pod(rec, cni_del=True)
        finally:
            self._deleting.discard(key)
        async with store.lock:
            store.pods.pop(key, None)
            await store.persist()
        return {"deleted": key}

    def get(self, namespace: str, name: str) -> PodRecord:
        rec = self.store.pods.get(f"{namespace}/{name}")
        if rec is None:
            raise NotFound(f"pod {namespace}/{name} not found")
        return rec

    def view(self, rec: PodRecord) -> dict[str, Any]:
        ep = self.store.endpoints.get(rec.container_id) if rec.container_id else None
        self.refresh(rec)
        return {"name": rec.name, "namespace": rec.namespace,
                "ip": ep.ipv4 if ep else None, "labels": dict(rec.labels), "status": rec.status,
                "endpoint_id": ep.id if ep else None, "identity": ep.identity if ep else None,
                "netns": rec.netns, "pid": rec.pid, "container_id": rec.container_id,
                "command": rec.command, "log": rec.log, "ports": rec.ports,
                "service_account": rec.service_account, "exit_code": rec.exit_code,
                "created": rec.created}

    def listing(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return [self.view(p) for _, p in sorted(self.store.pods.items())
                if not namespace or p.namespace == namespace]
