"""Rendering without a kernel: an interpreter for the rules we emit checks
them against MapState.lookup (the decision every datapath must reproduce),
and the LPM address views against a direct longest-prefix lookup."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from axoneme.core.mapstate import (
    ADDRESS_IDENTITY,
    Direction,
    Entry,
    Key,
    MapState,
    Protocol,
    Verdict,
    port_mask,
)
from axoneme.datapath.iptables import _prefixes as px
from axoneme.datapath.iptables import _readback as rb
from axoneme.datapath.iptables import _render as rd
from hypothesis import given, settings
from hypothesis import strategies as st

OUT = Direction.EGRESS
PROTO_NUM = {"tcp": Protocol.TCP, "udp": Protocol.UDP, "sctp": Protocol.SCTP, "icmp": Protocol.ICMP}

IPCACHE = {
    ipaddress.ip_network("10.0.0.0/8"): 5,
    ipaddress.ip_network("10.1.0.0/16"): 6,
    ipaddress.ip_network("10.1.2.3/32"): 5,
    ipaddress.ip_network("10.2.0.0/16"): 7,
    ipaddress.ip_network("10.2.128.0/17"): 7,
    ipaddress.ip_network("192.168.0.0/24"): 6,
}
SAMPLE_IPS = ["10.0.0.1", "10.1.0.1", "10.1.2.3", "10.1.2.4", "10.2.0.9", "10.2.200.1",
              "192.168.0.7", "192.168.1.7", "8.8.8.8", "10.255.255.255"]


def lpm(ip: str) -> int:
    addr = ipaddress.ip_address(ip)
    best = max((n for n in IPCACHE if addr in n), key=lambda n: n.prefixlen, default=None)
    return IPCACHE[best] if best is not None else px.WORLD


TABLE = px.split_by_family(IPCACHE.items())[4]
RANGES = {i: [px.to_cidr(p, 4) for p in r] for i, r in px.effective_ranges(TABLE, 4).items()}
SETS = px.identity_sets(TABLE, 4)


def in_set(ident: int, ip: str) -> bool:
    """hash:net semantics: the most specific entry decides, nomatch = no."""
    match, nomatch = SETS.get(ident, (set(), set()))
    addr = int(ipaddress.ip_address(ip))
    best: tuple[int, bool] | None = None
    for entries, ok in ((match, True), (nomatch, False)):
        for net, plen in entries:
            mask = ((1 << 32) - 1) ^ ((1 << (32 - plen)) - 1)
            if addr & mask == net and (best is None or plen > best[0]):
                best = (plen, ok)
    return best is not None and best[1]


@dataclass
class Packet:
    ip: str
    proto: Protocol
    port: int


def _rule_matches(toks: list[str], pkt: Packet) -> bool:
    i = 0
    while i < len(toks):
        t = toks[i]
        if t == "-p":
            if PROTO_NUM[toks[i + 1]] != pkt.proto:
                return False
            i += 2
        elif t == "--dport":
            lo, _, hi = toks[i + 1].partition(":")
            if not int(lo) <= pkt.port <= int(hi or lo):
                return False
            i += 2
        elif t == "--icmp-type":
            if int(toks[i + 1]) != pkt.port:
                return False
            i += 2
        elif t == "--match-set":
            if not in_set(int(toks[i + 1].rsplit("-", 1)[1]), pkt.ip):
                return False
            i += 3
        elif t in ("-s", "-d"):
            if ipaddress.ip_address(pkt.ip) not in ipaddress.ip_network(toks[i + 1]):
                return False
            i += 2
        elif t == "--mark":
            return False  # only the never-matching placeholder uses marks
        elif t == "--ctdir":
            return False  # probes are never replies
        elif t == "--comment":
            i += 2
        else:
            i += 1
    return True


def run(chains: dict[str, list[str]], chain: str, pkt: Packet) -> str:
    for rule in chains[chain]:
        toks = rule.split()
        target_at = max(toks.index(x) for x in ("-g", "-j") if x in toks)
        if not _rule_matches(toks[:target_at], pkt):
            continue
        target = toks[target_at + 1]
        if target == "RETURN":
            return "ALLOW"
        if target.startswith("AXON-ALLOW"):
            return "ALLOW"
        if target.startswith("AXON-AUDIT"):
            return "AUDIT"
        if target.startswith("AXON-PXY-"):
            return f"REDIRECT:{target.split('-')[2]}"
        if target.startswith("AXON-DENY"):
            return "DENY"
        if target.startswith("AXON-DROP"):
            return "DROP"
        return run(chains, target, pkt)
    return "ALLOW"  # fell off the chain: returns to the hook chain


def expected(state: MapState, pkt: Packet) -> str:
    d = state.lookup(lpm(pkt.ip), OUT, pkt.proto, pkt.port, pkt.ip)
    if d.verdict is Verdict.DENIED:
        return "DROP"
    if d.verdict is Verdict.DENIED_BY_RULE:
        return "DENY"
    if d.verdict is Verdict.REDIRECTED:
        assert d.entry is not None
        return f"REDIRECT:{d.entry.proxy_port}"
    assert d.entry is not None
    return "AUDIT" if d.entry.audit else "ALLOW"


# address keys: one peer address whatever its identity (an ipBlock over pods)
ADDRESSES = ["10.1.2.3", "10.1.2.4", "10.2.0.9", "8.8.8.8", "10.9.9.9"]


@st.composite
def keys(draw: st.DrawFn) -> Key:
    ident = draw(st.sampled_from([0, 0, 2, 5, 6, 7, ADDRESS_IDENTITY, ADDRESS_IDENTITY]))
    address = draw(st.sampled_from(ADDRESSES)) if ident == ADDRESS_IDENTITY else ""
    proto = draw(st.sampled_from([Protocol.ANY, Protocol.TCP, Protocol.TCP, Protocol.UDP, Protocol.ICMP]))
    if proto is Protocol.ANY:
        return Key(ident, OUT, address=address)
    if proto is Protocol.ICMP:
        plen = draw(st.sampled_from([0, 16, 16, 14]))
        port = draw(st.sampled_from([0, 3, 8]))
    else:
        plen = draw(st.sampled_from([0, 4, 8, 12, 15, 16]))
        port = draw(st.sampled_from([80, 81, 443, 8080, 0, 4096]))
    return Key(ident, OUT, proto, port & port_mask(plen), plen, address)


entries = st.sampled_from([Entry(), Entry(), Entry(deny=True), Entry(proxy_port=15001),
                           Entry(proxy_port=15002), Entry(audit=True)])
packets = st.builds(Packet, st.sampled_from(SAMPLE_IPS),
                    st.sampled_from([Protocol.TCP, Protocol.UDP, Protocol.ICMP, Protocol.SCTP]),
                    st.sampled_from([0, 3, 8, 80, 81, 443, 8080, 4096, 65535]))


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(keys(), entries, max_size=10), st.lists(packets, min_size=1, max_size=12),
       st.sampled_from(["plain", "ipset"]))
def test_rendered_rules_reproduce_lookup(raw: dict[Key, Entry], pkts: list[Packet], mode: str) -> None:
    state = MapState(raw)
    peers = rd.Peers(mode, 4, lambda ident: RANGES.get(ident, ()))
    chains = rd.render_endpoint(9, OUT, state, peers, tail_drop=True)
    for pkt in pkts:
        assert run(chains, rd.ep_chain(9, OUT), pkt) == expected(state, pkt), (pkt, chains)
    # every key is recorded exactly once per key, whatever the addresses
    assert rb.parse_key_rules([r for c in chains.values() for r in c]) == state


def test_effective_ranges_are_exact_lpm() -> None:
    for ip in SAMPLE_IPS:
        owners = [i for i, cidrs in RANGES.items()
                  if any(ipaddress.ip_address(ip) in ipaddress.ip_network(c) for c in cidrs)]
        assert owners == [lpm(ip)], ip
        assert [i for i in SETS if in_set(i, ip)] == [lpm(ip)], ip


def test_world_is_what_no_prefix_covers() -> None:
    ranges = px.effective_ranges({}, 4)
    assert ranges == {px.WORLD: [(0, 0)]}
    sets = px.identity_sets({}, 4)
    assert sets[px.WORLD] == ({(0, 1), (1 << 31, 1)}, set())
    six = px.identity_sets({(1 << 127, 1): 9}, 6)
    assert six[px.WORLD][0] == {(0, 1)} and six[9][0] == {(1 << 127, 1)}


def test_unenforced_tail_and_placeholders() -> None:
    state = MapState({Key(5, OUT, Protocol.ICMPV6, 128, 16): Entry(),
                      Key(77, OUT, Protocol.TCP, 80, 16): Entry()})
    chains = rd.render_endpoint(3, OUT, state, rd.Peers("plain", 4, lambda i: RANGES.get(i, ())),
                                tail_drop=False)
    main = chains[rd.ep_chain(3, OUT)]
    assert sum(rd.NEVER in r for r in main) == 2  # ICMPv6 in IPv4, identity without addresses
    assert main[-1].endswith("-j RETURN")
    assert rb.parse_key_rules(main) == state


def test_endpoint_refs_roundtrip() -> None:
    refs = [rd.EndpointRef(4, "lxc1", "10.244.0.4", "fd00::4", True, False),
            rd.EndpointRef(5, "lxc2", "", "", False, True)]
    hooks = rd.hook_chains(refs)
    assert rb.parse_endpoint_refs(hooks[rd.FWD_CHAIN]) == refs
    assert len(hooks[rd.FWD_CHAIN]) == 4 and len(hooks[rd.INPUT_CHAIN]) == 2


def test_parse_save() -> None:
    text = ("*filter\n:INPUT ACCEPT [0:0]\n:AXON-EP-1-IN - [0:0]\n:AXON-GUARD - [0:0]\n"
            "-A AXON-EP-1-IN -m comment --comment \"AXK:5:0:6:80:16:0:0:0:0\" -g AXON-ALLOW-IN\n"
            "COMMIT\n*mangle\n:AXON-EP-1-IN - [0:0]\n-A AXON-EP-1-IN -j RETURN\nCOMMIT\n")
    table = rb.parse_save(text)
    assert table.axon_chains() == ["AXON-EP-1-IN"]  # AXON-GUARD is not ours
    assert rb.parse_key_rules(table.chains["AXON-EP-1-IN"]) == MapState(
        {Key(5, Direction.INGRESS, Protocol.TCP, 80, 16): Entry()})


def test_failed_ipcache_write_is_written_again_on_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-memory ipcache view used to be updated before the ipset write:
    a failed write was then skipped as 'already there' by the agent's retry."""
    from axoneme.core.datapath import IPCacheChanges
    from axoneme.core.errors import DatapathProgramError
    from axoneme.datapath.iptables import _datapath as dpm

    writes: list[str] = []
    fail = [True]

    def restore(payload: str) -> None:
        if fail[0]:
            fail[0] = False
            raise DatapathProgramError("ipset restore", 1, "injected")
        writes.append(payload)

    monkeypatch.setattr(dpm.Backend, "ipset_restore", staticmethod(restore))
    dp = dpm.IptablesDatapath()
    dp.mode = "plain"
    change = IPCacheChanges({ipaddress.ip_network("10.244.9.2/32"): 4242})
    with pytest.raises(DatapathProgramError):
        dp.ipcache_apply(change)
    assert dp._identity_of("10.244.9.2") != 4242
    dp.ipcache_apply(change)  # the retry of the same batch
    assert any("10.244.9.2/32" in w and "id=4242" in w for w in writes)
    assert dp._identity_of("10.244.9.2") == 4242


def test_audit_entries_log_audit_and_return() -> None:
    from axoneme.core.flow import FlowVerdict
    from axoneme.datapath.iptables import _datapath as dpm

    shared = rd.shared_chains(7301)
    assert shared["AXON-AUDIT-OUT"] == [rd._log(7301, "AXON:W:E", "axon-wE", True)]  # no DROP
    state = MapState({Key(0, OUT): Entry(audit=True)})
    peers = rd.Peers("plain", 4, lambda ident: ())
    assert any(r.endswith("AXK:0:1:0:0:0:0:0:1:0 -g AXON-AUDIT-OUT")
               for r in rd.render_endpoint(9, OUT, state, peers, True)[rd.ep_chain(9, OUT)])
    assert not any("AXON-AUDIT" in r for r in rd.render_endpoint(9, OUT, state, peers, True, rd.MANGLE)[
        rd.ep_chain(9, OUT)])
    ip = bytes([0x45, 0, 0, 40]) + b"\0" * 5 + bytes([6]) + b"\0\0" + bytes([10, 244, 3, 8, 10, 244, 3, 7])
    tcp = (40000).to_bytes(2, "big") + (22).to_bytes(2, "big") + b"\0" * 8 + bytes([0x50, 0x02]) + b"\0" * 6
    flow = dpm.IptablesDatapath().flow_from_log("AXON:W:I", 1.0, ip + tcp)
    assert flow is not None and flow.verdict is FlowVerdict.AUDIT and flow.drop_reason is None
    assert flow.traffic_direction == "INGRESS" and flow.event_type == "policy-verdict"
