"""The node agent: namespaces, pods, endpoints, IPAM, identities, policies, flows.

All mutations run on the agent's asyncio loop under one ``asyncio.Lock`` and
end with an atomic write of the state file, so a SIGKILL at any moment leaves
either the state before or after the operation. Blocking datapath calls run
in a worker thread, serialised by ``_dp_lock``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from axoneme.agent import _netlink as nl
from axoneme.agent import guard as guard_mod
from axoneme.agent._flowstore import DEFAULT_FLOW_BUFFER, FlowStore
from axoneme.agent._ipam import IPAM
from axoneme.agent._metrics import AgentMetrics
from axoneme.agent._statefile import StateCorrupt, read_agent_state, read_json, write_json_atomic
from axoneme.agent.client import DEFAULT_SOCKET
from axoneme.core.datapath import Datapath, DatapathConfig, IPCacheChanges
from axoneme.core.endpoint import Endpoint, NamedPort
from axoneme.core.errors import (
    AxonemeError,
    ConfigError,
    DatapathError,
    MapFullError,
    PolicyError,
)
from axoneme.core.failpoints import failpoint
from axoneme.core.flow import Flow, FlowEndpoint
from axoneme.core.identity import Identity
from axoneme.core.labels import Labels, valid_label_key, valid_label_value
from axoneme.core.lockfile import LockHeld, PidLock
from axoneme.core.mapstate import MapChanges, MapState
from axoneme.core.names import (
    container_id_problem,
    dns_label_problem,
    dns_subdomain_problem,
    ifname_problem,
)

LOG = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/var/lib/axoneme"
STATE_FILE = "state.json"
LOCK_FILE = "agent.lock"  # flock held by the agent serving the state dir
DROPPED_POLICIES_FILE = "dropped-policies.json"  # --drop-unparseable-policies keeps them here
STATE_VERSION = 1
DNS_SERVER = "198.51.100.53"  # a test-net address: pods never use the host's resolver


class BadRequest(AxonemeError):
    """Bad input from an API client (HTTP 400, CLI exit 2)."""

    def __init__(self, message: str, problems: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        super().__init__(message)


class NotFound(BadRequest):
    """HTTP 404."""


class PersistedPolicyError(AxonemeError):
    """Persisted policies no longer parse: the agent refuses to start (exit 1)
    rather than stop enforcing them without a word."""

    def __init__(self, state_file: str, bad: Sequence[tuple[str, str]]) -> None:
        self.bad = list(bad)
        which = "; ".join(f"persisted policy {key} no longer parses: {why}"
                          for key, why in self.bad)
        super().__init__(
            f"{which} (state {state_file}); refusing to start rather than stop enforcing "
            f"{'it' if len(self.bad) == 1 else 'them'}. Fix the document in the state file, "
            f"or start once with `axoneme agent run --drop-unparseable-policies` (drops "
            f"{'it' if len(self.bad) == 1 else 'them'} loudly, keeps a copy in "
            f"{os.path.join(os.path.dirname(state_file), DROPPED_POLICIES_FILE)} and lists "
            f"{'it' if len(self.bad) == 1 else 'them'} in `axoneme status`), then apply a "
            f"corrected version")


def _problem_text(err: BaseException, limit: int = 5) -> str:
    """``field: problem; ...`` of a parse error (at most ``limit`` problems)."""
    problems = getattr(err, "problems", None)
    if problems:
        parts = [f"{p.field}: {p.message}" if getattr(p, "field", "") else str(getattr(p, "message", p))
                 for p in problems[:limit]]
        more = len(problems) - limit
        return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= 300 else text[:300] + "..."


class StateDirLocked(AxonemeError):
    """Another agent serves this state dir (``agent run`` exits 1)."""

    def __init__(self, state_dir: str, err: LockHeld) -> None:
        self.state_dir = state_dir
        self.pid = err.pid
        who = f"agent pid {err.pid}" if err.pid else "another agent"
        if err.info:
            who += f" ({err.info})"
        super().__init__(f"state dir {state_dir} is in use by {who}; two agents on one "
                         f"state dir overwrite each other's state: stop it first or use "
                         f"another --state-dir")


class StateWriteError(AxonemeError):
    """The state file could not be written; the change that needed it is refused."""


class Conflict(BadRequest):
    """HTTP 409."""


@dataclass
class AgentConfig:
    datapath: str = "ebpf"
    iptables_mode: str = "plain"
    state_dir: str = DEFAULT_STATE_DIR
    api_socket: str = DEFAULT_SOCKET
    policy_dir: str | None = None
    install_cni: bool = False
    pod_cidr: str = "10.244.0.0/16"
    flow_buffer: int = DEFAULT_FLOW_BUFFER
    guard: bool = True
    enforcement_mode: str = "default"
    allow_localhost: str = "auto"
    cluster_name: str = "default"
    cni_bin: str | None = None
    dns_server: str = DNS_SERVER
    mtu: int = 1500
    l7_proxies: bool = True  # run the installed axoneme.l7 proxies for L7 rules
    tofqdns_min_ttl: int = 0  # lower bound on DNS TTLs for toFQDNs (Cilium --tofqdns-min-ttl)
    dns_reject_rcode: str = "REFUSED"  # answer to a denied DNS query: REFUSED or NXDOMAIN
    bpffs_root: str = "/sys/fs/bpf/axoneme"  # where a BPF datapath pins its maps
    policy_map_max: int = 16384  # policy entries per endpoint (Cilium --bpf-policy-map-max)
    # a persisted policy that no longer parses: refuse to start (False) or drop it loudly
    drop_unparseable_policies: bool = False
    # a policy that does not fit an endpoint's policy map: fail-closed | keep-last
    policy_map_full: str = "fail-closed"
    datapath_options: dict[str, Any] = field(default_factory=dict)
    # POST /v1/flows: add flow records by hand. Off: any client of the socket
    # could forge the audit trail. Only tests of `observe` turn it on (config
    # file key, no flag).
    flow_injection: bool = False

    @property
    def state_file(self) -> str:
        return os.path.join(self.state_dir, STATE_FILE)


# -- records (agent-internal, persisted as JSON) ---------------------------------

@dataclass
class PodRecord:
    name: str
    namespace: str
    labels: dict[str, str]
    ports: list[str] = field(default_factory=list)  # name:port/proto
    service_account: str = "default"
    container_id: str = ""
    netns: str = ""
    command: list[str] = field(default_factory=list)
    cwd: str = "/"
    pid: int = 0
    pid_start: int = 0
    log: str = ""
    status: str = "Creating"
    exit_code: int | None = None
    created: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def named_ports(self) -> tuple[NamedPort, ...]:
        return tuple(parse_port(p) for p in self.ports)


@dataclass
class EndpointRecord:
    id: int
    container_id: str
    ifname: str
    netns_path: str
    namespace: str
    pod_name: str
    ipv4: str
    network: str = ""
    host_ifname: str = ""
    host_ifindex: int = 0
    host_mac: str = ""
    pod_mac: str = ""
    identity: int = 0
    status: str = "ready"
    created: float = 0.0
    ready_ms: float = 0.0  # CNI ADD received -> policy in force in the datapath


def parse_labels(items: Sequence[str] | str | None) -> dict[str, str]:
    """``k=v,...`` (or a list of ``k=v``) into a dict; BadRequest naming a bad label."""
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    out: dict[str, str] = {}
    for chunk in items:
        for text in chunk.split(","):
            text = text.strip()
            if not text:
                continue
            key, sep, value = text.partition("=")
            if not sep or not valid_label_key(key) or not valid_label_value(value):
                raise BadRequest(f"invalid label {text!r}: expected key=value with a Kubernetes "
                                 f"label key and value")
            out[key] = value
    return out


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str) or not valid_label_key(key) \
                or not valid_label_value(value):
            raise BadRequest(f"invalid label {key}={value!r}")
    return dict(labels)


def parse_port(text: str) -> NamedPort:
    """``name:port[/proto]`` (``port[/proto]`` without a name)."""
    name, sep, rest = text.rpartition(":")
    if not sep:
        name, rest = "", text
    port_s, _, proto = rest.partition("/")
    proto = (proto or "TCP").upper()
    try:
        port = int(port_s)
    except ValueError:
        raise BadRequest(f"invalid port {text!r}: expected name:port/proto") from None
    if not 0 < port < 65536 or proto not in ("TCP", "UDP", "SCTP"):
        raise BadRequest(f"invalid port {text!r}: expected name:port/proto (TCP, UDP or SCTP)")
    return NamedPort(name, port, proto)


def _proc_start(pid: int) -> int:
    """Start time of a process (clock ticks since boot): tells a PID's reuse apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        return int(data.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def process_alive(pid: int, start: int) -> bool:
    if pid <= 0:
        return False
    now = _proc_start(pid)
    if now == 0 or (start and now != start):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def netns_name(namespace: str, pod: str) -> str:
    short = f"{namespace[:8]}-{pod[:20]}".replace("/", "-")
    return f"axon-{short}-{secrets.token_hex(3)}"


class Agent:
    """One node agent. ``start()`` then serve the API; ``stop()`` on SIGTERM."""

    def __init__(self, config: AgentConfig) -> None:
        from axoneme.core.plugins import make_plugin_manager
        from axoneme.core.policy.engine import EngineOptions, PolicyEngine

        self.config = config
        self.lock = asyncio.Lock()
        self._dp_lock = threading.Lock()
        self.pm = make_plugin_manager()
        store = None
        try:
            store = self.pm.hook.axoneme_identity_store(config=dataclasses.asdict(config))
        except Exception as e:
            raise ConfigError(f"identity store plugin failed: {e}") from e
        from axoneme.core.identity import IdentityAllocator

        self.allocator = IdentityAllocator(store)
        self.proxies: Any = None  # ProxyManager, built at start when L7 parsers are installed
        self.fqdn: Any = None  # FQDNManager (toFQDNs), built at start
        self._proxy_ports: dict[tuple[str, int], int] = {}
        self._proxies_wanted: set[tuple[str, int]] = set()
        self.engine = PolicyEngine(self.allocator, EngineOptions(
            enforcement_mode=config.enforcement_mode, allow_localhost=config.allow_localhost,
            cluster_name=config.cluster_name, proxy_port=self._proxy_port))
        self.datapath: Datapath | None = None
        self.ipam = IPAM(config.pod_cidr)
        self.namespaces: dict[str, dict[str, str]] = {"default": {}}
        self.pods: dict[str, PodRecord] = {}
        self.endpoints: dict[str, EndpointRecord] = {}  # container id -> record
        self.endpoint_objs: dict[int, Endpoint] = {}
        self.next_endpoint_id = 1
        # policy ref key -> {"doc": {...}, "source": "api"|path, "revision": n}
        self.policy_docs: dict[str, dict[str, Any]] = {}
        self.metrics = AgentMetrics(self._datapath_metrics)
        self.flows = FlowStore(max(1, config.flow_buffer), enrich=self.enrich_flow,
                               on_flow=self._on_flow)
        self._children: dict[int, Any] = {}  # pid -> Popen (reaped by the monitor)
        self._tasks: list[asyncio.Task[Any]] = []
        self._events_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.guard_installed = False
        self.started = 0.0
        self.policy_dir_errors: dict[str, list[str]] = {}
        self._ip_index: dict[str, EndpointRecord] = {}
        # the engine counts revisions from 0 on every start; the agent's
        # revision continues from the persisted one
        self.rev_base = 0
        self._saved_revision = 0
        self._enforcement: dict[int, tuple[bool, bool]] = {}  # what the datapath was told
        self._deleting: set[str] = set()
        self._state_lock: PidLock | None = None
        self.dropped_policies: list[dict[str, Any]] = []  # --drop-unparseable-policies
        # what the datapath refused, kept until it is written (see _regenerate_sync)
        self._ipcache_pending: IPCacheChanges | None = None
        self._ipcache_error = ""
        self._ipcache_failures = 0
        self._resync: set[int] = set()  # endpoints whose kernel policy is not the resolved one
        self._fail_closed: dict[int, frozenset[Any]] = {}  # endpoint id -> directions
        self._fail_closed_reason: dict[int, str] = {}
        self._retry_delay = 1.0
        self._retry_at = 0.0
        self._state_error = ""  # the last state write failure, until a write works

    @property
    def revision(self) -> int:
        return self.rev_base + self.engine.revision

    # -- startup / shutdown ------------------------------------------------------
    def load_state(self) -> dict[str, Any] | None:
        """Read the state file; StateCorrupt (exit 2) if it cannot be used."""
        path = self.config.state_file
        data = read_agent_state(path)  # shape checked: StateCorrupt naming the field
        if data is None:
            return None
        try:
            version = int(data.get("version", 0))
            if version != STATE_VERSION:
                raise StateCorrupt(path, f"unknown state version {version}")
            namespaces = {str(k): dict(v) for k, v in data.get("namespaces", {}).items()}
            pods = {k: PodRecord(**v) for k, v in data.get("pods", {}).items()}
            endpoints = {k: EndpointRecord(**v) for k, v in data.get("endpoints", {}).items()}
            identities = {int(k): list(v) for k, v in data.get("identities", {}).items()}
            policies = dict(data.get("policies", {}))
            next_id = int(data.get("next_endpoint_id", 1))
            self._saved_revision = int(data.get("policy_revision", 0))
        except StateCorrupt:
            raise
        except (TypeError, ValueError, AttributeError) as e:
            raise StateCorrupt(path, f"unexpected content: {e}") from e
        self.namespaces = namespaces or {"default": {}}
        self.pods = pods
        self.endpoints = endpoints
        self.next_endpoint_id = max([next_id, *[e.id + 1 for e in endpoints.values()]])
        self._identities_saved = identities
        self.policy_docs = policies
        self._recorded_datapath = data.get("datapath")
        return data

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "datapath": self.config.datapath,
            "datapath_mode": self.config.iptables_mode if self.config.datapath == "iptables" else "",
            "pod_cidr": self.config.pod_cidr,
            "bpffs_root": self.config.bpffs_root,
            "api_socket": self.config.api_socket,
            "guard": self.config.guard,
            "l7_proxies": bool(self._proxy_ports),
            "next_endpoint_id": self.next_endpoint_id,
            "namespaces": self.namespaces,
            "pods": {k: dataclasses.asdict(v) for k, v in self.pods.items()},
            "endpoints": {k: dataclasses.asdict(v) for k, v in self.endpoints.items()},
            "identities": {str(k): v for k, v in self.allocator.snapshot().items()},
            "policies": {k: v for k, v in self.policy_docs.items() if v.get("source") == "api"},
            "policy_revision": self.revision,
        }

    async def persist(self, strict: bool = True) -> None:
        """Write the state file. A failure is remembered (status names it, the
        periodic tick writes again) and raised as StateWriteError, unless
        ``strict`` is false: then the caller goes on and the tick retries."""
        data = self.state_dict()
        try:
            failpoint("state.write", OSError)
            await asyncio.to_thread(write_json_atomic, self.config.state_file, data)
        except OSError as e:
            first = not self._state_error
            self._state_error = f"cannot write {self.config.state_file}: {e}"
            self.metrics.errors.labels(op="state_write").inc()
            if first:
                LOG.error("%s (written again every second until it works)", self._state_error)
            if strict:
                raise StateWriteError(self._state_error) from e
            return
        if self._state_error:
            LOG.warning("state file written again after: %s", self._state_error)
            self._state_error = ""

    async def _retry_persist(self) -> None:
        if self._state_error:
            async with self.lock:
                await self.persist(strict=False)

    def make_datapath(self) -> Datapath:
        from axoneme.core.plugins import load_driver

        mode = self.config.iptables_mode if self.config.datapath == "iptables" else ""
        cfg = DatapathConfig(state_dir=self.config.state_dir, mode=mode,
                             pod_cidr=self.config.pod_cidr, bpffs_root=self.config.bpffs_root,
                             policy_map_max=self.config.policy_map_max,
                             options=dict(self.config.datapath_options))
        dp: Datapath = load_driver("axoneme.datapath", self.config.datapath, cfg)
        return dp

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
            await self._start()
        except BaseException:
            lock.release()  # a failed start leaves the dir to whoever comes next
            raise

    async def _start(self) -> None:
        self.load_state()
        self.ipam = IPAM(self.config.pod_cidr,
                         {e.ipv4: e.container_id for e in self.endpoints.values() if e.ipv4})
        # datapath calls never run on the event loop's thread: some use
        # synchronous pyroute2, which runs an event loop of its own
        dp = await asyncio.to_thread(self.make_datapath)
        await asyncio.to_thread(dp.probe)  # DatapathUnavailable -> exit 1, no fallback
        self.datapath = dp
        if getattr(self, "_identities_saved", None):
            self.allocator.restore(self._identities_saved)
        await asyncio.to_thread(self._setup_proxies)
        self._restore_policies()
        from axoneme.agent._fqdn import FQDNManager

        self.fqdn = FQDNManager(self)
        self.fqdn.start()  # restored DNS names are in the engine before endpoints sync
        if self.config.guard:
            await asyncio.to_thread(guard_mod.install, self.config.pod_cidr, self.config.state_dir)
            self.guard_installed = True
        nl.enable_forwarding()
        await asyncio.to_thread(nl.warm_up)
        await asyncio.to_thread(self._dp_call, dp.start)
        await self._reconcile_interrupted()
        # the node's addresses are the host entity, for every datapath
        self.engine.set_host_addresses(await asyncio.to_thread(nl.host_addresses, self.config.pod_cidr))
        await self._adopt_endpoints()
        self.flows.bind_loop(asyncio.get_running_loop())
        self._start_events()
        await self.persist()
        self.started = time.time()
        self._update_gauges()
        if self.config.install_cni:
            from axoneme.agent._cniinstall import install_cni

            install_cni(self.config)
        self._tasks.append(asyncio.create_task(self._monitor_pods()))
        if self.config.policy_dir:
            from axoneme.agent._policydir import PolicyDirWatcher

            watcher = PolicyDirWatcher(self, self.config.policy_dir)
            await watcher.scan()
            self._tasks.append(asyncio.create_task(watcher.run()))
        try:
            status = await asyncio.to_thread(self.status)
            self.pm.hook.axoneme_agent_started(status=status)
        except Exception:
            LOG.warning("axoneme_agent_started hook failed", exc_info=True)

    # -- L7 proxies -------------------------------------------------------------------
    def _setup_proxies(self) -> None:
        """A ProxyManager for the installed ``axoneme.l7`` parsers (listeners start lazily)."""
        from axoneme.core.plugins import GROUP_L7, installed

        parsers = sorted(installed(GROUP_L7))
        if not self.config.l7_proxies or not parsers:
            return
        try:
            from axoneme.agent.proxy import (
                ProxyManager,
                RedirectRules,
                chain_for_state_dir,
                make_policy_for,
            )
            from axoneme.core.mapstate import Protocol

            def endpoint_by_ip(ip: str) -> Endpoint | None:
                rec = self._ip_index.get(ip)
                return self.endpoint_objs.get(rec.id) if rec is not None else None

            def policy_of(ep: Endpoint) -> MapState | None:
                try:
                    return self.engine.resolve(ep.id)
                except Exception:
                    return None

            policy_for = {
                parser: make_policy_for(
                    parser, endpoint_by_ip=endpoint_by_ip,
                    identity_of_ip=self.engine.identity_of_ip, policy_of=policy_of,
                    protocol=Protocol.UDP if parser == "dns" else Protocol.TCP)
                for parser in parsers}
            # one redirect chain per agent: agents sharing a host never flush each other's
            rules = RedirectRules(chain=chain_for_state_dir(self.config.state_dir))
            self.proxies = ProxyManager(policy_for, self.flows.add, rules=rules)
        except Exception as e:
            LOG.warning("L7 proxies disabled: %s", e)
            self.proxies = None

    def _proxy_port(self, parser: str, direction: Any) -> int:
        """EngineOptions.proxy_port: a fixed port per parser and direction.

        Called inside the engine's resolution, so it never blocks: the
        listener is started by ``_start_wanted_proxies`` before the datapath
        is told to redirect (a proxy that cannot start leaves the traffic
        redirected to nothing: L7 rules fail closed)."""
        from axoneme.core.mapstate import Direction
        from axoneme.core.policy._resolve import default_proxy_port

        d = Direction(int(direction))
        port = default_proxy_port(parser, d) + (100 if d is Direction.EGRESS else 0)
        key = (parser, int(d))
        if key not in self._proxy_ports:
            self._proxy_ports[key] = port
            self._proxies_wanted.add(key)
        return port

    def _start_wanted_proxies(self) -> None:
        """Start listeners handed out by ``_proxy_port`` (worker thread, no engine lock held)."""
        from axoneme.core.mapstate import Direction

        while self._proxies_wanted:
            parser, d = self._proxies_wanted.pop()
            if self.proxies is None:
                LOG.error("L7 rules for %s need a proxy, but L7 proxies are disabled or not "
                          "installed: that traffic is dropped", parser)
                continue
            try:
                self.proxies.acquire(parser, Direction(d), port=self._proxy_ports[(parser, d)],
                                     **(self.fqdn.proxy_kwargs(parser) if self.fqdn else {}))
            except Exception as e:
                LOG.error("cannot start the %s %s proxy: %s", parser, Direction(d), e)
                self.metrics.errors.labels(op="proxy").inc()

    def _restore_policies(self) -> None:
        """Put the persisted policies back in the engine.

        A policy that no longer parses (e.g. an upgrade tightened validation)
        is never dropped silently: its deny or default-deny would stop being
        enforced. The start is refused (PersistedPolicyError, exit 1) naming
        each one, unless the agent runs with ``--drop-unparseable-policies``:
        then each is dropped loudly, its document kept in
        ``dropped-policies.json`` of the state dir and listed in status.
        """
        from axoneme.core.policy.parse import parse_policy_obj

        def revision(kv: tuple[str, Any]) -> int:
            try:
                return int(kv[1].get("revision", 0))
            except (AttributeError, TypeError, ValueError):
                return 0

        bad: list[tuple[str, Any, str]] = []
        for key, rec in sorted(self.policy_docs.items(), key=revision):
            try:
                doc = rec.get("doc", {})
                pol = parse_policy_obj(doc.get("obj"), doc.get("file", "<state>"),
                                       int(doc.get("index", 0)))
            except (PolicyError, AttributeError, TypeError, ValueError, RecursionError) as e:
                bad.append((key, rec, _problem_text(e)))
                continue
            self.engine.upsert_policy(pol)
        if bad and not self.config.drop_unparseable_policies:
            raise PersistedPolicyError(self.config.state_file, [(k, why) for k, _, why in bad])
        if bad:
            saved = os.path.join(self.config.state_dir, DROPPED_POLICIES_FILE)
            try:
                kept = read_json(saved) or {}
            except StateCorrupt:
                kept = {}
            for key, rec, why in bad:
                LOG.error("persisted policy %s no longer parses: %s; DROPPED as asked "
                          "(--drop-unparseable-policies): it is no longer enforced; its "
                          "document is kept in %s", key, why, saved)
                del self.policy_docs[key]
                kept[key] = {"record": rec, "problem": why, "dropped_at": time.time()}
                self.dropped_policies.append({"policy": key, "problem": why, "saved_to": saved})
            write_json_atomic(saved, kept)
        self.rev_base = max(0, self._saved_revision - self.engine.revision)

    async def _reconcile_interrupted(self) -> None:
        """Undo what a killed agent left half-done (write-ahead records).

        - an endpoint still ``creating``: its veth (by name) is removed and
          its IP released; the runtime retries ADD.
        - a pod still ``Creating`` without a ready endpoint: `pod run` failed
          for its caller, so everything of it goes.
        - a pod ``Deleting``: the deletion is finished.
        """
        from axoneme.agent._runtime import PodRuntime

        for rec in [r for r in self.endpoints.values() if r.status == "creating"]:
            LOG.warning("endpoint %d (%s) was being created when the agent stopped: removing it",
                        rec.id, rec.container_id[:12])
            await asyncio.to_thread(nl.teardown_endpoint, rec.host_ifname)
            await self._forget_in_datapath(rec)
            self.ipam.release(rec.ipv4)
            del self.endpoints[rec.container_id]
        for key, pod in list(self.pods.items()):
            ep = self.endpoints.get(pod.container_id) if pod.container_id else None
            if pod.status == "Deleting" or (pod.status == "Creating" and ep is None):
                LOG.warning("pod %s was %s when the agent stopped: removing it", key,
                            pod.status.lower())
                await PodRuntime(self).stop_pod(pod, cni_del=False)
                if ep is not None:
                    await asyncio.to_thread(nl.teardown_endpoint, ep.host_ifname)
                    await self._forget_in_datapath(ep)
                    self.ipam.release(ep.ipv4)
                    del self.endpoints[ep.container_id]
                host = nl.host_ifname(pod.container_id) if pod.container_id else ""
                if host and nl.link_index(host):
                    await asyncio.to_thread(nl.teardown_endpoint, host)
                del self.pods[key]
            elif pod.status == "Creating":
                # the endpoint was ready; only the process start may be missing
                pod.status = "Running" if process_alive(pod.pid, pod.pid_start) else "Failed"

    async def _forget_in_datapath(self, rec: EndpointRecord) -> None:
        """Drop whatever the datapath may hold for an endpoint we will not adopt."""
        if self.datapath is None:
            return
        ep = Endpoint(id=rec.id, identity=rec.identity, labels=Labels(), ipv4=rec.ipv4,
                      host_ifname=rec.host_ifname, host_ifindex=rec.host_ifindex,
                      namespace=rec.namespace, pod_name=rec.pod_name,
                      container_id=rec.container_id)
        try:
            await asyncio.to_thread(self._dp_call, self.datapath.endpoint_removed, ep)
        except Exception:
            LOG.warning("datapath could not forget endpoint %d", rec.id, exc_info=True)

    async def _adopt_endpoints(self) -> None:
        assert self.datapath is not None
        dp = self.datapath
        for rec in self.endpoints.values():
            idx = nl.link_index(rec.host_ifname)
            if not idx:
                LOG.warning("endpoint %d (%s): host interface %s is gone", rec.id,
                            rec.container_id[:12], rec.host_ifname)
                rec.status = "disconnected"
                continue
            rec.host_ifindex = idx
            ep = self._build_endpoint(rec)
            self.endpoint_objs[rec.id] = ep
            rec.status = "ready"
        with self.engine.batch():
            for ep in self.endpoint_objs.values():
                self.engine.upsert_endpoint(ep)
        self._reindex()
        desired = self.engine.ipcache()
        self.engine.pending_ipcache_changes()

        def adopt() -> None:
            if self._proxies_wanted:
                self._start_wanted_proxies()
            current = dp.dump_ipcache()
            stale = frozenset(k for k in current if k not in desired)
            dp.ipcache_apply(IPCacheChanges(dict(desired), stale))
            for ep in self.endpoint_objs.values():
                ing, egr = self.engine.enforcement(ep.id)
                dp.endpoint_added(ep, ing, egr)
                self._enforcement[ep.id] = (ing, egr)
                try:
                    _policy_write(dp.sync, ep, self.engine.resolve(ep.id))
                    try:
                        # a previous run may have left it failing closed: it fits now
                        dp.endpoint_fail_closed(ep, frozenset())
                    except NotImplementedError:
                        pass
                except DatapathError as e:
                    # one endpoint whose policy cannot be written must not stop
                    # the node; it fails closed until a retry writes it
                    errors[ep.id] = self._fail_closed_after(dp, ep, None, e)
                if ep.id in errors:
                    self._resync.add(ep.id)

        errors: dict[int, str] = {}
        await asyncio.to_thread(self._dp_call, adopt)
        self.engine.pending_changes()  # sync applied everything (or _resync retries it)
        for rec in self.endpoints.values():
            if rec.id in errors:
                LOG.error("endpoint %d: policy not applied at start: %s", rec.id, errors[rec.id])
                rec.status = f"not-ready: {errors[rec.id]}"

    def _start_events(self) -> None:
        dp = self.datapath
        if dp is None:
            return

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
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        if self.fqdn is not None:
            await self.fqdn.stop()
        if self.datapath is not None:
            try:
                await asyncio.to_thread(self._dp_call, self.datapath.stop)
            except Exception:
                LOG.exception("datapath stop failed")
        if self.proxies is not None:
            # the listeners stop, the TPROXY rules stay (like the datapath's
            # enforcement): redirected traffic meets a closed port while the
            # agent is down, so L7 rules fail closed instead of being bypassed.
            # `agent cleanup` removes the rules.
            self.proxies.rules = None
            try:
                await asyncio.to_thread(self.proxies.stop)
            except Exception:
                LOG.exception("stopping the L7 proxies failed")
        try:
            async with self.lock:
                await self.persist()
        except Exception:
            LOG.exception("final state write failed")
        if self._state_lock is not None:
            self._state_lock.release()

    # -- helpers -------------------------------------------------------------------
    def _dp_call(self, fn: Any, *args: Any) -> Any:
        with self._dp_lock:
            return fn(*args)

    def _datapath_metrics(self) -> Mapping[str, float]:
        return self.datapath.metrics() if self.datapath is not None else {}

    def _on_flow(self, flow: Flow) -> None:
        self.metrics.observe_flow(flow)
        try:
            self.pm.hook.axoneme_flow_observed(flow=flow)
        except Exception:
            LOG.debug("flow hook failed", exc_info=True)

    def _update_gauges(self) -> None:
        self.metrics.endpoints.set(len(self.endpoints))
        self.metrics.identities.set(len(self.allocator.snapshot()))
        self.metrics.policy_revision.set(self.revision)

    def _reindex(self) -> None:
        self._ip_index = {r.ipv4: r for r in self.endpoints.values() if r.ipv4}

    def namespace_obj(self, name: str) -> Any:
        from axoneme.core.cluster import Namespace, namespace_labels

        return Namespace(name, namespace_labels(name, self.namespaces.get(name, {})))

    def identity_labels(self, namespace: str, pod_name: str) -> Labels:
        from axoneme.core.cluster import Pod, pod_identity_labels

        rec = self.pods.get(f"{namespace}/{pod_name}")
        if rec is not None:
            pod = Pod(pod_name, namespace, dict(rec.labels), (), rec.named_ports(),
                      rec.service_account)
        else:
            pod = Pod(pod_name, namespace, {}, ())
        return pod_identity_labels(pod, self.namespace_obj(namespace), self.config.cluster_name)

    def _build_endpoint(self, rec: EndpointRecord, identity: Identity | None = None) -> Endpoint:
        labels = self.identity_labels(rec.namespace, rec.pod_name)
        if identity is None:
            identity = self.allocator.allocate(labels)
        rec.identity = identity.id
        pod = self.pods.get(f"{rec.namespace}/{rec.pod_name}")
        return Endpoint(id=rec.id, identity=identity.id, labels=labels, ipv4=rec.ipv4,
                        host_ifname=rec.host_ifname, host_ifindex=rec.host_ifindex,
                        host_mac=rec.host_mac, pod_mac=rec.pod_mac, netns=rec.netns_path,
                        namespace=rec.namespace, pod_name=rec.pod_name,
                        named_ports=pod.named_ports() if pod else (),
                        container_id=rec.container_id)

    def _regenerate_sync(self) -> dict[int, str]:
        """Push pending ipcache and policy changes to the datapath (worker thread).

        Returns endpoint id -> error for endpoints whose apply failed.

        Nothing that failed is forgotten:
        1. ipcache changes that could not be written stay pending (merged with
           later ones) and are written again on the next regeneration or by
           the retry loop (``_retry_datapath``);
        2. an endpoint whose apply failed is fully re-synced now and, while
           that fails, on every later regeneration;
        3. a policy that cannot be written (it does not fit the endpoint's
           policy map, MapFullError, or the write fails) makes the endpoint
           fail closed in the directions that changed instead of leaving the
           older policy in force; the next sync that succeeds ends it. Only a
           full map may keep the older policy, if the user chose so
           (``--policy-map-full keep-last``).
        """
        dp = self.datapath
        assert dp is not None
        errors: dict[int, str] = {}
        t0 = time.perf_counter()
        with self._dp_lock:
            if self._proxies_wanted:
                self._start_wanted_proxies()
            ipc = merge_ipcache(self._ipcache_pending, self.engine.pending_ipcache_changes())
            if ipc.upserts or ipc.deletes:
                try:
                    failpoint("datapath.ipcache", DatapathError)
                    dp.ipcache_apply(ipc)
                    self._ipcache_pending = None
                    self._ipcache_error = ""
                except Exception as e:  # kept and retried whatever failed
                    self._ipcache_pending = ipc
                    self._ipcache_error = str(e)
                    self._ipcache_failures += 1
                    LOG.error("ipcache update failed (%d changes kept, retried): %s",
                              len(ipc.upserts) + len(ipc.deletes), e)
                    LOG.debug("ipcache update failure", exc_info=True)
                    self.metrics.errors.labels(op="ipcache").inc()
            pending = self.engine.pending_changes()
            for ep_id in sorted(set(pending) | self._resync):
                ep = self.endpoint_objs.get(ep_id)
                changes = pending.get(ep_id)
                if ep is None:
                    self._resync.discard(ep_id)
                    self._fail_closed.pop(ep_id, None)
                    continue
                if not changes and ep_id not in self._resync:
                    continue
                try:
                    # enforcement flags travel with endpoint_added (idempotent);
                    # a datapath may key its default verdict on them
                    enf = self.engine.enforcement(ep_id)
                    if self._enforcement.get(ep_id) != enf:
                        dp.endpoint_added(ep, *enf)
                        self._enforcement[ep_id] = enf
                    if ep_id in self._resync:
                        _policy_write(dp.sync, ep, self.engine.resolve(ep_id))
                    else:
                        assert changes is not None
                        _policy_write(dp.apply, ep, changes)
                except DatapathError as e:
                    if ep_id not in self._resync:
                        LOG.error("endpoint %d: datapath apply failed: %s", ep_id, e)
                        self.metrics.errors.labels(op="apply").inc()
                    errors[ep_id] = str(e)
                    # drift: resync this endpoint fully
                    try:
                        _policy_write(dp.sync, ep, self.engine.resolve(ep_id))
                        errors.pop(ep_id, None)
                    except DatapathError as e2:  # MapFullError included
                        errors[ep_id] = self._fail_closed_after(dp, ep, changes, e2)
                if ep_id in errors:
                    self._resync.add(ep_id)
                else:
                    self._resync.discard(ep_id)
                    if ep_id in self._fail_closed:
                        self._end_fail_closed(dp, ep)
        self.metrics.regeneration.observe(time.perf_counter() - t0)
        return errors

    def _fail_closed_after(self, dp: Datapath, ep: Endpoint, changes: MapChanges | None,
                           err: DatapathError) -> str:
        """The endpoint's policy could not be written (it does not fit the
        policy map, or the write failed): fail closed in the directions that
        changed, so a tightening is never lost by leaving the older policy in
        force. A full map may keep the last policy instead if the user chose
        so (``--policy-map-full keep-last``). Returns the endpoint's status text."""
        from axoneme.core.mapstate import Direction

        if isinstance(err, MapFullError):
            self.metrics.errors.labels(op="policy_map_full").inc()
            what = f"policy map full: {err}"
            if self.config.policy_map_full == "keep-last":
                LOG.error("endpoint %d: %s; keeping its previous policy (--policy-map-full "
                          "keep-last)", ep.id, err)
                return f"{what}; previous policy kept (keep-last)"
        else:
            what = f"datapath write failed: {err}"
        if not changes:  # a retry or a restart: what differs from the kernel's copy
            try:
                changes = dp.dump(ep).diff(self.engine.resolve(ep.id))
            except DatapathError:
                changes = None
        changed = ({k.direction for k in changes.adds} | {k.direction for k in changes.deletes}
                   if changes else set(Direction))
        dirs = frozenset(changed or Direction) | self._fail_closed.get(ep.id, frozenset())
        names = "+".join(sorted(d.name.lower() for d in dirs))
        reason = f"{what}; failing closed ({names})"
        try:
            dp.endpoint_fail_closed(ep, dirs)
        except NotImplementedError:
            # the datapath has no fail-closed switch: take the endpoint's entries
            # in those directions away, its default deny drops the traffic
            try:
                kept = MapState({k: v for k, v in dp.dump(ep).items() if k.direction not in dirs})
                _policy_write(dp.sync, ep, kept)
            except DatapathError as e:
                LOG.error("endpoint %d: cannot fail closed: %s", ep.id, e)
                return f"{reason} FAILED: {e}"
        except DatapathError as e:
            LOG.error("endpoint %d: cannot fail closed: %s", ep.id, e)
            return f"{reason} FAILED: {e}"
        if self._fail_closed.get(ep.id) != dirs:
            LOG.error("endpoint %d: %s", ep.id, reason)
        self._fail_closed[ep.id] = dirs
        self._fail_closed_reason[ep.id] = reason
        return reason

    def _end_fail_closed(self, dp: Datapath, ep: Endpoint) -> None:
        try:
            dp.endpoint_fail_closed(ep, frozenset())
        except NotImplementedError:
            pass  # the sync that just succeeded put the entries back
        except DatapathError as e:
            LOG.error("endpoint %d: cannot end failing closed: %s", ep.id, e)
            return
        LOG.warning("endpoint %d: its policy fits again, no longer failing closed", ep.id)
        self._fail_closed.pop(ep.id, None)
        self._fail_closed_reason.pop(ep.id, None)

    async def regenerate(self) -> dict[int, str]:
        errors = await asyncio.to_thread(self._regenerate_sync)
        for rec in self.endpoints.values():
            if rec.id in errors:
                rec.status = f"not-ready: {errors[rec.id]}"
            elif rec.status.startswith("not-ready"):
                rec.status = "ready"
        self._update_gauges()
        return errors

    async def _retry_datapath(self) -> None:
        """Write again what the datapath refused (ipcache changes, endpoints
        not in sync), with backoff: 1 s, doubling up to 30 s."""
        if self._ipcache_pending is None and not self._resync:
            self._retry_delay = 1.0
            return
        now = time.monotonic()
        if now < self._retry_at:
            return
        async with self.lock:
            await self.regenerate()
        if self._ipcache_pending is None and not self._resync:
            LOG.info("datapath retry succeeded")
            self._retry_delay = 1.0
        else:
            self._retry_delay = min(self._retry_delay * 2, 30.0)
        self._retry_at = time.monotonic() + self._retry_delay

    def endpoint_by_ip(self, ip: str) -> EndpointRecord | None:
        return self._ip_index.get(ip)

    def enrich_flow(self, flow: Flow) -> Flow:
        src = self._enrich_side(flow.source, flow.ip_source)
        dst = self._enrich_side(flow.destination, flow.ip_destination)
        if src is flow.source and dst is flow.destination:
            return flow
        return dataclasses.replace(flow, source=src, destination=dst)

    def _enrich_side(self, side: FlowEndpoint, ip: str) -> FlowEndpoint:
        if side.pod_name:
            return side
        rec = self.endpoint_by_ip(ip) if ip else None
        if rec is not None:
            ep = self.endpoint_objs.get(rec.id)
            labels = tuple(ep.labels.sorted_strings()) if ep else side.labels
            return FlowEndpoint(identity=side.identity or rec.identity, namespace=rec.namespace,
                                pod_name=rec.pod_name, labels=labels, id=rec.id)
        if not side.identity and ip:
            try:
                ident = self.engine.identity_of_ip(ip)
            except Exception:
                return side
            obj = self.allocator.get(ident)
            return FlowEndpoint(identity=ident, labels=tuple(obj.label_strings()) if obj else ())
        if side.identity and not side.labels:
            obj = self.allocator.get(side.identity)
            if obj is not None:
                return dataclasses.replace(side, labels=tuple(obj.label_strings()))
        return side

    # -- CNI (called by axoneme-cni through the API) ---------------------------------
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
                                    dns_subdomain_problem)):
            problem = check(value) if value or what != "pod_name" else None
            if problem:
                raise BadRequest(f"invalid {what}: {problem}")
        t0 = time.perf_counter()
        async with self.lock:
            if container_id in self.endpoints:
                raise Conflict(f"container {container_id} already has an endpoint "
                               f"(id {self.endpoints[container_id].id}); DEL it first")
            pod = self.pods.get(f"{namespace}/{pod_name}")
            if pod is not None and pod.container_id and pod.container_id != container_id:
                raise Conflict(f"pod {namespace}/{pod_name} is already attached to container "
                               f"{pod.container_id[:12]}")
            for other in self.endpoints.values():
                if other.namespace == namespace and other.pod_name == pod_name:
                    raise Conflict(f"pod {namespace}/{pod_name} already has an endpoint "
                                   f"(container {other.container_id[:12]})")
            ip = self.ipam.allocate(container_id)
            ep_id = self.next_endpoint_id
            self.next_endpoint_id += 1
            rec = EndpointRecord(id=ep_id, container_id=container_id, ifname=ifname,
                                 netns_path=netns_path, namespace=namespace, pod_name=pod_name,
                                 ipv4=ip, network=network, created=time.time(),
                                 host_ifname=nl.host_ifname(container_id), status="creating")
            # write-ahead: a SIGKILL from here on leaves a record that the
            # next start undoes (the IP is never handed out twice)
            self.endpoints[container_id] = rec
            try:
                await self.persist()
                link = await asyncio.to_thread(nl.setup_endpoint, container_id, netns_path,
                                               ifname, ip, self.config.mtu)
            except BaseException:
                self.endpoints.pop(container_id, None)
                self.ipam.release(ip)
                try:
                    await self.persist()
                except Exception:
                    LOG.warning("state write after a failed ADD failed", exc_info=True)
                raise
            rec.host_ifname, rec.host_ifindex = link.host_ifname, link.host_ifindex
            rec.host_mac, rec.pod_mac = link.host_mac, link.pod_mac
            identity: Identity | None = None
            try:
                labels = self.identity_labels(namespace, pod_name)
                identity = self.allocator.allocate(labels)
                ep = self._build_endpoint(rec, identity)
                self.engine.upsert_endpoint(ep)
                self.endpoints[container_id] = rec
                self.endpoint_objs[ep_id] = ep
                self._reindex()
                ing, egr = self.engine.enforcement(ep_id)
                assert self.datapath is not None
                await asyncio.to_thread(self._dp_call, self.datapath.endpoint_added, ep, ing, egr)
                self._enforcement[ep_id] = (ing, egr)
                errors = await self.regenerate()
                if ep_id in errors:
                    raise DatapathError(f"policy for endpoint {ep_id} could not be applied: "
                                        f"{errors[ep_id]}")
                rec.status = "ready"
                rec.ready_ms = round((time.perf_counter() - t0) * 1000, 3)
                if pod is not None:
                    pod.container_id = container_id
                await self.persist()
            except BaseException:
                await self._rollback_endpoint(rec, identity)
                raise
            self._update_gauges()
        self.metrics.endpoint_ready.observe(time.perf_counter() - t0)
        try:
            self.pm.hook.axoneme_endpoint_added(endpoint=ep)
        except Exception:
            LOG.warning("axoneme_endpoint_added hook failed", exc_info=True)
        LOG.info("endpoint %d ready: %s/%s %s identity %d", ep_id, namespace, pod_name, ip,
                 rec.identity)
        return self.cni_result(rec)

    async def _rollback_endpoint(self, rec: EndpointRecord, identity: Identity | None) -> None:
        self.endpoints.pop(rec.container_id, None)
        ep = self.endpoint_objs.pop(rec.id, None)
        self._enforcement.pop(rec.id, None)
        self._reindex()
        try:
            self.engine.remove_endpoint(rec.id)
        except Exception:
            pass
        if ep is not None and self.datapath is not None:
            try:
                await asyncio.to_thread(self._dp_call, self.datapath.endpoint_removed, ep)
            except Exception:
                LOG.warning("rollback: endpoint_removed failed", exc_info=True)
        try:
            await asyncio.to_thread(nl.teardown_endpoint, rec.host_ifname)
        except Exception:
            LOG.warning("rollback: cannot remove %s", rec.host_ifname, exc_info=True)
        self.ipam.release(rec.ipv4)
        if identity is not None:
            self.allocator.release(identity)
        try:
            await self.regenerate()
        except Exception:
            LOG.warning("rollback: regenerate failed", exc_info=True)
        try:
            await self.persist()
        except Exception:
            LOG.warning("rollback: state write failed", exc_info=True)

    def cni_result(self, rec: EndpointRecord) -> dict[str, Any]:
        return {
            "interfaces": [
                {"name": rec.host_ifname, "mac": rec.host_mac},
                {"name": rec.ifname, "mac": rec.pod_mac, "sandbox": rec.netns_path},
            ],
            "ips": [{"address": f"{rec.ipv4}/32", "gateway": nl.GATEWAY_IP, "interface": 1}],
            "routes": [{"dst": "0.0.0.0/0", "gw": nl.GATEWAY_IP}],
            "dns": {"nameservers": [self.config.dns_server]},
            "endpoint_id": rec.id,
            "identity": rec.identity,
        }

    async def cni_del(self, req: Mapping[str, Any]) -> dict[str, Any]:
        container_id = str(req.get("container_id") or "")
        async with self.lock:
            rec = self.endpoints.get(container_id)
            if rec is None:
                # unknown container or a second DEL: nothing to do (idempotent)
                host = nl.host_ifname(container_id) if container_id else ""
                if host and nl.link_index(host):
                    await asyncio.to_thread(nl.teardown_endpoint, host)
                return {"deleted": False}
            await self._remove_endpoint(rec)
            await self.persist()
        return {"deleted": True}

    async def _remove_endpoint(self, rec: EndpointRecord) -> None:
        """Remove one endpoint (lock held)."""
        ep = self.endpoint_objs.pop(rec.id, None)
        self.endpoints.pop(rec.container_id, None)
        self._enforcement.pop(rec.id, None)
        self._reindex()
        try:
            self.engine.remove_endpoint(rec.id)
        except Exception:
            LOG.debug("engine had no endpoint %d", rec.id)
        if ep is not None and self.datapath is not None:
            try:
                await asyncio.to_thread(self._dp_call, self.datapath.endpoint_removed, ep)
            except Exception:
                LOG.warning("endpoint_removed(%d) failed", rec.id, exc_info=True)
        await asyncio.to_thread(nl.teardown_endpoint, rec.host_ifname)
        self.ipam.release(rec.ipv4)
        ident = self.allocator.get(rec.identity)
        if ident is not None:
            self.allocator.release(ident)
        for pod in self.pods.values():
            if pod.container_id == rec.container_id:
                pod.container_id = ""
        await self.regenerate()
        if ep is not None:
            try:
                self.pm.hook.axoneme_endpoint_removed(endpoint=ep)
            except Exception:
                LOG.warning("axoneme_endpoint_removed hook failed", exc_info=True)

    async def cni_check(self, req: Mapping[str, Any]) -> dict[str, Any]:
        container_id = str(req.get("container_id") or "")
        rec = self.endpoints.get(container_id)
        if rec is None:
            raise NotFound(f"container {container_id} has no endpoint")
        if not nl.link_index(rec.host_ifname):
            raise AxonemeError(f"host interface {rec.host_ifname} of endpoint {rec.id} is missing")
        return self.cni_result(rec)

    async def cni_gc(self, req: Mapping[str, Any]) -> dict[str, Any]:
        network = str(req.get("network") or "")
        valid = {(str(a.get("containerID", "")), str(a.get("ifname", "eth0")))
                 for a in req.get("valid_attachments") or []}
        removed = []
        async with self.lock:
            for rec in list(self.endpoints.values()):
                if rec.network != network or (rec.container_id, rec.ifname) in valid:
                    continue
                await self._remove_endpoint(rec)
                removed.append(rec.container_id)
            if removed:
                await self.persist()
        return {"removed": removed}

    # -- namespaces ----------------------------------------------------------------------
    async def namespace_create(self, name: str, labels: Mapping[str, str]) -> dict[str, Any]:
        _check_name(name, "namespace")
        labels = check_labels(labels)
        async with self.lock:
            if name in self.namespaces:
                raise Conflict(f"namespace {name} already exists")
            self.namespaces[name] = labels
            await self.persist()
        return self.namespace_view(name)

    async def namespace_label(self, name: str, labels: Mapping[str, str],
                              remove: Sequence[str] = ()) -> dict[str, Any]:
        labels = check_labels(labels)
        async with self.lock:
            if name not in self.namespaces:
                raise NotFound(f"namespace {name} not found")
            new = dict(self.namespaces[name])
            new.update(labels)
            for key in remove:
                new.pop(key, None)
            self.namespaces[name] = new
            await self._relabel(lambda rec: rec.namespace == name)
            await self.persist()
        return self.namespace_view(name)

    async def _relabel(self, which: Any) -> None:
        """Recompute identities of matching endpoints (lock held)."""
        assert self.datapath is not None
        for rec in self.endpoints.values():
            if not which(rec) or rec.id not in self.endpoint_objs:
                continue
            old = self.allocator.get(rec.identity)
            ep = self._build_endpoint(rec)
            if old is not None:
                self.allocator.release(old)
            self.engine.upsert_endpoint(ep)
            self.endpoint_objs[rec.id] = ep
            ing, egr = self.engine.enforcement(rec.id)
            await asyncio.to_thread(self._dp_call, self.datapath.endpoint_added, ep, ing, egr)
            self._enforcement[rec.id] = (ing, egr)
        await self.regenerate()

    async def namespace_delete(self, name: str) -> None:
        async with self.lock:
            if name not in self.namespaces:
                raise NotFound(f"namespace {name} not found")
            busy = [p.name for p in self.pods.values() if p.namespace == name]
            busy += [e.pod_name for e in self.endpoints.values() if e.namespace == name]
            if busy:
                raise Conflict(f"namespace {name} still has pods: {', '.join(sorted(set(busy)))}")
            del self.namespaces[name]
            await self.persist()

    def namespace_view(self, name: str) -> dict[str, Any]:
        from axoneme.core.cluster import namespace_labels

        return {"name": name, "labels": namespace_labels(name, self.namespaces.get(name, {}))}

    # -- policies ---------------------------------------------------------------------------
    @staticmethod
    def policy_key(ref: Any) -> str:
        return f"{ref.kind.value}/{ref.namespace}/{ref.name}"

    async def policy_apply(self, docs: Sequence[Mapping[str, Any]], source: str = "api"
                           ) -> dict[str, Any]:
        from axoneme.core.errors import InvalidRule
        from axoneme.core.policy.parse import parse_policy_obj

        parsed = []
        problems = []
        for d in docs:
            try:
                parsed.append((parse_policy_obj(d.get("obj"), str(d.get("file", "<api>")),
                                                int(d.get("index", 0))), d))
            except InvalidRule as e:
                problems.extend(e.problems)
        if problems:
            raise InvalidRule(problems)
        return await self.policy_upsert(parsed, source)

    async def policy_upsert(self, parsed: Sequence[tuple[Any, Mapping[str, Any]]], source: str,
                            remove_refs: Sequence[Any] = ()) -> dict[str, Any]:
        applied = []
        removed = []
        async with self.lock:
            undo = _PolicyUndo(self, [*remove_refs, *(pol.ref for pol, _ in parsed)])
            try:
                for ref in remove_refs:
                    key = self.policy_key(ref)
                    if key in self.policy_docs:
                        self.engine.delete_policy(ref)
                        del self.policy_docs[key]
                        removed.append(ref)
                for pol, doc in parsed:
                    rev = self.engine.upsert_policy(pol) + self.rev_base
                    self.policy_docs[self.policy_key(pol.ref)] = {
                        "doc": {"file": str(doc.get("file", "<api>")),
                                "index": int(doc.get("index", 0)), "obj": doc.get("obj")},
                        "source": source, "revision": rev}
                    applied.append(pol.ref)
                # write-ahead: a policy given through the API is in the state
                # file before the kernel enforces it (a restart must not lose
                # a deny); policy-dir files are their own record
                await self.persist(strict=undo.persisted())
            except BaseException:
                undo.rollback()
                raise
            errors = await self.regenerate()
        self._policy_hook(applied, removed)
        return {"revision": self.revision,
                "applied": [self.ref_view(r) for r in applied],
                "removed": [self.ref_view(r) for r in removed],
                "errors": {str(k): v for k, v in errors.items()}}

    async def policy_delete(self, refs: Sequence[Any]) -> dict[str, Any]:
        async with self.lock:
            unknown = [r for r in refs if self.policy_key(r) not in self.policy_docs]
            if unknown:
                raise NotFound("policy not found: " + ", ".join(str(r) for r in unknown))
            undo = _PolicyUndo(self, refs)
            try:
                for ref in refs:
                    self.engine.delete_policy(ref)
                    del self.policy_docs[self.policy_key(ref)]
                await self.persist(strict=undo.persisted())
            except BaseException:
                undo.rollback()
                raise
            await self.regenerate()
        self._policy_hook([], list(refs))
        return {"revision": self.revision, "removed": [self.ref_view(r) for r in refs]}

    def _policy_hook(self, added: list[Any], removed: list[Any]) -> None:
        try:
            self.pm.hook.axoneme_policy_changed(revision=self.revision, added=added,
                                                removed=removed)
        except Exception:
            LOG.warning("axoneme_policy_changed hook failed", exc_info=True)

    @staticmethod
    def ref_view(ref: Any) -> dict[str, str]:
        return {"kind": ref.kind.value, "namespace": ref.namespace, "name": ref.name}

    def policy_list(self) -> list[dict[str, Any]]:
        out = []
        for pol in self.engine.policies():
            rec = self.policy_docs.get(self.policy_key(pol.ref), {})
            out.append({**self.ref_view(pol.ref), "revision": rec.get("revision", 0),
                        "source": rec.get("source", "api"), "rules": len(pol.rules)})
        out.sort(key=lambda p: (p["namespace"], p["kind"], p["name"]))
        return out

    # -- pods (standalone runtime) ------------------------------------------------------------
    def pod_view(self, rec: PodRecord) -> dict[str, Any]:
        ep = self.endpoints.get(rec.container_id) if rec.container_id else None
        self._refresh_pod_status(rec)
        return {"name": rec.name, "namespace": rec.namespace,
                "ip": ep.ipv4 if ep else None, "labels": dict(rec.labels), "status": rec.status,
                "endpoint_id": ep.id if ep else None, "identity": ep.identity if ep else None,
                "netns": rec.netns, "pid": rec.pid, "container_id": rec.container_id,
                "command": rec.command, "log": rec.log, "ports": rec.ports,
                "service_account": rec.service_account, "exit_code": rec.exit_code,
                "created": rec.created}

    def _refresh_pod_status(self, rec: PodRecord) -> None:
        if rec.status != "Running":
            return
        child = self._children.get(rec.pid)
        if child is not None:
            code = child.poll()
            if code is not None:
                rec.status, rec.exit_code = "Exited", code
                self._children.pop(rec.pid, None)
            return
        if not process_alive(rec.pid, rec.pid_start):
            rec.status = "Exited"

    async def _monitor_pods(self) -> None:
        """Reap exited pod processes (children of this agent) and track status."""
        while True:
            await asyncio.sleep(1.0)
            for rec in list(self.pods.values()):
                self._refresh_pod_status(rec)
            await self._refresh_host_addresses()
            try:
                await self._retry_datapath()
            except Exception:
                LOG.warning("datapath retry failed", exc_info=True)
            await self._retry_persist()
            self._check_proxies()

    def _check_proxies(self) -> None:
        """A dead proxy loop is restarted (its redirected traffic meets a
        listener nobody reads meanwhile: it fails closed, never bypasses L7)."""
        if self.proxies is None:
            return
        try:
            if self.proxies.health() is not None:
                self.proxies.revive()
        except Exception:
            LOG.warning("restarting the L7 proxies failed", exc_info=True)

    async def _refresh_host_addresses(self) -> None:
        """Addresses come and go (links added after start): keep host (1) current."""
        try:
            addrs = await asyncio.to_thread(nl.host_addresses, self.config.pod_cidr)
        except Exception:
            LOG.debug("listing the node's addresses failed", exc_info=True)
            return
        async with self.lock:
            if self.engine.set_host_addresses(addrs):
                LOG.info("node addresses changed: %s", ", ".join(addrs))
                await self.regenerate()

    async def pod_run(self, req: Mapping[str, Any], runtime: Any) -> dict[str, Any]:
        name = str(req.get("name") or "")
        namespace = str(req.get("namespace") or "default")
        _check_name(name, "pod")
        labels = check_labels(req.get("labels") or {})
        ports = [str(p) for p in req.get("ports") or []]
        for p in ports:
            parse_port(p)
        sa = str(req.get("service_account") or "default")
        command = [str(c) for c in req.get("command") or []]
        if not command:
            raise BadRequest("pod run needs a command after --")
        async with self.lock:
            if namespace not in self.namespaces:
                raise NotFound(f"namespace {namespace} not found (create it with: axoneme "
                               f"namespace create {namespace})")
            key = f"{namespace}/{name}"
            if key in self.pods:
                raise Conflict(f"pod {key} already exists")
            rec = PodRecord(name=name, namespace=namespace, labels=labels, ports=ports,
                            service_account=sa, netns=netns_name(namespace, name),
                            container_id=secrets.token_hex(32), command=command,
                            cwd=str(req.get("cwd") or "/"), created=time.time(),
                            log=os.path.join(self.config.state_dir, "pods", namespace,
                                             f"{name}.log"))
            self.pods[key] = rec
            await self.persist()
        try:
            ip = await runtime.start_pod(rec, dict(req.get("env") or {}))
        except BaseException:
            async with self.lock:
                self.pods.pop(key, None)
                await self.persist()
            try:
                await runtime.stop_pod(rec, cni_del=True)
            except Exception:
                LOG.warning("cleanup of failed pod %s failed", key, exc_info=True)
            raise
        async with self.lock:
            rec.status = "Running"
            await self.persist()
        view = self.pod_view(rec)
        view["ip"] = ip
        return view

    async def pod_delete(self, namespace: str, name: str, runtime: Any) -> dict[str, Any]:
        key = f"{namespace}/{name}"
        async with self.lock:
            rec = self.pods.get(key)
            if rec is None:
                raise NotFound(f"pod {key} not found")
            if key in self._deleting:
                raise Conflict(f"pod {key} is being deleted")
            self._deleting.add(key)
            rec.status = "Deleting"
            await self.persist()
        try:
            await runtime.stop_pod(rec, cni_del=True)
        finally:
            self._deleting.discard(key)
        async with self.lock:
            self.pods.pop(key, None)
            await self.persist()
        return {"deleted": key}

    def get_pod(self, namespace: str, name: str) -> PodRecord:
        rec = self.pods.get(f"{namespace}/{name}")
        if rec is None:
            raise NotFound(f"pod {namespace}/{name} not found")
        return rec

    # -- views ------------------------------------------------------------------------------
    def endpoint_view(self, rec: EndpointRecord) -> dict[str, Any]:
        ep = self.endpoint_objs.get(rec.id)
        ing = egr = False
        if ep is not None:
            try:
                ing, egr = self.engine.enforcement(rec.id)
            except Exception:
                pass
        labels = ep.labels.sorted_strings() if ep else self.identity_labels(
            rec.namespace, rec.pod_name).sorted_strings()
        return {"id": rec.id, "identity": rec.identity, "labels": labels, "ipv4": rec.ipv4,
                "policy_enforcement": {"ingress": bool(ing), "egress": bool(egr)},
                "status": rec.status, "pod": f"{rec.namespace}/{rec.pod_name}",
                "container_id": rec.container_id, "host_ifname": rec.host_ifname,
                "host_ifindex": rec.host_ifindex, "netns": rec.netns_path,
                "network": rec.network, "ready_ms": rec.ready_ms}

    def endpoint_list(self) -> list[dict[str, Any]]:
        return [self.endpoint_view(r) for r in sorted(self.endpoints.values(), key=lambda r: r.id)]

    def endpoint_get(self, ep_id: int) -> dict[str, Any]:
        rec = next((r for r in self.endpoints.values() if r.id == ep_id), None)
        if rec is None:
            raise NotFound(f"endpoint {ep_id} not found")
        view = self.endpoint_view(rec)
        ep = self.endpoint_objs.get(ep_id)
        if ep is not None:
            resolved = self.engine.resolve(ep_id)
            assert self.datapath is not None
            with self._dp_lock:
                try:
                    dumped: MapState | None = self.datapath.dump(ep)
                    dump_error = ""
                except Exception as e:
                    dumped, dump_error = None, str(e)
            view["policy"] = mapstate_view(resolved)
            view["datapath"] = mapstate_view(dumped) if dumped is not None else None
            view["datapath_error"] = dump_error
            view["in_sync"] = dumped is not None and dumped == resolved
        return view

    def identity_list(self) -> list[dict[str, Any]]:
        used: dict[int, int] = {}
        for rec in self.endpoints.values():
            used[rec.identity] = used.get(rec.identity, 0) + 1
        return [{"id": i.id, "labels": i.label_strings(), "reserved": i.reserved,
                 "endpoints": used.get(i.id, 0)} for i in self.allocator.all()]

    def _faults(self, dpv: Mapping[str, Any], proxy_fault: str | None) -> list[str]:
        """What is wrong now, one line each (``status`` shows them first)."""
        out = []
        if not dpv.get("healthy"):
            out.append(f"datapath {dpv.get('name')}: {dpv.get('detail') or 'unhealthy'}")
        for ep_id, reason in sorted(self._fail_closed_reason.items()):
            out.append(f"endpoint {ep_id}: {reason}")
        for rec in sorted(self.endpoints.values(), key=lambda r: r.id):
            if rec.status.startswith("not-ready") and rec.id not in self._fail_closed_reason:
                out.append(f"endpoint {rec.id}: {rec.status}")
        if self._ipcache_pending is not None:
            out.append(f"ipcache: {self._ipcache_error or 'changes pending'} (retried)")
        if self._state_error:
            out.append(f"state: {self._state_error}")
        if proxy_fault:
            out.append(f"l7 proxy: {proxy_fault}")
        for path, problems in sorted(self.policy_dir_errors.items()):
            out.append(f"policy file {path}: {problems[0] if problems else 'error'}")
        return out

    def status(self) -> dict[str, Any]:
        dp = self.datapath
        if dp is not None:
            try:
                st = dp.status()
                dpv = {"name": st.name, "mode": st.mode, "healthy": st.healthy, "detail": st.detail}
            except Exception as e:
                dpv = {"name": self.config.datapath, "mode": "", "healthy": False, "detail": str(e)}
        else:
            dpv = {"name": self.config.datapath, "mode": "", "healthy": False, "detail": "not started"}
        proxy_fault = self.proxies.health() if self.proxies is not None else None
        return {
            "datapath": dpv,
            "endpoints": len(self.endpoints),
            "identities": len(self.allocator.snapshot()),
            "policy_revision": self.revision,
            "faults": self._faults(dpv, proxy_fault),
            "components": {
                "api": {"socket": self.config.api_socket, "healthy": True},
                "state": {"dir": self.config.state_dir, "healthy": not self._state_error,
                          "last_error": self._state_error},
                "l7_proxy": {"healthy": proxy_fault is None, "fault": proxy_fault or "",
                             "restarts": self.proxies.restarts if self.proxies else 0,
                             "last_fault": self.proxies.last_fault if self.proxies else ""},
                "guard": {"installed": self.guard_installed, "pod_cidr": self.config.pod_cidr},
                "flows": {"stored": len(self.flows), "capacity": self.flows.capacity,
                          "seen": self.flows.seen},
                "policies": {"count": len(self.engine.policies()),
                             "policy_dir": self.config.policy_dir,
                             "errors": self.policy_dir_errors,
                             "dropped_at_start": self.dropped_policies},
                "pods": len(self.pods),
                "ipcache": {"pending": (len(self._ipcache_pending.upserts)
                                        + len(self._ipcache_pending.deletes))
                            if self._ipcache_pending is not None else 0,
                            "last_error": self._ipcache_error,
                            "retries": self._ipcache_failures},
                "fail_closed": [{"endpoint": ep_id,
                                 "directions": sorted(d.name.lower() for d in dirs),
                                 "reason": self._fail_closed_reason.get(ep_id, "")}
                                for ep_id, dirs in sorted(self._fail_closed.items())],
                "l7_proxies": [{"parser": i.parser, "direction": str(i.direction), "port": i.port}
                               for i in (self.proxies.proxies() if self.proxies else [])],
                "uptime_seconds": round(time.time() - self.started, 1) if self.started else 0,
            },
        }


class _PolicyUndo:
    """What a policy change replaces, to put back if it cannot be recorded."""

    def __init__(self, agent: Agent, refs: Sequence[Any]) -> None:
        self.agent = agent
        self.docs = dict(agent.policy_docs)
        self.policies = {agent.policy_key(r): (r, agent.engine.get_policy(r)) for r in refs}

    def persisted(self) -> bool:
        """Whether the change touches what the state file records (API policies)."""
        keys = self.policies.keys()
        return any(d.get("source") == "api"
                   for docs in (self.docs, self.agent.policy_docs)
                   for k, d in docs.items() if k in keys)

    def rollback(self) -> None:
        engine = self.agent.engine
        for ref, old in self.policies.values():
            if old is not None:
                engine.upsert_policy(old)
            elif engine.get_policy(ref) is not None:
                engine.delete_policy(ref)
        self.agent.policy_docs = self.docs


def _policy_write(write: Any, ep: Endpoint, what: Any) -> Any:
    """``dp.apply``/``dp.sync`` behind the ``datapath.apply`` failpoint."""
    failpoint("datapath.apply", DatapathError)
    return write(ep, what)


def mapstate_view(ms: MapState) -> list[dict[str, Any]]:
    out = []
    for key in sorted(ms):
        entry = ms[key]
        out.append({"key": str(key), "identity": key.identity, "direction": key.direction.name,
                    "protocol": str(key.protocol), "port": key.port, "prefix_len": key.prefix_len,
                    "entry": str(entry), "deny": entry.deny, "proxy_port": entry.proxy_port,
                    "derived_from": sorted(entry.derived_from)})
    return out


def _check_name(name: str, what: str) -> None:
    """Namespaces are RFC 1123 labels and pods RFC 1123 subdomains, as in Kubernetes."""
    problem = (dns_label_problem if what == "namespace" else dns_subdomain_problem)(name)
    if problem:
        raise BadRequest(f"invalid {what} name: {problem}")


def kill_pod_process(pid: int, start: int, grace: float = 3.0) -> None:
    """SIGTERM the pod's process group, then SIGKILL after ``grace`` seconds."""
    if not process_alive(pid, start):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not process_alive(pid, start):
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def ip_in(ip: str, cidr: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(cidr)


def merge_ipcache(old: IPCacheChanges | None, new: IPCacheChanges) -> IPCacheChanges:
    """``old`` then ``new`` as one batch (a prefix in both upserts and deletes
    is an upsert, as datapaths apply them)."""
    if old is None:
        return new
    upserts = {k: v for k, v in old.upserts.items() if k not in new.deletes}
    upserts.update(new.upserts)
    deletes = frozenset((old.deletes | new.deletes) - set(new.upserts))
    return IPCacheChanges(upserts, deletes)
