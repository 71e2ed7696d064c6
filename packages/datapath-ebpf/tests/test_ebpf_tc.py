"""tc over our rtnetlink client (_tc, axoneme.core.netlink) against the kernel:
clsact on a veth made in a test netns, a real bpf program attached as a
direct-action filter on both hooks, replaced in place, deleted; idempotence of
each step and the kernel's errors for a link that is not there."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import secrets
import struct
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from axoneme.core.netlink import Rtnl, RtnlError
from axoneme.datapath.ebpf import _tc
from axoneme.testing.capability import lacks_root, lacks_tools
from axoneme.testing.netns import add_netns, del_netns

pytestmark = [pytest.mark.privileged]

BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
NR_BPF = {"x86_64": 321, "aarch64": 280}


def _load_prog(name: str, ret: int) -> int:
    """A two-instruction SCHED_CLS program (r0 = ret; exit) loaded with bpf(2)."""
    insns = struct.pack("<BBhi", 0xB7, 0, 0, ret) + struct.pack("<BBhi", 0x95, 0, 0, 0)
    ibuf = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("=IIQQIIQII16s", attr, 0, BPF_PROG_TYPE_SCHED_CLS, 2,
                     ctypes.addressof(ibuf), ctypes.addressof(lic), 0, 0, 0, 0, 0, name.encode())
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(ctypes.c_long(NR_BPF[platform.machine()]), ctypes.c_int(BPF_PROG_LOAD),
                      attr, ctypes.c_uint(len(attr)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"BPF_PROG_LOAD: {os.strerror(e)}")
    return int(fd)


def _filters(ns: str, dev: str, hook: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "netns", "exec", ns, "tc", "-j", "filter", "show", "dev", dev, hook],
                         capture_output=True, text=True, check=True).stdout
    return [f for f in json.loads(out or "[]") if f.get("options")]


@pytest.fixture
def veth_ns() -> Iterator[tuple[str, str]]:
    why = lacks_root() or lacks_tools("ip", "tc") or (
        None if platform.machine() in NR_BPF else f"no bpf syscall number for {platform.machine()}")
    if why:
        pytest.skip(why)
    ns = f"axtc-{secrets.token_hex(3)}"
    dev = f"axt{secrets.token_hex(3)}"
    add_netns(ns)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name", dev + "p"],
                       check=True, capture_output=True)
        yield ns, dev
    finally:
        del_netns(ns)


def _in_netns(ns: str) -> Rtnl:
    return Rtnl(f"/run/netns/{ns}")


def test_clsact_and_bpf_filters_attach_replace_and_delete(veth_ns: tuple[str, str]) -> None:
    ns, dev = veth_ns
    progs = [_load_prog("ax_a", 0), _load_prog("ax_b", 2)]
    try:
        with _in_netns(ns) as rtnl:
            idx = rtnl.link_index(dev)
            assert idx > 0
            _tc.ensure_clsact(rtnl, idx)
            _tc.ensure_clsact(rtnl, idx)  # EEXIST: already there, no error
            _tc.replace_filter(rtnl, idx, _tc.PARENT_INGRESS, progs[0], "from_pod")
            _tc.replace_filter(rtnl, idx, _tc.PARENT_EGRESS, progs[0], "to_pod")
            ingress = _filters(ns, dev, "ingress")
            assert len(ingress) == 1
            opts = ingress[0]["options"]
            assert isinstance(opts, dict)
            assert opts.get("bpf_name", "").startswith("from_pod") and opts.get("direct-action") is True
            assert ingress[0]["pref"] == _tc.FILTER_PRIO and ingress[0]["protocol"] == "all"
            # replaced in place: still one filter per hook, now the other program
            _tc.replace_filter(rtnl, idx, _tc.PARENT_INGRESS, progs[1], "from_pod2")
            ingress = _filters(ns, dev, "ingress")
            assert len(ingress) == 1 and ingress[0]["options"]["bpf_name"].startswith("from_pod2")
            assert len(_filters(ns, dev, "egress")) == 1
            assert _tc.delete_filter(rtnl, idx, _tc.PARENT_INGRESS) is True
            assert _tc.delete_filter(rtnl, idx, _tc.PARENT_INGRESS) is False  # gone: not an error
            assert _filters(ns, dev, "ingress") == [] and len(_filters(ns, dev, "egress")) == 1
            # a link that is not there: "not there" for delete, ENODEV for the rest
            assert _tc.delete_filter(rtnl, 999_999, _tc.PARENT_EGRESS) is False
            with pytest.raises(RtnlError) as err:
                rtnl.clsact_add(999_999)
            assert err.value.errno == errno.ENODEV
            with pytest.raises(OSError):
                _tc.replace_filter(rtnl, idx, _tc.PARENT_INGRESS, 999, "bad_fd")  # not a bpf fd
    finally:
        for fd in progs:
            os.close(fd)


def test_attach_detach_and_lookups_in_the_callers_netns(veth_ns: tuple[str, str]) -> None:
    """The module-level helpers use a socket in the calling thread's netns;
    here a thread that entered the test netns runs them."""
    import threading

    ns, dev = veth_ns
    prog = _load_prog("ax_c", 0)
    got: dict[str, Any] = {}

    def inside() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            assert libc.setns(fd, 0x40000000) == 0, ctypes.get_errno()
        finally:
            os.close(fd)
        try:
            idx = _tc.ifindex_of(dev)
            got["idx"] = idx
            got["name"] = _tc.ifname_of(idx)
            got["missing"] = (_tc.ifindex_of("axnope0"), _tc.ifname_of(999_999))
            _tc.attach(idx, prog, "from_pod", prog, "to_pod")
            _tc.attach(idx, prog, "from_pod", prog, "to_pod")  # a restarted agent: in place
            got["after_attach"] = (len(_filters(ns, dev, "ingress")), len(_filters(ns, dev, "egress")))
            _tc.detach(idx)
            _tc.detach(idx)
            got["after_detach"] = (len(_filters(ns, dev, "ingress")), len(_filters(ns, dev, "egress")))
            subprocess.run(["ip", "-n", ns, "addr", "add", "10.99.0.1/24", "dev", dev], check=True)
            got["addrs"] = _tc.node_addresses()
        except BaseException as e:  # reported below
            got["error"] = e

    try:
        t = threading.Thread(target=inside)
        t.start()
        t.join(60)
    finally:
        os.close(prog)
    assert "error" not in got, got.get("error")
    assert isinstance(got["idx"], int) and got["idx"] > 0
    assert got["name"] == dev
    assert got["missing"] == (0, "")
    assert got["after_attach"] == (1, 1)
    assert got["after_detach"] == (0, 0)
    assert (4, "10.99.0.1") in got["addrs"]
