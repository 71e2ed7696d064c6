"""Machinery of the conformance suite's kernel part: one suite, the datapath
under test (``--axoneme-datapath``).

An agent per datapath (module scope: pytest groups the tests by datapath),
a topology of namespaces x,y,z x pods a,b,c created once through the CLI
(`axoneme pod run` -> axoneme-cni), a fake outside world netns at
198.51.100.0/24, and probers that run inside the pods. Datapaths that cannot
run here are skipped by capability (their probe() reason is printed).
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
AX = str(Path(sys.executable).with_name("axoneme"))
PYTHON = sys.executable
NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
PORTS = (80, 81)
# the outside world: a free /28 of these (sessions running at once each get their
# own) inside 198.51.100.0/24, the test network; the e2e suites use .64 and up
WORLD_BLOCKS = tuple(ipaddress.ip_network(f"198.51.100.{16 * i}/28") for i in range(4))
WORLD_LOCK = "/tmp/axoneme-conformance-world.lock"


@dataclass(frozen=True)
class World:
    """The outside world's /28: the node's address on its link (.1) and three hosts (.10-.12)."""

    net: str
    host_ip: str
    ips: tuple[str, str, str]

    @classmethod
    def of(cls, block: ipaddress.IPv4Network | ipaddress.IPv6Network) -> World:
        base = block.network_address
        return cls(str(block), str(base + 1), (str(base + 10), str(base + 11), str(base + 12)))


def free_world() -> World:
    """A World in a /28 of WORLD_BLOCKS no route covers yet (hold WORLD_LOCK until it is made)."""
    used = sh("ip", "-4", "route", "show").stdout
    for block in WORLD_BLOCKS:
        if str(block) not in used:
            return World.of(block)
    raise AssertionError(f"no free /28 for the outside world among {[str(b) for b in WORLD_BLOCKS]}: "
                         f"other sessions hold them all")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def uplink() -> str | None:
    out = sh("ip", "-o", "route", "show", "default", check=False).stdout.split()
    return out[out.index("dev") + 1] if "dev" in out else None


# --- the agent ---------------------------------------------------------------------

@dataclass
class Agent:
    datapath: str
    mode: str
    state_dir: Path
    socket: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    policy_files: list[Path] = field(default_factory=list)
    # a free /24 (netns.free_pod_cidr): an iptables agent drops pod-CIDR traffic of
    # pod interfaces it has no endpoint for, so never claim other runs' pods
    pod_cidr: str = ""

    @property
    def label(self) -> str:
        return f"{self.datapath}/{self.mode}" if self.mode else self.datapath

    def env(self) -> dict[str, str]:
        return {**os.environ, "AXONEME_API_SOCKET": str(self.socket)}

    def ax(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([AX, *args], capture_output=True, text=True, env=self.env(), timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"axoneme {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def json(self, *args: str) -> object:
        return json.loads(self.ax(*args, "-o", "json").stdout)

    def start(self) -> None:
        if not Path(AX).exists():
            raise AssertionError(f"the kernel part runs {AX} (agent run, pod run): install the node "
                                 "distributions next to the kit: pip install 'axoneme[agent]' axoneme-cni")
        cmd = [AX, "agent", "run", "--datapath", self.datapath, "--state-dir", str(self.state_dir),
               "--api-socket", str(self.socket)]
        if self.mode:
            cmd += ["--datapath-opt", f"mode={self.mode}"]
        if self.pod_cidr:
            cmd += ["--pod-cidr", self.pod_cidr]
        self.log = self.state_dir.parent / f"agent-{int(time.time() * 1000)}.log"
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, env=self.env())
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}:\n{self.log.read_text()}")
            if self.ax("status", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"agent did not become ready:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    # -- policies -------------------------------------------------------------------
    def apply(self, *paths: Path) -> None:
        args: list[str] = []
        for p in paths:
            args += ["-f", str(p)]
        self.ax("policy", "apply", *args)
        self.policy_files.extend(paths)
        self.wait_realized()

    def reset_policies(self) -> None:
        for pol in self.json("policy", "list"):  # type: ignore[union-attr]
            kind, ns, name = pol["kind"], pol.get("namespace", ""), pol["name"]
            args = ["policy", "delete", f"{kind}/{name}"] + (["-n", ns] if ns else [])
            self.ax(*args)
        self.policy_files.clear()
        self.wait_realized()

    def wait_realized(self, timeout: float = 30) -> None:
        """Until every endpoint's datapath dump equals its resolved MapState."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            pending = []
            for ep in self.json("endpoint", "list"):  # type: ignore[union-attr]
                got = self.json("endpoint", "get", str(ep["id"]))
                if not realized(got):
                    pending.append(ep.get("pod", ep["id"]))
            if not pending:
                return
            last = f"not realized: {pending}"
            time.sleep(0.2)
        raise AssertionError(f"policy not realized in the datapath within {timeout}s: {last}")


def realized(endpoint_json: object) -> bool:
    """`endpoint get -o json` holds the resolved MapState ("policy") and the
    datapath's dump() ("datapath"): realized when they are equal."""
    assert isinstance(endpoint_json, dict), endpoint_json
    want, got = endpoint_json.get("policy"), endpoint_json.get("datapath")
    assert want is not None, f"endpoint get lacks the resolved policy: {endpoint_json}"
    if got is None:
        return False

    def view(entries: list[dict]) -> set[tuple[str, str]]:
        return {(e["key"], e["entry"]) for e in entries}
    return view(want) == view(got)


@dataclass
class Topology:
    agent: Agent
    ips: dict[str, str]  # "x/a" -> IP
    cluster_file: Path
    netns: dict[str, str] = field(default_factory=dict)  # "x/a" -> netns name
    world: World = World.of(WORLD_BLOCKS[0])

    def exec_argv(self, pod: str) -> list[str]:
        """Run in the pod's netns directly: works while the agent is down."""
        return ["ip", "netns", "exec", self.netns[pod]]

    def pods(self) -> list[str]:
        return sorted(self.ips)


def cluster_yaml(agent: Agent) -> str:
    """The live cluster as Kubernetes objects, for `axoneme policy matrix`."""
    docs = []
    for ns in NAMESPACES:
        docs.append({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": ns, "labels": {"ns": ns, "kubernetes.io/metadata.name": ns}}})
    for p in agent.json("pod", "list"):  # type: ignore[union-attr]
        ports = [{"name": f"serve-{n}-{proto.lower()}", "containerPort": n, "protocol": proto}
                 for n in PORTS for proto in ("TCP", "UDP")]
        docs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {"name": p["name"], "namespace": p["namespace"], "labels": p["labels"]},
                     "spec": {"containers": [{"name": "server", "ports": ports}]},
                     "status": {"podIP": p["ip"]}})
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})


def wait_servers(topo: Topology) -> None:
    deadline = time.monotonic() + 30
    targets = [(ip, 80, "tcp") for ip in topo.ips.values()]
    while time.monotonic() < deadline:
        if all(run_prober(topo, "x/a", targets)):
            return
        time.sleep(0.3)
    raise AssertionError("pod servers did not come up")


def run_prober(topo: Topology, src: str, targets: list[tuple[str, int, str]]) -> list[bool]:
    r = subprocess.run([*topo.exec_argv(src), PYTHON, str(HERE / "prober.py"), json.dumps(targets)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"prober in {src} failed: {r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


Probe = tuple[str, str, int, str]  # from, to, port, proto ("x/a", "y/b" or an IP, 80, "tcp")


def probe_all(topo: Topology, probes: list[Probe]) -> dict[Probe, bool]:
    """Run every probe, one prober per source pod, sources in parallel."""
    by_src: dict[str, list[Probe]] = {}
    for pr in probes:
        by_src.setdefault(pr[0], []).append(pr)
    out: dict[Probe, bool] = {}

    def one(src: str) -> None:
        items = by_src[src]
        targets = [(topo.ips.get(dst, dst), port, proto) for _, dst, port, proto in items]
        for pr, ok in zip(items, run_prober(topo, src, targets), strict=True):
            out[pr] = ok

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(by_src) or 1) as ex:
        list(ex.map(one, by_src))
    return out
