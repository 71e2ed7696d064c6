"""The Datapath contract every enforcement backend implements.

Loaded by entry-point name from the ``axoneme.datapath`` group (the one plugin
registry, ``axoneme.core.plugins``),
exactly one per node, through ``build_datapath`` (the agent and ``agent
cleanup`` alike). Nothing outside a datapath package asks which one runs: a
datapath declares its knobs (``options``) and what it can do
(``capabilities``), and callers check those.
"""

from __future__ import annotations

import abc
import ipaddress
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from axoneme.core.endpoint import Endpoint
from axoneme.core.errors import ConfigError
from axoneme.core.flow import Flow
from axoneme.core.mapstate import Direction, MapChanges, MapState
from axoneme.core.plugins import GROUP_DATAPATH, load_class

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


#: The capability names a datapath may declare (``Datapath.capabilities``).
CAPABILITIES = frozenset({
    "l7_redirect",   # marks packets of entries with a proxy port for the TPROXY redirect
    "events",        # ``events()`` yields verdict/drop flows
    "ipv6",          # enforces IPv6 as well as IPv4
    "host_policy",   # enforces policy on the host's own traffic
    "fail_closed",   # implements ``endpoint_fail_closed``
    "ipcache_dump",  # ``dump_ipcache()`` reads the kernel's ipcache back
    # carries the source's identity in the tunnel header (the VNI) and judges
    # tunnelled packets by it: needs a collect_md VXLAN device (``node_devices``)
    "tunnel_identity",
    # puts the source identity it judged a packet by into the mark of a packet
    # it redirects to an L7 proxy (core.marks.to_proxy_identity_mark), and
    # judges a proxy's upstream packet by the identity its mark carries
    "proxy_identity_mark",
})


@dataclass(frozen=True, slots=True)
class DatapathOption:
    """One knob a datapath declares: ``agent run --datapath-opt NAME=VALUE``
    and the ``datapath_options`` config key set it; ``build_datapath`` checks
    the value (``type``, ``choices``) and fills in ``default``."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()


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
    #: what this datapath can do (names from ``CAPABILITIES``)
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: the options it accepts; their values reach it as ``config.options``
    #: (and, for the legacy names, the DatapathConfig fields of that name)
    options: ClassVar[tuple[DatapathOption, ...]] = ()

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
        """Remove every kernel object this datapath created (agent cleanup).
        Default: nothing (a datapath that leaves nothing in the kernel)."""
        return None

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

    def node_devices(self, devices: Sequence[str]) -> None:
        """The node's devices (Cilium's ``--devices``), the tunnel device of
        tunnel routing among them: where traffic from other nodes and from
        outside the cluster enters. A datapath that decides such traffic for
        local endpoints before routing (so ingress L7 rules can redirect it to
        the proxy) attaches there; with ``tunnel_identity`` it also carries the
        source's identity through a collect_md VXLAN device. Called with the
        whole list whenever it changes (a device no longer listed is left).
        Default: nothing to do (iptables decides in netfilter, PREROUTING).
        Raises DatapathProgramError when a device does not exist."""
        return None

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

    # A restart's adoption stamp (the agent's checkpoint, agent/_checkpoint.py):
    # a clean stop leaves a token beside the kernel's state saying "this state
    # is exactly what the stopping agent computed"; the next start takes it
    # (reads and erases it, before any write of its own), so a token is only
    # ever found after a clean stop with nothing written since. A datapath
    # whose kernel state does not outlive the agent keeps none.
    def take_adopt_stamp(self) -> str:
        """The token ``set_adopt_stamp`` left in the kernel, erased now (may be
        called before ``start``); "" if there is none. Default: none."""
        return ""

    def set_adopt_stamp(self, stamp: str) -> bool:
        """Leave ``stamp`` beside the kernel's state (a clean stop, after the
        last write); whether it was kept. Default: nothing is kept
        (``take_adopt_stamp`` finds none), so the agent writes no checkpoint."""
        return False

    def status(self) -> DatapathStatus:
        return DatapathStatus(self.name, self.config.mode)

    def metrics(self) -> Mapping[str, float]:
        """Datapath counters for the agent's metrics endpoint."""
        return {}


class NoopDatapath(Datapath):
    """Runs everything and enforces nothing; says so in its status."""

    name = "noop"
    capabilities = frozenset({"fail_closed", "ipcache_dump"})

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


# DatapathConfig fields a datapath may read directly (before issue 14 these
# were the only knobs): an option of that name also sets the field
_LEGACY_FIELDS = {f.name: f for f in fields(DatapathConfig)
                  if f.name in ("mode", "bpffs_root", "policy_map_max", "ipcache_max", "ct_max")}


def _option_value(datapath: str, opt: DatapathOption, value: Any) -> Any:
    """``value`` as ``opt.type`` (strings from the command line are converted);
    ConfigError naming the option and the datapath when it does not fit."""
    where = f"datapath option {opt.name!r} of datapath {datapath!r}"
    if opt.type is bool and isinstance(value, str):
        low = value.strip().lower()
        if low not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        value = low in ("1", "true", "yes", "on")
    elif not isinstance(value, opt.type) or (opt.type is int and isinstance(value, bool)):
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected {opt.type.__name__}, got {value!r}")
        try:
            value = opt.type(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {opt.type.__name__}, got {value!r}") from None
    if opt.choices and str(value) not in opt.choices:
        raise ConfigError(f"{where}: must be one of {', '.join(opt.choices)}, got {value!r}")
    return value


def check_options(cls: type[Datapath], options: Mapping[str, Any]) -> dict[str, Any]:
    """The option values ``cls`` runs with: declared defaults, then ``options``.

    ConfigError naming the option and the datapath for an unknown option or a
    bad value. A datapath that declares no options at all (written before
    options were declared) gets ``options`` as given, as it always did; a
    legacy DatapathConfig field still has to have that field's type."""
    name = getattr(cls, "name", cls.__name__)
    declared = {o.name: o for o in getattr(cls, "options", ())}
    out = {o.name: o.default for o in declared.values()}
    for key, value in options.items():
        opt = declared.get(key)
        if opt is None and declared:
            raise ConfigError(f"unknown datapath option {key!r} for datapath {name!r} "
                              f"(it accepts: {', '.join(sorted(declared))})")
        if opt is None and key in _LEGACY_FIELDS:
            default = _LEGACY_FIELDS[key].default
            opt = DatapathOption(key, type(default), default, "")
        out[key] = value if opt is None else _option_value(name, opt, value)
    return out


def datapath_class(name: str) -> type[Datapath]:
    """The ``axoneme.datapath`` entry point ``name`` (PluginError if missing)."""
    cls = load_class(GROUP_DATAPATH, name)
    if not (isinstance(cls, type) and issubclass(cls, Datapath)):
        raise ConfigError(f"the axoneme.datapath plugin {name!r} is not a Datapath ({cls!r})")
    return cls


def build_datapath(name: str, *, state_dir: str, pod_cidr: str,
                   options: Mapping[str, Any]) -> Datapath:
    """Load the datapath ``name``, check ``options`` against what it declares
    and construct it: the one place a datapath is built (agent and cleanup).

    Raises PluginError (not installed, fails to import) or ConfigError
    (unknown option, bad value: both name the option and the datapath)."""
    cls = datapath_class(name)
    values = check_options(cls, options)
    legacy = {k: v for k, v in values.items() if k in _LEGACY_FIELDS}
    config = DatapathConfig(state_dir=state_dir, pod_cidr=pod_cidr, options=values, **legacy)
    return cls(config)
