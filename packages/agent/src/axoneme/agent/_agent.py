"""The node agent: the composition root.

It builds the services and wires them; none of them imports it:

- ``StateStore`` (``_state``): what the agent knows, its state file, indexes;
- ``Regenerator`` (``_regenerator``): the only writer to the datapath;
- ``L7Proxies`` (``_l7proxies``): proxy ports and listeners for L7 rules;
- ``EndpointService`` (``_endpoints``): CNI ADD/DEL/CHECK/GC, adoption;
- ``PolicyService`` (``_policies``) and its sources (the API, ``--policy-dir``
  through ``PolicyDirWatcher``, the API server through ``KubernetesSource``);
- ``KubernetesSource`` (``_k8s``): Kubernetes mode, policies and pod metadata
  from the API server;
- ``NamespaceService``/``PodService`` (``_workloads``): standalone mode;
- ``FQDNManager`` (``_fqdn``): toFQDNs, pushing through the regenerator;
- ``Views`` (``_views``): status and lists.

All mutations run on the agent's asyncio loop under ``store.lock`` and end
with an atomic write of the state file. docs/architecture.md has the map.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from axoneme.agent import _checkpoint as checkpoint
from axoneme.agent import _gcpause
from axoneme.agent import _netlink as nl
from axoneme.agent import _tracing as tracing
from axoneme.agent import guard as guard_mod
from axoneme.agent._audit import AuditCounter
from axoneme.agent._cniinstall import install_cni
from axoneme.agent._config import LOCK_FILE, AgentConfig
from axoneme.agent._endpoints import EndpointService
from axoneme.agent._entities import ClusterEntities
from axoneme.agent._errors import StateDirLocked
from axoneme.agent._flowattr import FlowAttributor, fqdn_names
from axoneme.agent._flowstore import FlowStore
from axoneme.agent._fqdn import FQDNManager
from axoneme.agent._hostfw import HostFirewall
from axoneme.agent._identityk8s import CRDIdentities
from axoneme.agent._k8s import KubernetesSource
from axoneme.agent._k8sclient import node_name
from axoneme.agent._l7proxies import L7Proxies
from axoneme.agent._metrics import AgentMetrics
from axoneme.agent._noderoutes import NodeRouting, RoutingService
from axoneme.agent._policies import PolicyService, PolicySource
from axoneme.agent._policydir import PolicyDirWatcher
from axoneme.agent._prometheus import AgentStateCollector, MetricsServer
from axoneme.agent._regenerator import Regenerator
from axoneme.agent._remotepods import RemotePods
from axoneme.agent._routing import node_pod_cidr
from axoneme.agent._runtime import PodRuntime
from axoneme.agent._state import StateStore
from axoneme.agent._views import FlowEnricher, Views
from axoneme.agent._workloads import NamespaceService, PodService
from axoneme.core.datapath import Datapath, build_datapath, datapath_class
from axoneme.core.endpoint import Endpoint, host_endpoint
from axoneme.core.errors import ConfigError
from axoneme.core.flow import Flow
from axoneme.core.identity import IdentityAllocator
from axoneme.core.lockfile import LockHeld, PidLock
from axoneme.core.mapstate import MapState
from axoneme.core.plugins import configure, make_plugin_manager
from axoneme.core.policy.engine import EngineOptions, PolicyEngine

LOG = logging.getLogger(__name__)


class Agent:
    """One node agent. ``start()`` then serve the API; ``stop()`` on SIGTERM.

    ``netlink`` is what endpoints use of the kernel (a fake in root-free tests)."""

    def __init__(self, config: AgentConfig, netlink: nl.EndpointNetlink = nl) -> None:
        self.config = config
        if config.plugins is not None:
            configure(config.plugins)  # before anything is loaded: the allow-list
        self.pm = make_plugin_manager()
        try:
            store = self.pm.hook.axoneme_identity_store(config=dataclasses.asdict(config))
        except Exception as e:
            raise ConfigError(f"identity store plugin failed: {e}") from e
        # Kubernetes mode: identities shared through the API server (CiliumIdentity)
        self.crd_identities: CRDIdentities | None = None
        if store is None and config.k8s_mode and config.identity_allocation_mode == "crd":
            self.crd_identities = CRDIdentities(config)
            self.allocator = IdentityAllocator(self.crd_identities.store,
                                               preferred=self.crd_identities.preferred)
        else:
            self.allocator = IdentityAllocator(store)
        self.metrics = AgentMetrics(self._datapath_metrics)
        self.metrics.register(AgentStateCollector(self))
        self.audit_counter = AuditCounter(self.metrics)
        self.metrics_server: MetricsServer | None = None
        self.store = StateStore(config, self.metrics)
        self.proxies = L7Proxies(self.metrics)
        self.engine = PolicyEngine(self.allocator, EngineOptions(
            enforcement_mode=config.enforcement_mode, allow_localhost=config.allow_localhost,
            cluster_name=config.cluster_name, proxy_port=self.proxies.proxy_port,
            cidr_match_mode=config.policy_cidr_match_mode,
            policy_audit_mode=config.policy_audit_mode))
        self.regenerator = Regenerator(self.engine, self.store, self.metrics, self.proxies,
                                       config.policy_map_full)
        self.regenerator.after_regenerate = self._update_gauges
        self.flows = FlowStore(max(1, config.flow_buffer),
                               enrich=FlowAttributor(
                                   FlowEnricher(self.store, self.engine, self.allocator),
                                   self.store, self.engine, node_name(config),
                                   names=lambda ip: fqdn_names(getattr(self, "fqdn", None), ip)),
                               on_flow=self._on_flow)
        hooks = self.pm.hook
        self.endpoints = EndpointService(config, self.store, self.engine, self.allocator,
                                         self.regenerator, netlink, self.metrics, hooks,
                                         self._update_gauges)
        self.policies = PolicyService(config, self.store, self.engine, self.regenerator, hooks)
        self.runtime = PodRuntime(config, self.endpoints.cni_del)
        self.namespaces = NamespaceService(self.store, self.endpoints)
        self.pods = PodService(self.store, self.endpoints, self.runtime)
        self.views = Views(config, self.store, self.engine, self.allocator, self.regenerator,
                           self.proxies, self.policies, self.endpoints, self.flows)
        self.fqdn = FQDNManager(config, self.engine, self.regenerator.regenerate_sync, self.pm,
                                self.store.lock, self.metrics)
        self.proxies.acquire_kwargs = self.fqdn.proxy_kwargs
        # Kubernetes mode: policies and pod/namespace labels from the API server
        self.k8s: KubernetesSource | None = None
        self.entities: ClusterEntities | None = None
        if config.k8s_mode:
            self.k8s = KubernetesSource(config, self.store, self.endpoints, self.policies)
            self.endpoints.metadata = self.views.k8s = self.k8s
            if self.crd_identities is not None:
                self.crd_identities.attach(self.k8s, self.allocator, self.endpoints, self.store)
                self.k8s.identities = self.crd_identities
            # remote-node and kube-apiserver from Nodes and the API server's endpoints
            k8s = self.k8s
            self.entities = ClusterEntities(k8s.node, self.engine, self.regenerator, self.store,
                                            lambda: k8s.server)
            k8s.listen("nodes", self.entities.on_nodes)
            k8s.listen("endpointslices", self.entities.on_slices)
            k8s.entities = self.entities
        # the host firewall: host policies on this node's own endpoint (off by default)
        self.hostfw: HostFirewall | None = None
        if config.host_firewall:
            self.hostfw = HostFirewall(config, self.engine, self.regenerator, self.store,
                                       node=self.k8s.node if self.k8s is not None else "")
            if self.k8s is not None:
                self.k8s.listen("nodes", self.hostfw.on_nodes)
            self.views.hostfw = self.hostfw
        # policy sources besides the API and the API server
        self.policy_sources: list[PolicySource] = []
        if config.policy_dir:
            self.policy_sources.append(PolicyDirWatcher(self.policies, config.policy_dir))
        # Kubernetes mode: other nodes' pods in the ipcache, routes to their pod CIDRs
        self.remote_pods: RemotePods | None = None
        self.routing: RoutingService | None = None
        if self.k8s is not None:
            self.remote_pods = RemotePods(self.k8s, self.engine, self.allocator,
                                          self.regenerator, self.store.lock, config.cluster_name)
            self.k8s.listen("pods", self.remote_pods.on_pods)
            self.k8s.listen("namespaces", self.remote_pods.on_namespaces)
            self.k8s.listen("nodes", self.remote_pods.on_nodes)
            if self.crd_identities is not None and self.crd_identities.node_gc is not None:
                # after RemotePods dropped the Node's pods (and their references)
                self.k8s.listen("nodes", self.crd_identities.node_gc.on_nodes)
            if self.crd_identities is not None:  # a lower duplicate: their pods move too
                self.crd_identities.renumber_hooks.append(self.remote_pods.renumbered)
            self.routing = RoutingService(config.routing_mode, self.k8s.node,
                                          NodeRouting(mtu=config.mtu))
            self.k8s.listen("nodes", self.routing.on_node_events)
            self.views.routing = self.routing
            self.routing.remote_pods = self.remote_pods
        self.datapath_options: dict[str, Any] = {}
        self.store.contribute(self._state_fields)
        self._tasks: list[asyncio.Task[Any]] = []
        self._events_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.adoption = checkpoint.Adoption()  # a restart's background rebuild
        self.adopted = self.adoption.done  # the API's gate (_api)
        self._state_lock: PidLock | None = None

    @property
    def datapath(self) -> Datapath | None:
        return self.regenerator.datapath

    @datapath.setter
    def datapath(self, dp: Datapath | None) -> None:
        self.regenerator.datapath = dp

    @property
    def revision(self) -> int:
        return self.policies.revision

    def _state_fields(self) -> dict[str, Any]:
        """What the agent adds to the state file (``agent cleanup`` reads it)."""
        return {"identities": {str(k): v for k, v in self.allocator.snapshot().items()},
                "datapath_options": self.datapath_options,
                "datapath_mode": str(self.datapath_options.get("mode", "")),
                "bpffs_root": self.config.bpffs_root,
                "l7_proxies": bool(self.proxies.ports),
                # routes/VXLAN device of ours to remove when routing is off (_routing)
                "routing": self.routing.mode if self.routing is not None else ""}

    def make_datapath(self) -> Datapath:
        """The configured datapath, its options checked against what it declares."""
        declared = {o.name for o in datapath_class(self.config.datapath).options}
        self.datapath_options = self.config.datapath_option_values(declared)
        return build_datapath(self.config.datapath, state_dir=self.config.state_dir,
                              pod_cidr=self.config.pod_cidr, options=self.datapath_options)

    # -- startup / shutdown ------------------------------------------------------
    def load_state(self) -> dict[str, Any] | None:
        """Read the state file; StateCorrupt (exit 2) if it cannot be used."""
        return self.store.load()

    async def start(self) -> None:
        """Lock the state dir, load state, probe and start the datapath, adopt
        existing endpoints. StateDirLocked if another agent serves the dir."""
        os.makedirs(self.config.state_dir, mode=0o700, exist_ok=True)
        lock = PidLock(os.path.join(self.config.state_dir, LOCK_FILE))
        try:
            lock.acquire(f"api socket {self.config.api_socket}")
        except LockHeld as e:
            raise StateDirLocked(self.config.state_dir, e) from None
        self._state_lock = lock
        try:
            with _gcpause.paused():  # adopting a large state: see _gcpause
                await self._start()
        except BaseException:
            lock.release()  # a failed start leaves the dir to whoever comes next
            raise

    async def _start(self) -> None:
        config = self.config
        self._start_observability()  # a taken port fails before the kernel is touched
        # the restart checkpoint and its inputs, before anything is written (_checkpoint)
        ckpt = checkpoint.take(config)
        inputs = checkpoint.inputs_fingerprint(config) if ckpt is not None else ""
        saved = self.store.load(trusted=ckpt is not None and ckpt["inputs"] == inputs) or {}
        self.endpoints.restore_ipam()
        # datapath calls never run on the event loop's thread: they block on
        # syscalls (netlink, bpf, child processes)
        self._check_devices()  # before the datapath: bad input changes nothing
        dp = await asyncio.to_thread(self.make_datapath)
        # erased now whatever comes next: only a clean stop leaves one
        stamp = await asyncio.to_thread(dp.take_adopt_stamp)
        await asyncio.to_thread(dp.probe)  # DatapathUnavailable -> exit 1, no fallback
        if self.hostfw is not None and "host_policy" not in dp.capabilities:
            raise ConfigError(f"host_firewall (--enable-host-firewall): the {dp.name} datapath "
                              f"does not enforce host policies (capability host_policy)")
        self.datapath = dp
        why = checkpoint.adoptable(ckpt, inputs, stamp, self._not_adoptable())
        if self.store.saved_identities:
            self.allocator.restore(self.store.saved_identities)
            self.store.saved_identities = {}  # the allocator has them (100k lists at scale)
        await asyncio.to_thread(
            self.proxies.setup, enabled=config.l7_proxies, state_dir=config.state_dir,
            store=self.store, identity_of_ip=self.engine.identity_of_ip, policy_of=self._policy_of,
            flow_sink=self.flows.add, identity_marks="proxy_identity_mark" in dp.capabilities,
            http_engine=config.l7_http_engine)
        if why:
            self.policies.restore()
            self.fqdn.start()  # restored DNS names are in the engine before endpoints sync
        if config.guard:
            await asyncio.to_thread(guard_mod.install, config.pod_cidr, config.state_dir)
            self.views.guard_installed = True
        nl.enable_forwarding()
        await asyncio.to_thread(nl.warm_up)
        if self.routing is None and saved.get("routing"):
            # routing was on (Kubernetes mode) and is not now: what it made goes
            await asyncio.to_thread(NodeRouting().cleanup)
        await asyncio.to_thread(self.regenerator.call, dp.start)
        await self._wire_node_devices(dp)
        if why:
            await self._adopt_state(dp)
            await self.store.persist()
            self._update_gauges()
        else:  # the API waits for it (_api's gate), /v1/healthz does not
            self.adoption.begin(lambda: self._rebuild(dp), self._started_hook)
        self.flows.bind_loop(asyncio.get_running_loop())
        self._start_events(dp)
        self.views.started = time.time()
        if config.install_cni:
            install_cni(config)
        self._tasks.append(asyncio.create_task(self._tick()))
        for source in self.policy_sources:
            await source.start()
            self._tasks.append(asyncio.create_task(source.run()))
        if why:
            await self._started_hook()

    def _not_adoptable(self) -> str:
        """Why this agent never adopts at once: sources read after the start."""
        return ("Kubernetes mode" if self.k8s is not None else "a policy directory"
                if self.policy_sources else "the host firewall" if self.hostfw else "")

    async def _adopt_state(self, dp: Datapath) -> None:
        """Undo interrupted work, adopt the endpoints, the kernel holds their policy."""
        await self.endpoints.reconcile_interrupted()
        await self.pods.reconcile_interrupted()
        # the node's addresses are the host entity, for every datapath
        self.engine.set_host_addresses(
            await asyncio.to_thread(nl.host_addresses, self.config.pod_cidr))
        if self.k8s is not None:
            # every resource listed before endpoints are adopted or served: an
            # empty cache would give them wrong identities and no policy
            await self.k8s.start()
            self._use_node_pod_cidr()
            self._tasks.append(asyncio.create_task(self.k8s.run()))
            if self.crd_identities is not None and self.crd_identities.gc is not None:
                self._tasks.append(asyncio.create_task(self.crd_identities.run()))
        await self.endpoints.adopt()
        if self.hostfw is not None:
            await self.hostfw.start()
        elif "host_policy" in dp.capabilities:
            # a previous run's host firewall must not keep enforcing a stale policy
            await asyncio.to_thread(self.regenerator.call, dp.endpoint_removed, host_endpoint({}))
        if self.k8s is not None:
            await self.k8s.services_ready()

    async def _started_hook(self) -> None:
        try:
            status = await asyncio.to_thread(self.views.status)
            self.pm.hook.axoneme_agent_started(status=status)
        except Exception:
            LOG.warning("axoneme_agent_started hook failed", exc_info=True)

    async def _rebuild(self, dp: Datapath) -> None:
        async with self.store.lock, _gcpause.paused_async():  # as _start's (see _gcpause)
            await asyncio.to_thread(self.policies.restore)
            self.fqdn.start()
            await self._adopt_state(dp)
            await self.store.persist()
            self._update_gauges()

    def _check_devices(self) -> None:
        """Every configured device exists in this network namespace (ConfigError)."""
        for name in self.config.devices or []:
            try:
                socket.if_nametoindex(name)
            except OSError:
                raise ConfigError(f"devices (--devices): no interface {name!r} in this "
                                  f"network namespace") from None

    async def _wire_node_devices(self, dp: Datapath) -> None:
        """The node's devices for the datapath (``Datapath.node_devices``): the
        configured ``devices``; in Kubernetes mode also the device of this
        node's address and, in tunnel routing, the VXLAN device, which is
        collect_md when the datapath carries identities in it
        (``tunnel_identity``): routing names them after each change."""
        extra = list(self.config.devices or [])
        if self.routing is None:
            if extra:
                await asyncio.to_thread(self.regenerator.call, dp.node_devices, extra)
            return
        self.routing.kernel.external = "tunnel_identity" in dp.capabilities
        self.routing.devices_hook = lambda devs: self.regenerator.call(
            dp.node_devices, list(dict.fromkeys([*extra, *devs])))

    def _use_node_pod_cidr(self) -> None:
        """Kubernetes mode: pod IPs come from this Node's spec.podCIDR (Cilium's
        Kubernetes IPAM), so the nodes of one cluster never share an address
        and the other nodes' routes (``_routing``) point at the right node."""
        assert self.k8s is not None
        nodes = self.k8s.informers["nodes"].cache.values()
        cidr, why = node_pod_cidr(nodes, self.k8s.node, self.config.pod_cidr)
        if cidr is None:
            LOG.warning("pod IPs from pod_cidr %s, not this node's: %s", self.config.pod_cidr, why)
            self.endpoints.use_pod_cidr(self.config.pod_cidr, "config", why)
            return
        LOG.warning("pod IPs from node %s's pod CIDR %s", self.k8s.node, cidr)
        self.endpoints.use_pod_cidr(cidr, "node")

    def _start_observability(self) -> None:
        """--prometheus-serve-addr and --otlp-endpoint (ConfigError: exit 2)."""
        config = self.config
        if config.otlp_endpoint:
            tracing.configure(config.otlp_endpoint,
                              node=config.k8s_node_name or os.uname().nodename,
                              l7_sample_ratio=config.otlp_l7_sample_ratio)
        if config.prometheus_serve_addr:
            self.metrics_server = MetricsServer(config.prometheus_serve_addr,
                                                self.metrics.registry)
            self.metrics_server.start()

    def _policy_of(self, ep: Endpoint) -> MapState | None:
        try:
            return self.engine.resolve(ep.id)
        except Exception:
            return None

    def _start_events(self, dp: Datapath) -> None:
        if dp.capabilities and "events" not in dp.capabilities:
            return  # it says it has none

        def pump() -> None:
            try:
                for flow in dp.events():
                    if self._stopping.is_set():
                        break
                    self.flows.add(flow)
            except Exception:
                if not self._stopping.is_set():
                    LOG.exception("datapath event reader failed")

        self._events_thread = threading.Thread(target=pump, name="axoneme-events", daemon=True)
        self._events_thread.start()

    async def stop(self) -> None:
        """Clean shutdown: stop readers; kernel enforcement stays in place."""
        self._stopping.set()
        await self.adoption.finish()
        if self.k8s is not None:
            self.k8s.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        await self.fqdn.stop()
        if self.datapath is not None:
            try:
                await asyncio.to_thread(self.regenerator.call, self.datapath.stop)
            except Exception:
                LOG.exception("datapath stop failed")
        await asyncio.to_thread(self.proxies.stop)
        if self.metrics_server is not None:
            await asyncio.to_thread(self.metrics_server.stop)
        await asyncio.to_thread(tracing.shutdown)
        try:
            async with self.store.lock:
                await self.store.persist()
                await asyncio.to_thread(self._write_checkpoint)
        except Exception:
            LOG.exception("final state write failed")
        if self._state_lock is not None:
            self._state_lock.release()

    def _write_checkpoint(self) -> None:
        regen, dp = self.regenerator, self.datapath
        checkpoint.leave(self.config, dp, self._not_adoptable() or (
            "the datapath did not start" if dp is None else "the policy state was still "
            "being rebuilt" if not self.adopted.is_set() else "datapath writes wait for a "
            "retry" if regen.behind or regen.fail_closed else "policy changes not written"
            if self.engine.pending_size() else self.store.error))

    # -- the periodic tick ------------------------------------------------------------
    async def _tick(self) -> None:
        """Every second: reap pods, follow the node's addresses, retry what the
        datapath or the state file refused, revive dead proxies."""
        while True:
            await asyncio.sleep(1.0)
            self.pods.refresh_all()
            await self._refresh_host_addresses()
            try:
                await self.regenerator.retry()
            except Exception:
                LOG.warning("datapath retry failed", exc_info=True)
            await self.store.retry_persist()
            self.proxies.revive()

    async def _refresh_host_addresses(self) -> None:
        """Addresses come and go (links added after start): keep host (1) current."""
        try:
            addrs = await asyncio.to_thread(nl.host_addresses, self.config.pod_cidr)
        except Exception:
            LOG.debug("listing the node's addresses failed", exc_info=True)
            return
        async with self.store.lock:
            if self.engine.set_host_addresses(addrs):
                LOG.info("node addresses changed: %s", ", ".join(addrs))
                await self.regenerator.regenerate()

    # -- wiring helpers -----------------------------------------------------------------
    def _datapath_metrics(self) -> Mapping[str, float]:
        dp = self.datapath
        return dp.metrics() if dp is not None else {}

    def _on_flow(self, flow: Flow) -> None:
        self.metrics.observe_flow(flow)
        self.audit_counter.observe(flow)
        if flow.type == "L7":
            tracing.l7_decision(flow)
        try:
            self.pm.hook.axoneme_flow_observed(flow=flow)
        except Exception:
            LOG.debug("flow hook failed", exc_info=True)

    def _update_gauges(self) -> None:
        self.metrics.endpoints.set(len(self.store.endpoints))
        self.metrics.identities.set(len(self.allocator.snapshot()))
        self.metrics.policy_revision.set(self.revision)
