"""Kubernetes mode: the API server is the source of policies and pod metadata.

``KubernetesSource`` runs one informer (``_k8sinformer``) per resource:
Namespaces, Pods, Nodes, NetworkPolicies, CiliumNetworkPolicies,
CiliumClusterwideNetworkPolicies, Services and EndpointSlices. Their changes
are applied on the agent's loop:

- namespaces and pods feed a metadata cache (every pod of the cluster: its
  labels, service account, named ports, node and IPs) that
  ``EndpointService`` reads for identities instead of the standalone
  records; a change of a pod's or namespace's labels re-resolves the
  identities of the affected endpoints (``EndpointService.relabel``, as
  ``namespace label`` does in standalone mode);
- policies go through ``PolicyService.upsert`` with source ``k8s``; one the
  parser refuses is not enforced (a previous version of it stays in force)
  and never holds up the others; each CNP/CCNP gets this node's status
  (``status.nodes.<node>``) and each policy an Event (``StatusWriter``);
- services and endpoint slices feed the ClusterIP translation in the pods'
  namespaces (``_services``, with ``kube_proxy_replacement``) and, always,
  the CNP/CCNP ``toServices`` peers (``ServicePolicies``).

``start()`` returns when the first list of every resource is applied: the
agent adopts endpoints and serves CNI ADD only against a synced cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from axoneme.agent import _tracing as tracing
from axoneme.agent._endpoints import EndpointService
from axoneme.agent._errors import TryAgain
from axoneme.agent._k8sclient import (
    PolicyReport,
    StatusWriter,
    api_client,
    listers,
    node_name,
)
from axoneme.agent._k8sinformer import Event, Informer, Obj, obj_key
from axoneme.agent._policies import PolicyService, policy_key
from axoneme.agent._services import ServicePolicies, ServiceTranslator
from axoneme.agent._state import StateStore
from axoneme.core.cluster import Cluster, Namespace, Pod, namespace_labels
from axoneme.core.errors import InvalidRule, PolicyError
from axoneme.core.policy.api import MODE_ANNOTATION, Policy, PolicyKind, PolicyRef
from axoneme.core.policy.parse import parse_policy_obj

LOG = logging.getLogger(__name__)

SOURCE = "k8s"
POLICY_KINDS = {"networkpolicies": PolicyKind.NETWORK_POLICY,
                "cnps": PolicyKind.CILIUM_NETWORK_POLICY,
                "ccnps": PolicyKind.CILIUM_CLUSTERWIDE_NETWORK_POLICY}
# metadata the API server writes: not part of what a policy says
_VOLATILE_META = ("managedFields", "resourceVersion", "generation", "uid", "creationTimestamp",
                  "selfLink", "annotations")


@dataclass(frozen=True)
class PodMeta:
    pod: Pod  # labels, service account, named ports (core.cluster.Pod)
    node: str
    host_network: bool
    uid: str

    def identity_key(self) -> tuple[Any, ...]:
        return (tuple(sorted(self.pod.labels.items())), self.pod.service_account, self.pod.ports)


def pod_meta(obj: Obj) -> PodMeta:
    """A Pod object of the API -> what identities and the cache need."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    # the offline cluster loader reads labels, service account and named ports
    bare = {"kind": "Pod", "metadata": {"name": meta.get("name"), "namespace":
                                        meta.get("namespace"), "labels": meta.get("labels")},
            "spec": {k: spec.get(k) for k in ("serviceAccountName", "serviceAccount",
                                              "containers") if k in spec},
            "status": {k: status.get(k) for k in ("podIP", "podIPs") if k in status}}
    loaded = Cluster.from_objects([bare], "<k8s>")
    pod = next(iter(loaded.pods.values()))
    ips = tuple(str(x.get("ip")) for x in status.get("podIPs") or [] if isinstance(x, dict)) \
        or ((str(status["podIP"]),) if status.get("podIP") else ())
    return PodMeta(Pod(pod.name, pod.namespace, dict(pod.labels), ips, pod.ports,
                       pod.service_account), node=str(spec.get("nodeName") or ""),
                   host_network=bool(spec.get("hostNetwork")), uid=str(meta.get("uid") or ""))


def policy_document(obj: Obj) -> Obj:
    """The policy as its author wrote it: no status, no server-written metadata;
    of the annotations only ours, policy.axoneme.io/mode (``audit`` stages the
    policy; ``kubectl annotate ... policy.axoneme.io/mode-`` promotes it)."""
    doc = {k: v for k, v in obj.items() if k != "status"}
    meta = obj.get("metadata") or {}
    doc["metadata"] = {k: v for k, v in meta.items() if k not in _VOLATILE_META}
    notes = meta.get("annotations")
    if isinstance(notes, dict) and MODE_ANNOTATION in notes:
        doc["metadata"]["annotations"] = {MODE_ANNOTATION: notes[MODE_ANNOTATION]}
    return doc


def _ref(kind: PolicyKind, obj: Obj) -> PolicyRef:
    meta = obj.get("metadata") or {}
    return PolicyRef(kind, str(meta.get("namespace") or "") if kind.namespaced else "",
                     str(meta.get("name") or ""))


class KubernetesSource:
    """The watchers, the metadata cache, and the pod lookups of CNI ADD."""

    def __init__(self, config: Any, store: StateStore, endpoints: EndpointService,
                 policies: PolicyService) -> None:
        self.config = config
        self.store = store
        self.endpoints = endpoints
        self.policies = policies
        self.node = node_name(config)
        self.server = ""
        self.namespaces: dict[str, dict[str, str]] = {}
        self.pods: dict[str, PodMeta] = {}
        self.nodes: set[str] = set()
        # resource -> async fn(events, initial) run after its own handler (``listen``)
        self.listeners: dict[str, list[Any]] = {}
        # policy key -> canonical JSON of what was last applied (or refused)
        self._applied: dict[str, str] = {}
        self.refused: dict[str, str] = {}  # policy key -> first problem (with field path)
        self._stop = threading.Event()
        self.informers: dict[str, Informer] = {}
        self.status_writer: StatusWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Condition | None = None
        self.services: ServiceTranslator | None = None
        # resources other services follow (CRD identities, ``_identityk8s``):
        # name -> (list call made from the ApiClient, handler); their API may be missing
        self.extra_informers: dict[str, tuple[Any, Any]] = {}
        self.identities: Any = None  # _identityk8s.CRDIdentities: view and faults
        self.entities: Any = None  # _entities.ClusterEntities: view
        self.service_policies = ServicePolicies(policies, store)
        if getattr(config, "kube_proxy_replacement", True):
            self.services = ServiceTranslator(
                lambda: {r.container_id: r.netns_path for r in store.endpoints.values()
                         if r.netns_path})

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, start every informer, return when each first list is applied."""
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Condition()
        api = await asyncio.to_thread(api_client, self.config)
        self.server = str(api.configuration.host)
        self.status_writer = StatusWriter(api, self.node)
        self.status_writer.start()
        calls = listers(api)
        handlers = {"namespaces": self._on_namespaces, "pods": self._on_pods,
                    "nodes": self._on_nodes, "networkpolicies": self._on_policies,
                    "cnps": self._on_policies, "ccnps": self._on_policies,
                    "services": self._on_services, "endpointslices": self._on_services}
        for name, handler in handlers.items():
            self.informers[name] = Informer(name, getattr(calls, name),
                                            self._deliverer(name, handler), self._stop,
                                            optional=name in ("cnps", "ccnps"))
        for name, (make_lister, handler) in self.extra_informers.items():
            self.informers[name] = Informer(name, make_lister(api), self._deliverer(name, handler),
                                            self._stop, optional=True)
        LOG.warning("kubernetes mode: api server %s, node %s: listing", self.server, self.node)
        for inf in self.informers.values():
            inf.start()
        t0 = time.monotonic()
        next_log = t0 + 10
        while not all(i.synced.is_set() for i in self.informers.values()):
            await asyncio.sleep(0.05)
            if time.monotonic() >= next_log:
                next_log += 10
                pending = [n for n, i in self.informers.items() if not i.synced.is_set()]
                LOG.warning("kubernetes: waiting for the first list of %s (%s)",
                            ", ".join(pending), self._last_errors(pending))
        LOG.warning("kubernetes: caches synced in %.2fs: %s", time.monotonic() - t0,
                    ", ".join(f"{n} {len(i.cache)}" for n, i in self.informers.items()))

    async def run(self) -> None:
        await asyncio.Event().wait()  # the informers are threads; nothing to follow here

    def stop(self) -> None:
        self._stop.set()
        for inf in self.informers.values():
            inf.stop()
        if self.status_writer is not None:
            self.status_writer.stop()

    def _last_errors(self, names: Sequence[str]) -> str:
        errs = [f"{n}: {self.informers[n].stats.last_error}" for n in names
                if self.informers[n].stats.last_error]
        return "; ".join(errs) or "no answer yet"

    def listen(self, resource: str, listener: Any) -> None:
        """``await listener(events, initial)`` after each batch of ``resource``
        (``nodes``, ``pods``, ...) is applied to the cache: node routing and
        other nodes' pods (``_routing``, ``_remotepods``)."""
        self.listeners.setdefault(resource, []).append(listener)

    def _deliverer(self, name: str, handler: Any) -> Any:
        """The informer thread's ``deliver``: run ``handler`` (then the
        resource's listeners) on the loop, wait for it."""
        async def handle(events: Sequence[Event], initial: bool) -> None:
            await handler(name, events, initial)
            for listener in self.listeners.get(name, ()):
                await listener(events, initial)

        def deliver(events: Sequence[Event], initial: bool) -> None:
            assert self._loop is not None
            fut = asyncio.run_coroutine_threadsafe(
                tracing.within("k8s.event", handle(events, initial), resource=name,
                               events=len(events), initial=initial), self._loop)
            while True:
                try:
                    fut.result(timeout=1.0)
                    return
                except TimeoutError:
                    if self._stop.is_set():
                        fut.cancel()
                        return
        return deliver

    # -- metadata: what EndpointService reads ----------------------------------------------
    def pod(self, namespace: str, name: str) -> Pod | None:
        meta = self.pods.get(f"{namespace}/{name}")
        return meta.pod if meta is not None else None

    def namespace(self, name: str) -> Namespace | None:
        labels = self.namespaces.get(name)
        return Namespace(name, namespace_labels(name, labels)) if labels is not None else None

    async def wait_for_pod(self, namespace: str, name: str) -> None:
        """CNI ADD: return once the pod and its namespace are in the cache. Not
        there after ``k8s_pod_wait`` seconds: one GET of the pod, then TryAgain
        (CNI error 11: kubelet retries the sandbox)."""
        if self._known(namespace, name):
            return
        assert self._changed is not None
        LOG.info("CNI ADD for %s/%s: not in the cache yet, waiting", namespace, name)
        try:
            async with self._changed:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._known(namespace, name)),
                    timeout=max(0.0, float(self.config.k8s_pod_wait)))
            return
        except TimeoutError:
            pass
        if await self._get_pod(namespace, name) and self._known(namespace, name):
            return
        raise TryAgain(f"pod {namespace}/{name} is not known to the API server yet (waited "
                       f"{self.config.k8s_pod_wait:g}s): its labels are unknown, so its "
                       f"identity is; try again later")

    def _known(self, namespace: str, name: str) -> bool:
        return f"{namespace}/{name}" in self.pods and namespace in self.namespaces

    async def _get_pod(self, namespace: str, name: str) -> bool:
        """One GET of a pod the watch has not brought (yet); it joins the cache."""
        from kubernetes import client

        inf = self.informers.get("pods")
        if inf is None or self.status_writer is None:
            return False
        core: Any = client.CoreV1Api(self.status_writer.api)  # raw answer: untyped
        try:
            resp = await asyncio.to_thread(core.read_namespaced_pod, name, namespace,
                                           _preload_content=False, _request_timeout=(5, 10))
            obj = json.loads(resp.data)
        except Exception as e:
            LOG.info("GET pod %s/%s: %s", namespace, name, e)
            return False
        await self._on_pods("pods", [("ADDED", obj)], False)
        return True

    # -- handlers (on the loop) --------------------------------------------------------------
    async def _notify(self) -> None:
        assert self._changed is not None
        async with self._changed:
            self._changed.notify_all()

    async def _on_namespaces(self, _: str, events: Sequence[Event], initial: bool) -> None:
        changed = set()
        for kind, obj in events:
            name = str((obj.get("metadata") or {}).get("name") or "")
            if kind == "DELETED":
                self.namespaces.pop(name, None)
                continue
            labels = dict((obj.get("metadata") or {}).get("labels") or {})
            if self.namespaces.get(name) != labels:
                if name in self.namespaces:
                    changed.add(name)
                self.namespaces[name] = labels
        if changed:
            LOG.info("namespace labels changed: %s", ", ".join(sorted(changed)))
            await self._relabel(lambda ns, _pod: ns in changed)
        await self._notify()

    async def _on_pods(self, _: str, events: Sequence[Event], initial: bool) -> None:
        changed = set()
        for kind, obj in events:
            key = obj_key(obj)
            if kind == "DELETED":
                # its endpoint (if any) keeps its identity until CNI DEL
                self.pods.pop(key, None)
                continue
            try:
                meta = pod_meta(obj)
            except (InvalidRule, PolicyError, ValueError, StopIteration) as e:
                LOG.warning("pod %s: cannot read it: %s", key, e)
                continue
            old = self.pods.get(key)
            self.pods[key] = meta
            if old is not None and old.identity_key() != meta.identity_key():
                changed.add(key)
            elif old is None and not initial and self._has_endpoint(key):
                changed.add(key)  # deleted and made again before its CNI DEL
        if changed:
            LOG.info("pod labels changed: %s", ", ".join(sorted(changed)))
            await self._relabel(lambda ns, pod: f"{ns}/{pod}" in changed)
        await self._notify()

    def _has_endpoint(self, key: str) -> bool:
        return any(f"{r.namespace}/{r.pod_name}" == key for r in self.store.endpoints.values())

    async def _on_nodes(self, _: str, events: Sequence[Event], initial: bool) -> None:
        for kind, obj in events:
            name = str((obj.get("metadata") or {}).get("name") or "")
            if kind == "DELETED":
                self.nodes.discard(name)
            else:
                self.nodes.add(name)

    async def _on_services(self, informer: str, events: Sequence[Event], initial: bool) -> None:
        await self.service_policies.on_events(informer, events)
        if self.services is not None:
            await self.services.on_events(informer, events)

    async def pod_ready(self, netns_path: str) -> None:
        if self.services is not None and self.services.synced:
            await self.services.endpoint_ready(netns_path)

    async def services_ready(self) -> None:
        """After the endpoints are adopted: translate in every pod's namespace
        from now on (and write their tables now)."""
        if self.services is not None:
            self.services.synced = True
            await self.services.sync()

    async def _relabel(self, which: Any) -> None:
        async with self.store.lock:
            await self.endpoints.relabel(lambda rec: which(rec.namespace, rec.pod_name))
            await self.store.persist(strict=False)

    async def _on_policies(self, informer: str, events: Sequence[Event],
                           initial: bool) -> None:
        kind = POLICY_KINDS[informer]
        parsed: list[tuple[Policy, dict[str, Any]]] = []
        accepted: list[tuple[str, Obj, str]] = []  # key, object, canonical JSON
        removed: list[PolicyRef] = []
        reports: list[PolicyReport | None] = []
        for etype, obj in events:
            ref = _ref(kind, obj)
            key = policy_key(ref)
            if etype == "DELETED":
                self._applied.pop(key, None)
                self.refused.pop(key, None)
                removed.append(ref)
                continue
            doc = policy_document(obj)
            canon = json.dumps(doc, sort_keys=True, default=str)
            if self._applied.get(key) == canon:
                continue  # our own status write, or a resync: nothing new to enforce
            where = f"k8s:{kind.value}/{ref.namespace + '/' if ref.namespace else ''}{ref.name}"
            try:
                pol = parse_policy_obj(doc, where, 0, services=True)
            except (PolicyError, ValueError, TypeError, RecursionError) as e:
                problems = e.problems if isinstance(e, InvalidRule) else [e]
                problem = str(problems[0]) if problems else str(e)
                self.refused[key] = problem
                self._applied[key] = canon
                LOG.error("kubernetes: refusing %s: %s", where,
                          "; ".join(str(p) for p in problems))
                reports.append(self._report(kind, obj, ok=False, error=problem, initial=initial))
                continue
            parsed.append((pol, {"file": where, "index": 0, "obj": doc}))
            accepted.append((key, obj, canon))
        if parsed or removed:
            failed = await self._upsert(parsed, removed)
            for key, obj, canon in accepted:
                error = failed.get(key, "")
                self._applied[key] = canon
                if error:
                    self.refused[key] = error
                else:
                    self.refused.pop(key, None)
                reports.append(self._report(kind, obj, ok=not error, error=error,
                                            initial=initial))
        if self.status_writer is not None:
            for r in reports:
                if r is not None:
                    self.status_writer.submit(r)

    async def _upsert(self, parsed: list[tuple[Policy, dict[str, Any]]],
                      removed: list[PolicyRef]) -> dict[str, str]:
        """Apply as one change; when the engine refuses it, policy by policy, so
        one it refuses does not keep the others out. Returns key -> error."""
        try:
            await self.policies.upsert(parsed, source=SOURCE, remove_refs=removed)
            return {}
        except (PolicyError, ValueError, TypeError) as e:
            LOG.warning("kubernetes: batch of %d policies refused (%s): one by one",
                        len(parsed), e)
        failed = {}
        if removed:
            await self.policies.upsert([], source=SOURCE, remove_refs=removed)
        for pol, doc in parsed:
            try:
                await self.policies.upsert([(pol, doc)], source=SOURCE)
            except (PolicyError, ValueError, TypeError) as e:
                failed[policy_key(pol.ref)] = f"{type(e).__name__}: {e}"
                LOG.error("kubernetes: policy %s refused by the engine: %s", pol.ref, e)
        return failed

    def _report(self, kind: PolicyKind, obj: Obj, ok: bool, error: str,
                initial: bool) -> PolicyReport | None:
        """This node's verdict on a policy, unless its status already says it."""
        meta = obj.get("metadata") or {}
        ref = _ref(kind, obj)
        enforcing = self.policies.engine.get_policy(ref) is not None
        generation = int(meta.get("generation") or 0)
        mine = ((obj.get("status") or {}).get("nodes") or {}).get(self.node) or {}
        conds = (obj.get("status") or {}).get("conditions") or []
        seen_gen = next((c.get("observedGeneration") for c in conds
                         if isinstance(c, dict) and c.get("type") == "Valid"), None)
        if kind is not PolicyKind.NETWORK_POLICY and mine.get("ok") == ok and mine.get("error", "") == error \
                and seen_gen == generation:
            return None  # a restarted agent: the status is already right
        if kind is PolicyKind.NETWORK_POLICY and initial and ok:
            return None  # no status to compare with: no Event storm at every start
        return PolicyReport(kind=kind.value, namespace=ref.namespace, name=ref.name,
                            uid=str(meta.get("uid") or ""), generation=generation, ok=ok,
                            enforcing=enforcing, error=error, revision=self.policies.revision)

    # -- views ---------------------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        infs = {n: i.view() for n, i in self.informers.items()}
        errors = [f"{n}: {v['last_error']}" for n, v in infs.items()
                  if v["last_error"] and not v["connected"]]
        return {"api_server": self.server, "node": self.node,
                "connected": bool(infs) and all(v["connected"] for v in infs.values()),
                "synced": bool(infs) and all(v["synced"] for v in infs.values()),
                "resources": infs, "pods_cached": len(self.pods),
                "namespaces_cached": len(self.namespaces), "nodes": len(self.nodes),
                "services": self.services.view() if self.services is not None else None,
                "to_services": self.service_policies.view(),
                "refused_policies": dict(sorted(dict(self.refused).items())),
                "identities": self.identities.view() if self.identities is not None else None,
                "entities": self.entities.view() if self.entities is not None else None,
                "status_writes": self.status_writer.view() if self.status_writer else {},
                "last_error": errors[-1] if errors else ""}

    def faults(self) -> list[str]:
        v = self.view()
        out = [f"kubernetes {name}: not connected: {r['last_error']}"
               for name, r in v["resources"].items() if not r["connected"]]
        out += [f"kubernetes policy {key} refused: {why}" for key, why in v["refused_policies"].items()]
        if self.identities is not None:
            out += self.identities.faults()
        return out
