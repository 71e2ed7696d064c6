"""Shared fixtures of the cross-package tiers (integration, e2e, conformance, bench).

- ``guard``: the forwarding guard (pods never reach the uplink), installed
  before any agent starts and removed at the end of the session.
- ``pod_cidr``: a free /24 inside 10.244.0.0/16 (parallel agents never collide).
- ``agent_factory`` / ``agent``: an ``axoneme agent run`` process with its own
  state dir and API socket; ``.cli(...)`` runs the CLI against it. On
  teardown: SIGKILL, ``axoneme agent cleanup``, temp dir removed.
- ``datapath_name``: the datapaths under test, from AXONEME_E2E_DATAPATHS
  (comma-separated, default ``noop``); a datapath whose probe fails is
  skipped with the reason.
- ``netns_factory``: named network namespaces, always removed.

Everything is cleaned up by name or PID, on success and on failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from axoneme.testing import capability
from axoneme.testing.netns import POD_SUPERNET, free_pod_cidr

REPO = Path(__file__).resolve().parent.parent
# tests/ on sys.path: the tiers share _testnet (netns with their own resolv.conf, servers
# that accept before a test sees them); test modules cannot import this conftest
sys.path.insert(0, str(REPO / "tests"))
import _capability  # noqa: E402
import _testnet  # noqa: E402

VENV_BIN = Path(sys.executable).parent
AXONEME = str(VENV_BIN / "axoneme") if (VENV_BIN / "axoneme").exists() else "axoneme"
AXONEME_CNI = str(VENV_BIN / "axoneme-cni") if (VENV_BIN / "axoneme-cni").exists() else "axoneme-cni"


def is_root() -> bool:
    return capability.lacks_root() is None


def require_root() -> None:
    capability.require_root("network namespaces, veth, iptables")


def e2e_datapaths() -> list[str]:
    raw = os.environ.get("AXONEME_E2E_DATAPATHS", "noop")
    return [d.strip() for d in raw.split(",") if d.strip()]


# None, or the missing machine capability (skip); a broken datapath fails the test
probe_datapath = _capability.probe_datapath


@pytest.fixture(scope="session")
def datapath_probe() -> Any:
    """``probe_datapath`` for test modules (they cannot import this conftest)."""
    return probe_datapath


# -- pod CIDR / guard ---------------------------------------------------------------------

# free_pod_cidr: a /24 in 10.244.0.0/16 with no route in it (axoneme.testing.netns)


@pytest.fixture(scope="session")
def guard() -> Iterator[str]:
    """Install the forwarding guard for the whole pod supernet (session)."""
    require_root()
    from axoneme.agent import guard as guard_mod

    owner = f"pytest-{os.getpid()}-{secrets.token_hex(3)}"
    if shutil.which("iptables") is None:
        pytest.skip("no iptables binary: cannot install the forwarding guard")
    # any other install error fails: no pod traffic without the guard, and no silent skip
    guard_mod.install(str(POD_SUPERNET), owner)
    try:
        yield owner
    finally:
        guard_mod.remove(owner)


@pytest.fixture
def pod_cidr() -> str:
    return free_pod_cidr()


# -- network namespaces -------------------------------------------------------------------

@pytest.fixture
def netns_factory() -> Iterator[Any]:
    """``make(prefix)`` -> a new netns name (lo up, its own resolv.conf); all removed at teardown."""
    require_root()
    made: list[str] = []

    def make(prefix: str = "axt") -> str:
        name = f"{prefix}-p{os.getpid()}-{secrets.token_hex(4)}"  # pid: swept if killed
        made.append(name)
        _testnet.add_netns(name)
        return name

    try:
        yield make
    finally:
        for name in made:
            _testnet.del_netns(name)


# -- the agent process -------------------------------------------------------------------------

IPTABLES_BUSY = "the iptables datapath of this network namespace is in use by"
IPTABLES_BUSY_WAIT = 900.0


@dataclass
class AgentProcess:
    """One ``axoneme agent run`` process and a CLI bound to its socket."""

    workdir: Path
    datapath: str = "noop"
    pod_cidr: str = ""
    extra_args: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)
    starts: int = 0

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "agent.log"
        self.bpffs_root = f"/sys/fs/bpf/axoneme-t{secrets.token_hex(4)}"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def socket(self) -> Path:
        return self.workdir / "axoneme.sock"

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["AXONEME_API_SOCKET"] = str(self.socket)
        env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        return env

    def command(self) -> list[str]:
        cmd = [AXONEME, "agent", "run", "--datapath", self.datapath,
               "--state-dir", str(self.state_dir), "--api-socket", str(self.socket)]
        if self.pod_cidr:
            cmd += ["--pod-cidr", self.pod_cidr]
        # pinned BPF maps per agent: agents of parallel tests never share kernel maps
        cmd += ["--bpffs-root", self.bpffs_root]
        return cmd + list(self.extra_args)

    def start(self, wait: bool = True, timeout: float = 30.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "agent already running"
        # One iptables agent per network namespace: the agent refuses to run
        # next to another one (exit 1). Suites of other processes hold theirs
        # for a while; wait for it to go instead of failing.
        busy_until = time.monotonic() + IPTABLES_BUSY_WAIT
        while True:
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            log = open(self.log_path, "ab")
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=self.env(),
                                         start_new_session=True)
            log.close()
            self.starts += 1
            if not wait:
                return
            try:
                self.wait_ready(timeout)
                return
            except RuntimeError:
                with open(self.log_path, "rb") as f:
                    f.seek(offset)
                    new = f.read().decode(errors="replace")
                if (self.datapath != "iptables" or self.proc.poll() != 1
                        or IPTABLES_BUSY not in new or time.monotonic() > busy_until):
                    raise
            time.sleep(1.0)

    def wait_ready(self, timeout: float = 30.0) -> None:
        from axoneme.agent.client import AgentClient, AgentUnreachable

        deadline = time.monotonic() + timeout
        client = AgentClient(str(self.socket), timeout=2.0)
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            try:
                client.get("/v1/healthz")
                return
            except AgentUnreachable:
                time.sleep(0.05)
        raise RuntimeError(f"agent not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL (a crash): nothing runs on the way out."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait (clean shutdown)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def restart(self) -> None:
        self.stop()
        self.start()

    def cli(self, *args: str, check: bool = False, timeout: float = 120.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([AXONEME, *args], capture_output=True, text=True, env=self.env(),
                             timeout=timeout, input=input)
        if check and res.returncode != 0:
            raise AssertionError(f"axoneme {' '.join(args)} -> {res.returncode}\n"
                                 f"stdout: {res.stdout}\nstderr: {res.stderr}\n"
                                 f"agent log:\n{self.log()}")
        return res

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-o", "json", check=True).stdout)

    def api(self) -> Any:
        from axoneme.agent.client import AgentClient

        return AgentClient(str(self.socket))

    def pod_run(self, name: str, *cmd: str, namespace: str = "default",
                labels: str | None = None, extra: Sequence[str] = ()) -> str:
        args = ["pod", "run", name, "-n", namespace]
        if labels:
            args += ["--labels", labels]
        res = self.cli(*args, *extra, "--", *cmd, check=True)
        return res.stdout.strip().splitlines()[-1]

    def pod_exec(self, name: str, *cmd: str, namespace: str = "default",
                 timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.cli("pod", "exec", name, "-n", namespace, "--", *cmd, timeout=timeout)

    def cleanup(self) -> None:
        self.kill()
        subprocess.run([AXONEME, "agent", "cleanup", "--state-dir", str(self.state_dir)],
                       capture_output=True, env=self.env(), timeout=120)
        if os.path.isdir(self.bpffs_root):  # whatever the datapath's cleanup left
            shutil.rmtree(self.bpffs_root, ignore_errors=True)


@pytest.fixture
def agent_factory(tmp_path_factory: pytest.TempPathFactory, guard: str) -> Iterator[Any]:
    """``make(datapath="noop", start=True, extra_args=(), pod_cidr=None)`` -> AgentProcess."""
    require_root()
    agents: list[AgentProcess] = []

    def make(datapath: str = "noop", start: bool = True, extra_args: Sequence[str] = (),
             pod_cidr: str | None = None) -> AgentProcess:
        # a short path: unix socket paths are limited to 107 bytes
        # -p<pid>-: never swept by another session while its agent is down on purpose
        workdir = Path(tempfile.mkdtemp(prefix=f"axa-p{os.getpid()}-", dir="/tmp"))
        ap = AgentProcess(workdir, datapath, pod_cidr or free_pod_cidr(), extra_args)
        agents.append(ap)
        if start:
            ap.start()
        return ap

    try:
        yield make
    finally:
        for ap in agents:
            try:
                ap.cleanup()
            finally:
                shutil.rmtree(ap.workdir, ignore_errors=True)


@pytest.fixture(params=e2e_datapaths())
def datapath_name(request: pytest.FixtureRequest) -> str:
    name = str(request.param)
    if is_root():
        reason = probe_datapath(name)
        if reason is not None:
            print(f"SKIP: {reason}")
            pytest.skip(reason)
    return name


@pytest.fixture
def agent(agent_factory: Any, datapath_name: str) -> AgentProcess:
    """A running agent on the datapath under test."""
    ap: AgentProcess = agent_factory(datapath_name)
    return ap


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns a truthy value (or the last value on timeout)."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value
