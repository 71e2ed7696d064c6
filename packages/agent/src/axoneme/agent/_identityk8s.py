"""Cluster-wide identities through the API server: Cilium's CRD mode.

Kubernetes mode with ``identity_allocation_mode: crd`` (the default there):
every identity is a cluster-scoped ``CiliumIdentity`` (cilium.io/v2,
deploy/crds/ciliumidentities.yaml) whose name is the number and whose
``security-labels`` field holds the label set (``{"k8s:app": "web", ...}``);
its ``metadata.labels`` carry the ``k8s:`` labels that are valid Kubernetes
labels, so ``kubectl get ciliumid -l app=web`` finds it. Standalone mode and
``identity_allocation_mode: local`` keep the node-local allocator.

Allocation (``_identitycrd.CRDIdentityStore``, the allocator's ``IdentityStore``)
--------------------------------------------------------------------------------
1. A label set the cache already maps to a number (the watch below keeps
   every identity of the cluster in it) gets that number: the lowest one if
   two hold it.
2. Otherwise the allocator walks the label set's probe sequence (a hash of
   the sorted labels, then upwards) and, for each number the cache does not
   show taken, creates the object: 201 is ours; 409 AlreadyExists reads the
   object: the same labels (another node won the race) is ours too, other
   labels means the next number. The API server's create is the arbiter, so
   no number ever names two label sets, and two nodes racing on a new label
   set walk the same sequence and meet at its first free number.
3. A label set can still end up under two numbers when the garbage collector
   deletes a number in the middle of another node's walk. Every node then
   answers the lowest of them, re-identifies its endpoints that hold a higher
   one, and the higher one, unused, is collected: the cluster converges.
4. A node can start using a number the collector is deleting (its watch had
   not brought the mark, so acquiring it wrote nothing), and another node can
   then create that number for other labels before this one creates it again.
   The API's labels win: this node re-identifies the endpoints and remote pods
   that hold the number (they get another number for their labels, through
   1-2) and then knows the number by the API's labels
   (``IdentitySync.move_off_taken``).

The watch (``IdentitySync``)
----------------------------
An informer follows ``ciliumidentities``: what other nodes create becomes
known here (``identity list`` shows it, endpoints of other nodes resolve to
it), what is deleted is forgotten unless this node uses it, in which case
the agent creates it again with the same number and labels (as Cilium's
allocator re-creates a master key it still holds).

Garbage collection (``IdentityGC``)
-----------------------------------
Cilium's operator marks an identity no CiliumEndpoint uses with the
``io.cilium.heartbeat`` annotation and deletes it a heartbeat timeout later
with the object's resourceVersion as precondition; an agent that starts
using a marked identity removes the mark, which changes the resourceVersion
and so fails the operator's delete. axoneme has no operator: every agent
runs the same collector from its own caches, every ``identity_gc_interval``
seconds give or take a quarter (jitter) (0: off), and by default only on
the agent holding the Lease ``axoneme-identity-gc`` (``_identitylease``:
client-go's leader election; ``identity_gc_leader_election: false`` lets
every agent collect, each judging and writing):

- an identity is used when this node's endpoints hold it, or when a pod of
  the cluster (the pods informer: every pod, every node) has exactly its
  labels and it is the lowest number for them;
- used and marked: the mark is removed; unused and unmarked: it is marked
  with the time (a merge patch carrying the resourceVersion it was judged
  at: a change since fails it with 409, judged again when the watch brings it);
- unused and marked at least ``identity_heartbeat_timeout`` seconds ago: it
  is deleted with preconditions uid and resourceVersion.

Two agents collecting at once (the election off, or an old holder's last
write crossing the new holder's first) are safe: every write is conditional,
the loser gets 409/404 and moves on. An agent that acquires an identity (its first
endpoint with it) removes a mark first (``CRDIdentityStore.acquire``); if the
identity was deleted meanwhile it creates it again, or, when the number was
taken for other labels in between, allocates anew. The grace period covers
caches that lag: a pod must stay unseen by the collecting agent for the
whole timeout before its identity goes.
"""


from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from axoneme.agent._identitycrd import (
    CRDIdentityStore,
    KubernetesIdentityAPI,
    http_status,
    marked_at,
    meta_field,
    object_labels,
    object_number,
)
from axoneme.agent._identitylease import KubernetesLeaseAPI, LeaseElector, lease_namespace
from axoneme.agent._identitynodegc import NodeDeleteGC
from axoneme.agent._k8sinformer import Event, Obj, short_error
from axoneme.core.errors import IdentityError
from axoneme.core.failpoints import failpoint
from axoneme.core.identity import (
    MAX_CLUSTER_IDENTITY,
    MIN_CLUSTER_IDENTITY,
    IdentityAllocator,
    preferred_number,
)
from axoneme.core.labels import Labels

LOG = logging.getLogger(__name__)

__all__ = ["CRDIdentities", "IdentityGC", "IdentitySync", "pod_label_sets"]

JITTER = 0.25  # of identity_gc_interval, either way (IdentityGC.pause)


class IdentitySync:
    """Applies the ``ciliumidentities`` watch to the allocator (on the agent's loop).

    ``relabel(numbers)`` re-identifies this node's endpoints holding one of
    ``numbers`` (a lower number now holds their labels)."""

    def __init__(self, store: CRDIdentityStore, allocator: IdentityAllocator,
                 relabel: Callable[[set[int]], Awaitable[None]]) -> None:
        self.store = store
        self.allocator = allocator
        self.relabel = relabel
        self.conflicts: dict[int, str] = {}  # number -> what the API says instead

    async def on_events(self, _: str, events: Sequence[Event], initial: bool) -> None:
        store, alloc = self.store, self.allocator
        lost: list[int] = []  # deleted from the API while this node uses them
        seen: set[int] = set()
        for kind, obj in events:
            number = object_number(obj)
            if number is None:
                LOG.warning("CiliumIdentity %s: not a number in %d-%d: ignored",
                            meta_field(obj, "name"), MIN_CLUSTER_IDENTITY, MAX_CLUSTER_IDENTITY)
                continue
            if kind == "DELETED":
                store.objects.pop(number, None)
                self.conflicts.pop(number, None)
                if not alloc.forget(number):
                    lost.append(number)
                continue
            seen.add(number)
            store.objects[number] = obj
            labels = object_labels(obj)
            if alloc.learn(number, labels):
                self.conflicts.pop(number, None)
            else:
                # this node holds the number for other labels: it lost a race it
                # could not see (or someone wrote the object by hand)
                self.conflicts[number] = ",".join(labels)
                LOG.error("identity %d: the API server says %s, this node uses it for %s",
                          number, ",".join(labels), ",".join(
                              alloc.get(number).label_strings()))  # type: ignore[union-attr]
        if initial:
            # what the state file restored and the cluster no longer has
            for ident in alloc.all():
                if ident.reserved or ident.local or ident.id in seen:
                    continue
                if not alloc.forget(ident.id):
                    lost.append(ident.id)
        refs = alloc.references()
        unmark = [n for n in refs if n in store.objects and marked_at(store.objects[n]) is not None]
        if lost or unmark:
            await asyncio.to_thread(self.repair, lost, unmark)
        await self.move_off_taken()
        stale = set()
        for number in refs:
            held = alloc.get(number)
            canonical = alloc.lookup(held.labels) if held is not None else None
            if canonical is not None and canonical.id != number:
                stale.add(number)
        if stale:
            LOG.warning("identities %s: a lower number holds the same labels: "
                        "re-identifying their endpoints", ",".join(map(str, sorted(stale))))
            await self.relabel(stale)

    async def move_off_taken(self) -> None:
        """Numbers this node holds for labels other than the API's (step 4 of the
        module docstring: its delete and re-creation crossed this node's use): the
        holders move to another number, then the number is what the API says."""
        store, alloc = self.store, self.allocator
        taken = set()
        for number in list(self.conflicts):
            obj, held = store.objects.get(number), alloc.get(number)
            if obj is not None and held is not None and \
                    object_labels(obj) != held.label_strings() and alloc.disown(number):
                taken.add(number)
        if not taken:
            return
        LOG.warning("identities %s: the API server gives them other labels now: moving "
                    "their endpoints to another number", ",".join(map(str, sorted(taken))))
        await self.relabel(taken)
        for number in taken:
            obj = store.objects.get(number)
            if obj is not None and alloc.forget(number) and alloc.learn(number, object_labels(obj)):
                self.conflicts.pop(number, None)

    def repair(self, lost: Iterable[int], unmark: Iterable[int]) -> None:
        """Put back what this node uses (a worker thread: API writes)."""
        for number in lost:
            ident = self.allocator.get(number)
            if ident is None:
                continue
            try:
                if self.store.claim(number, ident.label_strings()):
                    LOG.warning("identity %d was deleted while in use here: created again",
                                number)
                else:
                    self.conflicts[number] = "taken for other labels after a delete"
                    LOG.error("identity %d was deleted while in use here and is now taken "
                              "for other labels", number)
            except IdentityError as e:
                LOG.warning("identity %d: cannot create it again: %s", number, e)
        for number in unmark:
            ident = self.allocator.get(number)
            if ident is None:
                continue
            try:
                self.store.acquire(number, ident.label_strings())
            except IdentityError as e:
                LOG.warning("identity %d: cannot take back its mark: %s", number, e)

    def faults(self) -> list[str]:
        return [f"identity {n}: the API server holds it for {what}"
                for n, what in sorted(self.conflicts.items())]


class IdentityGC:
    """The collector of the module docstring. ``used_labels()`` is the set of
    label sets (sorted strings) of the cluster's pods."""

    def __init__(self, store: CRDIdentityStore, allocator: IdentityAllocator,
                 used_labels: Callable[[], set[tuple[str, ...]]], interval: float,
                 timeout: float, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.allocator = allocator
        self.used_labels = used_labels
        self.interval = interval
        self.timeout = timeout
        self.clock = clock
        self.runs = 0
        self.marked = 0
        self.unmarked = 0
        self.deleted = 0
        self.conflicts = 0
        self.last_error = ""
        # the leader election's "this agent holds the Lease now" (None: every agent collects)
        self.may_collect: Callable[[], bool] | None = None
        # number -> the resourceVersion a write lost on (409/404): not judged again until
        # the watch brings another version (each pass would repeat the same losing write)
        self.stale: dict[int, str] = {}
        self._lock = threading.Lock()  # one pass at a time

    def user(self) -> Callable[[int, Obj], bool]:
        """Whether an identity is used, judged from the caches as they are now
        (this node's references, the cluster's pods): the module docstring's rule."""
        refs = self.allocator.references()
        pods = self.used_labels()

        def used(number: int, obj: Obj) -> bool:
            if number in refs:
                return True
            labels = tuple(object_labels(obj))
            canonical = self.allocator.lookup(Labels.from_strings(labels))
            return labels in pods and canonical is not None and canonical.id == number
        return used

    def plan(self) -> list[tuple[str, int, Obj]]:
        """What one pass does: ("mark" | "unmark" | "delete", number, object judged)."""
        is_used = self.user()
        now = self.clock()
        out = []
        objects = dict(self.store.objects)  # a copy: threads write it
        for number in [n for n in self.stale if n not in objects]:
            del self.stale[number]
        for number, obj in sorted(objects.items()):
            rv = meta_field(obj, "resourceVersion")
            if number in self.stale:
                if self.stale[number] == rv:
                    continue  # the write on this version lost: wait for the watch
                del self.stale[number]
            used = is_used(number, obj)
            mark = marked_at(obj)
            if used and mark is not None:
                out.append(("unmark", number, obj))
            elif not used and mark is None:
                out.append(("mark", number, obj))
            elif not used and mark is not None and now - mark >= self.timeout:
                out.append(("delete", number, obj))
        return out

    def run_once(self) -> None:
        """One pass: judge, then write."""
        self.execute(self.plan())

    def execute(self, plan: Sequence[tuple[str, int, Obj]], why: str = "") -> None:
        """The writes of a pass (a worker thread: API calls). ``why``: a targeted
        pass's reason (``_identitynodegc``), for the log; it is not counted in runs."""
        with self._lock:
            api = self.store.api
            if api is None:
                return
            periodic = not why
            if periodic and not self._may_collect():
                return
            if periodic:
                self.runs += 1
            for action, number, obj in plan:
                if periodic and not self._may_collect():
                    LOG.info("identity gc: the lease was lost during a pass: stopped")
                    return
                rv, uid = meta_field(obj, "resourceVersion"), meta_field(obj, "uid")
                try:
                    if action == "delete":
                        api.delete(number, uid, rv)
                        self.deleted += 1
                        LOG.info("identity %d: unused %s: deleted", number,
                                 why or f"for {self.timeout:g}s")
                    else:
                        stamp = (datetime.fromtimestamp(self.clock(), UTC)
                                 .isoformat().replace("+00:00", "Z"))
                        updated = api.set_mark(number, rv, stamp if action == "mark" else None)
                        self.store.objects[number] = updated
                        if action == "mark":
                            self.marked += 1
                            LOG.info("identity %d: unused%s: marked for deletion", number,
                                     f" {why}" if why else "")
                        else:
                            self.unmarked += 1
                except Exception as e:
                    if http_status(e) in (404, 409):
                        self.conflicts += 1  # changed or gone since judged: next round
                        self.stale[number] = rv
                        continue
                    self.last_error = f"{action} {number}: {short_error(e)}"
                    LOG.warning("identity gc: %s", self.last_error)

    def _may_collect(self) -> bool:
        return self.may_collect is None or self.may_collect()

    def pause(self) -> float:
        """Seconds to the next pass: the interval, give or take ``JITTER`` of it.
        With a fixed interval two agents keep the phase they started with: two
        that start close together collect in step for ever, and the later one's
        writes conflict with the earlier one's (judged before it saw them)."""
        return self.interval * random.uniform(1 - JITTER, 1 + JITTER)

    async def run(self) -> None:
        if self.interval <= 0:
            return
        while True:
            await asyncio.sleep(self.pause())
            if not self._may_collect():
                continue  # another agent holds the Lease: it collects
            try:
                # judged on the loop (the caches change there), written from a thread
                await asyncio.to_thread(self.execute, self.plan())
            except Exception:
                LOG.warning("identity gc pass failed", exc_info=True)

    def view(self) -> dict[str, Any]:
        return {"interval": self.interval, "heartbeat_timeout": self.timeout, "runs": self.runs,
                "marked": self.marked, "unmarked": self.unmarked, "deleted": self.deleted,
                "conflicts": self.conflicts, "last_error": self.last_error}


class _Collide(Exception):
    pass


class CRDIdentities:
    """CRD mode wired into the agent: the store (give it to the allocator), the
    watch (an extra informer of ``KubernetesSource``) and the collector."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.store = CRDIdentityStore()
        self.sync: IdentitySync | None = None
        self.gc: IdentityGC | None = None
        # a Node's delete: its pods' identities within seconds (a nodes listener, _agent)
        self.node_gc: NodeDeleteGC | None = None
        # the Lease that picks the one agent running the periodic passes (_identitylease)
        self.elector: LeaseElector | None = None
        # more holders of identities to move to a lower duplicate (other nodes' pods)
        self.renumber_hooks: list[Callable[[set[int]], Awaitable[None]]] = []

    def preferred(self, key: tuple[str, ...]) -> int:
        """Where a label set's probing starts: its hash (``identity_hash_bits``
        of it: a test knob, fewer bits force collisions), or, with the failpoint
        ``identity.collide`` armed (tests: AXONEME_FAILPOINTS), 256 for every
        label set, so each new one collides with all before it."""
        try:
            failpoint("identity.collide", _Collide)
        except _Collide:
            return MIN_CLUSTER_IDENTITY
        return preferred_number(key, int(getattr(self.config, "identity_hash_bits", 16)))

    def attach(self, source: Any, allocator: IdentityAllocator, endpoints: Any,
               state: Any) -> None:
        """Follow ``ciliumidentities`` through ``source`` (``KubernetesSource``);
        ``endpoints``/``state``: re-identification under the agent's lock."""
        config = self.config

        async def relabel(numbers: set[int]) -> None:
            async with state.lock:
                await endpoints.relabel(lambda rec: rec.identity in numbers)
                await state.persist(strict=False)
            for hook in self.renumber_hooks:  # they take the lock themselves
                await hook(numbers)

        def lister(api: Any) -> Callable[..., Any]:
            real = KubernetesIdentityAPI(api)
            self.store.api = real
            if self.elector is not None:  # requests time out well within the renew deadline
                elector = self.elector
                elector.api = KubernetesLeaseAPI(
                    api, elector.namespace, timeout=max(1.0, min(5.0, elector.renew_deadline / 2)))
            return real.lister()

        def used_labels() -> set[tuple[str, ...]]:
            return pod_label_sets(source, config.cluster_name)

        self.sync = IdentitySync(self.store, allocator, relabel)
        self.gc = IdentityGC(self.store, allocator, used_labels,
                             float(config.identity_gc_interval),
                             float(config.identity_heartbeat_timeout))
        if getattr(config, "identity_gc_leader_election", True) and self.gc.interval > 0:
            self.elector = LeaseElector(
                None, str(source.node), lease_namespace(),
                lease_duration=float(config.leader_election_lease_duration),
                renew_deadline=float(config.leader_election_renew_deadline),
                retry_period=float(config.leader_election_retry_period))
            self.gc.may_collect = self.elector.leading
        self.node_gc = NodeDeleteGC(
            self.gc, lambda nodes: pod_label_sets(source, config.cluster_name, on=nodes),
            float(getattr(config, "identity_node_gc_grace", 2.0)))
        source.extra_informers["identities"] = (lister, self.sync.on_events)

    async def run(self) -> None:
        """The periodic collector, and the election that lets it collect (until
        cancelled: a clean stop releases the Lease, ``LeaseElector.run``)."""
        if self.gc is None:
            return
        tasks = [asyncio.create_task(self.gc.run())]
        if self.elector is not None:
            tasks.append(asyncio.create_task(self.elector.run()))
        try:  # (not gather: cancelled, it returns at its first child's end, not its last)
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()  # once each: the elector then writes its release
            await asyncio.wait(tasks)  # the release is written before the agent goes on

    def view(self) -> dict[str, Any]:
        out = self.store.view()
        if self.gc is not None:
            out["gc"] = self.gc.view()
            out["gc"]["leader_election"] = (self.elector.view() if self.elector is not None
                                            else {"enabled": False})
        if self.node_gc is not None:
            out["node_gc"] = self.node_gc.view()
        return out

    def faults(self) -> list[str]:
        return self.sync.faults() if self.sync is not None else []


def pod_label_sets(source: Any, cluster_name: str,
                   on: set[str] | None = None) -> set[tuple[str, ...]]:
    """The identity label sets of the cluster's pods (``KubernetesSource``'s
    cache; host-network pods have none). A pod bound to a Node the API no
    longer has does not count: its node is gone (the pod garbage collector
    deletes such pods 40 s or more later), so the identities only its pods
    held are unused at once (``_identitynodegc`` collects them then).
    ``on``: instead, the label sets of the pods bound to these nodes, gone or
    not (what a Node's delete may leave unused)."""
    from axoneme.core.cluster import Namespace, namespace_labels, pod_identity_labels

    out = set()
    nodes = getattr(source, "nodes", None)
    for meta in list(source.pods.values()):
        if meta.host_network:
            continue
        if on is not None:
            if meta.node not in on:
                continue
        elif meta.node and nodes is not None and meta.node not in nodes:
            continue
        name = meta.pod.namespace
        # as EndpointService.namespace_obj: a namespace not cached yet has its name label
        ns = source.namespace(name) or Namespace(name, namespace_labels(name))
        out.add(tuple(pod_identity_labels(meta.pod, ns, cluster_name).sorted_strings()))
    return out
