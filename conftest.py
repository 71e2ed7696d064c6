"""Repository-wide pytest set-up.

Tests create kernel state (netns, links, tc filters, chains, processes)
that their fixtures remove in teardown. A SIGTERM (CI's time limit,
`timeout`, a runner stopping the job) would end pytest without teardown, so
in the pytest process itself it is turned into a KeyboardInterrupt: pytest
then runs every finalizer before exiting. A forked child (pyroute2 and
multiprocessing fork) inherits the handler; there it must not unwind into
the parent's fixtures, so it exits at once as SIGTERM would.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

_PYTEST_PID = os.getpid()


def _sigterm(signum: int, frame: object) -> None:
    if os.getpid() != _PYTEST_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: object) -> None:
    global _PYTEST_PID
    _PYTEST_PID = os.getpid()
    signal.signal(signal.SIGTERM, _sigterm)
    # every process a test starts inherits this: the sweep below finds its orphans
    os.environ[_OWNER_ENV] = str(_PYTEST_PID)


# -- leftovers of a killed run ----------------------------------------------------------------
#
# SIGKILL (a session's end, an OOM kill) skips every teardown. What such a run
# left must not break the next one, so a root session starts by removing what
# is provably stale, and nothing else:
#   * processes carrying AXONEME_TEST_OWNER=<pid> (set in every test session's
#     environment, so inherited by the agents, pods and servers it starts) whose
#     pid is gone: SIGTERM, then SIGKILL, by pid;
#   * agent state dirs under /tmp whose API socket nobody answers: the product's
#     own `axoneme agent cleanup` removes their pods, links, routes, chains, maps;
#   * test netns named ``<prefix>-p<pid>-<suffix>`` whose creating pid is gone
#     (``f"{prefix}-p{os.getpid()}-{suffix}"`` in a fixture) -- a
#     netns's veth peers, and the routes through them, go with it;
#   * iptables chains ``AXTEST-<what>-p<pid>`` whose pid is gone.

_OWNER_ENV = "AXONEME_TEST_OWNER"
_STATE_GLOBS = ("/tmp/*/state.json", "/tmp/*/*/state.json", "/tmp/pytest-of-*/pytest-*/*/state.json",
                "/tmp/pytest-of-*/pytest-*/*/*/state.json", "/tmp/pytest-of-*/pytest-*/*/*/*/state.json")
_OWNED = re.compile(r"-p(\d+)-")
_OWNED_CHAIN = re.compile(r"^AXTEST-[A-Z]+-p(\d+)$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _orphans() -> list[int]:
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for var in env:
            if var.startswith(_OWNER_ENV.encode() + b"="):
                owner = var.split(b"=", 1)[1]
                if owner.isdigit() and not _alive(int(owner)):
                    found.append(int(entry))
                break
    return found


def _stop(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while (pids := [p for p in pids if _alive(p) and not _zombie(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _cmdlines() -> list[str]:
    out: list[str] = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                out.append(Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return out


def _stale_state_dirs() -> list[str]:
    """State dirs no agent serves: nobody answers the socket, no process names the dir."""
    from axoneme.agent._api import socket_in_use

    found: list[str] = []
    running = " ".join(_cmdlines())
    for pattern in _STATE_GLOBS:
        for path in glob.glob(pattern):
            try:
                data = json.loads(Path(path).read_text())
            except (OSError, ValueError):
                continue
            sock = data.get("api_socket") if isinstance(data, dict) else None
            state_dir = os.path.dirname(path)
            if not sock or not data.get("datapath") or f"{state_dir} " in running or socket_in_use(sock):
                continue
            found.append(state_dir)
    return found


def _sweep_leftovers() -> None:
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=120)
    orphans = _orphans()
    if orphans:
        print(f"stopping processes of a killed test run: {orphans}", file=sys.stderr)
        _stop(orphans)
    ax = Path(sys.executable).with_name("axoneme")
    for state_dir in _stale_state_dirs() if ax.exists() else []:
        res = run([str(ax), "agent", "cleanup", "--state-dir", state_dir])
        print(f"swept the stale agent state {state_dir}: exit {res.returncode}", file=sys.stderr)
    for line in run(["ip", "netns", "list"]).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _OWNED.search(name)
        if m and not _alive(int(m.group(1))):
            run(["ip", "netns", "del", name])
            print(f"swept the stale netns {name}", file=sys.stderr)
    for table in ("filter", "mangle", "nat", "raw"):
        rules = run(["iptables", "-w", "5", "-t", table, "-S"]).stdout.splitlines()
        stale = {c for r in rules if r.startswith("-N ")
                 for c in [r.split()[1]] if (m := _OWNED_CHAIN.match(c)) and not _alive(int(m.group(1)))}
        for rule in rules:
            parts = rule.split()
            if parts[:1] == ["-A"] and "-j" in parts and parts[parts.index("-j") + 1] in stale:
                run(["iptables", "-w", "5", "-t", table, "-D", *parts[1:]])
        for chain in stale:
            run(["iptables", "-w", "5", "-t", table, "-F", chain])
            run(["iptables", "-w", "5", "-t", table, "-X", chain])
            print(f"swept the stale chain {table}/{chain}", file=sys.stderr)


def pytest_sessionstart(session: object) -> None:
    if os.geteuid() == 0 and not os.environ.get("PYTEST_XDIST_WORKER"):
        _sweep_leftovers()
