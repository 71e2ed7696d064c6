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

import asyncio
import random
import sys
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from axoneme.agent._config import AgentConfig
from axoneme.agent._identitycrd import CRDIdentityStore
from axoneme.agent._identityk8s import CRDIdentities, IdentitySync, pod_label_sets
from axoneme.core.identity import MIN_CLUSTER_IDENTITY, IdentityAllocator, preferred_number
from axoneme.core.labels import Labels
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))  # the fake API server (import-mode=importlib)
from test_agent_identity_crd import FakeIdentityAPI  # noqa: E402


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


class Member:
    """One agent's identity side with the hash-bits knob: store, allocator, watch, endpoints."""

    def __init__(self, api: FakeIdentityAPI, name: str, bits: int) -> None:
        self.name, self.api = name, api
        self.store = CRDIdentityStore(api)
        crd = CRDIdentities(AgentConfig(identity_hash_bits=bits))
        self.alloc = IdentityAllocator(self.store, preferred=crd.preferred)
        self.sync = IdentitySync(self.store, self.alloc, self.relabel)
        self.pos = 0
        self.synced = False
        self.held: dict[tuple[str, ...], int] = {}
        self.lock = threading.RLock()

    async def relabel(self, numbers: set[int]) -> None:
        with self.lock:
            for key, number in list(self.held.items()):
                if number in numbers:
                    old = self.alloc.get(number)
                    self.held[key] = self.alloc.allocate(Labels.from_strings(key)).id
                    assert old is not None
                    self.alloc.release(old)

    def deliver(self, upto: int | None = None) -> None:
        with self.api.lock:
            end = len(self.api.events) if upto is None else min(upto, len(self.api.events))
            batch = self.api.events[self.pos:end]
        with self.lock:
            self.pos = end
            initial, self.synced = not self.synced, True
            asyncio.run(self.sync.on_events("identities", batch, initial))

    def toggle(self, i: int) -> int | None:
        """Use label set ``i`` (its number) or stop using it (None)."""
        lab = _labels(i)
        key = tuple(lab.sorted_strings())
        with self.lock:
            if key in self.held:
                ident = self.alloc.get(self.held.pop(key))
                assert ident is not None
                self.alloc.release(ident)
                return None
            ident = self.alloc.allocate(lab)
            self.held[key] = ident.id
            return ident.id


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
    seeder = Member(api, "seed", bits)
    junk = []
    for i in range(garbage):
        junk.append(seeder.toggle(10_000 + i))
        seeder.toggle(10_000 + i)
    members = [Member(api, f"n{k}", bits) for k in range(nodes)]
    for m in members:
        m.deliver()
    errors: list[BaseException] = []
    start = threading.Barrier(nodes + 1)

    def work(m: Member, r: random.Random) -> None:
        try:
            start.wait(10)
            for _ in range(2 * sets):
                i = r.randrange(sets)
                number = m.toggle(i)
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
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for _ in range(3):  # drain: duplicates seen, endpoints moved to the lowest number
        for m in members:
            m.deliver()
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
