"""A deleted Node's identities collected within seconds (agent/_identitynodegc.py, issue 20),
against the in-memory fake of the API server (``FakeIdentityAPI`` of test_agent_identity_crd.py:
409 AlreadyExists, uid/resourceVersion preconditions, a watch log).

Each agent is a ``Node`` of that module (store, allocator, watch, its references) plus a pods view
(``Cluster``: which pod with which labels is bound to which Node, possibly lagging) and a
``NodePass`` driven round by round on a fake clock. The real cluster:
tests/k8s/test_k8s_multinode_identities.py."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from axoneme.agent._identitycrd import marked_at
from axoneme.agent._identityk8s import IdentityGC, pod_label_sets
from axoneme.agent._identitynodegc import NodeDeleteGC, NodePass
from axoneme.core.labels import Labels
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))  # the fake API server (import-mode=importlib)
from test_agent_identity_crd import FakeIdentityAPI, Node, labels  # noqa: E402

GRACE = 2.0
GHOST = "ghost"


def key(lab: Labels) -> tuple[str, ...]:
    return tuple(lab.sorted_strings())


class Cluster:
    """The pods of the cluster (name -> (node, label set)) and its Nodes, as the API has them."""

    def __init__(self) -> None:
        self.pods: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.nodes = {"a", "b", "c", GHOST}

    def view(self) -> dict[str, Any]:
        return {"pods": dict(self.pods), "nodes": set(self.nodes)}


class Agent:
    """One agent: identity side (``Node``), its pods/nodes view (a copy of the cluster's, taken
    at ``see``: a lagging informer), the collector and node-delete passes."""

    def __init__(self, api: FakeIdentityAPI, name: str, cluster: Cluster) -> None:
        self.node = Node(api, name)
        self.cluster = cluster
        self.seen = cluster.view()
        self.now = 1000.0
        self.gc = IdentityGC(self.node.store, self.node.alloc, self.live_labels, interval=0,
                             timeout=900, clock=lambda: self.now)
        self.passes: list[NodePass] = []

    def see(self) -> None:
        self.seen = self.cluster.view()

    def live_labels(self) -> set[tuple[str, ...]]:
        return {k for node, k in self.seen["pods"].values() if node in self.seen["nodes"]}

    def pods_on(self, nodes: set[str]) -> set[tuple[str, ...]]:
        return {k for node, k in self.seen["pods"].values() if node in nodes}

    def node_deleted(self, name: str, remote: list[Labels]) -> NodePass | None:
        """The nodes informer's DELETED: RemotePods drops the node's pods (their references,
        ``remote``), then the pass starts."""
        self.see()
        for lab in remote:
            self.node.stop_using(lab)
        p = NodeDeleteGC(self.gc, self.pods_on, GRACE, clock=lambda: self.now).start({name})
        if p is not None:
            self.passes.append(p)
        return p

    def round(self) -> list[tuple[str, int]]:
        """One round of every running pass (plan on the loop, then the writes)."""
        done = []
        for p in self.passes:
            if p.pending:
                plan = p.plan(self.gc, self.now)
                self.gc.execute(plan, "since node ghost was deleted")
                done += [(a, n) for a, n, _ in plan]
        return done


def _setup(names: tuple[str, ...] = ("a", "b")) -> tuple[FakeIdentityAPI, Cluster, list[Agent]]:
    """Pods on the ghost node with labels(1) (only there) and labels(2) (also a pod on b);
    every agent references both (other nodes' pods: RemotePods), b its own pod's labels(2)."""
    api = FakeIdentityAPI()
    cluster = Cluster()
    cluster.pods = {"g1": (GHOST, key(labels(1))), "g2": (GHOST, key(labels(2))),
                    "b2": ("b", key(labels(2)))}
    agents = [Agent(api, n, cluster) for n in names]
    for ag in agents:
        ag.node.deliver()
        ag.node.use(labels(1))
        ag.node.use(labels(2))
        ag.see()
    for ag in agents:
        ag.node.deliver()
    return api, cluster, agents


def _delete_ghost(cluster: Cluster, agents: list[Agent]) -> list[NodePass | None]:
    cluster.nodes.discard(GHOST)
    return [ag.node_deleted(GHOST, [labels(1)]) for ag in agents]  # labels(2): b's pod stays


def _tick(agents: list[Agent], seconds: float) -> None:
    for ag in agents:
        ag.now += seconds


def test_only_the_deleted_nodes_unused_identities_go_after_the_grace_not_the_timeout():
    api, cluster, agents = _setup(("a",))
    a = agents[0]
    n1, n2 = a.node.held[key(labels(1))], a.node.held[key(labels(2))]
    other = a.node.use(labels(3))  # unused too, but no pod of the deleted node had its labels
    a.node.stop_using(labels(3))
    (p,) = _delete_ghost(cluster, agents)
    assert p is not None and p.pending == {n1, n2}
    assert a.round() == [("mark", n1)]  # labels(2): b's pod still uses it
    assert p.pending == {n1}
    assert a.round() == []  # the marked version seen: the grace starts
    _tick(agents, GRACE - 0.1)
    assert a.round() == []
    _tick(agents, 0.1)
    assert a.round() == [("delete", n1)]
    assert api.get(n1) is None and a.gc.deleted == 1
    a.node.deliver()
    a.round()
    assert not p.pending and p.collected == {n1}
    assert a.node.alloc.get(n1) is None
    assert api.get(n2) is not None and marked_at(api.get(n2)) is None  # type: ignore[arg-type]
    assert api.get(other) is not None and marked_at(api.get(other)) is None  # type: ignore[arg-type]
    assert a.gc.last_error == ""


def test_a_new_pod_acquiring_after_the_mark_takes_it_back_and_the_delete_fails():
    """The race of the issue: the node is deleted, and a pod with the same labels appears on
    node b; a's pods view lags (it never sees the new pod) and b's watch brings the mark a
    moment after b acquired the identity without writing (its cache showed no mark yet)."""
    api, cluster, (a, b) = _setup()
    n1 = a.node.held[key(labels(1))]
    pa, pb = _delete_ghost(cluster, [a, b])
    assert a.round() == [("mark", n1)]
    marked = api.get(n1)
    assert marked is not None and marked_at(marked) is not None
    # b: a pod with labels(1) starts here before b's watch has the mark: acquire writes nothing
    cluster.pods["b1"] = ("b", key(labels(1)))
    assert b.node.use(labels(1)) == n1
    assert api.get(n1) == marked
    a.round()  # a sees its marked version: the grace starts
    b.node.deliver()  # b's watch brings the mark: b uses it, so the mark goes
    assert marked_at(api.get(n1)) is None  # type: ignore[arg-type]
    _tick([a, b], GRACE)
    # a's watch lags too: it still sees the marked version and deletes with it as precondition
    assert a.round() == [("delete", n1)]
    assert api.labels_of(n1) == key(labels(1)) and a.gc.conflicts == 1 and a.gc.deleted == 0
    a.node.deliver()  # now a sees the mark taken back: the pass leaves it alone
    assert a.round() == [] and n1 not in pa.pending  # type: ignore[union-attr]
    # b's own pass judges it used (its reference) and never marks it
    b.see()
    assert b.round() == [] and not pb.pending  # type: ignore[union-attr]
    assert api.labels_of(n1) == key(labels(1)) and b.node.held[key(labels(1))] == n1


def test_acquiring_a_marked_identity_seen_in_the_cache_unmarks_before_the_delete():
    api, cluster, (a, b) = _setup()
    n1 = a.node.held[key(labels(1))]
    _delete_ghost(cluster, [a])
    a.round()
    a.round()
    b.node.stop_using(labels(1))  # b saw the delete later... and a new pod comes at once
    b.node.deliver()  # b's cache shows the mark
    _tick([a, b], GRACE)
    plan = a.passes[0].plan(a.gc, a.now)
    assert [(x, n) for x, n, _ in plan] == [("delete", n1)]
    assert b.node.use(labels(1)) == n1  # acquire: the mark is taken back, the version moves on
    a.gc.execute(plan, "test")
    assert api.labels_of(n1) == key(labels(1)) and a.gc.conflicts == 1


def test_an_agent_that_sees_the_node_delete_late_unmarks_then_collects_it_itself():
    """b still references the ghost's pod (its nodes informer lags) when a's mark arrives: b takes
    the mark back, a's pass lets it be (no ping-pong), and b's own pass, started when the
    Node's delete reaches b, collects it."""
    api, cluster, (a, b) = _setup()
    n1 = a.node.held[key(labels(1))]
    cluster.nodes.discard(GHOST)
    pa = a.node_deleted(GHOST, [labels(1)])
    a.round()
    b.node.deliver()  # b: the mark, and b still references n1
    assert marked_at(api.get(n1)) is None  # type: ignore[arg-type]
    a.node.deliver()
    a.round()
    assert n1 not in pa.pending  # type: ignore[union-attr]
    assert a.round() == []  # and a does not mark it again
    pb = b.node_deleted(GHOST, [labels(1)])
    assert b.round() == [("mark", n1)]
    b.round()
    _tick([a, b], GRACE)
    assert b.round() == [("delete", n1)]
    assert api.get(n1) is None
    for ag in (a, b):
        ag.node.deliver()
        assert ag.node.alloc.get(n1) is None
    b.round()
    assert pb is not None and pb.collected == {n1}


def test_several_agents_in_the_same_pass_delete_once_and_report_no_error():
    api, cluster, agents = _setup(("a", "b", "c"))
    n1 = agents[0].node.held[key(labels(1))]
    _delete_ghost(cluster, agents)
    for _ in range(3):
        for ag in agents:
            ag.round()
            ag.node.deliver()
    _tick(agents, GRACE)
    for ag in agents:
        ag.round()
    assert api.get(n1) is None
    assert sum(ag.gc.deleted for ag in agents) == 1
    assert sum(ag.gc.marked for ag in agents) == 1
    assert all(ag.gc.last_error == "" for ag in agents)
    for ag in agents:
        ag.node.deliver()
        ag.round()
        assert not ag.passes[0].pending and ag.node.alloc.get(n1) is None


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "c", "a_watch", "c_watch", "a_pods", "c_pods",
                                           "b_use", "b_stop", "tick"]),
                          st.floats(0.05, 0.9)), max_size=60))
def test_property_never_deleted_while_another_node_uses_it(ops):
    """Any interleaving of two collecting agents' rounds, watches and pods views (lagging as
    they like) with node b starting and stopping a pod of the same labels: while b's watch is
    never a grace behind, no delete succeeds while b uses the identity, b's number always
    names its labels once b's watch is drained, and an identity nobody uses is gone once
    the passes finish."""
    api, cluster, agents = _setup(("a", "b", "c"))
    a, b, c = agents
    b.node.stop_using(labels(2))  # b's pod stays; b's labels(1) reference goes with the ghost
    n1 = a.node.held[key(labels(1))]
    deleted_in_use: list[int] = []
    real_delete = api.delete

    def delete(number: int, uid: str, rv: str) -> None:
        real_delete(number, uid, rv)
        if b.node.held.get(key(labels(1))) == number:
            deleted_in_use.append(number)

    api.delete = delete  # type: ignore[method-assign]
    cluster.nodes.discard(GHOST)
    b.node_deleted(GHOST, [labels(1)])
    b.passes.clear()  # b only acquires here
    a.node_deleted(GHOST, [labels(1)])
    c.node_deleted(GHOST, [labels(1)])
    last_b_watch = b.now
    for op, dt in ops:
        if op == "tick":
            _tick(agents, dt)
        elif op in ("a", "c"):
            {"a": a, "c": c}[op].round()
        elif op.endswith("_watch"):
            {"a": a, "c": c}[op[0]].node.deliver()
        elif op.endswith("_pods"):
            {"a": a, "c": c}[op[0]].see()
        elif op == "b_use" and key(labels(1)) not in b.node.held:
            cluster.pods["b1"] = ("b", key(labels(1)))
            b.node.use(labels(1))
        elif op == "b_stop" and key(labels(1)) in b.node.held:
            cluster.pods.pop("b1", None)
            b.node.stop_using(labels(1))
        if b.now - last_b_watch >= GRACE / 2:
            b.node.deliver()  # b's watch is never as far behind as the grace
            last_b_watch = b.now
    assert not deleted_in_use
    for _ in range(2):
        for ag in agents:
            ag.node.deliver()
    held = b.node.held.get(key(labels(1)))
    if held is not None:
        assert api.labels_of(held) == key(labels(1))
    else:
        # nobody uses labels(1): a pass over it (the Node's delete again) finishes the job
        for ag in (a, c):
            ag.see()
            ag.passes.append(NodePass([GHOST], {n1}, GRACE, ag.now))
        for _ in range(4):
            for ag in agents:
                ag.round()
                ag.node.deliver()
            _tick(agents, GRACE)
        assert api.get(n1) is None and all(ag.node.alloc.get(n1) is None for ag in agents)


# -- the informer side and the wiring ----------------------------------------------------------

def test_on_nodes_runs_a_pass_for_deleted_nodes_only(monkeypatch):
    import axoneme.agent._identitynodegc as nodegc

    monkeypatch.setattr(nodegc, "STEP", 0.01)
    api, cluster, (a,) = _setup(("a",))
    n1 = a.node.held[key(labels(1))]
    cluster.nodes.discard(GHOST)
    a.see()
    a.node.stop_using(labels(1))
    gc = NodeDeleteGC(a.gc, a.pods_on, 0.05)

    async def run() -> None:
        ghost = {"metadata": {"name": GHOST}}
        await gc.on_nodes([("ADDED", ghost), ("MODIFIED", ghost)], False)
        await gc.on_nodes([("DELETED", {"metadata": {"name": "no-pods-here"}})], False)
        assert not gc.active and gc.passes == 0
        await gc.on_nodes([("DELETED", ghost)], False)
        assert len(gc.active) == 1
        for _ in range(300):
            batch, a.node.pos = api.events[a.node.pos:], len(api.events)
            await a.node.sync.on_events("identities", batch, False)  # the watch, on the loop
            if not gc.active:
                break
            await asyncio.sleep(0.01)

    asyncio.run(run())
    assert api.get(n1) is None and gc.view() == {"grace": 0.05, "passes": 1, "collected": 1,
                                                 "running": 0}
    off = NodeDeleteGC(a.gc, a.pods_on, 0)
    asyncio.run(off.on_nodes([("DELETED", {"metadata": {"name": GHOST}})], False))
    assert off.passes == 0


def test_pod_label_sets_on_nodes_lists_their_pods_gone_or_not():
    from axoneme.core.cluster import Namespace, Pod

    def meta(name: str, app: str, node: str, hostnet: bool = False) -> Any:
        return SimpleNamespace(pod=Pod(name, "prod", {"app": app}, ()), host_network=hostnet,
                               node=node)

    source = SimpleNamespace(
        pods={"prod/a": meta("a", "a", "n1"), "prod/b": meta("b", "b", "n2"),
              "prod/h": meta("h", "h", "n2", hostnet=True)},
        nodes={"n1"},
        namespace=lambda name: Namespace(name, {"kubernetes.io/metadata.name": name}))
    apps = {next(x for x in k if x.startswith("k8s:app="))
            for k in pod_label_sets(source, "c", on={"n2"})}
    assert apps == {"k8s:app=b"}


def test_the_grace_is_a_config_key_and_the_pass_a_nodes_listener_after_remote_pods(tmp_path):
    from axoneme.agent._agent import Agent
    from axoneme.agent._config import AgentConfig
    from axoneme.agent.cli import build_parser
    from axoneme.agent.cli._agentcmds import build_agent_config
    from axoneme.core.errors import ConfigError

    agent = Agent(AgentConfig(datapath="noop", state_dir=str(tmp_path / "s"), guard=False,
                              k8s_kubeconfig="/nonexistent", identity_node_gc_grace=3))
    node_gc = agent.crd_identities.node_gc  # type: ignore[union-attr]
    assert node_gc is not None and node_gc.grace == 3
    listeners = agent.k8s.listeners["nodes"]  # type: ignore[union-attr]
    assert listeners.index(node_gc.on_nodes) > listeners.index(agent.remote_pods.on_nodes)  # type: ignore[union-attr]
    assert agent.k8s.view()["identities"]["node_gc"]["grace"] == 3  # type: ignore[union-attr]
    assert AgentConfig().identity_node_gc_grace == 2.0
    conf = tmp_path / "agent.yaml"
    conf.write_text("identity_node_gc_grace: -1\n")
    parser, _ = build_parser()
    with pytest.raises(ConfigError) as e:
        build_agent_config(parser.parse_args(["agent", "run", "--config", str(conf)]))
    assert "config key identity_node_gc_grace: expected 0 or more seconds" in str(e.value)
    assert str(conf) in str(e.value)


def test_the_periodic_collector_jitters_its_interval():
    """Two agents must not stay in step (each writing what the other just wrote)."""
    from axoneme.agent._identityk8s import JITTER

    api, _cluster, (a,) = _setup(("a",))
    gc = IdentityGC(a.node.store, a.node.alloc, set, interval=10, timeout=900)
    pauses = [gc.pause() for _ in range(200)]
    assert all(10 * (1 - JITTER) <= p <= 10 * (1 + JITTER) for p in pauses)
    assert max(pauses) - min(pauses) > 2 and 9 < sum(pauses) / len(pauses) < 11


def test_a_number_deleted_and_taken_for_other_labels_while_a_node_starts_using_it_moves():
    """The e2e's interleaving (a loaded machine: 1,000 cycles, a 1 s heartbeat): x starts using
    an identity again while its watch has not brought the collector's mark, so acquiring it
    writes nothing; the collector deletes it; z, whose watch is current, creates the number for
    other labels. x's watch then brings mark, delete and the new object: x cannot create it
    again, so x's holders move to another number and x knows the number by the API's labels
    (before: x kept it for its labels, a fault for ever, and one number named two label sets)."""
    from test_agent_identity_crd import Clock

    api = FakeIdentityAPI()
    x, y, z = Node(api, "x"), Node(api, "y"), Node(api, "z")
    for n in (x, y, z):
        n.deliver()
    number = x.use(labels(1))
    x.stop_using(labels(1))
    for n in (x, y, z):
        n.deliver()
    clock = Clock()
    gc = IdentityGC(y.store, y.alloc, set, interval=1, timeout=1, clock=clock)
    gc.run_once()  # y marks it (x's watch stops here)
    y.deliver()
    clock.now += 1
    gc.run_once()  # and deletes it
    assert api.get(number) is None
    z.deliver()
    assert z.use(labels(2)) == number  # the number is free: z's walk starts there
    assert x.use(labels(1)) == number  # x's cache: unmarked, so nothing written
    x.deliver()
    moved = x.held[key(labels(1))]
    assert moved != number and api.labels_of(moved) == key(labels(1))
    assert x.alloc.get(number).label_strings() == list(key(labels(2)))  # type: ignore[union-attr]
    assert x.alloc.lookup(labels(1)).id == moved  # type: ignore[union-attr]
    assert x.alloc.references() == {moved: 1} and x.sync.faults() == []
    for n in (x, y, z):
        n.deliver()
        assert n.alloc.lookup(labels(1)).id == moved  # type: ignore[union-attr]
        assert n.alloc.lookup(labels(2)).id == number  # type: ignore[union-attr]


def test_a_mark_that_failed_in_an_outage_is_tried_again_after_the_grace():
    api, cluster, (a,) = _setup(("a",))
    n1 = a.node.held[key(labels(1))]
    _delete_ghost(cluster, [a])
    api.fail = 503
    assert a.round() == [("mark", n1)]
    assert "503" in a.gc.last_error
    api.fail = None
    _tick([a], GRACE / 2)
    assert a.round() == []  # the same version: the write may still be on its way
    _tick([a], GRACE / 2)
    assert a.round() == [("mark", n1)]
    assert marked_at(api.get(n1)) is not None  # type: ignore[arg-type]
