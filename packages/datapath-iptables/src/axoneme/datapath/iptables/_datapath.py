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

The class is put together from one module per job: ``_state`` (options and
the state the parts share), ``_ipsets`` (ipcache and identity ipsets),
``_transaction`` (rendering and restores), ``_flows`` (NFLOG verdicts as
flows), ``_hostlock`` (one agent per netns); here: lifecycle, adoption from
the kernel, endpoints, policy and status.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from axoneme.core.datapath import DatapathStatus, IPCacheChanges
from axoneme.core.endpoint import Endpoint
from axoneme.core.errors import DatapathError, DatapathProgramError, DatapathUnavailable
from axoneme.core.lockfile import LockHeld
from axoneme.core.mapstate import Direction, MapChanges, MapState
from axoneme.datapath.iptables import _readback as rb
from axoneme.datapath.iptables import _render as rd
from axoneme.datapath.iptables._backend import Backend, detect
from axoneme.datapath.iptables._flows import _Flows
from axoneme.datapath.iptables._hostlock import (
    HOST_LOCK_DIR,
    acquire_host_lock,
    host_lock_path,
    release_host_lock,
)
from axoneme.datapath.iptables._nflog import NflogSocket
from axoneme.datapath.iptables._state import MODES, OPTIONS
from axoneme.datapath.iptables._transaction import _DIRS, _SUB_RE, _Transactions

LOG = logging.getLogger(__name__)

# HOST_LOCK_DIR, OPTIONS, host_lock_path: importable from here as before the
# parts moved to their own modules (tests use them)
__all__ = ["HOST_LOCK_DIR", "OPTIONS", "IptablesDatapath", "host_lock_path"]

_PXY_RE = re.compile(r"^AXON-PXY-(\d+)-(IN|OUT)$")
_MEP_RE = re.compile(r"^AXON-EP-(\d+)-(IN|OUT)(-S\d+)?$")
_MPXY_RE = re.compile(r"^AXON-MPXY-(\d+)$")


def _changed_dirs(changes: MapChanges) -> set[Direction]:
    return {k.direction for k in changes.adds} | {k.direction for k in changes.deletes}


class IptablesDatapath(_Flows, _Transactions):
    """iptables enforcement; ``config.mode`` is ``plain`` or ``ipset`` (default)."""

    name = "iptables"
    # each is proven by a test named in tests/test_iptables_contract.py
    capabilities = frozenset({"l7_redirect", "events", "ipv6", "fail_closed", "ipcache_dump",
                              "host_policy"})
    options = OPTIONS

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

    def _take_host_lock(self, what: str) -> None:
        """DatapathUnavailable naming the other agent if one runs here."""
        if self._host_lock is not None:
            return
        path = host_lock_path(self._lock_dir)
        try:
            acquire_host_lock(path, f"state dir {self.config.state_dir}")
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
            release_host_lock(path)

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
            tables = {f: (rb.parse_save(self.backend.save(f)),
                          rb.parse_save(self.backend.save(f, "mangle"), "mangle"))
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
                    table = rb.parse_save(backend.save(family, tname), tname)
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
            self._destroy_ipsets()
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

    def _adopt_rules(self, family: int, table: rb.Table) -> None:
        if family == 4:
            # pods' refs are on their FORWARD jumps, the host endpoint's on its INPUT jump
            for ref in rb.parse_endpoint_refs(table.chains.get(rd.FWD_CHAIN, [])
                                              + table.chains.get(rd.INPUT_CHAIN, [])):
                self._refs[ref.id] = ref
            for ep_id in self._refs:
                rules = (table.chains.get(rd.ep_chain(ep_id, Direction.INGRESS), [])
                         + table.chains.get(rd.ep_chain(ep_id, Direction.EGRESS), []))
                self._states[ep_id] = rb.parse_key_rules(rules)
                closed = frozenset(d for d in Direction if rb.is_fail_closed(
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

    def _adopt_mangle(self, family: int, table: rb.Table) -> None:
        for chain in table.chains:
            if m := _MEP_RE.match(chain):
                self._mangle.setdefault((int(m.group(1)), family, _DIRS[m.group(2)]),
                                        set()).add(chain)
            elif m := _MPXY_RE.match(chain):
                self._mproxy.add((family, int(m.group(1))))

    # ---- ipcache --------------------------------------------------------------

    def ipcache_apply(self, changes: IPCacheChanges) -> None:
        with self._lock:
            # the in-memory view changes below before the kernel's: put it back if
            # the write fails, so the agent's retry of the same batch is written
            saved = {f: dict(t) for f, t in self._ipcache.items()}
            try:
                # endpoints referencing an identity whose rules change
                for family, idents in self._ipset_apply(changes).items():
                    self._rerender_peers(family, idents)
            except BaseException:
                self._ipcache = saved
                self._recompute(set(saved))
                raise

    # ---- endpoints ------------------------------------------------------------

    def endpoint_added(self, endpoint: Endpoint, enforce_ingress: bool, enforce_egress: bool) -> None:
        if not endpoint.host_ifname and not endpoint.is_host:
            raise DatapathProgramError("endpoint_added", None,
                                       f"endpoint {endpoint.id} has no host interface")
        # the host endpoint has no interface: INPUT/OUTPUT (_render.hook_chains)
        ifname = rd.HOST_IFNAME if endpoint.is_host else endpoint.host_ifname
        ref = rd.EndpointRef(endpoint.id, ifname, endpoint.ipv4 or "",
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
                table = rb.parse_save(self.backend.save(family))
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
            table = rb.parse_save(self.backend.save(4))
            rules = (table.chains.get(rd.ep_chain(endpoint.id, Direction.INGRESS), [])
                     + table.chains.get(rd.ep_chain(endpoint.id, Direction.EGRESS), []))
            return rb.parse_key_rules(rules)

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
