"""Network namespaces and servers of the test kit, made one way everywhere.

Every netns made here gets its own ``/etc/netns/<name>/resolv.conf`` before
anything runs in it (``ip netns exec`` bind-mounts it over /etc/resolv.conf):
without one a process in the netns would use the host's resolver, which the
netns cannot reach, and each lookup would wait for the resolver timeout. The
default names ``127.0.0.1`` *inside the netns*, where nothing listens, so a
lookup fails at once instead.

A server is only handed to a test once it accepts connections
(``wait_accepting``), failing with the server's output if it never does.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from typing import Any

RESOLV_DIR = "/etc/netns"
POD_SUPERNET = ipaddress.ip_network("10.244.0.0/16")  # every test pod lives in it
NO_RESOLVER = "127.0.0.1"  # inside the netns: nothing listens, a lookup fails at once


def write_resolv_conf(netns: str, nameserver: str = NO_RESOLVER) -> str:
    """``/etc/netns/<netns>/resolv.conf`` naming ``nameserver``; its path."""
    if not netns or "/" in netns or netns in (".", ".."):
        raise ValueError(f"bad netns name {netns!r}")
    etc = os.path.join(RESOLV_DIR, netns)
    os.makedirs(etc, exist_ok=True)
    path = os.path.join(etc, "resolv.conf")
    with open(path, "w") as f:
        f.write(f"nameserver {nameserver}\noptions timeout:1 attempts:1\n")
    return path


def remove_resolv_conf(netns: str) -> None:
    if netns and "/" not in netns and netns not in (".", ".."):
        shutil.rmtree(os.path.join(RESOLV_DIR, netns), ignore_errors=True)


def add_netns(name: str, nameserver: str = NO_RESOLVER) -> str:
    """Create netns ``name`` with its resolv.conf (written first) and lo up."""
    write_resolv_conf(name, nameserver)
    res = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if res.returncode != 0:
        remove_resolv_conf(name)
        raise RuntimeError(f"ip netns add {name}: {res.stderr.strip()}")
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True,
                   capture_output=True)
    return name


def del_netns(name: str) -> None:
    """Remove netns ``name`` and its /etc/netns entry; unknown names are fine."""
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    remove_resolv_conf(name)


_PROBE = textwrap.dedent("""\
    import socket, sys, time
    host, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            sys.exit(0)
        except OSError as e:
            if time.monotonic() > deadline:
                sys.exit(f"{host}:{port} does not accept: {e}")
            time.sleep(0.05)
""")


def wait_accepting(ip: str, port: int, netns: str | None = None,
                   proc: subprocess.Popen[Any] | None = None, log: str | None = None,
                   timeout: float = 15.0) -> None:
    """Return once ``ip:port`` accepts a TCP connection (from inside ``netns``).

    Raises AssertionError with the server's output (``log``, a file) if it
    exits or does not accept within ``timeout``: a fixture must fail, never
    hand a test a server that is still starting.
    """
    cmd = [sys.executable, "-c", _PROBE, ip, str(port), str(timeout)]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    probe = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout + 10
    why = ""
    try:
        while probe.poll() is None and time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                why = f"the server exited with {proc.returncode}"
                break
            time.sleep(0.05)
        else:
            if probe.returncode == 0:
                return
            why = (probe.stderr.read() if probe.stderr else "").strip() or \
                f"no connection to {ip}:{port} within {timeout:.0f}s"
    finally:
        if probe.poll() is None:
            probe.kill()
        probe.wait(5)
        if probe.stderr:
            probe.stderr.close()
    out = ""
    if log:
        try:
            with open(log, errors="replace") as f:
                out = f.read()[-4000:]
        except OSError as e:
            out = f"(no log: {e})"
    raise AssertionError(f"server on {ip}:{port}{' in ' + netns if netns else ''} "
                         f"never accepted: {why}\nserver output:\n{out}")


def _routes_in_supernet() -> set[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True).stdout
    used: set[ipaddress.IPv4Network] = set()
    for line in out.splitlines():
        dst = line.split()[0] if line.split() else ""
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv4Network) and net.subnet_of(POD_SUPERNET) and \
                net != POD_SUPERNET:
            used.add(net)
    return used


def free_pod_cidr() -> str:
    """A /24 in 10.244.0.0/16 with no route in it (agents of parallel tests differ)."""
    used = _routes_in_supernet()
    candidates = list(range(16, 250))
    random.shuffle(candidates)
    for third in candidates:
        net = ipaddress.ip_network(f"10.244.{third}.0/24")
        if not any(r.overlaps(net) for r in used):
            return str(net)
    raise RuntimeError("no free /24 left in 10.244.0.0/16")
