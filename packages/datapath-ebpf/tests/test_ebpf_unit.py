"""Unit tests without root: struct conversions, source assembly, event decoding."""

from __future__ import annotations

import ctypes as ct
import ipaddress

import pytest
from axoneme.core.flow import DropReason, FlowVerdict
from axoneme.core.mapstate import Direction, Entry, Key, Protocol, port_range_to_prefixes
from axoneme.datapath.ebpf import _bpf, _events
from axoneme.datapath.ebpf import _layout as L
from axoneme.datapath.ebpf._datapath import (
    entry_from_policy,
    ipcache_key,
    key_from_policy,
    net_from_ipcache,
    policy_entry,
    policy_key,
)

KEYS = [
    Key(0, Direction.INGRESS),
    Key(42, Direction.EGRESS, Protocol.UDP),
    Key(42, Direction.EGRESS, Protocol.TCP, 8080, 16),
    Key(7, Direction.INGRESS, Protocol.ICMP, 8, 16),
    *[Key(9, Direction.INGRESS, Protocol.TCP, p, n) for p, n in port_range_to_prefixes(1000, 2047)],
]


@pytest.mark.parametrize("key", KEYS, ids=str)
def test_policy_key_roundtrip_and_prefix(key: Key) -> None:
    pk = policy_key(3, key)
    assert key_from_policy(pk) == key
    # LPM prefix: 72 fixed bits, + 8 for the protocol, + the port prefix
    want = 72 if key.protocol is Protocol.ANY else 80 + key.prefix_len
    assert pk.prefixlen == want and pk.ep_id == 3
    assert policy_entry(key, Entry()).l4_prefix == key.l4_prefix


def test_policy_key_port_is_network_order() -> None:
    pk = policy_key(1, Key(1, Direction.EGRESS, Protocol.TCP, 0x1F90, 16))
    raw = bytes(pk)
    assert raw[14:16] == b"\x1f\x90" and raw[16:] == bytes(4)  # dport, then the pad


@pytest.mark.parametrize("entry", [Entry(), Entry(deny=True), Entry(proxy_port=15001),
                                   Entry(audit=True, auth_required=True)], ids=str)
def test_entry_roundtrip(entry: Entry) -> None:
    assert entry_from_policy(policy_entry(Key(0, Direction.INGRESS), entry)) == entry


@pytest.mark.parametrize("net", ["10.244.1.2/32", "0.0.0.0/0", "192.0.2.0/24",
                                 "2001:db8::/32", "fd00::1/128"])
def test_ipcache_key_roundtrip(net: str) -> None:
    n = ipaddress.ip_network(net)
    k = ipcache_key(n)
    assert k.prefixlen == 32 + n.prefixlen and k.family == n.version
    assert net_from_ipcache(k) == n


def test_sizes_are_stable() -> None:
    # the C side is checked by test_ebpf_maps (privileged); these catch accidental edits
    assert ct.sizeof(L.PolicyKey) == 20 and ct.sizeof(L.PolicyEntry) == 24
    # a trie node's value follows the 24-byte node header and the key data:
    # the policy entry's u64 counters (atomic adds) must be 8-byte aligned there
    assert (24 + ct.sizeof(L.PolicyKey) - 4) % 8 == 0
    assert ct.sizeof(L.IPCacheKey) == 24 and ct.sizeof(L.Tuple) == 40
    assert ct.sizeof(L.Event) == 80 and ct.sizeof(L.CTEntry) == 64


def test_assembled_source_inlines_each_header_once() -> None:
    src = _bpf.assemble_source({"AX_PIN_ROOT": '"/x"'})
    assert src.count("struct ax_policy_key {") == 1
    assert '#include "lib/' not in src
    assert "int ax_from_container(" in src and "int ax_to_container(" in src
    for pin in _bpf.PINNED_MAPS.values():
        assert pin.startswith("axoneme_") and pin.endswith("_v1")
    assert all(len(name) <= 15 for name in _bpf.PINNED_MAPS)


def test_mark_defines_come_from_core_marks() -> None:
    """The C programs get every mark from axoneme.core.marks: generated into
    the translation unit, defined in no C file of the package."""
    import os

    from axoneme.core import marks

    src = _bpf.assemble_source({"AX_PIN_ROOT": '"/x"'})
    for name, value in (("AX_MARK_MAGIC_MASK", marks.MARK_MAGIC_HOST_MASK),
                        ("AX_MARK_MAGIC_TO_PROXY", marks.MARK_MAGIC_TO_PROXY),
                        ("AX_MARK_MAGIC_PROXY_INGRESS", marks.MARK_MAGIC_PROXY_INGRESS),
                        ("AX_MARK_MAGIC_CHECKED", marks.MARK_MAGIC_CHECKED)):
        assert src.count(f"#define {name} ") == 1
        assert f"#define {name} {value:#06x}\n" in src
    for dirpath, _, files in os.walk(_bpf.bpf_dir()):
        for f in files:
            with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                assert "#define AX_MARK" not in fh.read(), f


def test_both_programs_share_one_ct_fast_path_and_verdict_steps() -> None:
    """The CT fast path and the steps around a decision have one definition
    (lib/conntrack.h, lib/verdict.h) that every tc program calls."""
    import os

    src = _bpf.assemble_source({"AX_PIN_ROOT": '"/x"'})
    for fn in ("ax_ct_fast_path", "ax_endpoint_drops", "ax_ct_create_failed", "ax_pass"):
        assert src.count(f"static __always_inline int {fn}(") == 1, fn
    for name in _bpf.PROGRAM_FILES:
        with open(os.path.join(_bpf.bpf_dir(), name), encoding="utf-8") as f:
            text = f.read()
        # directly, or through the local delivery of lib/deliver.h (which does)
        assert ("ax_ct_fast_path(skb, " in text and "ax_endpoint_drops(" in text) \
            or "ax_deliver_local(skb, " in text, name
        for inlined in ("ax_ct_cached(", "ax_ct_is_reply(", "ax_policy_decide(", "AX_METRIC_"):
            assert inlined not in text, (name, inlined)


def _event(**kw: int) -> L.Event:
    ev = L.Event()
    ev.family, ev.proto = 4, 6
    ct.memmove(ev.saddr, bytes([10, 244, 0, 1]), 4)
    ct.memmove(ev.daddr, bytes([10, 244, 0, 2]), 4)
    for k, v in kw.items():
        setattr(ev, k, v)
    return ev


def test_drop_event_to_flow() -> None:
    ev = _event(type=L.EVENT_DROP, reason=133, direction=L.DIR_INGRESS, sport=40000, dport=80,
                tcp_flags=0x02, src_identity=100, dst_identity=200, ep_id=5)
    f = _events.to_flow(ev, 0.0)
    assert f.verdict is FlowVerdict.DROPPED and f.drop_reason is DropReason.POLICY_DENIED
    assert f.event_type == "drop" and f.traffic_direction == "INGRESS"
    assert f.l4 == {"TCP": {"source_port": 40000, "destination_port": 80, "flags": {"SYN": True}}}
    assert (f.ip_source, f.ip_destination) == ("10.244.0.1", "10.244.0.2")
    assert f.destination.id == 5 and f.source.identity == 100


def test_verdict_event_to_flow_icmp_and_redirect() -> None:
    ev = _event(type=L.EVENT_POLICY_VERDICT, verdict=L.VERDICT_FORWARDED, proto=1, icmp_type=8,
                direction=L.DIR_EGRESS, match_type=1)
    f = _events.to_flow(ev, 0.0)
    assert f.verdict is FlowVerdict.FORWARDED and f.event_type == "policy-verdict"
    assert f.l4 == {"ICMPv4": {"type": 8, "code": 0}} and f.match_type == "L3_ONLY"
    ev = _event(type=L.EVENT_POLICY_VERDICT, verdict=L.VERDICT_REDIRECTED, proto=17, dport=53,
                match_type=2, proxy_port=15000)
    assert _events.to_flow(ev, 0.0).verdict is FlowVerdict.REDIRECTED
    ev = _event(type=L.EVENT_POLICY_VERDICT, verdict=L.VERDICT_AUDIT, proto=6, dport=22)
    assert _events.to_flow(ev, 0.0).verdict is FlowVerdict.AUDIT


@pytest.mark.parametrize("key", KEYS, ids=str)
def test_policy_key_bytes_equal_struct(key: Key) -> None:
    from axoneme.datapath.ebpf._datapath import policy_key_bytes

    assert policy_key_bytes(77, key) == bytes(policy_key(77, key))


class FakeKernel:
    """The policy map as a dict (raw key bytes -> raw value bytes), recording writes."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.policy: dict[bytes, bytes] = {}
        self.log: list[tuple[str, bytes]] = []
        self.fail_after = fail_after

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import errno

        from axoneme.datapath.ebpf import _bpf

        def update_batch(fd, keys, values):  # type: ignore[no-untyped-def]
            for i, (k, v) in enumerate(zip(keys, values, strict=True)):
                if self.fail_after is not None and len(self.log) >= self.fail_after:
                    err = OSError(errno.ENOSPC, "full")
                    err.written = i  # type: ignore[attr-defined]
                    raise err
                self.policy[k] = v
                self.log.append(("update", k))
            return len(keys)

        def delete_batch(fd, keys):  # type: ignore[no-untyped-def]
            for k in keys:
                self.policy.pop(k, None)
                self.log.append(("delete", k))

        def lookup(fd, key, value):  # type: ignore[no-untyped-def]
            raw = key if isinstance(key, bytes) else bytes(key)
            if fd == 1 and raw in self.policy:
                ct.memmove(ct.addressof(value), self.policy[raw], ct.sizeof(value))
                return True
            return False

        def update(fd, key, value, flags=0):  # type: ignore[no-untyped-def]
            if fd == 1:
                self.policy[key if isinstance(key, bytes) else bytes(key)] = bytes(value)

        def delete(fd, key):  # type: ignore[no-untyped-def]
            if fd == 1:
                return self.policy.pop(key if isinstance(key, bytes) else bytes(key), None) is not None
            return False

        monkeypatch.setattr(_bpf, "map_update_batch", update_batch)
        monkeypatch.setattr(_bpf, "map_delete_batch", delete_batch)
        monkeypatch.setattr(_bpf, "map_lookup", lookup)
        monkeypatch.setattr(_bpf, "map_update", update)
        monkeypatch.setattr(_bpf, "map_delete", delete)
        monkeypatch.setattr(_bpf, "map_items_batch", lambda fd, k, v: iter(list(self.policy.items())))


def fake_dp(monkeypatch: pytest.MonkeyPatch, kernel: FakeKernel):  # type: ignore[no-untyped-def]
    from axoneme.datapath.ebpf import EbpfDatapath

    kernel.install(monkeypatch)
    dp = EbpfDatapath()
    dp._bpf = object()  # "started": map access goes to the fake
    dp._fds = {"ax_policy": 1, "ax_policy_hash": 1, "ax_rev": 2}
    return dp


def test_apply_write_order_never_widens(monkeypatch: pytest.MonkeyPatch) -> None:
    """new denies, deletions of allows, updates, new allows, deletions of denies."""
    from axoneme.core.endpoint import Endpoint
    from axoneme.core.labels import Labels
    from axoneme.core.mapstate import ALLOW, DENY, MapChanges, MapState
    from axoneme.datapath.ebpf._datapath import policy_key_bytes

    kernel = FakeKernel()
    dp = fake_dp(monkeypatch, kernel)
    ep = Endpoint(id=1, identity=100, labels=Labels())
    k = {n: Key(n, Direction.INGRESS, Protocol.TCP, 80, 16) for n in range(1, 8)}
    dp.apply(ep, MapChanges(adds={k[1]: ALLOW, k[2]: DENY, k[3]: ALLOW, k[4]: Entry(proxy_port=1)}))
    kernel.log.clear()
    dp.apply(ep, MapChanges(
        adds={k[5]: DENY, k[6]: ALLOW, k[3]: DENY, k[4]: Entry(proxy_port=2)},
        deletes=frozenset({k[1], k[2]})))
    order = [(op, next(n for n, key in k.items() if policy_key_bytes(1, key) == raw))
             for op, raw in kernel.log]
    pos = {item: i for i, item in enumerate(order)}
    new_denies = [pos[("update", 5)], pos[("update", 3)]]
    assert max(new_denies) < pos[("delete", 1)] < pos[("update", 4)] < pos[("update", 6)] < pos[("delete", 2)]
    assert dp.dump(ep) == MapState({k[3]: DENY, k[4]: Entry(proxy_port=2), k[5]: DENY, k[6]: ALLOW})


def test_apply_rolls_back_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    from axoneme.core.endpoint import Endpoint
    from axoneme.core.errors import MapFullError
    from axoneme.core.labels import Labels
    from axoneme.core.mapstate import ALLOW, DENY, MapChanges, MapState

    kernel = FakeKernel()
    dp = fake_dp(monkeypatch, kernel)
    ep = Endpoint(id=1, identity=100, labels=Labels())
    k = {n: Key(n, Direction.EGRESS, Protocol.UDP, 53, 16) for n in range(1, 8)}
    before = MapState({k[1]: ALLOW, k[2]: DENY})
    dp.apply(ep, MapChanges(adds=dict(before)))
    kernel.log.clear()
    kernel.fail_after = 3  # the 4th write fails
    with pytest.raises(MapFullError):
        dp.apply(ep, MapChanges(adds={k[3]: DENY, k[4]: ALLOW, k[5]: ALLOW, k[2]: ALLOW},
                                deletes=frozenset({k[1]})))
    assert dp.dump(ep) == before
    assert dp._map_full_errors == 1


def test_keys_and_prefixes_go_to_their_map() -> None:
    """Prefix 72 and 96 policy keys and host ipcache entries live in hashes
    (lib/policy.h, lib/ipcache.h); everything else in the tries."""
    from axoneme.datapath.ebpf._datapath import ipcache_map_of, policy_key_bytes, policy_map_of

    def where(key: Key) -> str:
        return policy_map_of(policy_key_bytes(3, key))

    assert where(Key(5, Direction.INGRESS)) == "ax_policy_hash"
    assert where(Key(0, Direction.EGRESS, Protocol.UDP, 53, 16)) == "ax_policy_hash"
    assert where(Key(5, Direction.INGRESS, Protocol.ICMP, 8, 16)) == "ax_policy_hash"
    assert where(Key(5, Direction.INGRESS, Protocol.TCP)) == "ax_policy"
    assert where(Key(5, Direction.INGRESS, Protocol.TCP, 0x8000, 1)) == "ax_policy"
    assert where(Key(5, Direction.INGRESS, Protocol.TCP, 80, 15)) == "ax_policy"
    for net, name in (("10.0.0.1/32", "ax_ipcache_host"), ("fd00::1/128", "ax_ipcache_host"),
                      ("10.0.0.0/31", "ax_ipcache"), ("fd00::/64", "ax_ipcache"),
                      ("0.0.0.0/0", "ax_ipcache")):
        assert ipcache_map_of(ipaddress.ip_network(net)) == name, net


def test_skip_flags_follow_the_key_kinds() -> None:
    from axoneme.core.mapstate import Key as K
    from axoneme.datapath.ebpf._datapath import skip_bit, skip_flags

    every = L.EP_F_NO_WILD_INGRESS | L.EP_F_NO_WILD_EGRESS | L.EP_F_NO_ADDR
    assert skip_flags({}) == every
    assert skip_bit(K(7, Direction.INGRESS)) == 0
    assert skip_bit(K(0, Direction.INGRESS, Protocol.TCP, 80, 16)) == L.EP_F_NO_WILD_INGRESS
    assert skip_bit(K(0, Direction.EGRESS)) == L.EP_F_NO_WILD_EGRESS
    assert skip_bit(K.for_address("10.0.0.1", Direction.INGRESS)) == L.EP_F_NO_ADDR
    assert skip_flags({L.EP_F_NO_WILD_EGRESS: 2, L.EP_F_NO_ADDR: 0}) == \
        L.EP_F_NO_WILD_INGRESS | L.EP_F_NO_ADDR


def test_possible_cpus_counts_the_ranges(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The per-CPU slot count from the kernel's list (bcc.utils's reading, without libbcc)."""
    for text, n in (("0-3,8\n", 5), ("0\n", 1), ("0-1,4-5,7\n", 5)):
        (tmp_path / "possible").write_text(text)
        assert _bpf.possible_cpus(str(tmp_path / "possible")) == n


def test_a_failing_compile_child_reports_its_error() -> None:
    """Source that does not compile: OSError with the child's exit and stderr, no fds."""
    with pytest.raises(OSError, match="compile child exited [1-9]") as e:
        _bpf.load_in_child("this is not C;", ("ax_nothing",), ())
    assert e.value.errno is not None
