"""Skip only on a missing machine capability; a broken datapath fails.

A datapath's own ``probe()`` raising DatapathUnavailable is a reason to skip
only when this machine truly lacks what that datapath needs, probed here
independently of the datapath (root; bcc, bpffs and tc clsact for eBPF; the
iptables binary, and ipset with its kernel module for ipset mode). Anything
else -- an ImportError of our own package, a compile error of our own BPF
programs, DatapathUnavailable on a machine that has everything -- is a
failure of the suite, never a skip.

The gating itself (root, tools, bpffs, the probe) is the test kit's
(``axoneme.testing.capability``); what each built-in datapath needs is here.
"""

from __future__ import annotations

import functools
import os
import secrets
import subprocess
import sys

from axoneme.testing import capability


@functools.cache
def _ebpf_lacks() -> str | None:
    if capability.lacks_bpffs():
        return capability.lacks_bpffs()
    # in a child: a broken libbcc may abort the interpreter
    res = subprocess.run([sys.executable, "-c", "import bcc"], capture_output=True, text=True,
                         timeout=60)
    if res.returncode != 0:
        return f"bcc is not importable here: {res.stderr.strip().splitlines()[-1:]}"
    ns = f"axcap-p{os.getpid()}-{secrets.token_hex(3)}"
    from axoneme.testing import netns as _testnet

    try:
        _testnet.add_netns(ns)
        tc = subprocess.run(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "clsact"],
                            capture_output=True, text=True, timeout=30)
    except (OSError, RuntimeError) as e:
        return f"cannot make a netns to probe tc clsact: {e}"
    finally:
        _testnet.del_netns(ns)
    if tc.returncode != 0:
        return f"no tc clsact qdisc: {tc.stderr.strip()}"
    return None


@functools.cache
def _iptables_lacks(mode: str) -> str | None:
    if capability.lacks_tools("iptables"):
        return "no iptables binary"
    if mode == "ipset":
        if capability.lacks_tools("ipset"):
            return "no ipset binary"
        res = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            return f"no ipset kernel support: {res.stderr.strip()}"
    return None


def machine_lacks(name: str, mode: str = "") -> str | None:
    """What this machine lacks for datapath ``name`` (``mode``), or None if nothing."""
    if name == "noop":
        return None
    if capability.lacks_root():
        return capability.lacks_root()
    if name == "ebpf":
        return _ebpf_lacks()
    if name == "iptables":
        return _iptables_lacks(mode)
    return None  # a third-party datapath: its probe() has to be right


def probe_datapath(name: str, mode: str = "") -> str | None:
    """None if ``name`` (in ``mode``) can run here, else the capability it lacks (skip).

    Raises (fails the test) on anything that is not a missing capability:
    this machine's needs are known for every datapath (``machine_lacks``).
    """
    return capability.probe_datapath(name, mode, lambda n, m: machine_lacks(n, m))
