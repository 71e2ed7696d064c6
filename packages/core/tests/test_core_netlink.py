"""axoneme.core.netlink without a kernel: attribute packing and alignment,
nested attributes, message splitting, NLMSG_ERROR (ACK, errno, extended ack)
and multipart dumps up to NLMSG_DONE, over a scripted socket."""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any

import pytest
from axoneme.core import netlink as nl


def _hdr(n: int, kind: int, flags: int, seq: int) -> bytes:
    return struct.pack("=IHHII", n, kind, flags, seq, 0)


def _msg(kind: int, seq: int, payload: bytes, flags: int = 0) -> bytes:
    n = 16 + len(payload)
    return _hdr(n, kind, flags, seq) + payload + b"\0" * (nl.align(n) - n)


def _error(seq: int, code: int, ext: str = "") -> bytes:
    """An NLMSG_ERROR as a NETLINK_CAP_ACK socket gets it: the request's header only."""
    payload = struct.pack("=i", code) + _hdr(40, nl.RTM_NEWLINK, 5, seq)
    flags = nl.NLM_F_CAPPED
    if ext:
        payload += nl.attr_str(nl.NLMSGERR_ATTR_MSG, ext)
        flags |= nl.NLM_F_ACK_TLVS
    return _msg(nl.NLMSG_ERROR, seq, payload, flags)


class ScriptedSocket:
    """Hands out the datagrams it was given, records what was sent."""

    def __init__(self, replies: list[bytes]) -> None:
        self.replies = list(replies)
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recvmsg(self, size: int) -> tuple[bytes, list[Any], int, Any]:
        data = self.replies.pop(0)
        return data[:size], [], socket.MSG_TRUNC if len(data) > size else 0, None

    def close(self) -> None:
        pass


def _rtnl(replies: list[bytes]) -> tuple[nl.Rtnl, ScriptedSocket]:
    sock = ScriptedSocket(replies)
    return nl.Rtnl(_sock=sock), sock  # type: ignore[arg-type]


def test_attribute_is_padded_to_four_bytes_and_its_length_excludes_the_padding() -> None:
    a = nl.attr_str(nl.IFLA_IFNAME, "eth0")  # 4 + 5 bytes -> 12 on the wire
    assert a == struct.pack("=HH", 9, nl.IFLA_IFNAME) + b"eth0\0" + b"\0\0\0"
    assert len(nl.attr_u32(nl.IFLA_MTU, 1500)) == 8
    assert nl.attr(7, b"") == struct.pack("=HH", 4, 7)
    assert [nl.align(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 4, 4, 8, 8, 12]


def test_parse_attrs_reads_back_packed_attrs_and_nesting() -> None:
    inner = nl.nested(nl.IFLA_INFO_DATA, nl.attr(nl.VETH_INFO_PEER, b"\x01\x02\x03"))
    linkinfo = nl.nested(nl.IFLA_LINKINFO, nl.attr_str(nl.IFLA_INFO_KIND, "veth"), inner)
    data = nl.attr_str(nl.IFLA_IFNAME, "lxc1") + linkinfo + nl.attr_u32(nl.IFLA_MTU, 9000)
    top = nl.parse_attrs(data)
    assert top[nl.IFLA_IFNAME] == b"lxc1\0"
    assert struct.unpack("=I", top[nl.IFLA_MTU]) == (9000,)
    info = nl.parse_attrs(top[nl.IFLA_LINKINFO])
    assert info[nl.IFLA_INFO_KIND] == b"veth\0"
    # the peer's 3 bytes come back without the attribute's padding
    assert nl.parse_attrs(info[nl.IFLA_INFO_DATA])[nl.VETH_INFO_PEER] == b"\x01\x02\x03"


def test_parse_attrs_masks_the_nested_flag_and_stops_at_a_truncated_attr() -> None:
    flagged = struct.pack("=HH", 8, nl.TCA_OPTIONS | nl.NLA_F_NESTED) + b"abcd"
    assert nl.parse_attrs(flagged) == {nl.TCA_OPTIONS: b"abcd"}
    truncated = nl.attr_u32(1, 5) + struct.pack("=HH", 40, 2) + b"xx"
    assert nl.parse_attrs(truncated) == {1: struct.pack("=I", 5)}


def test_split_messages_walks_aligned_messages_and_rejects_a_truncated_one() -> None:
    buf = _msg(nl.RTM_NEWADDR, 3, b"\x02" * 9, nl.NLM_F_MULTI) + _msg(nl.NLMSG_DONE, 3, b"\0" * 4)
    msgs = list(nl.split_messages(buf))
    assert [(m.type, m.seq, len(m.payload)) for m in msgs] == [(nl.RTM_NEWADDR, 3, 9),
                                                               (nl.NLMSG_DONE, 3, 4)]
    with pytest.raises(nl.RtnlError):
        list(nl.split_messages(_hdr(64, nl.RTM_NEWLINK, 0, 1) + b"\0" * 8))


def test_request_returns_at_the_ack_and_asks_for_one() -> None:
    rtnl, sock = _rtnl([_error(1, 0)])
    assert rtnl.request(nl.RTM_NEWLINK, 0, b"\0" * 16, "set") == []
    n, kind, flags, seq, _ = struct.unpack_from("=IHHII", sock.sent[0])
    assert (n, kind, seq) == (32, nl.RTM_NEWLINK, 1)
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_ACK


def test_kernel_error_is_an_oserror_with_its_errno_and_extended_ack() -> None:
    rtnl, _ = _rtnl([_error(1, -errno.EEXIST, "Exclusivity flag on")])
    with pytest.raises(OSError) as err:
        rtnl.request(nl.RTM_NEWQDISC, nl.NLM_F_CREATE | nl.NLM_F_EXCL, b"", "add qdisc")
    assert isinstance(err.value, nl.RtnlError)
    assert err.value.errno == errno.EEXIST
    assert "add qdisc" in str(err.value) and "Exclusivity flag on" in str(err.value)


def test_error_without_capped_ack_skips_the_whole_echoed_request() -> None:
    echoed = _hdr(22, nl.RTM_NEWLINK, 5, 1) + b"\0" * 6  # 22 bytes, aligned to 24
    payload = struct.pack("=i", -errno.ENODEV) + echoed + b"\0\0" + nl.attr_str(1, "no dev")
    err = nl.error_of(nl.Message(nl.NLMSG_ERROR, nl.NLM_F_ACK_TLVS, 1, payload), "get")
    assert err is not None and err.errno == errno.ENODEV and "(no dev)" in str(err)


def test_dump_collects_multipart_messages_across_datagrams_until_done() -> None:
    def addr(index: int, ip: str) -> bytes:
        packed = socket.inet_aton(ip)
        body = nl.IFADDRMSG.pack(socket.AF_INET, 24, 0, 0, index)
        body += nl.attr(nl.IFA_ADDRESS, packed) + nl.attr(nl.IFA_LOCAL, packed)
        return _msg(nl.RTM_NEWADDR, 1, body, nl.NLM_F_MULTI)

    first = addr(1, "127.0.0.1") + addr(2, "10.0.0.5")
    stale = _msg(nl.RTM_NEWADDR, 99, b"\0" * 8, nl.NLM_F_MULTI)  # another request's: ignored
    last = stale + addr(3, "192.0.2.9") + _msg(nl.NLMSG_DONE, 1, b"\0" * 4, nl.NLM_F_MULTI)
    rtnl, sock = _rtnl([first, last])
    got = rtnl.addr_dump()
    assert [(a.index, a.address, a.local, a.prefixlen) for a in got] == [
        (1, "127.0.0.1", "127.0.0.1", 24), (2, "10.0.0.5", "10.0.0.5", 24),
        (3, "192.0.2.9", "192.0.2.9", 24)]
    flags = struct.unpack_from("=IHHII", sock.sent[0])[2]
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_DUMP  # a dump asks for no ACK


def test_a_truncated_datagram_is_an_error_not_a_short_answer() -> None:
    rtnl, _ = _rtnl([b"\0" * (1 << 17)])
    with pytest.raises(nl.RtnlError, match="larger than"):
        rtnl.request(nl.RTM_GETADDR, nl.NLM_F_DUMP, b"\0" * 8, "dump")


def test_link_get_parses_the_answer_and_enodev_is_none() -> None:
    body = nl.IFINFOMSG.pack(0, 1, 7, 0x1003, 0) + nl.attr_str(nl.IFLA_IFNAME, "lxcab")
    body += nl.attr(nl.IFLA_ADDRESS, bytes([0xf2, 0, 0xab, 1, 2, 0x3c])) + nl.attr_u32(nl.IFLA_MTU, 1450)
    rtnl, sock = _rtnl([_msg(nl.RTM_NEWLINK, 1, body) + _error(1, 0), _error(2, -errno.ENODEV)])
    assert rtnl.link_get(name="lxcab") == nl.Link(7, "lxcab", "f2:00:ab:01:02:3c", 1450, 0x1003)
    assert nl.parse_attrs(sock.sent[0], 32)[nl.IFLA_IFNAME] == b"lxcab\0"
    assert rtnl.link_index("gone") == 0


def test_veth_request_nests_the_peer_with_its_netns_fd() -> None:
    rtnl, sock = _rtnl([_error(1, 0)])
    rtnl.veth_add("lxc1", "eth0", 1400, peer_netns_fd=9)
    _n, kind, flags, _seq, _ = struct.unpack_from("=IHHII", sock.sent[0])
    assert kind == nl.RTM_NEWLINK
    assert flags & (nl.NLM_F_CREATE | nl.NLM_F_EXCL) == nl.NLM_F_CREATE | nl.NLM_F_EXCL
    top = nl.parse_attrs(sock.sent[0], 16 + nl.IFINFOMSG.size)
    assert top[nl.IFLA_IFNAME] == b"lxc1\0"
    info = nl.parse_attrs(top[nl.IFLA_LINKINFO])
    peer = nl.parse_attrs(info[nl.IFLA_INFO_DATA])[nl.VETH_INFO_PEER]
    peer_attrs = nl.parse_attrs(peer, nl.IFINFOMSG.size)
    assert peer_attrs[nl.IFLA_IFNAME] == b"eth0\0"
    assert struct.unpack("=I", peer_attrs[nl.IFLA_NET_NS_FD]) == (9,)
    assert struct.unpack("=I", peer_attrs[nl.IFLA_MTU]) == (1400,)


def test_bpf_filter_request_carries_prio_protocol_handle_and_direct_action() -> None:
    rtnl, sock = _rtnl([_error(1, 0)])
    rtnl.bpf_filter_replace(5, nl.tc_handle("ffff:fff2"), 42, "from_pod", prio=1, handle=1)
    data = sock.sent[0]
    _n, kind, flags, _seq, _ = struct.unpack_from("=IHHII", data)
    assert kind == nl.RTM_NEWTFILTER and flags & nl.NLM_F_REPLACE and flags & nl.NLM_F_CREATE
    _fam, index, handle, parent, info = nl.TCMSG.unpack_from(data, 16)
    assert (index, handle, parent) == (5, 1, 0xFFFFFFF2)
    assert info == (1 << 16) | 0x0300  # prio 1, htons(ETH_P_ALL)
    attrs = nl.parse_attrs(data, 16 + nl.TCMSG.size)
    assert attrs[nl.TCA_KIND] == b"bpf\0"
    opts = nl.parse_attrs(attrs[nl.TCA_OPTIONS])
    assert struct.unpack("=I", opts[nl.TCA_BPF_FD]) == (42,)
    assert opts[nl.TCA_BPF_NAME] == b"from_pod\0"
    assert struct.unpack("=I", opts[nl.TCA_BPF_FLAGS]) == (nl.TCA_BPF_FLAG_ACT_DIRECT,)
    assert struct.unpack("=I", opts[nl.TCA_BPF_CLASSID]) == (1,)


def test_route_request_is_main_table_with_scope_and_replace() -> None:
    rtnl, sock = _rtnl([_error(1, 0), _error(2, 0)])
    rtnl.route_add("10.1.2.3", 32, 4, scope=nl.RT_SCOPE_LINK, replace=True)
    rtnl.route_add("0.0.0.0", 0, 4, gateway="169.254.1.1")
    first, default = sock.sent
    fields = nl.RTMSG.unpack_from(first, 16)
    assert (fields[1], fields[4], fields[6], fields[7]) == (32, nl.RT_TABLE_MAIN, nl.RT_SCOPE_LINK,
                                                            nl.RTN_UNICAST)
    assert struct.unpack_from("=IHH", first)[2] & nl.NLM_F_REPLACE
    attrs = nl.parse_attrs(first, 16 + nl.RTMSG.size)
    assert attrs[nl.RTA_DST] == socket.inet_aton("10.1.2.3")
    assert struct.unpack("=I", attrs[nl.RTA_OIF]) == (4,)
    dattrs = nl.parse_attrs(default, 16 + nl.RTMSG.size)
    assert nl.RTA_DST not in dattrs and dattrs[nl.RTA_GATEWAY] == socket.inet_aton("169.254.1.1")
    assert struct.unpack_from("=IHH", default)[2] & nl.NLM_F_EXCL


def test_tc_handle_and_mac_text() -> None:
    assert nl.tc_handle("ffff:fff3") == 0xFFFFFFF3
    assert nl.tc_handle("1:") == 0x10000
    assert nl.mac_bytes("f2:00:ab:01:02:3c") == bytes([0xf2, 0, 0xab, 1, 2, 0x3c])
    assert nl.mac_text(nl.mac_bytes("0a:0b:0c:0d:0e:0f")) == "0a:0b:0c:0d:0e:0f"
