"""One identity collector per cluster: leader election over a Lease (issue 20).

Cilium collects CiliumIdentities in its operator, one instance. axoneme has no
operator, so every agent could run the periodic collector
(``_identityk8s.IdentityGC``); its writes are conditional and so safe, but N
agents judging the same objects make N passes of writes, most of them losing
with 409 (about 800 conflicts per 1,000 pod cycles with 2 agents,
conformance-results/multinode-identities). Instead the agents elect one of
them, as client-go's ``leaderelection`` package does over a
``coordination.k8s.io/v1`` Lease (``axoneme-identity-gc`` in the agent's
namespace, kube-system), and only the holder runs the periodic passes.

The Lease (``LeaseElector``; client-go's ``tryAcquireOrRenew``)
-----------------------------------------------------------------
Every candidate reads the Lease every ``retry_period`` seconds (2):

1. Absent: it creates it holding it (``holderIdentity`` = the node name,
   ``leaseDurationSeconds``, ``acquireTime`` = ``renewTime`` = now as MicroTime,
   ``leaseTransitions`` 0). The API server's create is the arbiter: 409
   AlreadyExists means another candidate won.
2. Held by another: a candidate keeps its own clock of when it last saw the
   Lease change (any field of its spec). The Lease is fresh until the
   ``leaseDurationSeconds`` the holder published have passed on that clock
   since then (the holder's timestamps are never compared with ours: clocks
   may differ). Fresh: not ours; the next read comes at the expiry if that is
   sooner than the retry period. An empty ``holderIdentity`` (a released
   Lease) is free at once.
3. Ours, expired or free: an update (PUT) carrying the ``resourceVersion``
   read, with ``renewTime`` now; ``acquireTime`` now and ``leaseTransitions``
   + 1 when the holder changes. 409 Conflict: another candidate wrote first,
   not ours. Two candidates therefore cannot both win the same version.

The holder renews (3) every retry period. A holder that has not renewed
successfully for ``renew_deadline`` seconds (10, below the lease duration, 15)
stops collecting at once (``leading`` checks the time, so a pass in progress
stops before its next write, ``IdentityGC.execute``) and is a candidate again:
it stops at least ``lease_duration - renew_deadline`` seconds before any other
candidate can take the Lease. A clean stop (agent SIGTERM: the task cancelled)
releases the Lease (client-go's ``ReleaseOnCancel``): ``holderIdentity`` empty,
``leaseDurationSeconds`` 1, so another candidate takes it at its next read.

What only the holder does, and what every agent keeps
-----------------------------------------------------
Only the holder runs ``IdentityGC``'s periodic passes (mark unused, unmark,
delete after ``identity_heartbeat_timeout``). Every agent still:

- takes a mark back when it starts using an identity
  (``CRDIdentityStore.acquire``, ``IdentitySync``): that is a use, not a
  collection, and it is what makes the holder's conditional delete fail;
- creates again an identity deleted while in use here (``IdentitySync.repair``);
- runs the Node-delete pass (``_identitynodegc``). It is kept on every agent
  because it is event-driven (one short pass per Node delete, a few writes per
  identity, not a periodic pass over every identity) and must finish within
  seconds: if the deleted Node ran the holder, no agent would hold the Lease
  for up to a lease duration, and the pass would wait for it. Its writes are
  the collector's conditional ones, so several agents running it lose with
  409/404 as before (its docstring: "Why it is safe").

``identity_gc_leader_election: false`` turns the election off (every agent
collects, the behaviour before); it is on by default in CRD mode. The
durations are the Cilium operator's ``leader-election-lease-duration``,
``-renew-deadline`` and ``-retry-period`` (config keys ``leader_election_*``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from axoneme.agent._identitycrd import http_status
from axoneme.agent._k8sinformer import Obj, short_error

LOG = logging.getLogger(__name__)

__all__ = ["KubernetesLeaseAPI", "LeaseElector", "lease_namespace", "micro_time"]

LEASE_NAME = "axoneme-identity-gc"
GROUP, VERSION, PLURAL = "coordination.k8s.io", "v1", "leases"
SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def lease_namespace(sa_file: str = SA_NAMESPACE) -> str:
    """The agent's namespace: ``$POD_NAMESPACE``, else its service account's
    (in a pod), else kube-system (deploy/rbac.yaml's Role lives there)."""
    ns = os.environ.get("POD_NAMESPACE", "").strip()
    if ns:
        return ns
    try:
        with open(sa_file) as f:
            return f.read().strip() or "kube-system"
    except OSError:
        return "kube-system"


def micro_time(t: float) -> str:
    """A Kubernetes MicroTime (RFC 3339, microseconds, UTC)."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_object(name: str, namespace: str, spec: dict[str, Any],
                 resource_version: str = "") -> Obj:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if resource_version:
        meta["resourceVersion"] = resource_version
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Lease", "metadata": meta,
            "spec": spec}


class LeaseAPI(Protocol):
    """The calls on one Lease (``KubernetesLeaseAPI``; a fake in unit tests).
    Errors carry the HTTP status as ``.status``."""

    def get(self) -> Obj | None: ...

    def create(self, obj: Obj) -> Obj: ...

    def update(self, obj: Obj) -> Obj: ...


class KubernetesLeaseAPI:
    """``LeaseAPI`` over the `kubernetes` client (raw objects through
    CustomObjectsApi, which builds the same paths for built-in groups: the
    MicroTimes are written as the API server reads them)."""

    def __init__(self, api: Any, namespace: str, name: str = LEASE_NAME,
                 timeout: float = 5.0) -> None:
        from kubernetes import client

        self.custom: Any = client.CustomObjectsApi(api)
        self.namespace, self.name = namespace, name
        self.timeout = (min(2.0, timeout), timeout)

    def get(self) -> Obj | None:
        try:
            return dict(self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name,
                _request_timeout=self.timeout))
        except Exception as e:
            if http_status(e) == 404:
                return None
            raise

    def create(self, obj: Obj) -> Obj:
        return dict(self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, obj, _request_timeout=self.timeout))

    def update(self, obj: Obj) -> Obj:
        # a PUT carrying metadata.resourceVersion: 409 Conflict if the Lease changed since
        return dict(self.custom.replace_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, self.name, obj,
            _request_timeout=self.timeout))


class LeaseElector:
    """The candidate of the module docstring. ``attempt`` (one read and maybe a
    write: a worker thread) and ``release`` are synchronous; ``run`` is the loop
    on the agent's event loop. ``clock``: monotonic seconds (expiry, deadline);
    ``wall``: the time written into the Lease."""

    def __init__(self, api: LeaseAPI | None, identity: str, namespace: str,
                 name: str = LEASE_NAME, lease_duration: float = 15.0,
                 renew_deadline: float = 10.0, retry_period: float = 2.0,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self.api = api
        self.identity, self.namespace, self.name = identity, namespace, name
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.clock, self.wall = clock, wall
        self.observed: dict[str, Any] | None = None  # the Lease's spec as last read
        self.observed_at = 0.0  # when (clock) it last changed, as seen here
        self.renewed_at: float | None = None  # last successful acquire/renew (clock)
        self.leader = False
        self.acquired = 0  # times this agent became the holder
        self.lost = 0  # times it stopped holding without releasing
        self.conflicts = 0  # writes that lost (409)
        self.last_error = ""
        self.stopped = False  # released (a clean stop): no attempt writes again
        self._lock = threading.Lock()  # attempt and release, one at a time

    # -- state ---------------------------------------------------------------------------
    def leading(self) -> bool:
        """Whether this agent may collect now: the holder as last read (as
        client-go's ``IsLeader``), renewed within the renew deadline (judged
        now, not at the last loop turn)."""
        return (self.leader and self.holder() == self.identity and self.renewed_at is not None
                and self.clock() - self.renewed_at < self.renew_deadline)

    def holder(self) -> str:
        return str((self.observed or {}).get("holderIdentity") or "")

    def _observe(self, spec: dict[str, Any], now: float) -> None:
        if spec != self.observed:
            self.observed, self.observed_at = dict(spec), now

    def _duration_of(self, spec: dict[str, Any]) -> float:
        d = spec.get("leaseDurationSeconds")
        return float(d) if isinstance(d, int) and not isinstance(d, bool) and d > 0 \
            else self.lease_duration

    def expires_in(self) -> float:
        """Seconds until the observed Lease, held by another, is free (0: free now)."""
        spec = self.observed or {}
        if not self.holder() or self.holder() == self.identity:
            return 0.0
        return max(0.0, self.observed_at + self._duration_of(spec) - self.clock())

    # -- one attempt ---------------------------------------------------------------------
    def attempt(self) -> bool:
        """Acquire or renew (steps 1-3): True when this agent holds the Lease now."""
        with self._lock:
            # the deadline counts from before the request: the write may land any time after
            started = self.clock()
            ok = self._attempt()
            if ok:
                self.renewed_at = started
                if not self.leader:
                    self.leader = True
                    self.acquired += 1
                    LOG.warning("identity gc: this node (%s) holds lease %s/%s: collecting",
                                self.identity, self.namespace, self.name)
            elif self.leader and not self.leading():
                self._stop_leading(f"held by {self.holder()}" if self.holder() not in
                                   ("", self.identity) else
                                   f"cannot renew within {self.renew_deadline:g}s")
            return ok

    def _attempt(self) -> bool:
        if self.stopped:  # an attempt still in a worker thread when the agent stopped
            return False
        if self.api is None:
            self.last_error = "no API client yet"
            return False
        now, stamp = self.clock(), micro_time(self.wall())
        try:
            obj = self.api.get()
            if obj is None:  # 1: absent
                spec = {"holderIdentity": self.identity,
                        "leaseDurationSeconds": int(round(self.lease_duration)),
                        "acquireTime": stamp, "renewTime": stamp, "leaseTransitions": 0}
                created = self.api.create(lease_object(self.name, self.namespace, spec))
                self._observe(dict(created.get("spec") or spec), now)
                self.last_error = ""
                return True
            spec = dict(obj.get("spec") or {})
            self._observe(spec, now)
            holder = str(spec.get("holderIdentity") or "")
            if holder and holder != self.identity and \
                    self.observed_at + self._duration_of(spec) > now:
                self.last_error = ""
                return False  # 2: held by another, fresh
            transitions = spec.get("leaseTransitions")
            transitions = transitions if isinstance(transitions, int) else 0
            new = {"holderIdentity": self.identity,
                   "leaseDurationSeconds": int(round(self.lease_duration)),
                   "acquireTime": spec.get("acquireTime") or stamp, "renewTime": stamp,
                   "leaseTransitions": transitions}
            if holder != self.identity:  # 3: taken over (expired or released)
                new.update(acquireTime=stamp, leaseTransitions=transitions + 1)
            meta = obj.get("metadata") or {}
            body = dict(obj, spec=new)
            body["metadata"] = dict(meta)  # carries the resourceVersion read
            updated = self.api.update(body)
            self._observe(dict(updated.get("spec") or new), now)
            self.last_error = ""
            return True
        except Exception as e:
            if http_status(e) in (404, 409):
                self.conflicts += 1  # another candidate wrote first (or deleted it)
                self.last_error = ""
                return False
            self.last_error = short_error(e)
            LOG.info("identity gc lease %s/%s: %s", self.namespace, self.name, self.last_error)
            return False

    def _stop_leading(self, why: str) -> None:
        self.leader = False
        self.lost += 1
        LOG.warning("identity gc: this node (%s) no longer holds lease %s/%s (%s): "
                    "not collecting", self.identity, self.namespace, self.name, why)

    def release(self) -> bool:
        """A clean stop: stop collecting, then hand the Lease back (holder
        emptied) if this agent holds it. True when the release was written."""
        self.stopped = True  # before the lock: an attempt waiting for it writes nothing
        with self._lock:
            was = self.leader
            self.leader = False
            if not was or self.api is None:
                return False
            stamp = micro_time(self.wall())
            try:
                obj = self.api.get()
                spec = dict((obj or {}).get("spec") or {})
                if obj is None or spec.get("holderIdentity") != self.identity:
                    return False
                transitions = spec.get("leaseTransitions")
                new = {"holderIdentity": "", "leaseDurationSeconds": 1,
                       "acquireTime": stamp, "renewTime": stamp,
                       "leaseTransitions": transitions if isinstance(transitions, int) else 0}
                body = dict(obj, spec=new)
                body["metadata"] = dict(obj.get("metadata") or {})
                self._observe(dict(self.api.update(body).get("spec") or new), self.clock())
                LOG.warning("identity gc: released lease %s/%s", self.namespace, self.name)
                return True
            except Exception as e:
                self.last_error = f"release: {short_error(e)}"
                LOG.warning("identity gc lease %s/%s: %s", self.namespace, self.name,
                            self.last_error)
                return False

    # -- the loop ------------------------------------------------------------------------
    def pause(self) -> float:
        """Seconds to the next attempt: the retry period, or less when the Lease
        another agent holds expires sooner (taken within its duration plus
        at most one retry period of the holder's last renew)."""
        wait = self.retry_period
        if not self.leader:
            left = self.expires_in()
            if 0 < left < wait:
                wait = left + 0.05
        return wait

    async def run(self) -> None:
        """Candidate and holder until cancelled; cancelled (a clean stop):
        releases the Lease."""
        try:
            while True:
                # bounded: a hung request must not hold the loop past the deadline. Not
                # wait_for: cancelled as the attempt ends, it returns the result and the
                # cancel is lost (Python 3.11), and the agent's stop would wait for ever
                fut = asyncio.ensure_future(asyncio.to_thread(self.attempt))
                done, _ = await asyncio.wait({fut}, timeout=max(self.retry_period, 1.0) * 2)
                if not done:  # (not under _lock: the hung attempt holds it)
                    self.last_error = "the API server did not answer"
                    if self.leader and not self.leading():
                        self._stop_leading("no answer")
                elif fut.exception() is not None:  # attempt catches the API's errors: a bug
                    LOG.warning("identity gc lease: attempt failed", exc_info=fut.exception())
                await asyncio.sleep(self.pause())
        except asyncio.CancelledError:
            # shielded: a second cancel must not leave the release to chance
            await asyncio.shield(asyncio.to_thread(self.release))
            raise

    def view(self) -> dict[str, Any]:
        spec = self.observed or {}
        age = None if self.renewed_at is None else round(self.clock() - self.renewed_at, 3)
        return {"enabled": True, "lease": f"{self.namespace}/{self.name}",
                "identity": self.identity, "leading": self.leading(),
                "holder": self.holder(), "lease_transitions": spec.get("leaseTransitions"),
                "renew_time": spec.get("renewTime"),
                "lease_duration": self.lease_duration, "renew_deadline": self.renew_deadline,
                "retry_period": self.retry_period, "acquired": self.acquired,
                "lost": self.lost, "conflicts": self.conflicts, "renewed_ago": age,
                "last_error": self.last_error}
