"""The regenerator: the only code that writes to the datapath.

Policy (engine) -> MapState per endpoint -> ``Datapath.apply``/``sync``, and
the engine's ipcache -> ``Datapath.ipcache_apply``. Blocking datapath calls
run in a worker thread, serialised by one lock. Nothing that failed is
forgotten (see ``regenerate_sync``); an endpoint whose policy cannot be
written fails closed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from axoneme.agent import _tracing as tracing
from axoneme.agent._l7proxies import L7Proxies
from axoneme.agent._metrics import AgentMetrics
from axoneme.agent._state import StateStore
from axoneme.core.datapath import Datapath, IPCacheChanges
from axoneme.core.endpoint import Endpoint
from axoneme.core.errors import DatapathError, MapFullError
from axoneme.core.failpoints import failpoint
from axoneme.core.mapstate import Direction, MapChanges, MapState
from axoneme.core.policy.engine import PolicyEngine

LOG = logging.getLogger(__name__)


def merge_ipcache(old: IPCacheChanges | None, new: IPCacheChanges) -> IPCacheChanges:
    """``old`` then ``new`` as one batch (a prefix in both upserts and deletes
    is an upsert, as datapaths apply them)."""
    if old is None:
        return new
    upserts = {k: v for k, v in old.upserts.items() if k not in new.deletes}
    upserts.update(new.upserts)
    deletes = frozenset((old.deletes | new.deletes) - set(new.upserts))
    return IPCacheChanges(upserts, deletes)


def _policy_write(write: Callable[[Endpoint, Any], Any], ep: Endpoint, what: Any) -> Any:
    """``dp.apply``/``dp.sync`` behind the ``datapath.apply`` failpoint."""
    failpoint("datapath.apply", DatapathError)
    return write(ep, what)


def _can(dp: Datapath, capability: str) -> bool:
    """Whether ``dp`` may do ``capability``: declared, or a datapath that
    declares nothing (written before capabilities; it is tried)."""
    caps = dp.capabilities
    return not caps or capability in caps


# Up to this many pending keys/prefixes a regeneration runs on the agent's
# loop, while the last such one took less than INLINE_COST_S.
INLINE_CHANGES = 64
INLINE_COST_S = 0.002


class Regenerator:
    """Pushes the engine's pending changes into the datapath."""

    def __init__(self, engine: PolicyEngine, store: StateStore, metrics: AgentMetrics,
                 proxies: L7Proxies, policy_map_full: str = "fail-closed") -> None:
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.proxies = proxies
        self.policy_map_full = policy_map_full
        self.datapath: Datapath | None = None
        self._lock = threading.Lock()
        self._enforcement: dict[int, tuple[bool, bool]] = {}  # what the datapath was told
        # what the datapath refused, kept until it is written
        self.ipcache_pending: IPCacheChanges | None = None
        self.ipcache_error = ""
        self.ipcache_failures = 0
        self._resync: set[int] = set()  # endpoints whose kernel policy is not the resolved one
        self.fail_closed: dict[int, frozenset[Direction]] = {}  # endpoint id -> directions
        self.fail_closed_reason: dict[int, str] = {}
        self.retry_delay = 1.0
        self.retry_at = 0.0
        self.after_regenerate: Callable[[], None] = lambda: None  # the agent's gauges
        self._small_cost = float("inf")  # how long the last small regeneration took
        self.host_endpoint: Endpoint | None = None  # the host firewall's endpoint (_hostfw)

    # -- raw datapath access (serialised) ----------------------------------------------
    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a datapath method under the datapath lock (worker thread)."""
        with self._lock:
            return fn(*args)

    def _dp(self) -> Datapath:
        if self.datapath is None:
            raise DatapathError("the datapath is not started")
        return self.datapath

    async def endpoint_added(self, ep: Endpoint) -> None:
        """Attach an endpoint with the engine's enforcement flags."""
        dp = self._dp()
        enf = self.engine.enforcement(ep.id)
        await asyncio.to_thread(self.call, dp.endpoint_added, ep, *enf)
        self._enforcement[ep.id] = enf

    async def endpoint_removed(self, ep: Endpoint) -> None:
        """Detach an endpoint; failures are logged (it is going anyway)."""
        self._enforcement.pop(ep.id, None)
        if self.datapath is None:
            return
        try:
            await asyncio.to_thread(self.call, self.datapath.endpoint_removed, ep)
        except Exception:
            LOG.warning("datapath could not forget endpoint %d", ep.id, exc_info=True)

    def dump(self, ep: Endpoint) -> MapState:
        with self._lock:
            return self._dp().dump(ep)

    # -- a full sync (start: adopt what the kernel holds) ---------------------------------
    def sync_all(self, endpoints: list[Endpoint]) -> dict[int, str]:
        """Make the kernel hold exactly the resolved state: the ipcache (stale
        prefixes removed) and every endpoint's policy. Returns endpoint id ->
        error for endpoints that fail closed instead (worker thread)."""
        dp = self._dp()
        errors: dict[int, str] = {}
        desired = self.engine.ipcache()
        self.engine.pending_ipcache_changes()
        with self._lock:
            self.proxies.start_wanted()
            current = dp.dump_ipcache() if _can(dp, "ipcache_dump") else {}
            stale = frozenset(k for k in current if k not in desired)
            # all of it: a datapath may keep an in-memory view that only this fills
            dp.ipcache_apply(IPCacheChanges(dict(desired), stale))
            if current and current != desired:  # one C-level comparison when equal
                LOG.warning("start: the kernel's ipcache differed from the computed one "
                            "(%d prefixes removed, %d changed or new)", len(stale),
                            sum(1 for k, v in desired.items() if current.get(k) != v))
            for ep in endpoints:
                enf = self.engine.enforcement(ep.id)
                dp.endpoint_added(ep, *enf)
                self._enforcement[ep.id] = enf
                try:
                    changed = _policy_write(dp.sync, ep, self.engine.resolve(ep.id))
                    if changed:
                        # expected after a change while the agent was down; else the
                        # kernel was changed behind its back (or a write was lost)
                        LOG.warning("start: endpoint %d: the kernel's policy differed from the "
                                    "computed one (%d entries written, %d removed)", ep.id,
                                    len(changed.adds), len(changed.deletes))
                    # a previous run may have left it failing closed: it fits now
                    self._switch_fail_closed(dp, ep, frozenset())
                except DatapathError as e:
                    # one endpoint whose policy cannot be written must not stop
                    # the node; it fails closed until a retry writes it
                    errors[ep.id] = self._fail_closed_after(dp, ep, None, e)
                    self._resync.add(ep.id)
        self.engine.pending_changes()  # sync applied everything (or _resync retries it)
        self.proxies.policy_changed()
        return errors

    # -- incremental -----------------------------------------------------------------
    def regenerate_sync(self) -> dict[int, str]:
        """Push pending ipcache and policy changes to the datapath (worker thread).

        Returns endpoint id -> error for endpoints whose apply failed.

        Nothing that failed is forgotten:
        1. ipcache changes that could not be written stay pending (merged with
           later ones) and are written again on the next regeneration or by
           the retry loop (``retry``);
        2. an endpoint whose apply failed is fully re-synced now and, while
           that fails, on every later regeneration;
        3. a policy that cannot be written (it does not fit the endpoint's
           policy map, MapFullError, or the write fails) makes the endpoint
           fail closed in the directions that changed instead of leaving the
           older policy in force; the next sync that succeeds ends it. Only a
           full map may keep the older policy, if the user chose so
           (``--policy-map-full keep-last``).
        """
        dp = self._dp()
        errors: dict[int, str] = {}
        t0 = time.perf_counter()
        with self._lock, tracing.span("policy.regeneration") as sp:
            if self.proxies.wanted:
                self.proxies.start_wanted()
            self._write_ipcache(dp)
            pending = self.engine.pending_changes()
            for ep_id in sorted(set(pending) | self._resync):
                ep = self._endpoint(ep_id)
                changes = pending.get(ep_id)
                if ep is None:
                    self._resync.discard(ep_id)
                    self.fail_closed.pop(ep_id, None)
                    continue
                if not changes and ep_id not in self._resync:
                    continue
                reason = "RegenerationFailure" if ep_id in self._resync else "PolicyUpdate"
                t1 = time.perf_counter()
                with tracing.span("endpoint.regeneration", endpoint=ep.id,
                                  identity=ep.identity) as esp:
                    error = self._write_policy(dp, ep, changes)
                    tracing.set_attributes(esp, outcome="fail" if error else "success",
                                           error=error)
                self.metrics.endpoint_regenerated(time.perf_counter() - t1, error is None, reason)
                if error is not None:
                    errors[ep_id] = error
                    self._resync.add(ep_id)
                else:
                    self._resync.discard(ep_id)
                    if ep_id in self.fail_closed:
                        self._end_fail_closed(dp, ep)
            tracing.set_attributes(sp, endpoints_failed=len(errors))
        # the native HTTP engine caches policy answers (also per endpoint address:
        # endpoint adds and removals regenerate too): they go, confirmed, before
        # anyone learns the change is in force; the next request asks again
        self.proxies.policy_changed()
        self.metrics.regenerated(time.perf_counter() - t0)
        return errors

    def _endpoint(self, ep_id: int) -> Endpoint | None:
        host = self.host_endpoint
        if host is not None and ep_id == host.id:
            return host
        ep: Endpoint | None = self.store.endpoint_objs.get(ep_id)
        return ep

    async def host_endpoint_added(self, ep: Endpoint) -> None:
        """The host firewall's endpoint: attached, its whole policy written
        (what a previous run left in the kernel is replaced), lock held."""
        self.host_endpoint = ep
        await self.endpoint_added(ep)
        dp = self._dp()

        def sync() -> None:
            with self._lock:
                try:
                    _policy_write(dp.sync, ep, self.engine.resolve(ep.id))
                    # the kernel holds it all: the next change is a diff against it
                    self.engine.mark_synced(ep.id)
                except DatapathError as e:
                    self._fail_closed_after(dp, ep, None, e)
                    self._resync.add(ep.id)
        await asyncio.to_thread(sync)

    def _write_ipcache(self, dp: Datapath) -> None:
        ipc = merge_ipcache(self.ipcache_pending, self.engine.pending_ipcache_changes())
        if not (ipc.upserts or ipc.deletes):
            return
        try:
            failpoint("datapath.ipcache", DatapathError)
            dp.ipcache_apply(ipc)
            self.ipcache_pending = None
            self.ipcache_error = ""
        except Exception as e:  # kept and retried whatever failed
            self.ipcache_pending = ipc
            self.ipcache_error = str(e)
            self.ipcache_failures += 1
            LOG.error("ipcache update failed (%d changes kept, retried): %s",
                      len(ipc.upserts) + len(ipc.deletes), e)
            LOG.debug("ipcache update failure", exc_info=True)
            self.metrics.errors.labels(op="ipcache").inc()

    def _write_policy(self, dp: Datapath, ep: Endpoint, changes: MapChanges | None) -> str | None:
        """Apply (or, after a failure, sync) one endpoint's policy; the error, or None."""
        resync = ep.id in self._resync
        try:
            # enforcement flags travel with endpoint_added (idempotent);
            # a datapath may key its default verdict on them
            enf = self.engine.enforcement(ep.id)
            if self._enforcement.get(ep.id) != enf:
                dp.endpoint_added(ep, *enf)
                self._enforcement[ep.id] = enf
            if resync:
                _policy_write(dp.sync, ep, self.engine.resolve(ep.id))
            else:
                assert changes is not None
                _policy_write(dp.apply, ep, changes)
            return None
        except DatapathError as e:
            if not resync:
                LOG.error("endpoint %d: datapath apply failed: %s", ep.id, e)
                self.metrics.errors.labels(op="apply").inc()
            # drift: resync this endpoint fully
            try:
                _policy_write(dp.sync, ep, self.engine.resolve(ep.id))
                return None
            except DatapathError as e2:  # MapFullError included
                return self._fail_closed_after(dp, ep, changes, e2)

    # -- failing closed ---------------------------------------------------------------
    def _switch_fail_closed(self, dp: Datapath, ep: Endpoint,
                            directions: frozenset[Direction]) -> bool:
        """``dp.endpoint_fail_closed``; False when the datapath has no such switch."""
        if not _can(dp, "fail_closed"):
            return False
        try:
            dp.endpoint_fail_closed(ep, directions)
        except NotImplementedError:
            return False
        return True

    def _fail_closed_after(self, dp: Datapath, ep: Endpoint, changes: MapChanges | None,
                           err: DatapathError) -> str:
        """The endpoint's policy could not be written (it does not fit the
        policy map, or the write failed): fail closed in the directions that
        changed, so a tightening is never lost by leaving the older policy in
        force. A full map may keep the last policy instead if the user chose
        so (``--policy-map-full keep-last``). Returns the endpoint's status text."""
        if isinstance(err, MapFullError):
            self.metrics.errors.labels(op="policy_map_full").inc()
            what = f"policy map full: {err}"
            if self.policy_map_full == "keep-last":
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
        dirs = frozenset(changed or Direction) | self.fail_closed.get(ep.id, frozenset())
        names = "+".join(sorted(d.name.lower() for d in dirs))
        reason = f"{what}; failing closed ({names})"
        try:
            if not self._switch_fail_closed(dp, ep, dirs):
                # the datapath has no fail-closed switch: take the endpoint's entries
                # in those directions away, its default deny drops the traffic
                kept = MapState({k: v for k, v in dp.dump(ep).items() if k.direction not in dirs})
                _policy_write(dp.sync, ep, kept)
        except DatapathError as e:
            LOG.error("endpoint %d: cannot fail closed: %s", ep.id, e)
            return f"{reason} FAILED: {e}"
        if self.fail_closed.get(ep.id) != dirs:
            LOG.error("endpoint %d: %s", ep.id, reason)
        self.fail_closed[ep.id] = dirs
        self.fail_closed_reason[ep.id] = reason
        return reason

    def _end_fail_closed(self, dp: Datapath, ep: Endpoint) -> None:
        try:
            # without a switch, the sync that just succeeded put the entries back
            self._switch_fail_closed(dp, ep, frozenset())
        except DatapathError as e:
            LOG.error("endpoint %d: cannot end failing closed: %s", ep.id, e)
            return
        LOG.warning("endpoint %d: its policy fits again, no longer failing closed", ep.id)
        self.fail_closed.pop(ep.id, None)
        self.fail_closed_reason.pop(ep.id, None)

    # -- on the agent loop ----------------------------------------------------------------
    async def regenerate(self) -> dict[int, str]:
        """``regenerate_sync`` (in a worker thread unless the change is small:
        a one-entry change is a few syscalls, the thread hop would cost more
        than the write); endpoint records say which endpoints are not ready
        (lock held)."""
        small = (self.engine.pending_size() <= INLINE_CHANGES and not self._resync
                 and self.ipcache_pending is None)
        if small and self._small_cost < INLINE_COST_S and self._lock_free():
            errors, cost = self._timed_regenerate()
        else:
            errors, cost = await asyncio.to_thread(self._timed_regenerate)
        if small:
            # datapaths differ (a BPF map write vs an iptables-restore): the
            # loop runs small ones only while they stay cheap, whatever runs
            # them (the write's own time: a thread's hand-off on a loaded
            # machine must not keep later small ones off the loop)
            self._small_cost = cost
        for rec in self.store.endpoints.values():
            if rec.id in errors:
                rec.status = f"not-ready: {errors[rec.id]}"
            elif rec.status.startswith("not-ready"):
                rec.status = "ready"
        self.after_regenerate()
        return errors

    def _timed_regenerate(self) -> tuple[dict[int, str], float]:
        """``regenerate_sync`` and the seconds it took (waiting for the lock included)."""
        t0 = time.perf_counter()
        errors = self.regenerate_sync()
        return errors, time.perf_counter() - t0

    def _lock_free(self) -> bool:
        """Whether no worker thread holds the datapath (a dump, a sync): the
        loop must not wait for one."""
        if not self._lock.acquire(blocking=False):
            return False
        self._lock.release()
        return True

    @property
    def behind(self) -> bool:
        """Whether something the datapath refused waits for a retry."""
        return self.ipcache_pending is not None or bool(self._resync)

    async def retry(self) -> None:
        """Write again what the datapath refused (ipcache changes, endpoints
        not in sync), with backoff: 1 s, doubling up to 30 s."""
        if not self.behind:
            self.retry_delay = 1.0
            return
        if time.monotonic() < self.retry_at:
            return
        async with self.store.lock:
            await self.regenerate()
        if not self.behind:
            LOG.info("datapath retry succeeded")
            self.retry_delay = 1.0
        else:
            self.retry_delay = min(self.retry_delay * 2, 30.0)
        self.retry_at = time.monotonic() + self.retry_delay

    # -- status ----------------------------------------------------------------------
    def faults(self) -> list[str]:
        out = [f"endpoint {ep_id}: {reason}"
               for ep_id, reason in sorted(self.fail_closed_reason.items())]
        for rec in sorted(self.store.endpoints.values(), key=lambda r: r.id):
            if rec.status.startswith("not-ready") and rec.id not in self.fail_closed_reason:
                out.append(f"endpoint {rec.id}: {rec.status}")
        if self.ipcache_pending is not None:
            out.append(f"ipcache: {self.ipcache_error or 'changes pending'} (retried)")
        return out

    def ipcache_view(self) -> dict[str, Any]:
        pending = self.ipcache_pending
        return {"pending": len(pending.upserts) + len(pending.deletes) if pending else 0,
                "last_error": self.ipcache_error, "retries": self.ipcache_failures}

    def fail_closed_view(self) -> list[dict[str, Any]]:
        return [{"endpoint": ep_id, "directions": sorted(d.name.lower() for d in dirs),
                 "reason": self.fail_closed_reason.get(ep_id, "")}
                for ep_id, dirs in sorted(self.fail_closed.items())]
