"""Skip only on a missing machine capability; a broken datapath fails.

A datapath's own ``probe()`` raising DatapathUnavailable is a reason to skip
only when this machine truly lacks what that datapath needs, probed here
independently of the datapath (root; bcc, bpffs and tc clsact for eBPF; the
iptables binary, and ipset with its kernel module for ipset mode). Anything
else -- an ImportError of our own package, a compile error of our own BPF
programs, DatapathUnavailable on a machine that has everything -- is a
failure of the suite, never a skip.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import subprocess
import sys

import pytest


@functools.cache
def _ebpf_lacks() -> str | None:
    if not os.path.isdir("/sys/fs/bpf"):
        return "no /sys/fs/bpf (kernel without the bpf filesystem)"
    # in a child: a broken libbcc may abort the interpreter
    res = subprocess.run([sys.executable, "-c", "import bcc"], capture_output=True, text=True,
                         timeout=60)
    if res.returncode != 0:
        return f"bcc is not importable here: {res.stderr.strip().splitlines()[-1:]}"
    ns = f"axcap-p{os.getpid()}-{secrets.token_hex(3)}"
    import _testnet

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
    if shutil.which("iptables") is None:
        return "no iptables binary"
    if mode == "ipset":
        if shutil.which("ipset") is None:
            return "no ipset binary"
        res = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, timeout=30)
        if res.returncode != 0:
            return f"no ipset kernel support: {res.stderr.strip()}"
    return None


def machine_lacks(name: str, mode: str = "") -> str | None:
    """What this machine lacks for datapath ``name`` (``mode``), or None if nothing."""
    if name == "noop":
        return None
    if os.geteuid() != 0:
        return "not root"
    if name == "ebpf":
        return _ebpf_lacks()
    if name == "iptables":
        return _iptables_lacks(mode)
    return None  # a third-party datapath: its probe() has to be right


def probe_datapath(name: str, mode: str = "") -> str | None:
    """None if ``name`` (in ``mode``) can run here, else the capability it lacks (skip).

    Raises (fails the test) on anything that is not a missing capability.
    """
    from axoneme.core.datapath import DatapathConfig
    from axoneme.core.errors import DatapathUnavailable
    from axoneme.core.plugins import installed, load_class

    label = f"{name}/{mode}" if mode else name
    if name not in installed("axoneme.datapath"):
        pytest.fail(f"datapath {name!r} is not installed (AXONEME_E2E_DATAPATHS or the "
                    f"suite asks for it): install the workspace (scripts/bootstrap)")
    cls = load_class("axoneme.datapath", name)  # ImportError etc.: a broken plugin fails
    bpffs = f"/sys/fs/bpf/axoneme-probe-{secrets.token_hex(3)}"
    try:
        cls(DatapathConfig(state_dir="/tmp", mode=mode, bpffs_root=bpffs)).probe()
    except DatapathUnavailable as e:
        lacks = machine_lacks(name, mode)
        if lacks is None:
            pytest.fail(f"datapath {label} says it is unavailable ({e}) but this machine has "
                        f"everything it needs: a broken datapath fails, it is not skipped")
        return f"datapath {label} unavailable: {e} (this machine: {lacks})"
    finally:
        shutil.rmtree(bpffs, ignore_errors=True)
    return None
