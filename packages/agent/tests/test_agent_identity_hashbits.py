"""Issue 20's identity consistency with forced hash collisions (agent/_identityk8s.py).

``identity_hash_bits`` (a test knob, docs/kubernetes.md "Identities") shrinks the first-choice
number of a label set to ``2**bits`` values from 256, so many label sets collide and every
allocation probes and goes through the store's create-with-conflict-detection. Here several
allocators race in threads against the in-memory fake of the API server's semantics
(``FakeIdentityAPI`` of test_agent_identity_crd.py: 409 AlreadyExists, preconditions, a watch
log), hypothesis choosing the knob, the number of nodes, each node's use/release sequence and
when its watch delivers. The real API server: tests/k8s/test_k8s_multinode_identities.py.
"""

from __future__ import annotations

import random
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from axoneme.agent._config import AgentConfig
from axoneme.agent._identityk8s import CRDIdentities, pod_label_sets
from axoneme.core.identity import MIN_CLUSTER_IDENTITY, preferred_number
from axoneme.core.labels import Labels
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))  # the fake API server (import-mode=importlib)
from test_agent_identity_crd import FakeIdentityAPI, Node, run_and_drain  # noqa: E402


def _labels(i: int) -> Labels:
    return Labels.from_strings([f"k8s:app=app{i}", "k8s:io.kubernetes.pod.namespace=hb",
                                "k8s:io.cilium.k8s.policy.cluster=default"])


def test_hash_bits_shrink_the_first_choice_and_16_is_the_whole_space():
    keys = [tuple(_labels(i).sorted_strings()) for i in range(400)]
    for bits in (1, 3, 8):
        firsts = {preferred_number(k, bits) for k in keys}
        assert firsts <= set(range(MIN_CLUSTER_IDENTITY, MIN_CLUSTER_IDENTITY + (1 << bits)))
        assert len(firsts) == min(1 << bits, 400) or bits == 8  # 400 keys fill 2 and 8 slots
    assert [preferred_number(k) for k in keys] == [preferred_number(k, 16) for k in keys]
    assert len({preferred_number(k) for k in keys}) > 390  # the full hash rarely collides
    # the agent's CRD mode reads the knob from its config
    crd = CRDIdentities(AgentConfig(identity_hash_bits=2))
    assert {crd.preferred(k) for k in keys} == {256, 257, 258, 259}
    assert CRDIdentities(AgentConfig()).preferred(keys[0]) == preferred_number(keys[0])


@pytest.mark.parametrize("value", ["0", "17", "-1", "true", "4.5"])
def test_bad_hash_bits_name_the_key_and_the_file(tmp_path, value):
    from axoneme.agent.cli import build_parser
    from axoneme.agent.cli._agentcmds import build_agent_config
    from axoneme.core.errors import ConfigError

    conf = tmp_path / "agent.yaml"
    conf.write_text(f"identity_hash_bits: {value}\n")
    parser, _ = build_parser()
    with pytest.raises(ConfigError) as e:
        build_agent_config(parser.parse_args(["agent", "run", "--config", str(conf)]))
    assert "config key identity_hash_bits" in str(e.value) and str(conf) in str(e.value)


def test_pods_of_a_deleted_node_no_longer_keep_their_identities():
    """The collector's "used by a pod" leaves out pods bound to a Node the API no longer has
    (issue 20: delete a node, its pods' identities go; the pods stay until the pod GC)."""
    from axoneme.core.cluster import Namespace, Pod

    def meta(name: str, app: str, node: str) -> Any:
        return SimpleNamespace(pod=Pod(name, "prod", {"app": app}, ()), host_network=False,
                               node=node)

    source = SimpleNamespace(
        pods={"prod/a": meta("a", "a", "n1"), "prod/b": meta("b", "b", "n2"),
              "prod/p": meta("p", "pending", "")},
        nodes={"n1", "n2"},
        namespace=lambda name: Namespace(name, {"kubernetes.io/metadata.name": name}))
    apps = {next(x for x in key if x.startswith("k8s:app=")) for key in pod_label_sets(source, "c")}
    assert apps == {"k8s:app=a", "k8s:app=b", "k8s:app=pending"}
    source.nodes.discard("n2")
    apps = {next(x for x in key if x.startswith("k8s:app=")) for key in pod_label_sets(source, "c")}
    assert apps == {"k8s:app=a", "k8s:app=pending"}


def _member(api: FakeIdentityAPI, name: str, bits: int) -> Node:
    """One agent's identity side (store, allocator, watch, endpoints) with the hash-bits knob."""
    return Node(api, name, preferred=CRDIdentities(AgentConfig(identity_hash_bits=bits)).preferred)


def _toggle(m: Node, i: int) -> int | None:
    """Use label set ``i`` (its number) or stop using it (None)."""
    lab = _labels(i)
    if tuple(lab.sorted_strings()) in m.held:
        m.stop_using(lab)
        return None
    return m.use(lab)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bits=st.integers(1, 5), nodes=st.integers(2, 4), sets=st.integers(4, 40),
       garbage=st.integers(0, 12), seed=st.integers(0, 2**32 - 1),
       deliver=st.floats(0.0, 0.6))
def test_property_allocators_racing_with_forced_collisions_converge(bits, nodes, sets, garbage,
                                                                    seed, deliver):
    """2-4 allocators in threads use and release label sets (each its own random sequence
    over the same ``sets``, so they race on new label sets), every first choice among
    ``2**bits`` numbers, their watches delivering at random moments, while unused identities
    are deleted (a collector) so numbers free up mid-walk. Whenever a node uses a number, it
    and the API name that number for that label set only; once the watches drain every node
    agrees on every label set it uses, and every number any node knows names the API's
    label set."""
    rng = random.Random(seed)
    api = FakeIdentityAPI()
    seeder = _member(api, "seed", bits)
    junk = []
    for i in range(garbage):
        junk.append(_toggle(seeder, 10_000 + i))
        _toggle(seeder, 10_000 + i)
    members = [_member(api, f"n{k}", bits) for k in range(nodes)]
    for m in members:
        m.deliver()
    errors: list[BaseException] = []
    start = threading.Barrier(nodes + 1)

    def work(m: Node, r: random.Random) -> None:
        try:
            start.wait(10)
            for _ in range(2 * sets):
                i = r.randrange(sets)
                number = _toggle(m, i)
                if number is not None:
                    key = tuple(_labels(i).sorted_strings())
                    assert api.labels_of(number) in (key, None), (m.name, number, key)
                    ident = m.alloc.get(number)
                    assert ident is not None and tuple(ident.label_strings()) == key
                if r.random() < deliver:
                    m.deliver(r.randrange(m.pos, len(api.events) + 1))
        except BaseException as e:  # reported below
            errors.append(e)

    def collector(r: random.Random) -> None:
        try:
            start.wait(10)
            for number in r.sample(junk, len(junk)):
                obj = api.get(number)
                if obj is not None:
                    api.delete(number, obj["metadata"]["uid"], obj["metadata"]["resourceVersion"])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(m, random.Random(rng.random())))
               for m in members]
    threads.append(threading.Thread(target=collector, args=(random.Random(rng.random()),)))
    run_and_drain(threads, members, errors)
    numbers: dict[tuple[str, ...], set[int]] = {}
    for m in members:
        for key, number in m.held.items():
            numbers.setdefault(key, set()).add(number)
            assert api.labels_of(number) == key, (m.name, number, key)
            assert m.alloc.lookup(Labels.from_strings(key)).id == number  # type: ignore[union-attr]
        for ident in m.alloc.all():
            if not ident.reserved:
                assert api.labels_of(ident.id) == tuple(ident.label_strings()), (m.name, ident.id)
    assert all(len(v) == 1 for v in numbers.values()), numbers
    # every first choice was among 2**bits numbers: collisions were forced
    firsts = {preferred_number(k, bits) for k in numbers}
    assert firsts <= set(range(256, 256 + (1 << bits)))
