"""iptables datapath benchmarks (pytest-benchmark, marker bench;
AXONEME_BENCH_QUICK=1 keeps N <= 1k and few rounds).

The same policy in both modes: N/10 peer identities with 10 addresses each,
one TCP port key per identity (egress). Plain mode holds N rules (one per
address and port), ipset mode N/10 rules and N/10 sets.

- apply one policy change (one key added) with that policy present;
- full resync of the policy into an empty endpoint chain.

Everything runs inside a private network namespace: the benchmark's tens of
thousands of rules never meet the host's tables.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest
from axoneme.core.datapath import DatapathConfig, IPCacheChanges
from axoneme.core.endpoint import Endpoint
from axoneme.core.labels import Labels
from axoneme.core.mapstate import ALLOW, Direction, Key, MapChanges, MapState, Protocol

pytestmark = [pytest.mark.bench, pytest.mark.privileged]
LOG = logging.getLogger(__name__)
QUICK = os.environ.get("AXONEME_BENCH_QUICK") == "1"
SIZES = [100, 1000] if QUICK else [100, 1000, 10_000, 50_000]
ROUNDS = 2 if QUICK else 3
PER_ID = 10
CLONE_NEWNET = 0x40000000
EP = Endpoint(7, 4007, Labels(), ipv4="10.244.253.7", host_ifname="axbench0")


def policy(n: int) -> tuple[dict[ipaddress.IPv4Network | ipaddress.IPv6Network, int], MapState]:
    ids = max(1, n // PER_ID)
    ipcache: dict[ipaddress.IPv4Network | ipaddress.IPv6Network, int] = {}
    for i in range(ids):
        for j in range(PER_ID):
            addr = ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.128.0.0")) + i * PER_ID + j)
            ipcache[ipaddress.IPv4Network(f"{addr}/32")] = 100_000 + i
    state = MapState({Key(100_000 + i, Direction.EGRESS, Protocol.TCP, 1 + i % 60000, 16): ALLOW
                      for i in range(ids)})
    return ipcache, state


@pytest.fixture(scope="module")
def private_netns() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root: creates a network namespace and iptables rules")
    libc = ctypes.CDLL(None, use_errno=True)
    name = f"axbench-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        # the main thread (and the iptables/ipset children it forks) move in
        if libc.setns(target, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
        yield name
    finally:
        libc.setns(home, CLONE_NEWNET)
        os.close(home)
        os.close(target)
        subprocess.run(["ip", "netns", "del", name], check=False)


def _datapath(mode: str):  # type: ignore[no-untyped-def]
    from axoneme.datapath.iptables import IptablesDatapath

    dp = IptablesDatapath(DatapathConfig(mode=mode, options={"events": False}))
    dp.start()
    return dp


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", ["plain", "ipset"])
def test_apply_one_change(benchmark, private_netns: str, mode: str, n: int) -> None:  # type: ignore[no-untyped-def]
    dp = _datapath(mode)
    try:
        ipcache, state = policy(n)
        dp.ipcache_apply(IPCacheChanges(ipcache))
        dp.endpoint_added(EP, True, True)
        dp.sync(EP, state)
        extra = Key(100_000, Direction.EGRESS, Protocol.TCP, 65001, 16)

        def reset() -> None:
            dp.apply(EP, MapChanges(deletes=frozenset({extra})))

        benchmark.pedantic(lambda: dp.apply(EP, MapChanges({extra: ALLOW})), setup=reset,
                           rounds=ROUNDS, iterations=1)
        assert dp.dump(EP)[extra] == ALLOW
        rules = dp.metrics()["rules"]
        benchmark.extra_info.update(mode=mode, n=n, rules=rules)
        LOG.info("apply one change: mode=%s n=%d rules=%d", mode, n, rules)
    finally:
        dp.cleanup()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("mode", ["plain", "ipset"])
def test_full_resync(benchmark, private_netns: str, mode: str, n: int) -> None:  # type: ignore[no-untyped-def]
    dp = _datapath(mode)
    try:
        ipcache, state = policy(n)
        dp.ipcache_apply(IPCacheChanges(ipcache))
        dp.endpoint_added(EP, True, True)

        def empty() -> None:
            dp.sync(EP, MapState())

        benchmark.pedantic(lambda: dp.sync(EP, state), setup=empty, rounds=ROUNDS, iterations=1)
        assert dp.dump(EP) == state
        benchmark.extra_info.update(mode=mode, n=n, rules=dp.metrics()["rules"])
    finally:
        dp.cleanup()
