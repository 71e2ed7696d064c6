"""Map-level kernel tests: MapFullError with rollback, dump/sync round trips,
ipcache, and the C/ctypes layout check. No netns needed."""

from __future__ import annotations

import ctypes as ct
import ipaddress
from collections.abc import Iterator

import pytest
from axoneme.core.datapath import DatapathConfig, IPCacheChanges
from axoneme.core.endpoint import Endpoint
from axoneme.core.errors import MapFullError
from axoneme.core.labels import Labels
from axoneme.core.mapstate import (
    ADDRESS_IDENTITY,
    ALLOW,
    DENY,
    Direction,
    Entry,
    Key,
    MapChanges,
    MapState,
    Protocol,
)

pytestmark = pytest.mark.privileged

EG, IN = Direction.EGRESS, Direction.INGRESS


@pytest.fixture(scope="module")
def small_dp(start_ebpf) -> Iterator:  # type: ignore[no-untyped-def, type-arg]
    """policy_map_max 32 per endpoint, 40 entries in the kernel trie overall."""
    with start_ebpf(policy_map_max=32, ct_max=1024, ipcache_max=64,
                    options={"policy_map_total": 40, "max_endpoints": 8}) as dp:
        yield dp


def ep(n: int) -> Endpoint:
    return Endpoint(id=n, identity=1000 + n, labels=Labels())


def keys(n: int, identity: int = 7000, port0: int = 1000) -> dict[Key, Entry]:
    return {Key(identity, IN, Protocol.TCP, port0 + i, 16): ALLOW for i in range(n)}


def test_dump_roundtrip_every_key_shape(small_dp) -> None:  # type: ignore[no-untyped-def]
    state = MapState({
        Key(0, IN): ALLOW,
        Key(0, EG, Protocol.UDP): DENY,
        Key(5, EG, Protocol.TCP, 8080, 15): Entry(proxy_port=15001),
        Key(6, IN, Protocol.ICMP, 8, 16): ALLOW,
        Key(7, IN, Protocol.ICMPV6, 128, 16): Entry(deny=True),
        Key(8, EG, Protocol.SCTP, 0, 0): Entry(audit=True, auth_required=True),
        Key(9, IN, Protocol.TCP, 0x8000, 1): ALLOW,
    })
    changes = small_dp.sync(ep(1), state)
    assert set(changes.adds) == set(state) and not changes.deletes
    assert small_dp.dump(ep(1)) == state
    assert small_dp.dump(ep(2)) == MapState()
    # sync again: nothing to do; then to a different state: minimal changes
    assert not small_dp.sync(ep(1), state)
    new = MapState({k: v for k, v in state.items() if k.identity != 9})
    changes = small_dp.sync(ep(1), new)
    assert not changes.adds and changes.deletes == {Key(9, IN, Protocol.TCP, 0x8000, 1)}
    assert small_dp.dump(ep(1)) == new
    small_dp.sync(ep(1), MapState())
    assert small_dp.dump(ep(1)) == MapState()


def test_per_endpoint_limit_raises_and_changes_nothing(small_dp) -> None:  # type: ignore[no-untyped-def]
    before = MapState(keys(30))
    small_dp.sync(ep(3), before)
    errors0 = small_dp.metrics()["map_full_errors"]
    with pytest.raises(MapFullError):
        small_dp.apply(ep(3), MapChanges(adds=keys(5, identity=7001)))
    assert small_dp.dump(ep(3)) == before
    assert small_dp.metrics()["map_full_errors"] == errors0 + 1
    small_dp.sync(ep(3), MapState())


def test_full_kernel_map_rolls_back(small_dp) -> None:  # type: ignore[no-untyped-def]
    # ep 4 holds 30 of the 40 kernel slots; ep 5 fits its own limit but not the trie
    small_dp.sync(ep(4), MapState(keys(30)))
    before = MapState({Key(0, IN): DENY, **keys(3, identity=7100)})
    small_dp.sync(ep(5), before)
    errors0 = small_dp.metrics()["map_full_errors"]
    batch = MapChanges(
        adds={Key(0, IN): ALLOW,                                    # deny -> allow flip
              Key(7200, EG, Protocol.UDP, 53, 16): DENY,            # new deny
              **keys(12, identity=7101)},                           # too many new allows
        deletes=frozenset({Key(7100, IN, Protocol.TCP, 1000, 16)}))
    with pytest.raises(MapFullError):
        small_dp.apply(ep(5), batch)
    assert small_dp.dump(ep(5)) == before
    assert small_dp.dump(ep(4)) == MapState(keys(30))
    assert small_dp.metrics()["map_full_errors"] == errors0 + 1
    # the datapath still works after the failure
    small_dp.sync(ep(4), MapState())
    small_dp.apply(ep(5), batch)
    assert small_dp.dump(ep(5)) == before.apply(batch)
    small_dp.sync(ep(5), MapState())


def test_ipcache_roundtrip_v4_v6(small_dp) -> None:  # type: ignore[no-untyped-def]
    nets = {ipaddress.ip_network("10.244.9.9/32"): 1234,
            ipaddress.ip_network("192.0.2.0/24"): (1 << 24) | 1,
            ipaddress.ip_network("2001:db8::/32"): (1 << 24) | 2,
            ipaddress.ip_network("2001:db8::1/128"): 4321}
    small_dp.ipcache_apply(IPCacheChanges(upserts=nets))
    got = small_dp.dump_ipcache()
    assert {k: v for k, v in got.items() if k in nets} == nets
    small_dp.ipcache_apply(IPCacheChanges(deletes=frozenset(nets)))
    assert not set(small_dp.dump_ipcache()) & set(nets)


def test_index_holds_the_last_written_keys(small_dp) -> None:  # type: ignore[no-untyped-def]
    """The index of what the kernel holds keeps the Key objects last written
    (the caller's state), not a copy of each: a write of keys equal to held
    ones replaces them; deleted ones leave; address keys are found by their
    slot (issue 17: no raw key bytes kept per entry)."""
    first = MapState({**keys(6, identity=31), Key(ADDRESS_IDENTITY, EG, address="10.9.9.9"): ALLOW})
    small_dp.sync(ep(6), first)
    again = {Key(k.identity, k.direction, k.protocol, k.port, k.prefix_len, k.address): DENY
             for k in list(first)[:3]}
    gone = list(first)[3]
    small_dp.apply(ep(6), MapChanges(again, frozenset({gone})))
    held = small_dp._keys_index()[6]
    assert held == set(first) - {gone}
    assert {id(k) for k in again} <= {id(k) for k in held}
    assert small_dp.dump(ep(6)) == MapState({**{k: v for k, v in first.items() if k != gone},
                                             **again})
    small_dp.sync(ep(6), MapState())
    assert not small_dp._keys_index().get(6)


def _kernel_ipcache_count(dp) -> int:  # type: ignore[no-untyped-def]
    from axoneme.datapath.ebpf import _bpf
    from axoneme.datapath.ebpf import _layout as L
    return sum(1 for name in ("ax_ipcache_host", "ax_ipcache")
               for _ in _bpf.map_keys(dp.map_fd(name), L.IPCacheKey))


def test_ipcache_count_kept_by_writes(small_dp, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The ipcache's entry count (metrics, status) is kept by each write, not
    by a copy of the keys: new keys, identity changes of held ones, deletions
    of held and absent ones, and a batch too big to look up (the count taken
    from the kernel again) all leave it equal to what the maps hold."""
    from axoneme.datapath.ebpf import _ipcachemaps
    count = lambda: int(small_dp.metrics()["ipcache_entries"])  # noqa: E731
    assert count() == _kernel_ipcache_count(small_dp)  # counted from the kernel
    base = count()
    hosts = {ipaddress.ip_network(f"10.250.0.{i}/32"): (1 << 24) | 100 + i for i in range(10)}
    wide = {ipaddress.ip_network(f"10.251.{i}.0/24"): (1 << 24) | 200 + i for i in range(4)}
    small_dp.ipcache_apply(IPCacheChanges(upserts={**hosts, **wide}))
    assert count() == base + 14 == _kernel_ipcache_count(small_dp)
    # 4 held prefixes change identity among 4 new ones
    nets = list(hosts)
    change = {nets[1]: 7001, nets[4]: 7002, nets[9]: 7003, list(wide)[0]: 7004}
    more = {ipaddress.ip_network(f"10.250.1.{i}/32"): (1 << 24) | 300 + i for i in range(4)}
    small_dp.ipcache_apply(IPCacheChanges(upserts={**change, **more}))
    assert count() == base + 18 == _kernel_ipcache_count(small_dp)
    got = small_dp.dump_ipcache()
    assert all(got[n] == ident for n, ident in {**change, **more}.items())
    # deletions: two held, one never written
    small_dp.ipcache_apply(IPCacheChanges(deletes=frozenset(
        {nets[0], list(wide)[1], ipaddress.ip_network("10.252.0.1/32")})))
    assert count() == base + 16 == _kernel_ipcache_count(small_dp)
    # a batch past the lookup bound: the count read from the kernel again
    monkeypatch.setattr(_ipcachemaps, "_LOOKUPS_MAX", 2)
    small_dp.ipcache_apply(IPCacheChanges(upserts={
        **{n: 8000 + i for i, n in enumerate(nets[1:])},
        ipaddress.ip_network("10.250.2.1/32"): 8100}))
    assert count() == base + 17 == _kernel_ipcache_count(small_dp)
    assert small_dp.dump_ipcache()[nets[9]] == 8008
    small_dp.ipcache_apply(IPCacheChanges(deletes=frozenset(
        {*hosts, *wide, *more, ipaddress.ip_network("10.250.2.1/32")})))
    assert count() == base == _kernel_ipcache_count(small_dp)


def test_status_and_metrics(small_dp) -> None:  # type: ignore[no-untyped-def]
    st = small_dp.status()
    assert st.healthy and st.name == "ebpf" and "policy entries" in st.detail
    m = small_dp.metrics()
    for name in ("policy_entries", "ipcache_entries", "ct_entries", "map_full_errors",
                 "events_suppressed", "packets_dropped"):
        assert name in m


def test_probe_passes_as_root(small_dp) -> None:  # type: ignore[no-untyped-def]
    assert small_dp.probe() is None  # raises DatapathUnavailable with the reason otherwise
    # probing again next to a running datapath leaves it as it was
    assert small_dp.status().healthy


def test_ctypes_mirrors_match_c_structs(small_dp) -> None:  # type: ignore[no-untyped-def]
    """Cilium alignchecker: every ctypes mirror has the C struct's size and offsets."""
    import os
    import uuid

    import bcc
    from axoneme.datapath.ebpf import _bpf
    from axoneme.datapath.ebpf import _layout as L

    root = f"/sys/fs/bpf/axoneme-test-{uuid.uuid4().hex[:8]}"
    os.makedirs(root)
    try:
        defines = {"AX_PIN_ROOT": f'"{root}"', "AX_POLICY_MAX": 8, "AX_IPCACHE_MAX": 8,
                   "AX_CT_MAX": 8, "AX_EP_MAX": 8, "AX_RINGBUF_PAGES": 1}
        # one array map per struct, so BCC generates ctypes from the C definitions
        extra = "".join(f"BPF_ARRAY(chk_{i}, struct {cname}, 1);\n"
                        for i, (_, cname) in enumerate(L.MIRRORS))
        b = bcc.BPF(text=(_bpf.assemble_source(defines) + extra).encode())
        try:
            for i, (mirror, cname) in enumerate(L.MIRRORS):
                gen = b[f"chk_{i}".encode()].Leaf
                assert ct.sizeof(gen) == ct.sizeof(mirror), cname
                gen_fields = [f[0] for f in gen._fields_ if not f[0].startswith("__pad")]
                assert gen_fields == [f[0] for f in mirror._fields_], cname
                for fname, _ in mirror._fields_:
                    assert getattr(gen, fname).offset == getattr(mirror, fname).offset, (cname, fname)
                    assert getattr(gen, fname).size == getattr(mirror, fname).size, (cname, fname)
        finally:
            b.cleanup()
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def test_incompatible_pinned_map_is_replaced() -> None:
    """An upgrade changed a map layout: start() replaces that pinned map."""
    import os
    import shutil
    import uuid

    if os.geteuid() != 0:
        pytest.skip("needs root: pins BPF maps")
    import bcc
    from axoneme.datapath.ebpf import EbpfDatapath, _bpf

    root = f"/sys/fs/bpf/axoneme-test-{uuid.uuid4().hex[:8]}"
    os.makedirs(root)
    try:
        old = bcc.BPF(text=(f'BPF_TABLE_PINNED("hash", u32, u32, ax_ct, 8, "{root}/axoneme_ct_v1");'
                            "int f(void *c) { return 0; }").encode())
        old.cleanup()
        assert _bpf.pinned_map_sizes(f"{root}/axoneme_ct_v1") == (4, 4)
        dp = EbpfDatapath(DatapathConfig(bpffs_root=root, ct_max=64, ipcache_max=64))
        dp.start()
        try:
            assert _bpf.pinned_map_sizes(f"{root}/axoneme_ct_v1") == (40, 64)
        finally:
            dp.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_big_endpoint_dump_and_sync_use_the_batch_walk(start_ebpf) -> None:  # type: ignore[no-untyped-def]
    """Endpoints above 4096 entries are dumped by one kernel-side walk."""
    from axoneme.datapath.ebpf import EbpfDatapath

    with start_ebpf(policy_map_max=6000, ct_max=64, ipcache_max=64,
                    options={"max_endpoints": 2}) as first:
        big = MapState({**keys(5000, port0=1), Key(0, EG): DENY})
        small = MapState(keys(3, identity=9))
        first.sync(ep(1), big)
        first.sync(ep(2), small)
        assert first.dump(ep(1)) == big and first.dump(ep(2)) == small
        # a fresh instance (adoption) rebuilds its index from the kernel
        first.stop()
        dp = EbpfDatapath(first.config)
        dp.start()
        try:
            assert dp.dump(ep(1)) == big
            smaller = MapState({k: v for i, (k, v) in enumerate(big.items()) if i % 2})
            changes = dp.sync(ep(1), smaller)
            assert not changes.adds and len(changes.deletes) == len(big) - len(smaller)
            # the index holds the state's Key objects, not the dump's copies (RSS)
            mine = {id(k) for k in smaller}
            assert all(id(k) in mine for k in dp._keys_index()[1])
            assert dp.dump(ep(1)) == smaller and dp.dump(ep(2)) == small
            assert dp.metrics()["policy_entries"] == len(smaller) + len(small)
            # values compared as bytes (_sync_big): each kind of change is found
            kinds = (DENY, Entry(proxy_port=15001), Entry(audit=True, auth_required=True))
            other = MapState({**{k: kinds[i % 3] if i % 100 == 0 else v
                                 for i, (k, v) in enumerate(smaller.items())},
                              Key(0, IN): ALLOW, Key(5, EG, Protocol.UDP, 53, 16): DENY})
            changes = dp.sync(ep(1), other)
            assert len(changes.adds) == len(smaller) // 100 + (len(smaller) % 100 > 0) + 2
            assert not changes.deletes
            assert dp.dump(ep(1)) == other and dp.dump(ep(2)) == small
            assert not dp.sync(ep(1), other)  # nothing left to change
        finally:
            dp.stop()


def test_adopting_start_builds_the_index_from_the_first_sync(start_ebpf) -> None:  # type: ignore[no-untyped-def]
    """A start registers its endpoints with flags from a walk that decodes no
    Key (no index yet); the first sync builds the index holding the state's
    own Keys (issue 17: an index decoded at start and replaced later left its
    200k Keys' heap partly used under the rebuilt state)."""
    from axoneme.datapath.ebpf import EbpfDatapath

    with start_ebpf(policy_map_max=6000, ct_max=64, ipcache_max=64,
                    options={"max_endpoints": 2}) as first:
        big = MapState({**keys(5000, port0=1), Key(0, EG): DENY})
        small = MapState({**keys(3, identity=9), Key(0, IN): ALLOW})
        first.sync(ep(1), big)
        first.sync(ep(2), small)
        flags = (first._skip_flags(1), first._skip_flags(2), first._skip_flags(3))
        assert len(set(flags)) == 3  # wildcard egress, wildcard ingress, nothing
        first.stop()
        dp = EbpfDatapath(first.config)
        dp.start()
        try:
            assert (dp._skip_flags(1), dp._skip_flags(2), dp._skip_flags(3)) == flags
            assert dp._index is None  # the walk kept no Key
            fresh = MapState({Key(k.identity, k.direction, k.protocol, k.port, k.prefix_len): v
                              for k, v in big.items()})
            assert not dp.sync(ep(1), fresh)
            mine = {id(k) for k in fresh}
            assert all(id(k) in mine for k in dp._keys_index()[1])
            assert len(dp._keys_index()[1]) == len(fresh)
            assert dp.dump(ep(1)) == big and dp.dump(ep(2)) == small
            assert (dp._skip_flags(1), dp._skip_flags(2)) == flags[:2]
            # a write after it keeps the flags as before the restart
            dp.apply(ep(2), MapChanges({}, frozenset({Key(0, IN)})))
            assert dp._skip_flags(2) == flags[2]
        finally:
            dp.stop()


def test_host_entries_move_from_the_trie_to_the_host_hash(start_ebpf) -> None:  # type: ignore[no-untyped-def]
    """A /32 or /128 in the ipcache trie (what a version without the host hash
    wrote) moves to axoneme_ipcache_host_v1 at start: the programs look host
    addresses up there first, and deletes go there (lib/ipcache.h)."""
    from axoneme.datapath.ebpf import EbpfDatapath, _bpf
    from axoneme.datapath.ebpf import _layout as L
    from axoneme.datapath.ebpf._datapath import ipcache_key

    host4, host6 = ipaddress.ip_network("10.244.77.7/32"), ipaddress.ip_network("fd00:77::7/128")
    cidr = ipaddress.ip_network("10.244.77.0/24")
    with start_ebpf(ct_max=64, ipcache_max=64, options={"max_endpoints": 2}) as first:
        first.ipcache_apply(IPCacheChanges(upserts={cidr: 5001}))
        for net, ident in ((host4, 5002), (host6, 5003)):
            v = L.IPCacheValue()
            v.identity = ident
            _bpf.map_update(first.map_fd("ax_ipcache"), ipcache_key(net), v)  # the old layout
        first.stop()
        dp = EbpfDatapath(first.config)
        dp.start()
        try:
            trie = {bytes(k) for k in _bpf.map_keys(dp.map_fd("ax_ipcache"), L.IPCacheKey)}
            host = {bytes(k) for k in _bpf.map_keys(dp.map_fd("ax_ipcache_host"), L.IPCacheKey)}
            assert bytes(ipcache_key(cidr)) in trie
            assert {bytes(ipcache_key(host4)), bytes(ipcache_key(host6))} <= host - trie
            got = dp.dump_ipcache()
            assert (got[cidr], got[host4], got[host6]) == (5001, 5002, 5003)
            dp.ipcache_apply(IPCacheChanges(deletes=frozenset({host4, host6, cidr})))
            assert not {cidr, host4, host6} & set(dp.dump_ipcache())
        finally:
            dp.stop()


def test_a_start_prunes_node_entries_of_addresses_the_node_lost(start_ebpf) -> None:  # type: ignore[no-untyped-def]
    """A node entry (IPCACHE_F_NODE) for an address this node no longer has
    goes at start; the agent's own /32 entries beside it stay (the start reads
    only the node entries' keys of the whole host map)."""
    from axoneme.datapath.ebpf import EbpfDatapath, _bpf
    from axoneme.datapath.ebpf import _layout as L
    from axoneme.datapath.ebpf._datapath import ipcache_key

    gone, peer = ipaddress.ip_network("198.51.100.77/32"), ipaddress.ip_network("10.244.78.9/32")
    with start_ebpf(ct_max=64, ipcache_max=64, options={"max_endpoints": 2}) as first:
        first.ipcache_apply(IPCacheChanges(upserts={peer: 5004}))
        v = L.IPCacheValue()
        v.identity, v.flags = L.ID_HOST, L.IPCACHE_F_NODE
        _bpf.map_update(first.map_fd("ax_ipcache_host"), ipcache_key(gone), v)
        first.stop()
        dp = EbpfDatapath(first.config)
        dp.start()
        try:
            host = {bytes(k) for k in _bpf.map_keys(dp.map_fd("ax_ipcache_host"), L.IPCacheKey)}
            assert bytes(ipcache_key(gone)) not in host
            assert dp.dump_ipcache()[peer] == 5004
            assert ipaddress.ip_network("127.0.0.1/32") not in dp.dump_ipcache()  # node entries
        finally:
            dp.stop()
