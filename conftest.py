"""Repository-wide pytest set-up.

Tests create kernel state (netns, links, tc filters, chains, processes)
that their fixtures remove in teardown. A SIGTERM (CI's time limit,
`timeout`, a runner stopping the job) would end pytest without teardown, so
in the pytest process itself it is turned into a KeyboardInterrupt: pytest
then runs every finalizer before exiting. A forked child (multiprocessing
fork, a test's os.fork) inherits the handler; there it must not unwind into
the parent's fixtures, so it exits at once as SIGTERM would.
"""

from __future__ import annotations

import functools
import glob
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

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
# relative to a temp root: /tmp (agent_factory's state dirs) and the system temp dir
# (TMPDIR: pytest's tmp_path dirs)
_STATE_GLOBS = ("*/state.json", "*/*/state.json", "pytest-of-*/pytest-*/*/state.json",
                "pytest-of-*/pytest-*/*/*/state.json", "pytest-of-*/pytest-*/*/*/*/state.json")
# an agent's state file with every policy of a 50k-rule benchmark stays far below this;
# anything bigger is not ours and is not worth reading at session start
_STATE_MAX_BYTES = 64 << 20
_OWNED = re.compile(r"-p(\d+)-")
_OWNED_CHAIN = re.compile(r"^AXTEST-[A-Z]+-p(\d+)$")
_RESOLV_DIR = "/etc/netns"


def _state_globs() -> list[str]:
    roots = dict.fromkeys(["/tmp", tempfile.gettempdir()])
    return [os.path.join(root, pattern) for root in roots for pattern in _STATE_GLOBS]


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


def _read_agent_state(path: str) -> dict[str, Any] | None:
    """The state file at ``path`` if it is an axoneme agent's of ours, else None.

    Anything under the temp dir may be another program's, hostile or half
    written: a file that is not ours (not a regular file owned by us, too big,
    not JSON, not an agent's state) is left alone, never an error.
    """
    try:
        st = os.lstat(path)
        dst = os.lstat(os.path.dirname(path))
    except OSError:
        return None
    euid = os.geteuid()
    if not stat.S_ISREG(st.st_mode) or not stat.S_ISDIR(dst.st_mode) or \
            st.st_uid != euid or dst.st_uid != euid or st.st_size > _STATE_MAX_BYTES:
        return None
    try:
        with open(path, "rb") as f:
            raw = f.read(_STATE_MAX_BYTES + 1)
        if len(raw) > _STATE_MAX_BYTES:
            return None
        # RecursionError: deep nesting; ValueError: bad JSON, over-long ints; UnicodeError
        data = json.loads(raw)
    except (OSError, ValueError, UnicodeError, RecursionError, MemoryError):
        return None
    if not isinstance(data, dict):
        return None
    sock, datapath, version = data.get("api_socket"), data.get("datapath"), data.get("version")
    if not (isinstance(sock, str) and sock and isinstance(datapath, str) and datapath
            and isinstance(version, int) and not isinstance(version, bool)):
        return None
    return data


def _stale_state_dirs(globs: Sequence[str] | None = None) -> list[str]:
    """State dirs no agent serves: nobody answers the socket, no process names the dir,
    and no live test session owns it (a ``-p<pid>-`` in its path: its agent may be
    down on purpose, e.g. a restart test)."""
    from axoneme.agent._api import socket_in_use

    found: list[str] = []
    running = " ".join(_cmdlines())
    for pattern in _state_globs() if globs is None else globs:
        for path in sorted(glob.glob(pattern)):
            data = _read_agent_state(path)
            if data is None:
                continue
            state_dir = os.path.dirname(path)
            owner = _OWNED.search(state_dir)
            if owner and _alive(int(owner.group(1))):
                continue
            if state_dir in found or f"{state_dir} " in running or socket_in_use(data["api_socket"]):
                continue
            found.append(state_dir)
    return found


def _sweep_state_dirs(globs: Sequence[str] | None = None) -> list[str]:
    """Run ``axoneme agent cleanup`` on every stale agent state dir; the dirs swept."""
    ax = Path(sys.executable).with_name("axoneme")
    if not ax.exists():
        return []
    swept = _stale_state_dirs(globs)
    for state_dir in swept:
        res = subprocess.run([str(ax), "agent", "cleanup", "--state-dir", state_dir],
                             capture_output=True, text=True, timeout=120)
        print(f"swept the stale agent state {state_dir}: exit {res.returncode}", file=sys.stderr)
    return swept


def _sweep_leftovers() -> None:
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=120)
    orphans = _orphans()
    if orphans:
        print(f"stopping processes of a killed test run: {orphans}", file=sys.stderr)
        _stop(orphans)
    _sweep_state_dirs()
    for line in run(["ip", "netns", "list"]).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _OWNED.search(name)
        if m and not _alive(int(m.group(1))):
            run(["ip", "netns", "del", name])
            print(f"swept the stale netns {name}", file=sys.stderr)
    # the netns's own resolv.conf (tests/_testnet.py) outlives it in /etc/netns
    for name in os.listdir(_RESOLV_DIR) if os.path.isdir(_RESOLV_DIR) else []:
        m = _OWNED.search(name)
        if m and not _alive(int(m.group(1))) and not os.path.exists(f"/run/netns/{name}"):
            shutil.rmtree(os.path.join(_RESOLV_DIR, name), ignore_errors=True)
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


def _sweep_at_start() -> None:
    if os.geteuid() == 0 and not os.environ.get("PYTEST_XDIST_WORKER"):
        try:
            _sweep_leftovers()
        except (OSError, subprocess.SubprocessError) as e:
            # housekeeping: a leftover it cannot remove must not stop the suite
            print(f"warning: sweeping leftovers of killed runs failed: {e!r}", file=sys.stderr)


# -- every netns of ours has its own resolver ----------------------------------------------------
#
# A netns without /etc/netns/<name>/resolv.conf uses the host's resolver, which
# it cannot reach: any lookup in it (``-m http.server`` does one before it
# listens) then waits for the resolver timeout. Before each test body runs,
# every netns this session made (named ``<prefix>-p<pid>-<suffix>``) must have
# its own, naming only loopback or the test DNS (tests/_testnet.py).

def _testnet() -> Any:
    mod = sys.modules.get("_testnet")
    if mod is None:
        import importlib.util

        spec = importlib.util.spec_from_file_location(
            "_testnet", Path(__file__).resolve().parent / "tests" / "_testnet.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_testnet"] = mod
        spec.loader.exec_module(mod)
    return mod


def _netns_resolver_problems(pid: int) -> list[str]:
    """What is wrong with the resolv.conf of each netns named for ``pid``."""
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    problems = []
    for line in res.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _OWNED.search(name)
        if m and int(m.group(1)) == pid and os.path.exists(f"/run/netns/{name}"):
            problem = _testnet().resolv_conf_problem(name)
            if problem:
                problems.append(problem)
    return problems


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    if os.geteuid() != 0:
        return
    problems = _netns_resolver_problems(os.getpid())
    if problems:
        pytest.fail("a netns of this session would use the host's resolver "
                    "(make it with tests/_testnet.py add_netns):\n  " + "\n  ".join(problems),
                    pytrace=False)


# -- skips are counted --------------------------------------------------------------------------
#
# A kernel suite that skips while running as root tested nothing: CI must not pass on
# it. A skip whose reason matches _ALLOWED_SKIPS is expected on every machine
# (documented); any other skip, in a strict session, makes the session fail and is
# listed with its reason. Strict: CI=true, or root with AXONEME_STRICT_SKIPS=1
# (scripts/test sets it).

_ALLOWED_SKIPS = (
    # the noop datapath computes policy and enforces nothing (DESIGN.md): no L7 to test
    re.compile(r"\bnoop datapath has no L7 redirect\b"),
)
_SKIPS: pytest.StashKey[list[tuple[str, str]]] = pytest.StashKey()


def _strict_skips() -> bool:
    return os.environ.get("CI", "").lower() == "true" or \
        (os.geteuid() == 0 and os.environ.get("AXONEME_STRICT_SKIPS") == "1")


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        reason = str(longrepr[2])
        return reason.removeprefix("Skipped: ")
    return str(longrepr)


def _record_skip(config: pytest.Config, report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        config.stash.setdefault(_SKIPS, []).append((report.nodeid, _skip_reason(report)))


_CONFIG: list[pytest.Config] = []  # this session's (hooks below get no config argument)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _CONFIG:
        _record_skip(_CONFIG[0], report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if _CONFIG:
        _record_skip(_CONFIG[0], report)


def pytest_sessionstart(session: pytest.Session) -> None:
    _CONFIG[:] = [session.config]
    _sweep_at_start()


def _unexpected_skips(config: pytest.Config) -> list[tuple[str, str]]:
    return [(node, why) for node, why in config.stash.get(_SKIPS, [])
            if not any(p.search(why) for p in _ALLOWED_SKIPS)]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _strict_skips() and _unexpected_skips(session.config) and \
            session.exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    unexpected = _unexpected_skips(config)
    if not unexpected or not _strict_skips():
        return
    terminalreporter.section("unexpected skips (strict: CI=true or AXONEME_STRICT_SKIPS=1 as root)",
                             sep="=", red=True, bold=True)
    for node, why in unexpected:
        terminalreporter.line(f"SKIPPED {node}: {why}")
    terminalreporter.line(f"{len(unexpected)} unexpected skip(s): the session fails. A skip is "
                          f"allowed only for a reason in conftest.py _ALLOWED_SKIPS.", red=True)
