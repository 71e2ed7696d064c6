"""One identity collector per cluster: the Lease election (agent/_identitylease.py, issue 20).

``FakeLeaseServer`` answers as the API server does for one ``coordination.k8s.io/v1`` Lease:
404 when absent, 409 AlreadyExists on a second create, 409 Conflict on an update whose
``metadata.resourceVersion`` is not the current one, a new resourceVersion on every write,
and it refuses a body that is not a Lease of that shape (MicroTimes, integer fields). Clocks
are fakes: the election's expiry and renew deadline are judged on them. The real API server:
tests/k8s/test_k8s_deploy.py (as the agent's service account) and
tests/k8s/test_k8s_identity_leader.py (2 nodes)."""

from __future__ import annotations

import asyncio
import copy
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from axoneme.agent._identitycrd import marked_at
from axoneme.agent._identitylease import LEASE_NAME, LeaseElector, lease_namespace, micro_time

sys.path.insert(0, str(Path(__file__).parent))  # the fake CiliumIdentity API (import-mode=importlib)
from test_agent_identity_crd import (  # noqa: E402
    Clock,
    FakeIdentityAPI,
    Node,
    _gc,
    labels,
    two_collectors_one_unused,
)

NS = "kube-system"
MICRO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
SPEC_TYPES = {"holderIdentity": str, "leaseDurationSeconds": int, "acquireTime": str,
              "renewTime": str, "leaseTransitions": int}


class ApiError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"({status})")
        self.status = status


class FakeLeaseServer:
    """One Lease as the API server keeps it (module docstring)."""

    def __init__(self) -> None:
        self.obj: dict[str, Any] | None = None
        self.version = 100
        self.fail: Exception | None = None  # every call raises it (an outage)
        self.writes: list[tuple[str, dict[str, Any]]] = []
        self.before_update: Any = None  # called before an update is judged (a racing writer)

    def _check(self, obj: dict[str, Any]) -> None:
        assert obj["apiVersion"] == "coordination.k8s.io/v1" and obj["kind"] == "Lease"
        assert (obj["metadata"]["name"], obj["metadata"]["namespace"]) == (LEASE_NAME, NS)
        spec = obj["spec"]
        assert set(spec) <= set(SPEC_TYPES), spec
        for k, v in spec.items():
            assert isinstance(v, SPEC_TYPES[k]) and not isinstance(v, bool), (k, v)
        for k in ("acquireTime", "renewTime"):
            assert k not in spec or MICRO.match(spec[k]), spec[k]

    def _store(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        self.obj = copy.deepcopy(obj)
        self.obj["metadata"] = dict(obj["metadata"], resourceVersion=str(self.version),
                                    uid="lease-uid")
        return copy.deepcopy(self.obj)

    def get(self) -> dict[str, Any] | None:
        if self.fail is not None:
            raise self.fail
        return copy.deepcopy(self.obj)

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.fail is not None:
            raise self.fail
        self._check(obj)
        assert "resourceVersion" not in obj["metadata"]
        if self.obj is not None:
            raise ApiError(409)  # AlreadyExists
        self.writes.append(("create", copy.deepcopy(obj["spec"])))
        return self._store(obj)

    def update(self, obj: dict[str, Any]) -> dict[str, Any]:
        if self.before_update is not None:
            hook, self.before_update = self.before_update, None
            hook()
        if self.fail is not None:
            raise self.fail
        self._check(obj)
        if self.obj is None:
            raise ApiError(404)
        if obj["metadata"].get("resourceVersion") != self.obj["metadata"]["resourceVersion"]:
            raise ApiError(409)  # Conflict: the object has been modified
        self.writes.append(("update", copy.deepcopy(obj["spec"])))
        return self._store(obj)

    def spec(self) -> dict[str, Any]:
        assert self.obj is not None
        return dict(self.obj["spec"])


class Clocks:
    """Monotonic and wall clocks moved together by hand."""

    def __init__(self) -> None:
        self.mono, self.epoch = 500.0, 1_796_000_000.0

    def advance(self, s: float) -> None:
        self.mono += s
        self.epoch += s


def elector(server: FakeLeaseServer, clocks: Clocks, node: str, **kw: Any) -> LeaseElector:
    return LeaseElector(server, node, NS, clock=lambda: clocks.mono, wall=lambda: clocks.epoch, **kw)


def held_by(server: FakeLeaseServer, clocks: Clocks, holder: str, transitions: int = 3) -> None:
    stamp = micro_time(clocks.epoch)
    server._store({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                   "metadata": {"name": LEASE_NAME, "namespace": NS},
                   "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                            "acquireTime": stamp, "renewTime": stamp,
                            "leaseTransitions": transitions}})


def renew_by_other(server: FakeLeaseServer, clocks: Clocks) -> None:
    obj = server.get()
    assert obj is not None
    obj["spec"]["renewTime"] = micro_time(clocks.epoch)
    server._store(obj)


# -- the state machine ------------------------------------------------------------------------------

def test_absent_lease_is_created_held_by_this_node():
    server, clocks = FakeLeaseServer(), Clocks()
    a = elector(server, clocks, "node-a")
    assert not a.leading()
    assert a.attempt() and a.leading() and a.acquired == 1
    spec = server.spec()
    assert server.writes[0][0] == "create"
    assert spec == {"holderIdentity": "node-a", "leaseDurationSeconds": 15,
                    "acquireTime": micro_time(clocks.epoch), "renewTime": micro_time(clocks.epoch),
                    "leaseTransitions": 0}
    clocks.advance(2)
    assert a.attempt() and a.leading()  # the renew: an update, same acquireTime and transitions
    assert server.writes[-1][0] == "update"
    renewed = server.spec()
    assert renewed["renewTime"] == micro_time(clocks.epoch)
    assert (renewed["acquireTime"], renewed["leaseTransitions"]) == (spec["acquireTime"], 0)
    assert a.view()["holder"] == "node-a" and a.view()["leading"] is True


def test_two_candidates_on_an_absent_lease_one_wins_the_create():
    server, clocks = FakeLeaseServer(), Clocks()
    a, b = elector(server, clocks, "node-a"), elector(server, clocks, "node-b")
    real_create = server.create

    def racing_create(obj: dict[str, Any]) -> dict[str, Any]:
        server.create = real_create  # type: ignore[method-assign]
        a.attempt()  # a creates between b's read (absent) and b's create
        return real_create(obj)

    server.create = racing_create  # type: ignore[method-assign]
    assert not b.attempt() and not b.leading() and b.conflicts == 1  # 409 AlreadyExists
    assert a.leading() and server.spec()["holderIdentity"] == "node-a"


def test_fresh_lease_of_another_is_not_taken_and_expires_on_this_nodes_clock():
    """The holder's renewTime is never compared with this clock: the lease is fresh until its
    duration has passed since this candidate saw it change, even if renewTime is old."""
    server, clocks = FakeLeaseServer(), Clocks()
    held_by(server, clocks, "node-b")
    clocks.advance(3600)  # renewTime an hour old by the wall clock: still not taken at once
    a = elector(server, clocks, "node-a")
    assert not a.attempt() and a.holder() == "node-b" and not a.leading()
    assert server.writes == []
    clocks.advance(14.9)
    assert not a.attempt() and server.writes == []
    assert 0 < a.pause() <= 0.2  # the next read comes at the expiry, not a retry period later
    clocks.advance(0.1)
    assert a.attempt() and a.leading()
    spec = server.spec()
    assert spec["holderIdentity"] == "node-a" and spec["leaseTransitions"] == 4
    assert spec["acquireTime"] == spec["renewTime"] == micro_time(clocks.epoch)


def test_a_holder_that_renews_keeps_the_lease():
    server, clocks = FakeLeaseServer(), Clocks()
    held_by(server, clocks, "node-b")
    a = elector(server, clocks, "node-a")
    for _ in range(20):  # 60 s: the holder renews every 2 s, this candidate reads every 3
        assert not a.attempt()
        clocks.advance(2)
        renew_by_other(server, clocks)
        clocks.advance(1)
    assert server.spec()["holderIdentity"] == "node-b" and a.acquired == 0


def test_released_lease_is_taken_at_once():
    server, clocks = FakeLeaseServer(), Clocks()
    a, b = elector(server, clocks, "node-a"), elector(server, clocks, "node-b")
    assert a.attempt()
    assert not b.attempt()
    assert a.release() and not a.leading()
    spec = server.spec()
    assert spec["holderIdentity"] == "" and spec["leaseDurationSeconds"] == 1
    assert spec["leaseTransitions"] == 0
    assert b.attempt() and b.leading()  # no waiting: an empty holder is free
    assert server.spec()["holderIdentity"] == "node-b" and server.spec()["leaseTransitions"] == 1
    # a release by a non-holder writes nothing
    writes = len(server.writes)
    assert not a.release() and len(server.writes) == writes


def test_release_does_not_touch_a_lease_another_took():
    server, clocks = FakeLeaseServer(), Clocks()
    a = elector(server, clocks, "node-a")
    assert a.attempt()
    held_by(server, clocks, "node-b", transitions=1)  # taken over (a was partitioned)
    assert not a.release()
    assert server.spec()["holderIdentity"] == "node-b"


def test_conflict_on_the_update_is_not_leadership():
    """Two candidates read the same expired version; the one whose update comes second gets 409."""
    server, clocks = FakeLeaseServer(), Clocks()
    held_by(server, clocks, "node-c")
    a, b = elector(server, clocks, "node-a"), elector(server, clocks, "node-b")
    assert not a.attempt() and not b.attempt()
    clocks.advance(16)
    server.before_update = lambda: b.attempt()  # b reads and updates between a's read and write
    assert not a.attempt() and not a.leading() and a.conflicts == 1
    assert b.leading() and server.spec()["holderIdentity"] == "node-b"
    assert server.spec()["leaseTransitions"] == 4
    # and a, reading again, sees b's fresh lease
    assert not a.attempt() and a.holder() == "node-b"


def test_renew_failing_past_the_deadline_stops_leading_before_the_lease_expires():
    server, clocks = FakeLeaseServer(), Clocks()
    a, b = elector(server, clocks, "node-a"), elector(server, clocks, "node-b")
    assert a.attempt() and not b.attempt()
    server.fail = ConnectionError("connection refused")
    for _ in range(4):  # 8 s of failed renews: still within the 10 s deadline
        clocks.advance(2)
        assert not a.attempt() and a.leading()
    assert "connection refused" in a.last_error
    clocks.advance(2)  # 10 s since the last renew
    assert not a.leading()  # judged on the clock, before any attempt
    assert not a.attempt() and not a.leader and a.lost == 1
    server.fail = None
    # the lease is still fresh for b (15 s): a stopped 5 s or more before b can take it
    clocks.advance(4.9)
    assert not b.attempt()
    clocks.advance(0.2)
    assert b.attempt() and b.leading()
    assert not a.attempt() and not a.leading() and a.holder() == "node-b"


def test_a_holder_that_sees_another_holder_stops_at_once():
    server, clocks = FakeLeaseServer(), Clocks()
    a = elector(server, clocks, "node-a")
    assert a.attempt()
    held_by(server, clocks, "node-b", transitions=1)
    assert not a.attempt()
    assert not a.leading() and a.lost == 1 and a.holder() == "node-b"


def test_lease_namespace_is_the_pods(tmp_path, monkeypatch):
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    assert lease_namespace(str(tmp_path / "none")) == "kube-system"
    (tmp_path / "ns").write_text("axoneme-system\n")
    assert lease_namespace(str(tmp_path / "ns")) == "axoneme-system"
    monkeypatch.setenv("POD_NAMESPACE", "other")
    assert lease_namespace(str(tmp_path / "ns")) == "other"


# -- the loop: acquires, renews, releases when cancelled ----------------------------------------

def test_run_acquires_renews_and_releases_when_cancelled():
    server = FakeLeaseServer()
    a = LeaseElector(server, "node-a", NS, lease_duration=3, renew_deadline=0.5,
                     retry_period=0.02)

    async def go() -> None:
        task = asyncio.create_task(a.run())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if len(server.writes) >= 4:
                break
        assert a.leading()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    kinds = [k for k, _ in server.writes]
    assert kinds[0] == "create" and kinds.count("update") >= 4  # renews, then the release
    assert server.spec()["holderIdentity"] == "" and not a.leading()


# -- the collector runs only on the holder --------------------------------------------------------

def _collector_with_one_unused() -> tuple[FakeIdentityAPI, Any, Clock, int]:
    api = FakeIdentityAPI()
    node = Node(api, "a")
    node.deliver()
    number = node.use(labels(1))
    node.stop_using(labels(1))
    node.deliver()
    clock = Clock()
    return api, _gc(node, set(), clock), clock, number


def test_collector_writes_nothing_unless_this_node_holds_the_lease():
    api, gc, _, number = _collector_with_one_unused()
    holding = [False]
    gc.may_collect = lambda: holding[0]
    gc.run_once()
    assert gc.runs == 0 and marked_at(api.get(number)) is None  # type: ignore[arg-type]
    holding[0] = True
    gc.run_once()
    assert gc.runs == 1 and marked_at(api.get(number)) is not None  # type: ignore[arg-type]


def test_collector_stops_mid_pass_when_the_lease_is_lost():
    api = FakeIdentityAPI()
    node = Node(api, "a")
    node.deliver()
    numbers = [node.use(labels(i)) for i in range(1, 5)]
    for i in range(1, 5):
        node.stop_using(labels(i))
    node.deliver()
    gc = _gc(node, set(), Clock())
    checks = iter([True, True, True, False, False, False])  # the pass, 2 writes, then lost
    gc.may_collect = lambda: next(checks)
    gc.run_once()
    marked = [n for n in numbers if marked_at(api.get(n)) is not None]  # type: ignore[arg-type]
    assert len(marked) == 2 and gc.marked == 2


def test_targeted_node_delete_pass_writes_without_the_lease():
    """The Node-delete pass (``execute(plan, why)``) stays on every agent."""
    api, gc, clock, number = _collector_with_one_unused()
    gc.may_collect = lambda: False
    clock.now += 5
    gc.execute([("mark", number, gc.store.objects[number])], "since node x was deleted")
    assert marked_at(api.get(number)) == clock.now  # type: ignore[arg-type]
    assert gc.marked == 1 and gc.runs == 0  # a targeted pass is not a periodic run


# -- configuration ----------------------------------------------------------------------------------

# (bad values of the election's keys: test_agent_identity_crd.py's config test)

def test_agent_wires_the_election_in_crd_mode_unless_turned_off(tmp_path):
    from axoneme.agent._agent import Agent
    from axoneme.agent._config import AgentConfig

    def agent(**kw: Any) -> Any:
        return Agent(AgentConfig(datapath="noop", state_dir=str(tmp_path / "s"), guard=False,
                                 k8s_kubeconfig="/nonexistent", k8s_node_name="n1", **kw))

    on = agent(leader_election_lease_duration=20, leader_election_renew_deadline=12,
               leader_election_retry_period=3).crd_identities
    assert on is not None and on.elector is not None and on.gc is not None
    assert on.gc.may_collect == on.elector.leading
    view = on.view()["gc"]["leader_election"]
    assert view["enabled"] and view["identity"] == "n1" and view["leading"] is False
    assert view["lease"].endswith("/axoneme-identity-gc")
    assert (view["lease_duration"], view["renew_deadline"], view["retry_period"]) == (20, 12, 3)
    off = agent(identity_gc_leader_election=False).crd_identities
    assert off is not None and off.elector is None and off.gc.may_collect is None  # type: ignore[union-attr]
    assert off.view()["gc"]["leader_election"] == {"enabled": False}
    no_gc = agent(identity_gc_interval=0).crd_identities
    assert no_gc is not None and no_gc.elector is None  # nothing to elect for


def test_agent_stop_releases_the_lease_whenever_it_comes(tmp_path):
    """The agent's stop cancels ``CRDIdentities.run`` (the collector and the elector) at any
    moment, also while an attempt waits for the API server (20 ms a call here): the release
    is the last write, every time. (Run with asyncio.gather, cancelled, returned at the first
    child's end and cancelled the elector a second time: its release was lost in most runs.)"""
    import random
    import time

    from axoneme.agent._agent import Agent
    from axoneme.agent._config import AgentConfig

    class Slow(FakeLeaseServer):
        def get(self) -> Any:
            time.sleep(0.02)
            return super().get()

        def update(self, obj: dict[str, Any]) -> dict[str, Any]:
            time.sleep(0.02)
            return super().update(obj)

    rnd = random.Random(7)
    for i in range(12):
        crd = Agent(AgentConfig(datapath="noop", state_dir=str(tmp_path / f"s{i}"), guard=False,
                                k8s_kubeconfig="/nonexistent", k8s_node_name="n1",
                                leader_election_lease_duration=2,
                                leader_election_renew_deadline=1,
                                leader_election_retry_period=0.05)).crd_identities
        assert crd is not None and crd.elector is not None
        server = Slow()
        crd.elector.api, crd.elector.namespace = server, NS

        async def go(crd: Any = crd) -> None:
            task = asyncio.create_task(crd.run())
            for _ in range(1000):
                if crd.elector.leading():
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(rnd.random() * 0.15)
            task.cancel()
            # (a lost cancel would leave it running: bounded, not a hang)
            done, _ = await asyncio.wait({task}, timeout=30)
            assert done, "the cancelled collector and elector did not end"
            assert task.cancelled()

        asyncio.run(go())
        assert server.writes[-1][1]["holderIdentity"] == "", (i, server.writes[-3:])
        assert crd.elector.stopped and not crd.elector.leading()


def test_a_losing_write_is_not_repeated_until_the_watch_brings_the_new_version():
    """A 409 means this collector judged an old version: the next passes leave that number
    alone (no second losing write) until the watch brings another version, then judge it."""
    api, a, b, ga, gb, clock, number = two_collectors_one_unused()
    gb.run_once()  # b marks it; a's watch has not brought the mark
    events = len(api.events)
    for _ in range(3):
        ga.run_once()
    assert (ga.conflicts, ga.marked, len(api.events)) == (1, 0, events)  # one losing write
    a.deliver()  # the mark arrives
    clock.now += 31
    ga.run_once()  # judged again: unused and marked long enough
    assert api.get(number) is None and ga.deleted == 1 and not ga.stale
