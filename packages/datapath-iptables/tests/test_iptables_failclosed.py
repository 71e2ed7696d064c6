"""Issue 13 hardening of the iptables datapath, without a kernel:

- the catch-all for our pod interfaces without an endpoint: rendered after
  the per-endpoint jumps, scoped to the host-veth name prefix and the pod
  CIDR, returning for interfaces with an endpoint, logged with drop reason
  152 (NO_MATCHING_LOCAL_CONTAINER_FOUND) in both modes;
- ``endpoint_fail_closed``: an ``AXFC`` rule right after the reply rule of
  the directions failing closed (DROP_EP_NOT_READY, 203), kept by every
  later render (``endpoint_added`` included), idempotent, adopted by a
  restarted datapath and ended by an empty set.

The datapath runs against an in-memory stand-in for iptables-restore/save
and ipset (``FakeKernel``); the real kernel is test_iptables_kernel.py.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from axoneme.core.datapath import DatapathConfig
from axoneme.core.endpoint import Endpoint
from axoneme.core.errors import DatapathProgramError
from axoneme.core.flow import DropReason, FlowVerdict
from axoneme.core.labels import Labels
from axoneme.core.mapstate import ALLOW, Direction, Key, MapState, Protocol
from axoneme.datapath.iptables import _datapath as dpm
from axoneme.datapath.iptables import _readback as rb
from axoneme.datapath.iptables import _render as rd

IN, OUT = Direction.INGRESS, Direction.EGRESS
A = Endpoint(7, 4007, Labels(), ipv4="10.244.3.7", ipv6="fd00:3::7", host_ifname="lxc0000000007")
B = Endpoint(8, 4008, Labels(), ipv4="10.244.3.8", host_ifname="lxc0000000008")
OTHER = Endpoint(9, 4009, Labels(), ipv4="10.244.3.9", host_ifname="veth-not-ours")
SCOPE4 = rd.PodScope("lxc", ("10.244.0.0/16",))


class FakeKernel:
    """iptables-restore --noflush / iptables-save and ipset, in memory."""

    def __init__(self) -> None:
        self.tables: dict[tuple[int, str], dict[str, list[str]]] = {}
        self.payloads: list[str] = []
        self.kind, self.reason, self.ipv6 = "nft", "fake", True

    def restore(self, family: int, payload: str) -> None:
        self.payloads.append(payload)
        table: dict[str, list[str]] = {}
        for line in payload.splitlines():
            if line.startswith("*"):
                table = self.tables.setdefault((family, line[1:]), {})
            elif line.startswith(":"):
                table[line[1:].split()[0]] = []
            elif line.startswith("-A "):
                _, chain, rule = line.split(" ", 2)
                table[chain].append(rule)
            elif line.startswith("-I "):
                _, chain, _pos, rule = line.split(" ", 3)
                table.setdefault(chain, []).insert(0, rule)
            elif line.startswith("-X "):
                table.pop(line.split()[1], None)

    def save(self, family: int, table: str = "filter") -> str:
        chains = self.tables.get((family, table), {})
        lines = [f"*{table}"] + [f":{c} - [0:0]" for c in chains]
        lines += [f"-A {c} {r}" for c, rules in chains.items() for r in rules]
        return "\n".join([*lines, "COMMIT"]) + "\n"

    def drop_packets(self, family: int, chain: str) -> int:
        return 3 if chain in self.tables.get((family, "filter"), {}) else 0


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    k = FakeKernel()
    monkeypatch.setattr(dpm, "detect", lambda mode: k)
    monkeypatch.setattr(dpm.Backend, "ipset", staticmethod(lambda *a: None))
    monkeypatch.setattr(dpm.Backend, "ipset_save", staticmethod(lambda: ""))
    monkeypatch.setattr(dpm.Backend, "ipset_restore", staticmethod(lambda payload: None))
    return k


def _dp(tmp_path: Path, mode: str = "plain", **options: object) -> dpm.IptablesDatapath:
    opts = {"events": False, "lock_dir": str(tmp_path), **options}
    dp = dpm.IptablesDatapath(DatapathConfig(mode=mode, options=opts))
    dp.start()
    return dp


def _chain(k: FakeKernel, name: str, family: int = 4) -> list[str]:
    return k.tables[(family, "filter")][name]


# ---- rendering -------------------------------------------------------------------------

def test_catch_all_follows_the_endpoint_jumps_and_skips_known_interfaces() -> None:
    refs = [rd.EndpointRef(7, "lxc0000000007"), rd.EndpointRef(9, "veth-not-ours")]
    hooks = rd.hook_chains(refs, SCOPE4, 4)
    fwd = hooks[rd.FWD_CHAIN]
    jumps = [i for i, r in enumerate(fwd) if "AXON-EP-" in r]
    catch = [i for i, r in enumerate(fwd) if "AXON-NOEP-" in r]
    assert jumps and catch and max(jumps) < min(catch)  # endpoints with chains go first
    assert fwd[min(catch):] == ["-i lxc+ -s 10.244.0.0/16 -j AXON-NOEP-OUT",
                                "-o lxc+ -d 10.244.0.0/16 -j AXON-NOEP-IN"]
    assert hooks[rd.INPUT_CHAIN][-1] == "-i lxc+ -s 10.244.0.0/16 -j AXON-NOEP-OUT"
    assert hooks[rd.OUTPUT_CHAIN][-1] == "-o lxc+ -d 10.244.0.0/16 -j AXON-NOEP-IN"
    out, inn = hooks["AXON-NOEP-OUT"], hooks["AXON-NOEP-IN"]
    # only our interfaces need a way out; the rest drops, logged with reason 152's prefix
    assert out == ["-i lxc0000000007 -j RETURN", "-j AXON-UNKNOWN-OUT"]
    assert inn == ["-o lxc0000000007 -j RETURN", "-j AXON-UNKNOWN-IN"]
    shared = rd.shared_chains(7301)
    assert "--nflog-prefix AXON:U:E " in shared["AXON-UNKNOWN-OUT"][0]
    assert "--nflog-prefix AXON:U:I " in shared["AXON-UNKNOWN-IN"][0]
    assert shared["AXON-UNKNOWN-OUT"][-1] == shared["AXON-UNKNOWN-IN"][-1] == "-j DROP"
    assert all(rb.OWNED_CHAIN_RE.match(c) for c in [*hooks, *shared])  # cleanup removes them


def test_catch_all_scope() -> None:
    refs = [rd.EndpointRef(7, "lxc0000000007")]
    assert rd.hook_chains(refs) == rd.hook_chains(refs, rd.PodScope("", ("10.244.0.0/16",)))
    assert rd.hook_chains(refs) == rd.hook_chains(refs, rd.PodScope("lxc", ()), 6)
    six = rd.hook_chains(refs, rd.PodScope("lxc", ("fd00:244::/64",)), 6)
    assert six[rd.FWD_CHAIN][-1] == "-o lxc+ -d fd00:244::/64 -j AXON-NOEP-IN"
    assert all(r in six["AXON-NOEP-OUT"] for r in rd.ND_RULES)  # link control passes


def test_fail_closed_rule_follows_the_reply_rule() -> None:
    state = MapState({Key(0, OUT): ALLOW, Key(5, OUT, Protocol.TCP, 80, 16): ALLOW})
    peers = rd.Peers("plain", 4, lambda i: ["10.0.0.0/8"])
    main = rd.render_endpoint(3, OUT, state, peers, True, fail_closed=True)[rd.ep_chain(3, OUT)]
    assert main[0] == rd.REPLY_RULE
    assert main[1] == "-m comment --comment AXFC -g AXON-NRDY-OUT"
    assert rb.parse_key_rules(main) == state  # dump() still reads the policy
    assert rb.is_fail_closed(main)
    assert not rb.is_fail_closed(rd.render_endpoint(3, OUT, state, peers, True)[rd.ep_chain(3, OUT)])
    six = rd.render_endpoint(3, IN, {}, rd.Peers("plain", 6, lambda i: []), True,
                             fail_closed=True)[rd.ep_chain(3, IN)]
    assert six[: 1 + len(rd.ND_RULES)] == [rd.REPLY_RULE, *rd.ND_RULES]
    assert six[1 + len(rd.ND_RULES)].endswith("-g AXON-NRDY-IN")
    # the mangle lookup marks nothing for a proxy while failing closed
    mangle = rd.render_endpoint(3, OUT, state, peers, True, rd.MANGLE, fail_closed=True)
    assert mangle[rd.ep_chain(3, OUT)][1] == "-m comment --comment AXFC -j RETURN"
    shared = rd.shared_chains(7301)
    assert "--nflog-prefix AXON:N:E " in shared["AXON-NRDY-OUT"][0]
    assert shared["AXON-NRDY-OUT"][-1] == "-j DROP"
    assert rb.is_fail_closed(['-m comment --comment "AXFC" -g AXON-NRDY-IN'])  # as saved


def _tcp(src: str, dst: str) -> bytes:
    ip = bytes([0x45, 0]) + struct.pack("!H", 40) + b"\0" * 5 + bytes([6]) + b"\0\0"
    ip += socket.inet_aton(src) + socket.inet_aton(dst)
    return ip + struct.pack("!HHIIBBHHH", 40000, 80, 0, 0, 0x50, 0x02, 0, 0, 0)


def test_flows_of_the_new_drops() -> None:
    dp = dpm.IptablesDatapath()
    unknown = dp.flow_from_log("AXON:U:E", 1.0, _tcp("10.244.3.50", "10.244.3.8"))
    assert unknown is not None and unknown.verdict is FlowVerdict.DROPPED
    assert unknown.drop_reason is DropReason.NO_MATCHING_LOCAL_CONTAINER_FOUND
    assert unknown.traffic_direction == "EGRESS"
    closed = dp.flow_from_log("AXON:N:I", 1.0, _tcp("10.244.3.8", "10.244.3.7"))
    assert closed is not None and closed.drop_reason is DropReason.DROP_EP_NOT_READY
    assert closed.traffic_direction == "INGRESS"


# ---- the datapath (fake kernel) ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["plain", "ipset"])
def test_datapath_writes_the_catch_all(kernel: FakeKernel, tmp_path: Path, mode: str) -> None:
    dp = _dp(tmp_path, mode)
    # no endpoint yet: every pod interface drops
    assert _chain(kernel, "AXON-NOEP-OUT") == ["-j AXON-UNKNOWN-OUT"]
    assert _chain(kernel, rd.FWD_CHAIN) == ["-i lxc+ -s 10.244.0.0/16 -j AXON-NOEP-OUT",
                                            "-o lxc+ -d 10.244.0.0/16 -j AXON-NOEP-IN"]
    assert "AXON-NOEP-OUT" not in kernel.tables[(6, "filter")]  # the pod CIDR is IPv4 only
    dp.endpoint_added(A, True, True)
    assert _chain(kernel, "AXON-NOEP-OUT")[0] == f"-i {A.host_ifname} -j RETURN"
    assert _chain(kernel, "AXON-NOEP-IN")[0] == f"-o {A.host_ifname} -j RETURN"
    dp.endpoint_removed(A)
    assert not any(A.host_ifname in r for r in _chain(kernel, "AXON-NOEP-OUT"))
    assert dp.metrics()["packets_unknown_endpoint"] == 6  # 3 a chain in the fake: IN + OUT
    dp.stop()
    dp.start()  # refills the verdict chains (their counters restart): the metric goes on
    assert dp.metrics()["packets_unknown_endpoint"] == 12
    dp.cleanup()
    assert not any(c.startswith("AXON-") for c in kernel.tables[(4, "filter")])


def test_catch_all_options(kernel: FakeKernel, tmp_path: Path) -> None:
    dp = _dp(tmp_path, host_ifname_prefix="axh", events=False)
    assert _chain(kernel, rd.FWD_CHAIN)[0].startswith("-i axh+ ")
    dp.stop()
    dpm.IptablesDatapath(DatapathConfig(pod_cidr="10.244.0.0/16,fd00:244::/64", options={
        "events": False, "lock_dir": str(tmp_path)})).start()
    assert _chain(kernel, rd.FWD_CHAIN, 6)[-1] == "-o lxc+ -d fd00:244::/64 -j AXON-NOEP-IN"
    with pytest.raises(dpm.DatapathUnavailable, match="pod CIDR"):
        dpm.IptablesDatapath(DatapathConfig(pod_cidr="10.244.0.0/33")).probe()


def test_fail_closed_survives_readd_and_restart(kernel: FakeKernel, tmp_path: Path) -> None:
    dp = _dp(tmp_path)
    dp.endpoint_added(A, True, True)
    dp.endpoint_added(B, True, True)
    policy = MapState({Key(0, IN): ALLOW, Key(0, OUT): ALLOW})
    dp.sync(A, policy)
    dp.endpoint_fail_closed(A, frozenset({IN}))
    for family in (4, 6):
        assert rb.is_fail_closed(_chain(kernel, rd.ep_chain(A.id, IN), family))
        assert not rb.is_fail_closed(_chain(kernel, rd.ep_chain(A.id, OUT), family))
    assert not rb.is_fail_closed(_chain(kernel, rd.ep_chain(B.id, IN)))
    assert dp.dump(A) == policy  # the keys stay
    writes = len(kernel.payloads)
    dp.endpoint_fail_closed(A, frozenset({IN}))  # idempotent: nothing to write
    assert len(kernel.payloads) == writes
    # re-added with other enforcement flags, and a policy change: still failing closed
    dp.endpoint_added(A, False, True)
    dp.sync(A, MapState({Key(0, IN): ALLOW}))
    assert rb.is_fail_closed(_chain(kernel, rd.ep_chain(A.id, IN)))
    # a restarted datapath adopts it from the kernel
    dp.stop()
    fresh = _dp(tmp_path)
    assert fresh._fail_closed == {A.id: frozenset({IN})}
    fresh.endpoint_added(A, False, True)
    fresh.sync(A, MapState({Key(0, IN): ALLOW}))
    assert rb.is_fail_closed(_chain(kernel, rd.ep_chain(A.id, IN)))
    fresh.endpoint_fail_closed(A, frozenset({IN, OUT}))
    assert rb.is_fail_closed(_chain(kernel, rd.ep_chain(A.id, OUT)))
    fresh.endpoint_fail_closed(A, frozenset())  # ends it
    assert not any(rb.is_fail_closed(_chain(kernel, rd.ep_chain(A.id, d), f))
                   for d in Direction for f in (4, 6))
    # an endpoint without chains cannot fail closed now, but its chains will
    with pytest.raises(DatapathProgramError):
        fresh.endpoint_fail_closed(OTHER, frozenset({OUT}))
    fresh.endpoint_added(OTHER, True, True)
    assert rb.is_fail_closed(_chain(kernel, rd.ep_chain(OTHER.id, OUT)))
    fresh.endpoint_removed(OTHER)
    fresh.endpoint_added(OTHER, True, True)  # removed: forgotten
    assert not rb.is_fail_closed(_chain(kernel, rd.ep_chain(OTHER.id, OUT)))
    fresh.cleanup()
