"""The iptables datapath: per-endpoint chains, plain and ipset modes.

Kernel state it owns (everything prefixed ``AXON-``):
- filter table, IPv4 and IPv6: the hook chains, the verdict chains, one
  chain per endpoint and direction (see ``_render``) and the catch-all for
  pod interfaces without an endpoint (``AXON-NOEP-*``: interfaces named
  ``options["host_ifname_prefix"]``, default ``lxc`` as the agent names host
  veths, carrying pod CIDR addresses), plus one jump rule per hook in
  FORWARD/INPUT/OUTPUT;
- ipsets: ``AXON-IPC4``/``AXON-IPC6`` keep the ipcache itself (prefix with
  the identity in the entry comment) so a restarted agent adopts it; in ipset
  mode ``AXON-ID-<id>``/``AXON-ID6-<id>`` hold the addresses whose longest
  prefix match is that identity (``hash:net`` with ``nomatch`` for excepts).

An endpoint failing closed (``endpoint_fail_closed``) has an ``AXFC`` rule
in its chain of that direction; ``start()`` adopts it from the kernel like
the rest of the endpoint's state.

Writes are ``iptables-restore --noflush`` transactions: an endpoint chain is
flushed and refilled in one restore, so the kernel never holds half a policy.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import fields
from typing import Any

from axoneme.core.datapath import (
    Datapath,
    DatapathConfig,
    DatapathOption,
    DatapathStatus,
    IPCacheChanges,
    IPNetwork,
    check_options,
)
from axoneme.core.endpoint import Endpoint
from axoneme.core.errors import DatapathError, DatapathProgramError, DatapathUnavailable
from axoneme.core.flow import DropReason, Flow, FlowEndpoint, FlowVerdict
from axoneme.core.lockfile import LockHeld, PidLock
from axoneme.core.mapstate import Direction, Entry, Key, MapChanges, MapState, Protocol
from axoneme.datapath.iptables import _prefixes as px
from axoneme.datapath.iptables import _render as rd
from axoneme.datapath.iptables._backend import Backend, detect
from axoneme.datapath.iptables._nflog import NflogSocket, decode_l4

LOG = logging.getLogger(__name__)

MODES = ("plain", "ipset")
DEFAULT_NFLOG_GROUP = 7301
# DO NOT CHANGE without the agent: the prefix of the host-side veths it creates
DEFAULT_HOST_IFNAME_PREFIX = "lxc"
IPC_SET = {4: "AXON-IPC4", 6: "AXON-IPC6"}
_IPC_RE = re.compile(r'^add (AXON-IPC[46]) (\S+) comment "id=(\d+)(,z)?"')
_SET_ADD_RE = re.compile(r"^add (AXON-ID6?-\d+) (\S+)( nomatch)?")
_SET_CREATE_RE = re.compile(r"^create (AXON-\S+) ")
_SUB_RE = re.compile(r"^AXON-EP-(\d+)-(IN|OUT)-S\d+$")
_PXY_RE = re.compile(r"^AXON-PXY-(\d+)-(IN|OUT)$")
_MEP_RE = re.compile(r"^AXON-EP-(\d+)-(IN|OUT)(-S\d+)?$")
_MPXY_RE = re.compile(r"^AXON-MPXY-(\d+)$")
_DIRS = {"IN": Direction.INGRESS, "OUT": Direction.EGRESS}


# One iptables datapath per network namespace: chain names (AXON-*) and the
# NFLOG group are per netns, so a second agent there would share them (and
# run "Ok" with no events). The lock is per process: instances of one process
# (tests, adoption) share it.
HOST_LOCK_DIR = "/run/axoneme"
_host_locks: dict[str, tuple[PidLock, int]] = {}
_host_locks_guard = threading.Lock()

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


def _netns_id() -> str:
    for path in ("/proc/thread-self/ns/net", "/proc/self/ns/net"):
        try:
            return str(os.stat(path).st_ino)
        except OSError:
            continue
    return "host"


def host_lock_path(lock_dir: str = HOST_LOCK_DIR) -> str:
    """The lock of the iptables datapath of the calling thread's network namespace."""
    return os.path.join(lock_dir, f"iptables-netns-{_netns_id()}.lock")


def _acquire_host_lock(path: str, info: str) -> None:
    with _host_locks_guard:
        lock, refs = _host_locks.get(path, (PidLock(path), 0))
        if refs == 0:
            os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
            lock.acquire(info)
        _host_locks[path] = (lock, refs + 1)


def _release_host_lock(path: str) -> None:
    with _host_locks_guard:
        lock, refs = _host_locks.get(path, (None, 0))
        if lock is None:
            return
        if refs <= 1:
            lock.release()
            del _host_locks[path]
        else:
            _host_locks[path] = (lock, refs - 1)


def _pod_cidrs(text: str) -> dict[int, tuple[str, ...]]:
    """``config.pod_cidr`` (one CIDR, or several separated by commas) per family."""
    out: dict[int, list[str]] = {4: [], 6: []}
    for part in text.split(","):
        if part.strip():
            net = ipaddress.ip_network(part.strip(), strict=False)
            out[net.version].append(str(net))
    return {f: tuple(v) for f, v in out.items()}


def _changed_dirs(changes: MapChanges) -> set[Direction]:
    return {k.direction for k in changes.adds} | {k.direction for k in changes.deletes}


class IptablesDatapath(Datapath):
    """iptables enforcement; ``config.mode`` is ``plain`` or ``ipset`` (default)."""

    name = "iptables"
    # each is proven by a test named in tests/test_iptables_contract.py
    capabilities = frozenset({"l7_redirect", "events", "ipv6", "fail_closed", "ipcache_dump"})
    options = OPTIONS

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

    # ---- lifecycle ------------------------------------------------------------

    def probe(self) -> None:
        if self.mode not in MODES:
            raise DatapathUnavailable(f"unknown iptables mode {self.mode!r} (plain | ipset)")
        if self._config_error:
            raise DatapathUnavailable(self._config_error)
        backend = detect(self.mode)
        try:
            Backend.ipset("list", "-n")
        except DatapathError as e:
            raise DatapathUnavailable(f"ipset does not work here: {e}") from e
        self._backend = backend

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self.probe()
        assert self._backend is not None
        return self._backend

    def _take_host_lock(self, what: str) -> None:
        """DatapathUnavailable naming the other agent if one runs here."""
        if self._host_lock is not None:
            return
        path = host_lock_path(self._lock_dir)
        try:
            _acquire_host_lock(path, f"state dir {self.config.state_dir}")
        except LockHeld as e:
            who = f"agent pid {e.pid}" if e.pid else "another agent"
            if e.info:
                who += f" ({e.info})"
            raise DatapathUnavailable(
                f"the iptables datapath of this network namespace is in use by {who}; "
                f"two iptables agents would share the AXON- chains and NFLOG group "
                f"{self.nflog_group}, so {what} is refused (lock {path})") from None
        except OSError as e:
            raise DatapathUnavailable(f"cannot take the iptables datapath lock {path}: {e}") from e
        self._host_lock = path

    def _drop_host_lock(self) -> None:
        path, self._host_lock = self._host_lock, None
        if path is not None:
            _release_host_lock(path)

    def start(self) -> None:
        with self._lock:
            self.probe()
            self._take_host_lock("starting a second one")
            self._stopped.clear()
            self._families = (4, 6) if self.backend.ipv6 else (4,)
            # The kernel is the truth: forget what a previous start() knew.
            self._refs.clear()
            self._states.clear()
            self._subchains.clear()
            self._proxy_chains.clear()
            self._rule_counts.clear()
            self._mangle.clear()
            self._mproxy.clear()
            self._fail_closed.clear()
            self._adopt_ipsets()
            # Read each table once: with nf_tables, reading back a large table
            # is the expensive part of a restart.
            tables = {f: (rd.parse_save(self.backend.save(f)),
                          rd.parse_save(self.backend.save(f, "mangle"), "mangle"))
                      for f in self._families}
            for family, (filt, mangle) in tables.items():
                self._adopt_rules(family, filt)
                self._adopt_mangle(family, mangle)
            self._recompute(set(self._families))
            # _write_base refills the verdict chains: keep what their counters said
            self._unknown_base += self._unknown_endpoint_packets()
            self._write_base(tables)
            LOG.info("iptables datapath started: mode=%s backend=%s (%s), adopted %d endpoints",
                     self.mode, self.backend.kind, self.backend.reason, len(self._refs))
        if self._events_enabled and self._nflog is None:
            try:
                self._nflog = NflogSocket(self.nflog_group)
                self._nflog_error = ""
            except DatapathError as e:
                self._nflog_error = str(e)
                LOG.warning("NFLOG events unavailable: %s", e)

    def stop(self) -> None:
        self._stopped.set()
        sock, self._nflog = self._nflog, None
        if sock is not None:
            sock.close()
        self._drop_host_lock()

    def cleanup(self) -> None:
        self.stop()
        # the chains are the running agent's too: never remove them under it
        self._take_host_lock("removing its chains")
        try:
            self._cleanup()
        finally:
            self._drop_host_lock()

    def _cleanup(self) -> None:
        with self._lock:
            backend = self.backend
            for family in (4, 6) if backend.ipv6 else (4,):
                # Empty the big chains we know of first: reading back (iptables-save)
                # a table of tens of thousands of rules takes seconds with nf_tables.
                known = [rd.ep_chain(ep, d) for ep in self._refs for d in Direction]
                if known:
                    flush = "*filter\n" + "".join(f"-F {c}\n" for c in known) + "COMMIT\n"
                    try:
                        self._restore(family, flush)
                    except DatapathError:
                        LOG.debug("pre-flush failed; the full cleanup below still runs")
                payload = ""
                for tname, hooks in (("filter", rd.HOOKS), ("mangle", rd.MANGLE_HOOKS)):
                    table = rd.parse_save(backend.save(family, tname), tname)
                    post = []
                    for builtin, chain in hooks:
                        for rule in table.chains.get(builtin, []):
                            if rule.endswith(f"-j {chain}"):
                                post.append(f"-D {builtin} {rule}")
                    chains = table.axon_chains()
                    if post or chains:
                        payload += rd.restore_payload(tname, {}, pre=post, delete_chains=chains)
                if payload:
                    self._restore(family, payload)
            names = [m.group(1) for line in Backend.ipset_save().splitlines()
                     if (m := _SET_CREATE_RE.match(line)) and rd.OWNED_SET_RE.match(m.group(1))]
            Backend.ipset_restore("".join(f"destroy {name}\n" for name in names))
            self._refs.clear()
            self._endpoints.clear()
            self._states.clear()
            self._sets.clear()
            self._proxy_chains.clear()
            self._subchains.clear()
            self._rule_counts.clear()
            self._mangle.clear()
            self._mproxy.clear()
            self._fail_closed.clear()
            self._ipcache = {4: {}, 6: {}}
            self._recompute({4, 6})

    # ---- adoption -------------------------------------------------------------

    def _adopt_ipsets(self) -> None:
        existing = set()
        contents: dict[str, tuple[set[str], set[str]]] = {}
        ipcache: dict[int, dict[px.Prefix, int]] = {4: {}, 6: {}}
        for line in Backend.ipset_save().splitlines():
            if m := _SET_CREATE_RE.match(line):
                existing.add(m.group(1))
                continue
            if m := _IPC_RE.match(line):
                name, cidr, ident, zero = m.groups()
                net = ipaddress.ip_network(cidr, strict=False)
                if zero:
                    net = net.supernet(new_prefix=0)
                ipcache[net.version][px.to_prefix(net)] = int(ident)
            elif m := _SET_ADD_RE.match(line):
                name, cidr, nomatch = m.groups()
                c = str(ipaddress.ip_network(cidr, strict=False))
                contents.setdefault(name, (set(), set()))[1 if nomatch else 0].add(c)
        self._ipcache = ipcache
        self._sets = {name: (frozenset(contents.get(name, (set(), set()))[0]),
                             frozenset(contents.get(name, (set(), set()))[1]))
                      for name in existing if name.startswith(("AXON-ID-", "AXON-ID6-"))}
        lines = []
        for family, name in IPC_SET.items():
            if name not in existing:
                fam = "inet" if family == 4 else "inet6"
                lines.append(f"create {name} hash:net family {fam} comment "
                             f"maxelem {max(self.config.ipcache_max, 1024)}")
        Backend.ipset_restore("\n".join(lines) + "\n")

    def _adopt_rules(self, family: int, table: rd.Table) -> None:
        if family == 4:
            for ref in rd.parse_endpoint_refs(table.chains.get(rd.FWD_CHAIN, [])):
                self._refs[ref.id] = ref
            for ep_id in self._refs:
                rules = (table.chains.get(rd.ep_chain(ep_id, Direction.INGRESS), [])
                         + table.chains.get(rd.ep_chain(ep_id, Direction.EGRESS), []))
                self._states[ep_id] = rd.parse_key_rules(rules)
                closed = frozenset(d for d in Direction if rd.is_fail_closed(
                    table.chains.get(rd.ep_chain(ep_id, d), [])))
                if closed:
                    self._fail_closed[ep_id] = closed
        for chain, rules in table.chains.items():
            if m := _SUB_RE.match(chain):
                self._subchains.setdefault((int(m.group(1)), family, _DIRS[m.group(2)]),
                                           set()).add(chain)
            elif m := _PXY_RE.match(chain):
                self._proxy_chains.add((int(m.group(1)), _DIRS[m.group(2)]))
            elif chain.startswith("AXON-EP-"):
                parts = chain.split("-")
                if len(parts) == 4 and parts[2].isdigit() and parts[3] in _DIRS:
                    self._rule_counts[(int(parts[2]), family, _DIRS[parts[3]])] = len(rules)

    def _adopt_mangle(self, family: int, table: rd.Table) -> None:
        for chain in table.chains:
            if m := _MEP_RE.match(chain):
                self._mangle.setdefault((int(m.group(1)), family, _DIRS[m.group(2)]),
                                        set()).add(chain)
            elif m := _MPXY_RE.match(chain):
                self._mproxy.add((family, int(m.group(1))))

    def _hooks(self, family: int) -> dict[str, list[str]]:
        scope = rd.PodScope(self.host_ifname_prefix, self._pod_cidrs.get(family, ()))
        return rd.hook_chains(list(self._refs.values()), scope, family)

    def _redirecting(self, family: int) -> set[tuple[int, Direction]]:
        return {(ep, d) for (ep, fam, d) in self._mangle if fam == family}

    def _write_base(self, tables: Mapping[int, tuple[rd.Table, rd.Table]]) -> None:
        """Verdict and hook chains (flushed and refilled: they are derived) and
        the jump rules from the built-in chains (added only when missing)."""
        for family in self._families:
            table, mangle = tables[family]
            chains = rd.shared_chains(self.nflog_group)
            for port, d in sorted(self._proxy_chains):
                chains[rd.proxy_chain(port, d)] = rd.proxy_chain_rules(port, d, self.nflog_group)
            hooks = self._hooks(family)
            # Endpoint chains must exist for the hook chains' jumps.
            for ep_id in self._refs:
                for d in Direction:
                    name = rd.ep_chain(ep_id, d)
                    if name not in table.chains:
                        chains.update(self._render(ep_id, d, family))
            chains.update(hooks)
            post = []
            for builtin, chain in rd.HOOKS:
                if not any(r.endswith(f"-j {chain}") for r in table.chains.get(builtin, [])):
                    post.append(f"-I {rd.hook_rule(builtin, chain)}".replace(
                        f"-I {builtin} ", f"-I {builtin} 1 ", 1))
            payload = rd.restore_payload("filter", chains, post=post)
            mpost = []
            for builtin, chain in rd.MANGLE_HOOKS:
                if not any(r.endswith(f"-j {chain}") for r in mangle.chains.get(builtin, [])):
                    mpost.append(f"-I {builtin} 1 -m comment --comment {rd.HOOK_COMMENT} -j {chain}")
            pre = {rd.PRE_CHAIN: rd.pre_chain(list(self._refs.values()), self._redirecting(family),
                                              family)}
            payload += rd.restore_payload("mangle", pre, post=mpost)
            self._restore(family, payload)

    # ---- ipcache --------------------------------------------------------------

    def _recompute(self, families: Iterable[int]) -> tuple[dict[int, set[int]], dict[int, set[int]]]:
        """Refresh the derived per-identity address views; return, per family,
        the identities whose addresses changed and those whose rules must be
        re-rendered (plain: the same; ipset: the ones gaining their first or
        losing their last address)."""
        changed: dict[int, set[int]] = {}
        rerender: dict[int, set[int]] = {}
        for family in families:
            table = self._ipcache[family]
            self._lengths[family] = sorted({plen for _, plen in table} | {0}, reverse=True)
            if self.mode == "plain":
                new = {ident: [px.to_cidr(p, family) for p in ranges]
                       for ident, ranges in px.effective_ranges(table, family).items()}
                old = self._ranges[family]
                changed[family] = {i for i in set(old) | set(new) if old.get(i) != new.get(i)}
                rerender[family] = changed[family]
                self._ranges[family] = new
            else:
                old_sets = self._idsets[family]
                new_sets = px.identity_sets(table, family)
                changed[family] = {i for i in set(old_sets) | set(new_sets)
                                   if old_sets.get(i) != new_sets.get(i)}
                rerender[family] = {i for i in changed[family]
                                    if bool(old_sets.get(i, ((), ()))[0])
                                    != bool(new_sets.get(i, ((), ()))[0])}
                self._idsets[family] = new_sets
        return changed, rerender

    def ipcache_apply(self, changes: IPCacheChanges) -> None:
        with self._lock:
            # the in-memory view changes below before the kernel's: put it back if
            # the write fails, so the agent's retry of the same batch is written
            saved = {f: dict(t) for f, t in self._ipcache.items()}
            try:
                self._ipcache_apply(changes)
            except BaseException:
                self._ipcache = saved
                self._recompute(set(saved))
                raise

    def _ipcache_apply(self, changes: IPCacheChanges) -> None:
        lines = []
        touched = set()
        for net in changes.deletes:
            prefix = px.to_prefix(net)
            if self._ipcache[net.version].pop(prefix, None) is not None:
                touched.add(net.version)
                lines += [f"del {IPC_SET[net.version]} {c} -exist" for c in self._ipc_cidrs(net)]
        for net, ident in changes.upserts.items():
            prefix = px.to_prefix(net)
            if self._ipcache[net.version].get(prefix) == ident:
                continue
            self._ipcache[net.version][prefix] = ident
            touched.add(net.version)
            zero = ",z" if net.prefixlen == 0 else ""
            lines += [f'add {IPC_SET[net.version]} {c} comment "id={ident}{zero}" -exist'
                      for c in self._ipc_cidrs(net)]
        if not touched:
            return
        # Updating an existing entry's comment needs del + add.
        lines = [ln for ln in lines if ln.startswith("del")] + [
            f"del {ln.split()[1]} {ln.split()[2]} -exist" for ln in lines if ln.startswith("add")
        ] + [ln for ln in lines if ln.startswith("add")]
        Backend.ipset_restore("\n".join(lines) + "\n")
        changed, rerender = self._recompute(touched)
        if self.mode == "ipset":
            dirty = set().union(*changed.values())
            referenced = {k.identity for st in self._states.values() for k in st}
            self._sync_sets(need={i for i in dirty if i in referenced or any(
                rd.set_name(i, f) in self._sets for f in self._families)})
        # endpoints referencing an identity whose rules change
        for family in touched:
            idents = rerender.get(family, set())
            eps = [ep for ep, st in self._states.items()
                   if ep in self._refs and any(k.identity in idents for k in st)]
            if not eps:
                continue
            chains: dict[str, list[str]] = {}
            deletes: list[str] = []
            for ep_id in eps:
                for d in Direction:
                    c, dels = self._render_with_stale(ep_id, d, family)
                    chains.update(c)
                    deletes += dels
            self._restore(family, rd.restore_payload("filter", chains, delete_chains=deletes))
            self._commit_subchains(chains, deletes, family)

    @staticmethod
    def _ipc_cidrs(net: IPNetwork) -> list[str]:
        if net.prefixlen == 0:
            return [str(s) for s in net.subnets(prefixlen_diff=1)]
        return [str(net)]

    def dump_ipcache(self) -> dict[IPNetwork, int]:
        out: dict[IPNetwork, int] = {}
        for line in Backend.ipset_save().splitlines():
            if m := _IPC_RE.match(line):
                _, cidr, ident, zero = m.groups()
                net = ipaddress.ip_network(cidr, strict=False)
                if zero:
                    net = net.supernet(new_prefix=0)
                out[net] = int(ident)
        return out

    def _sync_sets(self, need: Iterable[int] = (), only_missing: bool = False) -> None:
        """Make the AXON-ID sets hold the current LPM view (ipset mode).

        ``need``: identities whose sets must exist and be current; with
        ``only_missing`` the sets that exist are taken as current
        (ipcache_apply keeps them so) and only absent ones are made."""
        lines: list[str] = []
        wanted = set(need)
        new_sets: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        for family in self._families:
            fam = "inet" if family == 4 else "inet6"
            if only_missing:
                idents = {i for i in wanted if rd.set_name(i, family) not in self._sets}
            else:
                idents = wanted
            for ident in idents:
                name = rd.set_name(ident, family)
                match, nomatch = self._idsets[family].get(ident, (set(), set()))
                want = (frozenset(px.to_cidr(p, family) for p in match),
                        frozenset(px.to_cidr(p, family) for p in nomatch))
                have = self._sets.get(name)
                if have is None and not match:
                    continue  # rules render a never-matching placeholder instead
                if have is None:
                    lines.append(f"create {name} hash:net family {fam} "
                                 f"maxelem {max(self.config.ipcache_max, 1024)} -exist")
                    have = (frozenset(), frozenset())
                new_sets[name] = want
                if have == want:
                    continue
                for c in (have[0] - want[0]) | (have[1] - want[1]):
                    lines.append(f"del {name} {c} -exist")
                for c in want[0] - have[0]:
                    lines.append(f"add {name} {c} -exist")
                for c in want[1] - have[1]:
                    if c in have[0]:
                        lines.append(f"del {name} {c} -exist")
                    lines.append(f"add {name} {c} nomatch -exist")
                for c in want[0] & have[1]:
                    lines.append(f"del {name} {c} -exist")
                    lines.append(f"add {name} {c} -exist")
        if lines:
            Backend.ipset_restore("\n".join(lines) + "\n")
        self._sets.update(new_sets)

    # ---- endpoints ------------------------------------------------------------

    def endpoint_added(self, endpoint: Endpoint, enforce_ingress: bool, enforce_egress: bool) -> None:
        if not endpoint.host_ifname:
            raise DatapathProgramError("endpoint_added", None,
                                       f"endpoint {endpoint.id} has no host interface")
        ref = rd.EndpointRef(endpoint.id, endpoint.host_ifname, endpoint.ipv4 or "",
                             endpoint.ipv6 or "", enforce_ingress, enforce_egress)
        with self._lock:
            self._endpoints[endpoint.id] = endpoint
            if self._refs.get(endpoint.id) == ref:
                return  # adopted: the kernel already holds it
            old_ref = self._refs.get(endpoint.id)
            self._refs[endpoint.id] = ref
            state = self._states.setdefault(endpoint.id, MapState())
            try:
                self._write(endpoint.id, state, set(Direction), hooks=True)
            except DatapathError:
                if old_ref is None:
                    self._refs.pop(endpoint.id, None)
                else:
                    self._refs[endpoint.id] = old_ref
                raise

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        with self._lock:
            self._endpoints.pop(endpoint.id, None)
            self._fail_closed.pop(endpoint.id, None)
            ref = self._refs.pop(endpoint.id, None)
            self._states.pop(endpoint.id, None)
            for family in self._families:
                table = rd.parse_save(self.backend.save(family))
                prefix = f"AXON-EP-{endpoint.id}-"
                dead = [c for c in table.chains if c.startswith(prefix)]
                if ref is None and not dead:
                    continue
                payload = rd.restore_payload("filter", self._hooks(family), delete_chains=dead)
                mdead = sorted(set().union(*(self._mangle.pop((endpoint.id, family, d), set())
                                             for d in Direction)))
                if mdead:
                    pre = {rd.PRE_CHAIN: rd.pre_chain(list(self._refs.values()),
                                                      self._redirecting(family), family)}
                    payload += rd.restore_payload("mangle", pre, delete_chains=mdead)
                self._restore(family, payload)
                for d in Direction:
                    self._subchains.pop((endpoint.id, family, d), None)
                    self._rule_counts.pop((endpoint.id, family, d), None)

    def endpoint_fail_closed(self, endpoint: Endpoint, directions: frozenset[Direction]) -> None:
        """An ``AXFC`` rule right after the reply rule of the endpoint's chain in
        each direction of ``directions`` sends everything else to
        ``AXON-NRDY-<D>`` (NFLOG DROP_EP_NOT_READY, DROP); the mangle lookup
        returns there too, so nothing is marked for a proxy. Replies of
        established connections still pass, as on eBPF. Every later render of
        the endpoint keeps it (``endpoint_added`` included) until an empty set
        ends it; ``start()`` adopts it from the kernel."""
        closed = frozenset(directions)
        with self._lock:
            old = self._fail_closed.get(endpoint.id, frozenset())
            if endpoint.id not in self._refs:
                # remembered: endpoint_added renders it (as eBPF keeps the bits)
                if closed:
                    self._fail_closed[endpoint.id] = closed
                    raise DatapathProgramError("endpoint fail-closed", None,
                                               f"endpoint {endpoint.id} has no chains")
                self._fail_closed.pop(endpoint.id, None)
                return
            if closed == old:
                return  # idempotent: the kernel holds it (adopted or written)
            self._write(endpoint.id, self._states.get(endpoint.id, MapState()),
                        set(old ^ closed), closed=closed)

    # ---- policy ---------------------------------------------------------------

    def _ensure_ref(self, endpoint: Endpoint) -> None:
        if endpoint.id not in self._refs:
            self.endpoint_added(endpoint, True, True)

    def apply(self, endpoint: Endpoint, changes: MapChanges) -> None:
        with self._lock:
            self._ensure_ref(endpoint)
            if not changes:
                return
            old = self._states.get(endpoint.id, MapState())
            new = old.apply(changes)
            self._write(endpoint.id, new, _changed_dirs(changes))

    def sync(self, endpoint: Endpoint, state: MapState) -> MapChanges:
        with self._lock:
            self._ensure_ref(endpoint)
            have = self.dump(endpoint)
            adds = {k: v for k, v in state.items() if have.get(k) != v}
            deletes = frozenset(k for k in have if k not in state)
            # Rewrite both directions even without differences: rule bodies
            # may have drifted (addresses, hand edits) while keys did not.
            self._write(endpoint.id, MapState(state), set(Direction))
            return MapChanges(adds, deletes)

    def dump(self, endpoint: Endpoint) -> MapState:
        with self._lock:
            table = rd.parse_save(self.backend.save(4))
            rules = (table.chains.get(rd.ep_chain(endpoint.id, Direction.INGRESS), [])
                     + table.chains.get(rd.ep_chain(endpoint.id, Direction.EGRESS), []))
            return rd.parse_key_rules(rules)

    # ---- writing --------------------------------------------------------------

    def _peers(self, family: int) -> rd.Peers:
        if self.mode == "ipset":
            sets = self._idsets[family]
            return rd.Peers(self.mode, family, lambda ident: ("set",) if sets.get(ident, ((), ()))[0] else ())
        ranges = self._ranges[family]
        return rd.Peers(self.mode, family, lambda ident: ranges.get(ident, ()))

    def _render(self, ep_id: int, d: Direction, family: int,
                state: Mapping[Key, Entry] | None = None,
                targets: rd.Targets = rd.FILTER,
                closed: frozenset[Direction] | None = None) -> dict[str, list[str]]:
        ref = self._refs[ep_id]
        tail = ref.tail_in_drop if d is Direction.INGRESS else ref.tail_out_drop
        st = self._states.get(ep_id, MapState()) if state is None else state
        if closed is None:
            closed = self._fail_closed.get(ep_id, frozenset())
        return rd.render_endpoint(ep_id, d, st, self._peers(family), tail, targets,
                                  placeholders=family == 4 and targets is rd.FILTER,
                                  fail_closed=d in closed)

    def _render_with_stale(self, ep_id: int, d: Direction, family: int,
                           state: Mapping[Key, Entry] | None = None,
                           closed: frozenset[Direction] | None = None
                           ) -> tuple[dict[str, list[str]], list[str]]:
        chains = self._render(ep_id, d, family, state, closed=closed)
        old = self._subchains.get((ep_id, family, d), set())
        return chains, sorted(old - set(chains))

    def _commit_subchains(self, chains: Mapping[str, list[str]], deleted: Iterable[str],
                          family: int) -> None:
        dead = set(deleted)
        for name in chains:
            m = _SUB_RE.match(name)
            if m:
                self._subchains.setdefault((int(m.group(1)), family, _DIRS[m.group(2)]),
                                           set()).add(name)
        for key in list(self._subchains):
            if key[1] == family:
                self._subchains[key] -= dead
        for name, rules in chains.items():
            parts = name.split("-")
            if len(parts) == 4 and parts[:2] == ["AXON", "EP"] and parts[2].isdigit():
                self._rule_counts[(int(parts[2]), family, _DIRS[parts[3]])] = len(rules)

    def _write(self, ep_id: int, state: MapState, dirs: set[Direction], hooks: bool = False,
               closed: frozenset[Direction] | None = None) -> None:
        """Render ``dirs`` of one endpoint (failing closed in ``closed``, default:
        as now) and restore them, one transaction per family; on failure the
        families already written are put back."""
        if self.mode == "ipset":
            self._sync_sets(need={k.identity for k in state if k.identity and not k.is_address},
                            only_missing=True)
        old_closed = self._fail_closed.get(ep_id, frozenset())
        new_closed = old_closed if closed is None else closed
        done: list[int] = []
        try:
            for family in self._families:
                self._write_family(ep_id, state, dirs, hooks, family, new_closed)
                done.append(family)
        except DatapathError:
            old = self._states.get(ep_id, MapState())
            for family in done:
                try:
                    self._write_family(ep_id, old, dirs, hooks, family, old_closed)
                except DatapathError:
                    LOG.exception("rollback of endpoint %d (IPv%d) failed", ep_id, family)
            raise
        self._proxy_chains |= rd.proxy_ports(state)
        self._states[ep_id] = state
        if new_closed:
            self._fail_closed[ep_id] = new_closed
        else:
            self._fail_closed.pop(ep_id, None)

    def _write_family(self, ep_id: int, state: MapState, dirs: set[Direction], hooks: bool,
                      family: int, closed: frozenset[Direction]) -> None:
        chains: dict[str, list[str]] = {}
        for port, d in sorted(rd.proxy_ports(state) - self._proxy_chains):
            chains[rd.proxy_chain(port, d)] = rd.proxy_chain_rules(port, d, self.nflog_group)
        deletes: list[str] = []
        for d in sorted(dirs):
            c, dels = self._render_with_stale(ep_id, d, family, state, closed)
            chains.update(c)
            deletes += dels
        if hooks:
            chains.update(self._hooks(family))
        payload = rd.restore_payload("filter", chains, delete_chains=deletes)

        # mangle: the same lookup, only for directions holding redirects
        mchains: dict[str, list[str]] = {}
        mdeletes: list[str] = []
        mangle = dict(self._mangle)
        for d in sorted(dirs):
            key = (ep_id, family, d)
            old = mangle.get(key, set())
            if any(e.is_redirect for k, e in state.items() if k.direction == d):
                c = self._render(ep_id, d, family, state, rd.MANGLE, closed)
                mchains.update(c)
                mdeletes += sorted(old - set(c))
                mangle[key] = set(c)
            elif old:
                mdeletes += sorted(old)
                mangle.pop(key)
        ports = {e.proxy_port for e in state.values() if e.is_redirect}
        new_mproxy = {(family, p) for p in ports} - self._mproxy
        for _, port in sorted(new_mproxy):
            mchains[rd.mangle_proxy_chain(port)] = rd.mangle_proxy_rules(port)
        redirecting = {(ep, d) for (ep, fam, d) in mangle if fam == family}
        if redirecting != self._redirecting(family) or (hooks and redirecting):
            mchains[rd.PRE_CHAIN] = rd.pre_chain(list(self._refs.values()), redirecting, family)
        if mchains or mdeletes:
            payload += rd.restore_payload("mangle", mchains, delete_chains=mdeletes)
        self._restore(family, payload)
        self._commit_subchains(chains, deletes, family)
        self._mangle = mangle
        self._mproxy |= new_mproxy

    def _restore(self, family: int, payload: str) -> None:
        if self.fault_injection is not None and family == 4:
            bad, self.fault_injection = self.fault_injection, None
            payload = payload.replace("COMMIT\n", f"{bad}\nCOMMIT\n")
        self._counters["restores"] += 1
        try:
            self.backend.restore(family, payload)
        except DatapathProgramError:
            self._counters["restore_errors"] += 1
            LOG.debug("failed restore payload:\n%s", payload)
            raise

    # ---- events ---------------------------------------------------------------

    def _identity_of(self, ip: str) -> int:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return 0
        family = addr.version
        bits = px.BITS[family]
        value = int(addr)
        table = self._ipcache[family]
        for plen in self._lengths[family]:
            mask = ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)
            ident = table.get((value & mask, plen))
            if ident is not None:
                return ident
        return px.WORLD

    def _flow_endpoint(self, ip: str) -> FlowEndpoint:
        ident = self._identity_of(ip)
        for ep_id, ref in self._refs.items():
            if ip in (ref.ipv4, ref.ipv6):
                ep = self._endpoints.get(ep_id)
                if ep is None:
                    return FlowEndpoint(identity=ident, id=ep_id)
                return FlowEndpoint(identity=ep.identity or ident, namespace=ep.namespace,
                                    pod_name=ep.pod_name,
                                    labels=tuple(ep.labels.sorted_strings()), id=ep_id)
        return FlowEndpoint(identity=ident)

    def flow_from_log(self, prefix: str, ts: float, payload: bytes) -> Flow | None:
        parts = prefix.split(":")
        if len(parts) < 3 or parts[0] != "AXON":
            return None
        kind, direction = parts[1], parts[2]
        ipv, src, dst, l4 = decode_l4(payload)
        if not src:
            return None
        verdict, reason, event_type = {
            rd.LOG_ALLOW: (FlowVerdict.FORWARDED, None, "policy-verdict"),
            rd.LOG_AUDIT: (FlowVerdict.AUDIT, None, "policy-verdict"),
            rd.LOG_REDIRECT: (FlowVerdict.REDIRECTED, None, "policy-verdict"),
            rd.LOG_DENY: (FlowVerdict.DROPPED, DropReason.POLICY_DENY, "drop"),
            rd.LOG_DROP: (FlowVerdict.DROPPED, DropReason.POLICY_DENIED, "drop"),
            rd.LOG_NOT_READY: (FlowVerdict.DROPPED, DropReason.DROP_EP_NOT_READY, "drop"),
            rd.LOG_UNKNOWN: (FlowVerdict.DROPPED, DropReason.NO_MATCHING_LOCAL_CONTAINER_FOUND,
                             "drop"),
        }.get(kind, (None, None, ""))
        if verdict is None:
            return None
        ingress = direction == "I"
        with self._lock:
            source, destination = self._flow_endpoint(src), self._flow_endpoint(dst)
            local, peer = (destination, source) if ingress else (source, destination)
            match = self._match_type(local.id, peer.identity, ingress, l4, src if ingress else dst)
        return Flow(time=ts, verdict=verdict, ip_source=src, ip_destination=dst,
                    source=source, destination=destination,
                    traffic_direction="INGRESS" if ingress else "EGRESS",
                    event_type=event_type, drop_reason=reason, l4=l4, is_reply=False,
                    ip_version=ipv, match_type=match)

    def _match_type(self, ep_id: int, peer: int, ingress: bool, l4: Mapping[str, Any],
                    address: str | None = None) -> str:
        """Hubble's policy_match_type of the key that decided (from our MapState)."""
        state = self._states.get(ep_id)
        if not ep_id or state is None or not l4:
            return ""
        name, info = next(iter(l4.items()))
        proto = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP,
                 "ICMPv4": Protocol.ICMP, "ICMPv6": Protocol.ICMPV6}.get(name)
        if proto is None:
            return ""
        port = info.get("type", 0) if proto in (Protocol.ICMP, Protocol.ICMPV6) else info.get(
            "destination_port", 0)
        key = state.lookup(peer, Direction.INGRESS if ingress else Direction.EGRESS, proto,
                           int(port), address).key
        if key is None:
            return ""
        l3 = key.identity != 0
        if key.protocol is Protocol.ANY:
            return "L3_ONLY" if l3 else "ALL"
        return "L3_L4" if l3 else "L4_ONLY"

    def events(self) -> Iterator[Flow]:
        while not self._stopped.is_set():
            sock = self._nflog
            if sock is None:
                if self._stopped.wait(0.5):
                    return
                continue
            try:
                packets = sock.read(0.5)
            except (OSError, ValueError):
                if self._stopped.is_set():
                    return
                LOG.debug("nflog read failed", exc_info=True)
                time.sleep(0.1)
                continue
            for pkt in packets:
                flow = self.flow_from_log(pkt.prefix, pkt.time, pkt.payload)
                if flow is not None:
                    self._counters["events"] += 1
                    yield flow

    # ---- status ---------------------------------------------------------------

    def status(self) -> DatapathStatus:
        try:
            backend = self.backend
        except DatapathUnavailable as e:
            return DatapathStatus(self.name, self.mode, False, str(e))
        detail = (f"backend={backend.kind} ({backend.reason}); endpoints={len(self._refs)}; "
                  f"rules={sum(self._rule_counts.values())}; ipsets={len(self._sets)}")
        if self._nflog_error:
            detail += f"; events unavailable: {self._nflog_error}"
        return DatapathStatus(self.name, self.mode, True, detail)

    def metrics(self) -> Mapping[str, float]:
        out: dict[str, Any] = dict(self._counters)
        out["endpoints"] = float(len(self._refs))
        out["rules"] = float(sum(self._rule_counts.values()))
        out["ipsets"] = float(len(self._sets))
        out["ipcache_entries"] = float(sum(len(t) for t in self._ipcache.values()))
        out["packets_unknown_endpoint"] = self._unknown_base + self._unknown_endpoint_packets()
        return out

    def _unknown_endpoint_packets(self) -> float:
        """Packets the unknown-endpoint catch-all dropped since its verdict chains
        were last written (their DROP rules' kernel counters, both directions and
        families); 0 before start()."""
        if self._backend is None or not self.host_ifname_prefix:
            return 0.0
        total = 0
        for family in self._families:
            if not self._pod_cidrs.get(family):
                continue
            for d in Direction:
                try:
                    total += self._backend.drop_packets(family, rd.unknown_drop_chain(d))
                except DatapathError:
                    LOG.debug("cannot read the counters of %s", rd.unknown_drop_chain(d),
                              exc_info=True)
        return float(total)
