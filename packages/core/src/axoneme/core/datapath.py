"""The Datapath contract every enforcement backend implements.

Loaded by entry-point name from the ``axoneme.datapath`` group (stevedore),
exactly one per node. Nothing outside a datapath package asks which one runs.
"""

from __future__ import annotations

import abc
import ipaddress
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from axoneme.core.endpoint import Endpoint
from axoneme.core.errors import DatapathUnavailable
from axoneme.core.flow import Flow
from axoneme.core.mapstate import Direction, MapChanges, MapState

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class DatapathConfig:
    """Options the agent passes to a datapath (from flags/config file)."""

    state_dir: str = "/var/lib/axoneme"
    bpffs_root: str = "/sys/fs/bpf/axoneme"
    mode: str = ""  # datapath-specific (iptables: plain | ipset)
    policy_map_max: int = 16384
    ipcache_max: int = 512000
    ct_max: int = 262144
    pod_cidr: str = "10.244.0.0/16"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DatapathStatus:
    name: str
    mode: str = ""
    healthy: bool = True
    detail: str = ""


@dataclass(frozen=True, slots=True)
class IPCacheChanges:
    """Prefix -> identity upserts and prefix deletions (IPs are /32, /128)."""

    upserts: Mapping[IPNetwork, int] = field(default_factory=dict)
    deletes: frozenset[IPNetwork] = frozenset()


class Datapath(abc.ABC):
    """Enforcement backend.

    Lifecycle: ``probe()`` (raise DatapathUnavailable with the reason) ->
    ``start()`` (adopt existing kernel state if any) -> endpoint/ipcache/policy
    calls -> ``stop()`` (leaves enforcement in the kernel) or ``cleanup()``
    (removes every kernel object this datapath made).

    Batches are atomic: ``apply`` either applies all changes or none and
    raises ``DatapathError``; a full map raises ``MapFullError``.
    """

    name: str = "abstract"

    def __init__(self, config: DatapathConfig | None = None) -> None:
        self.config = config or DatapathConfig()

    @abc.abstractmethod
    def probe(self) -> None:
        """Raise DatapathUnavailable(reason) if this datapath cannot run here."""

    @abc.abstractmethod
    def start(self) -> None:
        """Prepare shared kernel state, adopting what a previous run left."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop event readers; kernel enforcement stays in place."""

    def cleanup(self) -> None:
        """Remove every kernel object this datapath created (agent cleanup)."""

    @abc.abstractmethod
    def endpoint_added(self, endpoint: Endpoint, enforce_ingress: bool, enforce_egress: bool) -> None:
        """Attach enforcement to the endpoint's host-side interface.

        Idempotent: attaching an endpoint already attached (after an agent
        restart) adopts it."""

    @abc.abstractmethod
    def endpoint_removed(self, endpoint: Endpoint) -> None:
        """Detach and drop the endpoint's state. Unknown endpoints are fine."""

    def endpoint_fail_closed(self, endpoint: Endpoint, directions: frozenset[Direction]) -> None:
        """Drop every packet the endpoint's policy would decide in ``directions``
        (an empty set ends it), whatever its policy entries say.

        The agent calls it when the endpoint's new policy cannot be written
        (the policy map is full): a tightening must never be lost by leaving
        the older policy in force. Drops carry reason DROP_EP_NOT_READY.
        Idempotent; survives ``endpoint_added`` for the same endpoint.
        Default: NotImplementedError (the agent then removes the endpoint's
        entries in those directions, so its default deny drops them)."""
        raise NotImplementedError

    @abc.abstractmethod
    def ipcache_apply(self, changes: IPCacheChanges) -> None:
        """Update the IP/prefix -> identity map."""

    @abc.abstractmethod
    def apply(self, endpoint: Endpoint, changes: MapChanges) -> None:
        """Apply an incremental policy change to one endpoint, atomically."""

    @abc.abstractmethod
    def sync(self, endpoint: Endpoint, state: MapState) -> MapChanges:
        """Make the kernel hold exactly ``state``; return what had to change."""

    @abc.abstractmethod
    def dump(self, endpoint: Endpoint) -> MapState:
        """Read the endpoint's policy back from the kernel."""

    def dump_ipcache(self) -> dict[IPNetwork, int]:
        """Read the ipcache back from the kernel."""
        return {}

    def events(self) -> Iterator[Flow]:
        """Verdict/drop events; blocks until ``stop()``. Default: none."""
        return iter(())

    def status(self) -> DatapathStatus:
        return DatapathStatus(self.name, self.config.mode)

    def metrics(self) -> Mapping[str, float]:
        """Datapath counters for the agent's metrics endpoint."""
        return {}


class NoopDatapath(Datapath):
    """Runs everything and enforces nothing; says so in its status."""

    name = "noop"

    def __init__(self, config: DatapathConfig | None = None) -> None:
        super().__init__(config)
        self._lock = threading.Lock()
        self._state: dict[int, MapState] = {}
        self._ipcache: dict[IPNetwork, int] = {}
        self._stopped = threading.Event()
        self.fail_closed: dict[int, frozenset[Direction]] = {}  # what it was told

    def probe(self) -> None:
        return None

    def start(self) -> None:
        self._stopped.clear()

    def stop(self) -> None:
        self._stopped.set()

    def endpoint_added(self, endpoint: Endpoint, enforce_ingress: bool, enforce_egress: bool) -> None:
        with self._lock:
            self._state.setdefault(endpoint.id, MapState())

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        with self._lock:
            self._state.pop(endpoint.id, None)
            self.fail_closed.pop(endpoint.id, None)

    def endpoint_fail_closed(self, endpoint: Endpoint, directions: frozenset[Direction]) -> None:
        with self._lock:
            if directions:
                self.fail_closed[endpoint.id] = frozenset(directions)
            else:
                self.fail_closed.pop(endpoint.id, None)

    def ipcache_apply(self, changes: IPCacheChanges) -> None:
        with self._lock:
            for net in changes.deletes:
                self._ipcache.pop(net, None)
            self._ipcache.update(changes.upserts)

    def apply(self, endpoint: Endpoint, changes: MapChanges) -> None:
        with self._lock:
            self._state[endpoint.id] = self._state.get(endpoint.id, MapState()).apply(changes)

    def sync(self, endpoint: Endpoint, state: MapState) -> MapChanges:
        with self._lock:
            old = self._state.get(endpoint.id, MapState())
            self._state[endpoint.id] = MapState(state)
            return old.diff(state)

    def dump(self, endpoint: Endpoint) -> MapState:
        with self._lock:
            return MapState(self._state.get(endpoint.id, MapState()))

    def dump_ipcache(self) -> dict[IPNetwork, int]:
        with self._lock:
            return dict(self._ipcache)

    def status(self) -> DatapathStatus:
        return DatapathStatus("noop", "", True, "no enforcement: policy is computed but not enforced")


def unavailable(reason: str) -> DatapathUnavailable:
    return DatapathUnavailable(reason)
