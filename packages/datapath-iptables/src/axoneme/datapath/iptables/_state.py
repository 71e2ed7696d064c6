"""The iptables datapath's options and what it knows of the kernel.

``_State`` is the base of the parts of ``IptablesDatapath``, each in its own
module: ``_ipsets`` (the ipcache and identity ipsets), ``_transaction`` (rule
rendering and ``iptables-restore`` transactions), ``_flows`` (NFLOG verdicts
as flows) and ``_datapath`` (lifecycle, adoption, endpoints, policy, status).
Everything they share is set here; the kernel is the truth, and ``start()``
rebuilds it from there.
"""

from __future__ import annotations

import ipaddress
import threading
from dataclasses import fields

from axoneme.core.datapath import Datapath, DatapathConfig, DatapathOption, check_options
from axoneme.core.endpoint import Endpoint
from axoneme.core.mapstate import Direction, MapState
from axoneme.datapath.iptables import _prefixes as px
from axoneme.datapath.iptables import _render as rd
from axoneme.datapath.iptables._backend import Backend
from axoneme.datapath.iptables._hostlock import HOST_LOCK_DIR
from axoneme.datapath.iptables._nflog import NflogSocket

MODES = ("plain", "ipset")
DEFAULT_NFLOG_GROUP = 7301
# DO NOT CHANGE without the agent: the prefix of the host-side veths it creates
DEFAULT_HOST_IFNAME_PREFIX = "lxc"

# What ``agent run --datapath-opt NAME=VALUE`` (and ``datapath_options``) may
# set. ``mode`` and ``ipcache_max`` are DatapathConfig fields of that name as
# well (build_datapath sets both); the datapath reads them from the config.
OPTIONS = (
    DatapathOption("mode", str, "ipset", "one rule per peer IP and port (plain) or one ipset "
                   "per identity (ipset)", choices=MODES),
    DatapathOption("ipcache_max", int,
                   next(f.default for f in fields(DatapathConfig) if f.name == "ipcache_max"),
                   "maxelem of the ipcache and identity ipsets (at least 1024)"),
    DatapathOption("nflog_group", int, DEFAULT_NFLOG_GROUP, "NFLOG group of the verdict events"),
    DatapathOption("events", bool, True, "log verdicts to NFLOG and read them as flows"),
    DatapathOption("host_ifname_prefix", str, DEFAULT_HOST_IFNAME_PREFIX,
                   "prefix of the pods' host veths: packets through one without an endpoint "
                   "are dropped (NO_LXC); empty: no such catch-all"),
    DatapathOption("lock_dir", str, HOST_LOCK_DIR,
                   "directory of the one-iptables-agent-per-netns lock file"),
)
_OPTION_NAMES = frozenset(o.name for o in OPTIONS)


def _pod_cidrs(text: str) -> dict[int, tuple[str, ...]]:
    """``config.pod_cidr`` (one CIDR, or several separated by commas) per family."""
    out: dict[int, list[str]] = {4: [], 6: []}
    for part in text.split(","):
        if part.strip():
            net = ipaddress.ip_network(part.strip(), strict=False)
            out[net.version].append(str(net))
    return {f: tuple(v) for f, v in out.items()}


class _State(Datapath):
    """Options and the kernel state the datapath's parts share (abstract)."""

    def __init__(self, config: DatapathConfig | None = None) -> None:
        super().__init__(config)
        # declared options only: build_datapath already refused unknown ones,
        # and a config built by hand may carry another datapath's options too
        opts = check_options(type(self), {k: v for k, v in self.config.options.items()
                                          if k in _OPTION_NAMES})
        self.mode = self.config.mode or str(opts["mode"])
        self.nflog_group = int(opts["nflog_group"])
        self._events_enabled = bool(opts["events"])
        self.host_ifname_prefix = str(opts["host_ifname_prefix"])
        self._lock_dir = str(opts["lock_dir"])
        try:
            self._pod_cidrs = _pod_cidrs(self.config.pod_cidr)
            self._config_error = ""
        except ValueError as e:
            self._pod_cidrs = {4: (), 6: ()}
            self._config_error = f"bad pod CIDR {self.config.pod_cidr!r}: {e}"
        if len(self.host_ifname_prefix) > 14:  # IFNAMSIZ - 1, and room for one more char
            self._config_error = f"host_ifname_prefix {self.host_ifname_prefix!r} is too long"
        self._lock = threading.RLock()
        self._backend: Backend | None = None
        self._families: tuple[int, ...] = (4,)
        self._refs: dict[int, rd.EndpointRef] = {}
        self._endpoints: dict[int, Endpoint] = {}
        self._states: dict[int, MapState] = {}
        self._ipcache: dict[int, dict[px.Prefix, int]] = {4: {}, 6: {}}
        self._lengths: dict[int, list[int]] = {4: [], 6: []}
        self._ranges: dict[int, dict[int, list[str]]] = {4: {}, 6: {}}
        self._idsets: dict[int, dict[int, tuple[set[px.Prefix], set[px.Prefix]]]] = {4: {}, 6: {}}
        self._sets: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        self._proxy_chains: set[tuple[int, Direction]] = set()
        self._subchains: dict[tuple[int, int, Direction], set[str]] = {}
        self._rule_counts: dict[tuple[int, int, Direction], int] = {}
        # mangle chains (per endpoint, family, direction) of endpoints with redirects
        self._mangle: dict[tuple[int, int, Direction], set[str]] = {}
        self._mproxy: set[tuple[int, int]] = set()  # (family, proxy port)
        # endpoint id -> directions failing closed (AXFC rules in the kernel)
        self._fail_closed: dict[int, frozenset[Direction]] = {}
        self._nflog: NflogSocket | None = None
        self._nflog_error = ""
        self._stopped = threading.Event()
        self._counters = {"restores": 0.0, "restore_errors": 0.0, "events": 0.0}
        # unknown-endpoint drops counted before the last start() refilled their chains
        self._unknown_base = 0.0
        self._host_lock: str | None = None  # path of the netns lock this instance holds
        # Test hook: one extra restore line (e.g. a bad rule) for the next write.
        self.fault_injection: str | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self.probe()
        assert self._backend is not None
        return self._backend
