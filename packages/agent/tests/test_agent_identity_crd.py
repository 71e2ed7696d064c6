"""CRD-mode identities (agent/_identityk8s.py, _identitycrd.py) against an in-memory fake of the
API server's create/get/patch/delete semantics for CiliumIdentity objects:
409 AlreadyExists, resourceVersion and uid preconditions, and a watch log.

The real API server is exercised by tests/k8s/test_k8s_identities.py."""

from __future__ import annotations

import asyncio
import copy
import random
import threading
from typing import Any

import pytest
from axoneme.agent._identitycrd import (
    MARK,
    CRDIdentityStore,
    identity_object,
    marked_at,
    object_labels,
    object_number,
)
from axoneme.agent._identityk8s import IdentityGC, IdentitySync
from axoneme.core.errors import IdentityError
from axoneme.core.identity import IdentityAllocator
from axoneme.core.labels import Labels
from hypothesis import given, settings
from hypothesis import strategies as st


class ApiError(Exception):
    def __init__(self, status: int, what: str = "") -> None:
        super().__init__(f"HTTP {status} {what}")
        self.status = status
        self.reason = what


class FakeIdentityAPI:
    """The API server's semantics for one cluster-scoped resource, thread-safe.
    ``events`` is the watch: every change in order, as the server streams it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[int, dict[str, Any]] = {}
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.rv = 0
        self.uids = 0
        self.history: list[tuple[int, tuple[str, ...]]] = []  # every create: number, labels
        self.fail: int | None = None  # every call answers this status (an outage)

    def _bump(self, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def _check(self) -> None:
        if self.fail is not None:
            raise ApiError(self.fail, "scripted outage")

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            self._check()
            number = int(obj["metadata"]["name"])
            if number in self.objects:
                raise ApiError(409, "AlreadyExists")
            obj = copy.deepcopy(obj)
            self.uids += 1
            obj["metadata"]["uid"] = f"uid-{self.uids}"
            self._bump(obj)
            self.objects[number] = obj
            self.history.append((number, tuple(object_labels(obj))))
            self.events.append(("ADDED", copy.deepcopy(obj)))
            return copy.deepcopy(obj)

    def get(self, number: int) -> dict[str, Any] | None:
        with self.lock:
            self._check()
            obj = self.objects.get(number)
            return copy.deepcopy(obj) if obj is not None else None

    def set_mark(self, number: int, resource_version: str, value: str | None) -> dict[str, Any]:
        with self.lock:
            self._check()
            obj = self.objects.get(number)
            if obj is None:
                raise ApiError(404, "NotFound")
            if obj["metadata"]["resourceVersion"] != resource_version:
                raise ApiError(409, "Conflict")
            notes = obj["metadata"].setdefault("annotations", {})
            if value is None:
                notes.pop(MARK, None)
            else:
                notes[MARK] = value
            self._bump(obj)
            self.events.append(("MODIFIED", copy.deepcopy(obj)))
            return copy.deepcopy(obj)

    def delete(self, number: int, uid: str, resource_version: str) -> None:
        with self.lock:
            self._check()
            obj = self.objects.get(number)
            if obj is None:
                raise ApiError(404, "NotFound")
            meta = obj["metadata"]
            if meta["uid"] != uid or meta["resourceVersion"] != resource_version:
                raise ApiError(409, "Conflict: precondition failed")
            del self.objects[number]
            self._bump(obj)
            self.events.append(("DELETED", copy.deepcopy(obj)))

    def labels_of(self, number: int) -> tuple[str, ...] | None:
        with self.lock:
            obj = self.objects.get(number)
            return tuple(object_labels(obj)) if obj is not None else None


def collide(_: tuple[str, ...]) -> int:
    return 256  # every label set probes from the same number: forced collisions


def labels(i: int, ns: str = "default") -> Labels:
    return Labels.from_strings([f"k8s:app=app{i}", f"k8s:io.kubernetes.pod.namespace={ns}"])


class Node:
    """One agent's identity side: store, allocator, the watch (from a position
    in the fake's event log) and its endpoints (label-set key -> number held)."""

    def __init__(self, api: FakeIdentityAPI, name: str, preferred: Any = collide) -> None:
        self.name = name
        self.api = api
        self.store = CRDIdentityStore(api)
        self.alloc = IdentityAllocator(self.store, preferred=preferred)
        self.sync = IdentitySync(self.store, self.alloc, self.relabel)
        self.pos = 0
        self.synced = False
        self.held: dict[tuple[str, ...], int] = {}  # the endpoints' identities
        self.lock = threading.Lock()

    async def relabel(self, numbers: set[int]) -> None:
        with self.lock:
            for key, number in list(self.held.items()):
                if number in numbers:
                    old = self.alloc.get(number)
                    new = self.alloc.allocate(Labels.from_strings(key))
                    assert old is not None
                    self.alloc.release(old)
                    self.held[key] = new.id

    def deliver(self, upto: int | None = None) -> None:
        """Apply the watch events not yet seen (an informer's batch)."""
        with self.api.lock:
            end = len(self.api.events) if upto is None else min(upto, len(self.api.events))
            batch = self.api.events[self.pos:end]
        self.pos = end
        initial, self.synced = not self.synced, True
        asyncio.run(self.sync.on_events("identities", batch, initial))

    def use(self, lab: Labels) -> int:
        with self.lock:
            key = tuple(lab.sorted_strings())
            if key in self.held:
                return self.held[key]
            ident = self.alloc.allocate(lab)
            self.held[key] = ident.id
            return ident.id

    def stop_using(self, lab: Labels) -> None:
        with self.lock:
            number = self.held.pop(tuple(lab.sorted_strings()))
            ident = self.alloc.get(number)
            assert ident is not None
            self.alloc.release(ident)


# -- the object --------------------------------------------------------------------------------

def test_object_is_ciliums_shape_and_round_trips():
    lab = Labels.from_strings(["k8s:app=web", "k8s:io.kubernetes.pod.namespace=prod",
                               "k8s:io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name=prod",
                               "k8s:bad key=x", "reserved:host"])
    obj = identity_object(4242, lab.sorted_strings())
    assert obj["apiVersion"] == "cilium.io/v2" and obj["kind"] == "CiliumIdentity"
    assert obj["metadata"]["name"] == "4242"
    assert obj["security-labels"]["k8s:app"] == "web"
    assert obj["security-labels"]["reserved:host"] == ""
    # metadata.labels: only k8s: labels Kubernetes accepts (the server refuses others)
    assert obj["metadata"]["labels"] == {
        "app": "web", "io.kubernetes.pod.namespace": "prod",
        "io.cilium.k8s.namespace.labels.kubernetes.io/metadata.name": "prod"}
    assert object_labels(obj) == lab.sorted_strings()
    assert object_number(obj) == 4242
    assert object_number({"metadata": {"name": "12"}}) is None  # reserved range
    assert object_number({"metadata": {"name": "web"}}) is None
    assert object_number({"metadata": {"name": "70000"}}) is None


# -- allocation ---------------------------------------------------------------------------------

def test_create_conflict_same_labels_is_reused_other_labels_probe_on():
    api = FakeIdentityAPI()
    a, b = Node(api, "a"), Node(api, "b")
    n1 = a.use(labels(1))
    assert n1 == 256 and api.labels_of(256) == tuple(labels(1).sorted_strings())
    # b has not seen the watch: its create of 256 gets 409, the object has the same labels
    assert b.use(labels(1)) == 256
    # other labels: 409, other labels on 256, so 257
    assert b.use(labels(2)) == 257
    assert a.use(labels(2)) == 257  # without the watch either
    assert len(api.objects) == 2


def test_api_outage_fails_the_allocation_without_probing_on():
    api = FakeIdentityAPI()
    node = Node(api, "a")
    api.fail = 503
    with pytest.raises(IdentityError, match="503"):
        node.use(labels(1))
    assert node.store.errors == 1
    api.fail = 404
    with pytest.raises(IdentityError, match="ciliumidentities.yaml"):
        node.use(labels(1))
    api.fail = None
    assert node.use(labels(1)) == 256


def test_no_api_client_yet_is_an_identity_error():
    alloc = IdentityAllocator(CRDIdentityStore())
    with pytest.raises(IdentityError, match="not connected"):
        alloc.allocate(labels(1))


def _race(seed: int, nodes: int, sets: int, garbage: int) -> tuple[FakeIdentityAPI, list[Node]]:
    """``nodes`` agents allocate the same ``sets`` label sets (forced collisions)
    in shuffled orders at once, while their watches deliver at random moments;
    with ``garbage`` unused identities deleted meanwhile (a collector's work),
    which lets a label set land on two numbers. Ends when the watches are
    drained."""
    rng = random.Random(seed)
    api = FakeIdentityAPI()
    seeder = Node(api, "seed")
    junk = [seeder.use(labels(1000 + i, "junk")) for i in range(garbage)]
    for i in range(garbage):
        seeder.stop_using(labels(1000 + i, "junk"))
    members = [Node(api, f"n{i}") for i in range(nodes)]
    for m in members:
        m.deliver()
    errors: list[BaseException] = []

    def work(node: Node, order: list[int], r: random.Random) -> None:
        try:
            for i in order:
                lab = labels(i)
                number = node.use(lab)
                # the number the node got names these labels in the API (nobody deletes
                # a used identity here), never another label set
                assert api.labels_of(number) in (tuple(lab.sorted_strings()), None)
                if r.random() < 0.3:
                    node.deliver(r.randrange(node.pos, len(api.events) + 1))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def collector(r: random.Random) -> None:
        for number in r.sample(junk, len(junk)):
            obj = api.get(number)
            assert obj is not None
            api.delete(number, obj["metadata"]["uid"], obj["metadata"]["resourceVersion"])

    threads = [threading.Thread(target=work, args=(m, rng.sample(range(sets), sets),
                                                   random.Random(rng.random())))
               for m in members]
    threads.append(threading.Thread(target=collector, args=(random.Random(rng.random()),)))
    run_and_drain(threads, members, errors)
    return api, members


def run_and_drain(threads: list[threading.Thread], members: list[Node],
                  errors: list[BaseException]) -> None:
    """Run the racing threads, then drain the watches: duplicates seen, endpoints
    re-identified."""
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for _ in range(3):
        for m in members:
            m.deliver()


def _check_converged(api: FakeIdentityAPI, members: list[Node], sets: int) -> None:
    for i in range(sets):
        key = tuple(labels(i).sorted_strings())
        held = {m.name: m.held[key] for m in members}
        assert len(set(held.values())) == 1, (key, held)
        number = next(iter(held.values()))
        assert api.labels_of(number) == key
        for m in members:
            assert m.alloc.lookup(labels(i)).id == number  # type: ignore[union-attr]
    for m in members:
        for number in m.alloc.references():
            ident = m.alloc.get(number)
            assert ident is not None
            assert api.labels_of(number) == tuple(ident.label_strings())
    # the API never held one number for two label sets at once (create is the arbiter) and
    # each node's view of every number it knows is the API's
    for m in members:
        for ident in m.alloc.all():
            if not ident.reserved:
                assert api.labels_of(ident.id) == tuple(ident.label_strings())


@pytest.mark.parametrize("seed", range(12))
def test_two_nodes_racing_with_forced_collisions_converge(seed):
    api, members = _race(seed, nodes=2, sets=25, garbage=0)
    _check_converged(api, members, 25)
    # without deletes no label set is ever created twice
    keys = [k for _, k in api.history]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("seed", range(12))
def test_racing_while_identities_are_collected_converges(seed):
    api, members = _race(seed, nodes=3, sets=20, garbage=15)
    _check_converged(api, members, 20)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 7), st.booleans(),
                          st.booleans()), max_size=40))
def test_property_interleaved_use_release_and_watch(ops):
    """Any interleaving of use/release/watch delivery on two nodes with forced
    collisions: whenever a node uses a number, the API holds it for exactly
    those labels, and after the watches drain both nodes agree."""
    api = FakeIdentityAPI()
    members = [Node(api, "a"), Node(api, "b")]
    for m in members:
        m.deliver()
    for who, i, release, deliver in ops:
        node = members[who]
        lab = labels(i)
        key = tuple(lab.sorted_strings())
        if release and key in node.held:
            node.stop_using(lab)
        else:
            number = node.use(lab)
            assert api.labels_of(number) == key
        if deliver:
            node.deliver()
    for m in members:
        m.deliver()
    for i in range(8):
        key = tuple(labels(i).sorted_strings())
        numbers = {m.held[key] for m in members if key in m.held}
        assert len(numbers) <= 1
        known = {m.alloc.lookup(labels(i)).id for m in members  # type: ignore[union-attr]
                 if m.alloc.lookup(labels(i)) is not None}
        assert len(known) <= 1


# -- the watch ------------------------------------------------------------------------------------

def test_watch_brings_other_nodes_identities_and_forgets_deleted_ones():
    api = FakeIdentityAPI()
    a, b = Node(api, "a"), Node(api, "b")
    b.deliver()
    number = a.use(labels(7))
    assert b.alloc.get(number) is None
    b.deliver()
    assert b.alloc.get(number).label_strings() == labels(7).sorted_strings()  # type: ignore[union-attr]
    assert b.alloc.lookup(labels(7)).id == number  # type: ignore[union-attr]
    obj = api.get(number)
    assert obj is not None
    a.stop_using(labels(7))
    api.delete(number, obj["metadata"]["uid"], obj["metadata"]["resourceVersion"])
    b.deliver()
    assert b.alloc.get(number) is None


def test_identity_deleted_while_in_use_is_created_again():
    api = FakeIdentityAPI()
    node = Node(api, "a")
    node.deliver()
    number = node.use(labels(3))
    node.deliver()
    obj = api.get(number)
    assert obj is not None
    api.delete(number, obj["metadata"]["uid"], obj["metadata"]["resourceVersion"])  # kubectl delete
    node.deliver()
    assert api.labels_of(number) == tuple(labels(3).sorted_strings())
    assert node.alloc.get(number) is not None


def test_first_list_forgets_restored_identities_the_cluster_no_longer_has():
    api = FakeIdentityAPI()
    other = Node(api, "other")
    kept = other.use(labels(1))
    node = Node(api, "a")
    node.alloc.restore({kept: labels(1).sorted_strings(), 300: labels(2).sorted_strings()})
    node.deliver()
    assert node.alloc.get(kept) is not None
    assert node.alloc.get(300) is None


def test_a_lower_duplicate_re_identifies_endpoints():
    api = FakeIdentityAPI()
    node = Node(api, "a")
    node.deliver()
    # a duplicate made behind the node's back: 300 holds the labels, then 256 too
    api.create(identity_object(300, labels(5).sorted_strings()))
    node.deliver()
    assert node.use(labels(5)) == 300
    api.create(identity_object(256, labels(5).sorted_strings()))
    node.deliver()
    assert node.held[tuple(labels(5).sorted_strings())] == 256
    assert node.alloc.references() == {256: 1}


# -- garbage collection ---------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _gc(node: Node, pods: set[tuple[str, ...]], clock: Clock, timeout: float = 30) -> IdentityGC:
    return IdentityGC(node.store, node.alloc, lambda: pods, interval=1, timeout=timeout,
                      clock=clock)


def test_gc_marks_unused_then_deletes_after_the_timeout_and_keeps_used_ones():
    api = FakeIdentityAPI()
    node = Node(api, "a")
    node.deliver()
    local = node.use(labels(1))       # an endpoint here
    by_pod = node.use(labels(2))      # a pod on another node
    unused = node.use(labels(3))
    node.stop_using(labels(2))
    node.stop_using(labels(3))
    node.deliver()
    clock = Clock()
    gc = _gc(node, {tuple(labels(2).sorted_strings())}, clock)
    gc.run_once()
    assert marked_at(api.get(unused)) == clock.now  # type: ignore[arg-type]
    assert marked_at(api.get(local)) is None  # type: ignore[arg-type]
    assert marked_at(api.get(by_pod)) is None  # type: ignore[arg-type]
    node.deliver()
    clock.now += 29
    gc.run_once()
    assert api.get(unused) is not None  # not yet: the timeout counts from the mark
    clock.now += 1
    gc.run_once()
    assert api.get(unused) is None and gc.deleted == 1
    node.deliver()
    assert node.alloc.get(unused) is None
    assert api.get(local) is not None and api.get(by_pod) is not None


def _marked_and_due(pods: set[tuple[str, ...]] | None = None
                    ) -> tuple[FakeIdentityAPI, Node, IdentityGC, int]:
    """A node used labels(1) and stopped; the collector marked it; the node's
    watch has seen the mark; the timeout is over: the next pass deletes it."""
    api = FakeIdentityAPI()
    node = Node(api, "a")
    node.deliver()
    number = node.use(labels(1))
    node.stop_using(labels(1))
    clock = Clock()
    gc = _gc(node, set() if pods is None else pods, clock)
    gc.run_once()
    node.deliver()
    clock.now += 60
    return api, node, gc, number


def test_gc_removes_the_mark_of_an_identity_used_again():
    pods: set[tuple[str, ...]] = set()
    api, node, gc, number = _marked_and_due(pods)
    assert marked_at(api.get(number)) is not None  # type: ignore[arg-type]
    pods.add(tuple(labels(1).sorted_strings()))  # a pod with these labels appeared
    gc.run_once()
    assert marked_at(api.get(number)) is None  # type: ignore[arg-type]
    assert gc.unmarked == 1


def test_acquiring_a_marked_identity_takes_the_mark_back_and_the_delete_fails():
    """The race Cilium closes with resourceVersion preconditions: the collector
    judged the identity unused at one version, a node acquires it meanwhile."""
    api, node, gc, number = _marked_and_due()
    plan = gc.plan()
    assert [(a, n) for a, n, _ in plan] == [("delete", number)]
    assert node.use(labels(1)) == number  # acquire: the mark goes, the version moves on
    gc.execute(plan)
    assert api.get(number) is not None and gc.conflicts == 1 and gc.deleted == 0
    assert marked_at(api.get(number)) is None  # type: ignore[arg-type]


def test_acquiring_an_identity_deleted_meanwhile_creates_it_again():
    api, node, gc, number = _marked_and_due()
    gc.run_once()  # deleted; the node's watch has not said so yet
    assert api.get(number) is None
    assert node.use(labels(1)) == number
    assert api.labels_of(number) == tuple(labels(1).sorted_strings())


def test_acquiring_a_number_taken_for_other_labels_allocates_anew():
    api, node, gc, number = _marked_and_due()
    gc.run_once()
    other = Node(api, "b")
    other.deliver()
    assert other.use(labels(9)) == number  # the freed number, for other labels
    got = node.use(labels(1))  # the node still thinks `number` holds labels(1)
    assert got != number
    assert api.labels_of(got) == tuple(labels(1).sorted_strings())
    assert api.labels_of(number) == tuple(labels(9).sorted_strings())


def two_collectors_one_unused() -> tuple[FakeIdentityAPI, Node, Node, IdentityGC, IdentityGC,
                                          Clock, int]:
    """Nodes a and b, each with a collector, both knowing one identity number
    that a made and no longer uses."""
    api = FakeIdentityAPI()
    a, b = Node(api, "a"), Node(api, "b")
    a.deliver()
    number = a.use(labels(1))
    a.stop_using(labels(1))
    a.deliver()
    b.deliver()
    clock = Clock()
    return api, a, b, _gc(a, set(), clock), _gc(b, set(), clock), clock, number


def test_two_collectors_at_once_delete_once():
    api, a, b, ga, gb, clock, number = two_collectors_one_unused()
    plans = ga.plan(), gb.plan()
    ga.execute(plans[0])
    gb.execute(plans[1])  # judged at the same version: 409
    assert (ga.marked, gb.marked, gb.conflicts) == (1, 0, 1)
    a.deliver()
    b.deliver()
    clock.now += 31
    plans = ga.plan(), gb.plan()
    ga.execute(plans[0])
    gb.execute(plans[1])
    assert api.get(number) is None
    assert ga.deleted + gb.deleted == 1 and gb.conflicts + ga.conflicts == 2


def test_gc_counts_a_duplicate_used_by_pods_only_at_its_lowest_number():
    api = FakeIdentityAPI()
    node = Node(api, "a")
    node.deliver()
    api.create(identity_object(256, labels(5).sorted_strings()))
    api.create(identity_object(300, labels(5).sorted_strings()))
    node.deliver()
    gc = _gc(node, {tuple(labels(5).sorted_strings())}, Clock())
    assert [(a, n) for a, n, _ in gc.plan()] == [("mark", 300)]


def test_pod_label_sets_use_the_endpoint_labels():
    from types import SimpleNamespace

    from axoneme.agent._identityk8s import pod_label_sets
    from axoneme.core.cluster import Namespace, Pod, pod_identity_labels

    pod = Pod("p", "prod", {"app": "web"}, ())
    hostnet = Pod("h", "prod", {"app": "host"}, ())
    source = SimpleNamespace(
        pods={"prod/p": SimpleNamespace(pod=pod, host_network=False, node=""),
              "prod/h": SimpleNamespace(pod=hostnet, host_network=True, node="")},
        namespace=lambda name: Namespace(name, {"kubernetes.io/metadata.name": name}))
    want = pod_identity_labels(pod, Namespace("prod", {"kubernetes.io/metadata.name": "prod"}),
                               "c1")
    assert pod_label_sets(source, "c1") == {tuple(want.sorted_strings())}


def test_a_delete_during_a_walk_makes_a_duplicate_and_the_nodes_converge():
    """The interleaving the racing tests may or may not hit, forced: node A skips
    256 (its cache: other labels), the collector deletes 256, node B (its watch
    has said so) creates 256 for the labels, A creates 257 for them too. Both
    then hold the lowest, 256, and 257 is left unused for the collector."""
    api = FakeIdentityAPI()
    seeder = Node(api, "seed")
    junk = seeder.use(labels(99, "junk"))
    seeder.stop_using(labels(99, "junk"))
    a, b = Node(api, "a"), Node(api, "b")
    a.deliver()
    b.deliver()
    create = api.create

    def interleave(obj):
        api.create = create  # once
        gone = api.get(junk)
        api.delete(junk, gone["metadata"]["uid"], gone["metadata"]["resourceVersion"])
        b.deliver()
        assert b.use(labels(1)) == 256
        return create(obj)

    api.create = interleave
    assert a.use(labels(1)) == 257
    assert [n for n, k in api.history if k == tuple(labels(1).sorted_strings())] == [256, 257]
    a.deliver()
    b.deliver()
    assert a.held == b.held == {tuple(labels(1).sorted_strings()): 256}
    assert a.alloc.references() == {256: 1}
    gc = _gc(a, {tuple(labels(1).sorted_strings())}, Clock())
    assert [(x, n) for x, n, _ in gc.plan()] == [("mark", 257)]


def test_thousand_pod_cycles_with_forced_collisions_and_gc_keep_one_number_per_label_set():
    """Issue 20's cycle test at unit level: 1,000 pod create/delete cycles over
    two nodes and 12 label sets, every label set probing from 256, a collector
    on each node with a short timeout; at every step a label set used on both
    nodes has one number, and the API holds it for exactly those labels."""
    rng = random.Random(20)
    api = FakeIdentityAPI()
    members = [Node(api, "a"), Node(api, "b")]
    clock = Clock()
    pods: dict[str, set[tuple[str, ...]]] = {"a": set(), "b": set()}
    gcs = [IdentityGC(m.store, m.alloc, lambda: pods["a"] | pods["b"], interval=1, timeout=5,
                      clock=clock) for m in members]
    for m in members:
        m.deliver()
    deleted_before = 0
    for _ in range(1000):
        node = rng.choice(members)
        lab = labels(rng.randrange(12))
        key = tuple(lab.sorted_strings())
        if key in node.held:
            node.stop_using(lab)
            pods[node.name].discard(key)
        else:
            number = node.use(lab)
            pods[node.name].add(key)
            assert api.labels_of(number) == key
        clock.now += rng.random()
        for m, gc in zip(members, gcs, strict=True):
            if rng.random() < 0.3:
                m.deliver()
            if rng.random() < 0.2:
                gc.execute(gc.plan())
        both = set(members[0].held) & set(members[1].held)
        for m in members:
            m.deliver()
        for k in both:
            assert members[0].held[k] == members[1].held[k], k
            assert api.labels_of(members[0].held[k]) == k
        deleted_before = max(deleted_before, sum(g.deleted for g in gcs))
    assert deleted_before > 0  # the collector did delete along the way


# -- configuration and wiring ----------------------------------------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    ("identity_allocation_mode: kvstore\n",
     "config key identity_allocation_mode: expected crd or local, got 'kvstore'"),
    ("identity_gc_interval: -1\n", "config key identity_gc_interval: expected 0 or more seconds"),
    ("identity_heartbeat_timeout: -5\n",
     "config key identity_heartbeat_timeout: expected 0 or more seconds"),
    ("identity_gc_interval: soon\n", "config key identity_gc_interval: expected a number"),
    # the collector's leader election (_identitylease; client-go's checks)
    ("identity_gc_leader_election: maybe\n",
     "config key identity_gc_leader_election: expected true or false, got str 'maybe'"),
    ("leader_election_lease_duration: 0\n",
     "config key leader_election_lease_duration: expected more than 0 seconds, got 0"),
    ("leader_election_lease_duration: 15.5\n",
     "config key leader_election_lease_duration: expected whole seconds"),
    ("leader_election_renew_deadline: 15\n",
     "config key leader_election_renew_deadline: expected less than "
     "leader_election_lease_duration (15), got 15"),
    ("leader_election_retry_period: 9\n",
     "config key leader_election_retry_period: expected less than "
     "leader_election_renew_deadline / 1.2 (8.33333), got 9"),
    ("leader_election_retry_period: -2\n",
     "config key leader_election_retry_period: expected more than 0 seconds, got -2"),
])
def test_bad_identity_config_names_the_key_and_the_file(tmp_path, text, message):
    from axoneme.agent.cli import build_parser
    from axoneme.agent.cli._agentcmds import build_agent_config
    from axoneme.core.errors import ConfigError

    conf = tmp_path / "agent.yaml"
    conf.write_text(text)
    parser, _ = build_parser()
    with pytest.raises(ConfigError) as e:
        build_agent_config(parser.parse_args(["agent", "run", "--config", str(conf)]))
    assert message in str(e.value) and str(conf) in str(e.value)


def test_agent_wires_crd_identities_in_kubernetes_mode_only(tmp_path):
    from axoneme.agent._agent import Agent
    from axoneme.agent._config import AgentConfig

    def agent(**kw):
        return Agent(AgentConfig(datapath="noop", state_dir=str(tmp_path / "s"), guard=False,
                                 **kw))

    crd = agent(k8s_kubeconfig="/nonexistent", identity_gc_interval=3,
                identity_heartbeat_timeout=7)
    assert crd.allocator.shared and crd.crd_identities is not None
    assert crd.k8s is not None and "identities" in crd.k8s.extra_informers
    assert crd.k8s.identities is crd.crd_identities
    assert (crd.crd_identities.gc.interval, crd.crd_identities.gc.timeout) == (3, 7)
    assert crd.k8s.view()["identities"]["mode"] == "crd"
    assert crd.remote_pods is not None
    assert crd.crd_identities.renumber_hooks == [crd.remote_pods.renumbered]
    local = agent(k8s_kubeconfig="/nonexistent", identity_allocation_mode="local")
    assert not local.allocator.shared and local.crd_identities is None
    assert local.k8s is not None and not local.k8s.extra_informers
    standalone = agent()
    assert not standalone.allocator.shared and standalone.crd_identities is None


def test_store_backed_release_keeps_the_identity_known_until_the_store_drops_it():
    api = FakeIdentityAPI()
    node = Node(api, "a")
    number = node.use(labels(1))
    node.stop_using(labels(1))
    assert node.alloc.get(number) is not None and node.alloc.references() == {}
    assert node.alloc.forget(number) and node.alloc.get(number) is None
    # without a store, today's behaviour: freed with its last reference
    plain = IdentityAllocator()
    ident = plain.allocate(labels(1))
    assert plain.release(ident) and plain.get(ident.id) is None


def test_failpoint_identity_collide_forces_every_label_set_to_probe_from_256():
    from axoneme.agent._config import AgentConfig
    from axoneme.agent._identityk8s import CRDIdentities
    from axoneme.core import failpoints
    from axoneme.core.identity import preferred_number

    crd = CRDIdentities(AgentConfig())
    key = tuple(labels(1).sorted_strings())
    assert crd.preferred(key) == preferred_number(key)
    failpoints.configure("identity.collide=error")
    try:
        assert crd.preferred(key) == 256
        api = FakeIdentityAPI()
        alloc = IdentityAllocator(CRDIdentityStore(api), preferred=crd.preferred)
        assert [alloc.allocate(labels(i)).id for i in range(3)] == [256, 257, 258]
    finally:
        failpoints.configure(None)
    assert crd.preferred(key) == preferred_number(key)


def test_other_nodes_pods_move_to_the_lower_duplicate_too():
    """RemotePods holds identities of other nodes' pods: when a lower number
    turns up for their labels, their ipcache entries take it as endpoints do."""
    from types import SimpleNamespace

    from axoneme.agent._k8s import PodMeta
    from axoneme.agent._remotepods import RemotePods
    from axoneme.core.cluster import Namespace, Pod, namespace_labels, pod_identity_labels
    from axoneme.core.policy.engine import PolicyEngine

    class Regen:
        async def regenerate(self) -> dict[int, str]:
            return {}

    api = FakeIdentityAPI()
    store = CRDIdentityStore(api)
    alloc = IdentityAllocator(store, preferred=collide)
    engine = PolicyEngine(alloc)
    pod = Pod("p", "prod", {"app": "web"}, ("10.244.1.5",))
    cache = SimpleNamespace(pods={"prod/p": PodMeta(pod, "node-2", False, "u1")}, node="node-1",
                            nodes={"node-1", "node-2"}, namespace=lambda name: None)
    web = pod_identity_labels(pod, Namespace("prod", namespace_labels("prod")), "default")
    high = api.create(identity_object(300, web.sorted_strings()))

    async def run() -> None:
        remote = RemotePods(cache, engine, alloc, Regen(), asyncio.Lock())
        sync = IdentitySync(store, alloc, remote.renumbered)
        await sync.on_events("identities", [("ADDED", high)], True)
        await remote.on_pods([("ADDED", {"metadata": {"name": "p", "namespace": "prod"}})], False)
        assert remote.entries["prod/p"].identity.id == 300
        low = api.create(identity_object(256, web.sorted_strings()))
        await sync.on_events("identities", [("ADDED", low)], False)
        assert remote.entries["prod/p"].identity.id == 256
        assert engine.identity_of_ip("10.244.1.5") == 256
        assert alloc.references() == {256: 1}

    asyncio.run(run())


def test_kubernetes_api_calls_bind_to_the_clients_methods():
    """KubernetesIdentityAPI's calls, bound to the real CustomObjectsApi method
    signatures (a recorder answers instead of the network)."""
    import inspect

    from axoneme.agent._identitycrd import KubernetesIdentityAPI
    from kubernetes import client

    calls: list[tuple[str, inspect.BoundArguments]] = []

    class Recorder:
        def __getattr__(self, name: str):
            real = getattr(client.CustomObjectsApi, name)

            def call(*args, **kwargs):
                bound = inspect.signature(real).bind(None, *args, **kwargs)
                calls.append((name, bound))
                if name == "get_cluster_custom_object" and args[3] == "404":
                    raise ApiError(404)
                return {"metadata": {"name": args[3] if len(args) > 3 else "x"}}
            return call

    api = KubernetesIdentityAPI(client.ApiClient())
    api.custom = Recorder()
    obj = identity_object(300, labels(1).sorted_strings())
    api.create(obj)
    assert api.get(404) is None and api.get(300) is not None
    api.set_mark(300, "17", "2026-12-04T19:00:00Z")
    api.delete(300, "uid-1", "18")
    api.lister()(watch=True, resource_version="5", _preload_content=False)
    names = [n for n, _ in calls]
    assert names == ["create_cluster_custom_object", "get_cluster_custom_object",
                     "get_cluster_custom_object", "patch_cluster_custom_object",
                     "delete_cluster_custom_object", "list_cluster_custom_object"]
    create = calls[0][1].arguments
    assert (create["group"], create["version"], create["plural"]) == ("cilium.io", "v2",
                                                                      "ciliumidentities")
    assert create["body"] is obj
    patch = calls[3][1].arguments
    assert patch["name"] == "300" and patch["body"] == {
        "metadata": {"resourceVersion": "17", "annotations": {MARK: "2026-12-04T19:00:00Z"}}}
    assert patch["_content_type"] == "application/merge-patch+json"
    delete = calls[4][1].arguments
    assert client.ApiClient().sanitize_for_serialization(delete["body"]) == {
        "preconditions": {"resourceVersion": "18", "uid": "uid-1"}}


def test_the_store_over_http_speaks_the_api_servers_wire():
    """CRDIdentityStore + KubernetesIdentityAPI through the real `kubernetes`
    client to a local HTTP server that answers as the API server does for
    CiliumIdentities (201, 409 AlreadyExists with a Status, 200, 404): the
    paths, verbs, content types and bodies on the wire, and 409 read back as
    "another label set holds it"."""
    import http.server
    import json
    import threading

    from axoneme.agent._identitycrd import KubernetesIdentityAPI
    from kubernetes import client

    base = "/apis/cilium.io/v2/ciliumidentities"
    seen: list[tuple[str, str, str, Any]] = []
    held = {"256": identity_object(256, labels(9).sorted_strings())}
    held["256"]["metadata"].update(resourceVersion="7", uid="u-256")

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> Any:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n)) if n else None

        def _status(self, code: int, reason: str) -> None:
            self._answer(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                "reason": reason, "code": code})

        def do_POST(self) -> None:  # noqa: N802
            body = self._body()
            seen.append(("POST", self.path, self.headers.get("Content-Type"), body))
            name = body["metadata"]["name"]
            if name in held:
                return self._status(409, "AlreadyExists")
            held[name] = dict(body, metadata=dict(body["metadata"], resourceVersion="8",
                                                  uid=f"u-{name}"))
            self._answer(201, held[name])

        def do_GET(self) -> None:  # noqa: N802
            seen.append(("GET", self.path, None, None))
            name = self.path.rsplit("/", 1)[-1]
            if name not in held:
                return self._status(404, "NotFound")
            self._answer(200, held[name])

        def do_PATCH(self) -> None:  # noqa: N802
            body = self._body()
            seen.append(("PATCH", self.path, self.headers.get("Content-Type"), body))
            self._answer(200, held[self.path.rsplit("/", 1)[-1]])

        def do_DELETE(self) -> None:  # noqa: N802
            body = self._body()
            seen.append(("DELETE", self.path, self.headers.get("Content-Type"), body))
            self._status(409, "Conflict")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{server.server_address[1]}"
        api = KubernetesIdentityAPI(client.ApiClient(cfg))
        alloc = IdentityAllocator(CRDIdentityStore(api), preferred=collide)
        assert alloc.allocate(labels(1)).id == 257  # 256: 409, read, other labels
        # (the client sends creates and deletes without a Content-Type, as its Event
        # creates: the API server reads them as JSON)
        assert [(m, p) for m, p, _, _ in seen] == [("POST", base), ("GET", f"{base}/256"),
                                                   ("POST", base)]
        created = seen[2][3]
        assert created["kind"] == "CiliumIdentity" and created["metadata"]["name"] == "257"
        assert created["security-labels"] == {"k8s:app": "app1",
                                              "k8s:io.kubernetes.pod.namespace": "default"}
        api.set_mark(257, "8", None)
        method, path, ctype, body = seen[-1]
        assert (method, path, ctype) == ("PATCH", f"{base}/257", "application/merge-patch+json")
        assert body == {"metadata": {"resourceVersion": "8", "annotations": {MARK: None}}}
        with pytest.raises(client.exceptions.ApiException) as e:
            api.delete(257, "u-257", "8")
        assert e.value.status == 409
        assert seen[-1][:2] == ("DELETE", f"{base}/257")
        assert seen[-1][3]["preconditions"] == {"resourceVersion": "8", "uid": "u-257"}
        assert api.get(999) is None
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
