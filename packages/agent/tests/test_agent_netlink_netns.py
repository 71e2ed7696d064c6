"""The agent's link lookups answer for the agent's own network namespace.

An agent started with ``nsenter --net=<node netns>`` (the benchmark suite's
node, the host firewall's kernel test) keeps the host's mount namespace, so
/sys/class/net lists the host's links, not its own: a restart found its
pods' veths "gone" and disconnected them. ``link_index`` must ask the kernel
in the calling thread's namespace.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import subprocess
import threading

import pytest
from axoneme.agent import _netlink as nl
from axoneme.testing.capability import lacks_root, lacks_tools
from axoneme.testing.netns import add_netns, del_netns

pytestmark = [pytest.mark.privileged]

CLONE_NEWNET = 0x40000000


def test_link_index_of_missing_and_loopback() -> None:
    assert nl.link_index("lo") == 1
    assert nl.link_index("axno" + secrets.token_hex(5)) == 0
    assert nl.link_index("") == 0


def test_link_index_sees_the_threads_netns_not_sysfs() -> None:
    why = lacks_root() or lacks_tools("ip")
    if why:
        pytest.skip(why)
    ns = f"axnl-{secrets.token_hex(3)}"
    dev = f"axd{secrets.token_hex(3)}"
    add_netns(ns)
    got: dict[str, int | bool] = {}
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", dev, "type", "veth", "peer", "name",
                        dev + "p"], check=True,
                       capture_output=True)

        def inside() -> None:  # only this thread enters the netns
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                assert libc.setns(fd, CLONE_NEWNET) == 0, ctypes.get_errno()
                got["index"] = nl.link_index(dev)
                # the host's sysfs does not list it: what the old lookup read
                got["in_sysfs"] = os.path.exists(f"/sys/class/net/{dev}")
            finally:
                os.close(fd)

        t = threading.Thread(target=inside)
        t.start()
        t.join(30)
        assert got.get("index", 0) > 0, got
        assert got["in_sysfs"] is False
        assert nl.link_index(dev) == 0  # this thread is still in the host's namespace
    finally:
        del_netns(ns)
