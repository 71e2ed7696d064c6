"""Reference semantics on generated cases: a datapath holds exactly the
MapState it is given (``sync``), changes it by exactly the MapChanges it is
given (``apply``), reads it back unchanged (``dump``), and -- in the kernel --
decides real packets as ``MapState.lookup`` does.

- ``test_follows_the_noop_reference`` (offline, datapaths that leave nothing
  in the kernel): the same calls on the datapath and on NoopDatapath, the
  reference, give the same dumps, ipcache and answers, endpoints without an
  interface;
- ``test_kernel_decides_as_mapstate_lookup`` (kernel part): two veth pods on
  a private node; each generated state is synced (then reached again by
  ``apply``) on pod b, and a TCP and a UDP probe a -> b:80 must pass exactly
  when ``state.lookup(identity of a, INGRESS, proto, 80, address of a)``
  allows it.

The generated states hold address keys too (``Key.for_address``: one peer
address whatever its identity), for the pods' own addresses and one no pod has.

The cases are generated from fixed seeds: a failure names its seed and round.
"""

from __future__ import annotations

import ipaddress
import random
from typing import Any

import pytest
from axoneme.testing.conformance.fixtures import NODE_IDS, NODE_PORT, Node

pytestmark = [pytest.mark.conformance]

OFFLINE_SEEDS = range(8)
OFFLINE_ROUNDS = 12
KERNEL_SEEDS = range(2)
KERNEL_ROUNDS = 4
OTHER_IDENTITY = 40000  # an identity no pod has
OFFLINE_ADDRESSES = ("10.244.9.1", "10.244.9.2", "10.244.9.77")  # pods a and b, and no pod


def generated_state(rng: random.Random, kernel: bool, max_entries: int = 12,
                    addresses: tuple[str, ...] = OFFLINE_ADDRESSES) -> Any:
    """A MapState of up to ``max_entries`` keys: wildcard and pod identities,
    both directions, any protocol / whole protocol / port prefixes / exact
    ports, allow, deny and redirect entries. ``kernel``: redirects only on
    exact high ports (no proxy listens; the probes never hit them) and an
    open egress (the probes' own direction decides nothing)."""
    from axoneme.core.mapstate import (
        ADDRESS_IDENTITY,
        ALLOW,
        DENY,
        Direction,
        Entry,
        Key,
        MapState,
        Protocol,
        port_mask,
    )

    peers: list[tuple[int, str]] = [(ident, "") for ident in (0, NODE_IDS["a"], NODE_IDS["b"], OTHER_IDENTITY)]
    peers += [(ADDRESS_IDENTITY, a) for a in addresses]
    entries: dict[Any, Any] = {}
    for _ in range(rng.randint(0, max_entries)):
        ident, address = rng.choice(peers)
        direction = Direction.INGRESS if kernel else rng.choice(list(Direction))
        proto = rng.choice([Protocol.ANY, Protocol.TCP, Protocol.UDP, Protocol.TCP, Protocol.UDP])
        if proto is Protocol.ANY:
            key = Key(ident, direction, address=address)
        else:
            plen = rng.choice([0, 8, 12, 15, 16, 16])
            port = rng.choice([NODE_PORT, 81, 443, 8080, rng.randrange(65536)]) & port_mask(plen)
            key = Key(ident, direction, proto, port, plen, address)
        entry = rng.choice([ALLOW, ALLOW, DENY])
        if rng.random() < 0.15:
            if kernel:
                key = Key(ident, direction, Protocol.TCP, rng.randrange(20000, 30000), 16, address)
            entry = Entry(proxy_port=rng.randrange(15000, 15100))
        entries[key] = entry
    if kernel:
        entries[Key(0, Direction.EGRESS)] = ALLOW
    return MapState(entries)


def generated_packets(rng: random.Random, n: int = 24, addresses: tuple[str, ...] = OFFLINE_ADDRESSES
                      ) -> list[tuple[Any, ...]]:
    """(identity, direction, protocol, port, address) tuples near the generated keys."""
    from axoneme.core.mapstate import Direction, Protocol

    identities = [NODE_IDS["a"], NODE_IDS["b"], OTHER_IDENTITY, 50000]
    return [(rng.choice(identities), rng.choice(list(Direction)),
             rng.choice([Protocol.TCP, Protocol.UDP, Protocol.ICMP]),
             rng.choice([NODE_PORT, 81, 443, 8080, rng.randrange(65536)]),
             rng.choice([*addresses, "10.244.9.200"])) for _ in range(n)]


def _check_round(dp: Any, ep: Any, state: Any, where: str, rng: random.Random,
                 addresses: tuple[str, ...] = OFFLINE_ADDRESSES) -> None:
    got = dp.dump(ep)
    assert got == state, f"{where}: dump() is not the state it was given\nwant {state}\ngot  {got}"
    for packet in generated_packets(rng, addresses=addresses):
        want, have = state.lookup(*packet), got.lookup(*packet)
        assert (have.verdict, have.key) == (want.verdict, want.key), \
            f"{where}: the dumped state decides {packet} as {have}, MapState.lookup as {want}"


@pytest.mark.axoneme_offline
@pytest.mark.axoneme_in_memory
@pytest.mark.parametrize("seed", OFFLINE_SEEDS)
def test_follows_the_noop_reference(axoneme_datapath: Any, axoneme_datapath_class: type,
                                    seed: int, tmp_path: Any) -> None:
    from axoneme.core.datapath import Datapath, DatapathConfig, IPCacheChanges, NoopDatapath
    from axoneme.core.endpoint import Endpoint
    from axoneme.core.labels import Labels
    from axoneme.core.mapstate import Direction, MapState

    cls = axoneme_datapath_class
    config = DatapathConfig(state_dir=str(tmp_path), mode=axoneme_datapath.mode,
                            bpffs_root=str(tmp_path / "bpffs"))
    dp, ref = cls(config), NoopDatapath(config)
    rng = random.Random(seed)
    eps = [Endpoint(i + 1, ident, Labels(), ipv4=f"10.244.9.{i + 1}") for i, ident in
           enumerate((NODE_IDS["a"], NODE_IDS["b"]))]
    dp.probe()
    dp.start()
    try:
        for ep in eps:
            dp.endpoint_added(ep, True, True)
            dp.endpoint_added(ep, True, True)  # idempotent
            ref.endpoint_added(ep, True, True)
        cache = {ipaddress.ip_network(f"{ep.ipv4}/32"): ep.identity for ep in eps}
        dp.ipcache_apply(IPCacheChanges(cache))
        dp.ipcache_apply(IPCacheChanges(deletes=frozenset({ipaddress.ip_network("10.244.9.99/32")})))
        if cls.dump_ipcache is not Datapath.dump_ipcache:
            assert dp.dump_ipcache() == cache, "dump_ipcache() is not the ipcache it was given"
        held = {ep.id: MapState() for ep in eps}
        for rnd in range(OFFLINE_ROUNDS):
            where = f"seed {seed} round {rnd}"
            ep = rng.choice(eps)
            state = generated_state(rng, kernel=False)
            if rnd % 2:
                changes = held[ep.id].diff(state)
                dp.apply(ep, changes)
                ref.apply(ep, changes)
            else:
                changes = dp.sync(ep, state)
                assert held[ep.id].apply(changes) == state, f"{where}: sync() returned {changes}, " \
                    f"not what turns the old state into the new"
                ref.sync(ep, state)
            held[ep.id] = state
            _check_round(dp, ep, state, where, rng)
            assert dp.dump(ep) == ref.dump(ep), f"{where}: differs from NoopDatapath"
        if cls.endpoint_fail_closed is not Datapath.endpoint_fail_closed:
            dp.endpoint_fail_closed(eps[0], frozenset({Direction.INGRESS}))
            dp.endpoint_fail_closed(eps[0], frozenset())
            assert dp.dump(eps[0]) == held[eps[0].id], "failing closed changed the policy"
        for ep in eps:
            dp.endpoint_removed(ep)
            dp.endpoint_removed(ep)  # unknown endpoints are fine
            ref.endpoint_removed(ep)
            assert dp.dump(ep) == ref.dump(ep) == MapState(), "a removed endpoint keeps its policy"
    finally:
        dp.stop()
        dp.cleanup()


@pytest.mark.axoneme_kernel
@pytest.mark.privileged
@pytest.mark.parametrize("seed", KERNEL_SEEDS)
def test_kernel_decides_as_mapstate_lookup(conformance_node: Node, conformance_kernel_datapath: Any,
                                           seed: int) -> None:
    from axoneme.core.mapstate import ALLOW, Direction, Key, MapState, Protocol

    node = conformance_node
    cls, config = conformance_kernel_datapath
    eps = node.endpoints()
    open_policy = MapState({Key(0, Direction.INGRESS): ALLOW, Key(0, Direction.EGRESS): ALLOW})
    rng = random.Random(seed)
    dp = cls(config)
    dp.start()
    try:
        node.wire(dp, eps, open_policy)
        if "ipcache_dump" in cls.capabilities:
            cache = dp.dump_ipcache()
            for name, pod in node.pods.items():
                net = ipaddress.ip_network(f"{pod.ip}/32")
                assert cache.get(net) == NODE_IDS[name], f"dump_ipcache() lacks {net}: {cache}"
        assert node.probe("a", "b"), "a -> b does not pass with an allow-all policy"
        held = open_policy
        addresses = (node.pods["a"].ip, node.pods["b"].ip, OFFLINE_ADDRESSES[2])
        for rnd in range(KERNEL_ROUNDS):
            where = f"seed {seed} round {rnd}"
            state = generated_state(rng, kernel=True, addresses=addresses)
            if rnd % 2:
                dp.apply(eps["b"], held.diff(state))
            else:
                dp.sync(eps["b"], state)
            held = state
            _check_round(dp, eps["b"], state, where, rng, addresses)
            for proto, kind in ((Protocol.TCP, "tcp"), (Protocol.UDP, "udp")):
                want = state.lookup(NODE_IDS["a"], Direction.INGRESS, proto, NODE_PORT,
                                    node.pods["a"].ip).allowed
                got = node.probe("a", "b", proto=kind)
                assert got == want, (f"{where}: a -> b:{NODE_PORT}/{kind} "
                                     f"{'passes' if got else 'is dropped'}, MapState.lookup says "
                                     f"{'allowed' if want else 'denied'}\nstate {state}")
    finally:
        dp.stop()
