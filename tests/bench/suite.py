"""Head-to-head benchmark suite: eBPF vs iptables (plain, ipset, stateful) vs no policy.

Run the full suite with ``scripts/bench`` (writes bench-results/); CI runs the
quick mode (AXONEME_BENCH_QUICK=1) through tests/bench/test_bench_suite.py.

Every condition drives a datapath through the Datapath ABC with hand-made
MapStates; B7 (agent start) goes through the real ``axoneme agent run``.

Safety: traffic only between network namespaces this suite creates (pods in
10.244.0.0/16, fake peers in 10.244.128.0/17 that nothing uses); a guard
chain of our own drops 10.244.0.0/16 forwarded to the default route's
interface before anything else is created. Everything made here (netns,
veths, routes, tc filters via the datapath, pinned maps under a private
bpffs dir, AXON- chains/ipsets via ``Datapath.cleanup()``, our own chains,
processes by PID) is removed on success and on failure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import logging
import os
import platform
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: run as a script too
import _testnet  # noqa: E402

LOG = logging.getLogger("axoneme.bench")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
VENV_BIN = Path(sys.executable).parent
AXONEME = str(VENV_BIN / "axoneme") if (VENV_BIN / "axoneme").exists() else "axoneme"

PORT = 5201  # TCP + UDP echo
SINK_PORT = 5202  # UDP sink (flood)
DENIED_PORT = 5203  # the server listens here too; nobody is allowed on it
PEER_BASE_ID = 100_000
SRV_ID = 90_001
FAKE_NET = ipaddress.ip_network("10.244.128.0/17")
CONDITIONS = ("none", "ebpf", "iptables-plain", "iptables-ipset", "iptables-stateful")


@dataclass(frozen=True)
class Plan:
    quick: bool
    reps: int
    seconds: float  # per traffic measurement
    sizes: dict[str, tuple[int, ...]]  # condition -> N values for B2/B3/B4
    b1_sizes: tuple[int, ...]
    b5_sizes: tuple[int, ...]
    b5_iters_ebpf: int
    b5_iters_ipt: int
    b7_populate: int
    seed: int
    setup_budget_s: float = 90.0  # a (condition, N) whose policy setup takes longer is skipped
    b5_budget_s: float = 45.0  # per B5 cell once 3 samples are in
    # B5 through the agent (end to end): the sizes of B5 plus 100k
    b5a_sizes: tuple[int, ...] = (100, 1000, 10_000, 50_000, 100_000)
    # B5 through the agent: a cell whose base policy load would take longer is
    # skipped (iptables-ipset at 100k loads for minutes); one sample at least,
    # then no new round once a cell has run this long (a change on ipset at
    # 100k takes minutes: its sample count says how many fit)
    b5a_setup_budget_s: float = float(os.environ.get("AXONEME_B5A_SETUP_BUDGET", "900"))
    b5a_cell_cap_s: float = float(os.environ.get("AXONEME_B5A_CELL_CAP", "300"))

    @classmethod
    def make(cls, quick: bool, seed: int | None = None) -> Plan:
        seed = seed if seed is not None else random.randrange(1 << 30)
        if quick:
            q = (10, 1000)
            return cls(True, 2, 0.3, {"none": (0,), "ebpf": q, "iptables-plain": q,
                                      "iptables-ipset": q, "iptables-stateful": q},
                       (10, 1000), (100, 1000), 50, 5, 1000, seed)
        return cls(False, 5, 2.0,
                   {"none": (0,), "ebpf": (10, 1000, 10_000, 100_000),
                    "iptables-plain": (10, 1000, 10_000),
                    "iptables-ipset": (10, 1000, 10_000, 100_000),
                    "iptables-stateful": (1000, 10_000)},
                   (10, 1000, 10_000, 100_000), (100, 1000, 10_000, 50_000), 300, 10,
                   100_000, seed)


# The process that owns the kernel objects. A forked child (multiprocessing, a
# helper's fork) must not clean up: if a SIGTERM handler (ours, or the repo's conftest) turns a signal
# in such a child into an exception, the child would unwind through our
# cleanup code and tear down the parent's objects. Cleanup runs only here.
OWNER_PID = os.getpid()


def not_owner() -> bool:
    """In a forked child: leave at once, clean nothing (see OWNER_PID)."""
    if os.getpid() != OWNER_PID:
        os._exit(1)
    return False


IPTABLES_LOCK = "/tmp/axoneme-iptables-datapath.lock"  # shared by the repo's tests


@contextmanager
def iptables_host_lock(cond: str, wait: float = 30.0) -> Iterator[None]:
    """The iptables datapath's chains are host-wide: hold the host lock the repo's
    tests take around an iptables agent/datapath (bounded wait; without it a trial
    whose chains are removed under it is caught and not counted anyway)."""
    if "iptables" not in cond:
        yield
        return
    import fcntl

    f = open(IPTABLES_LOCK, "w")
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    LOG.warning("%s held for %.0f s: going on without it", IPTABLES_LOCK, wait)
                    break
                time.sleep(0.1)
        yield
    finally:
        f.close()  # releases the flock


# ---- shell helpers ------------------------------------------------------------------------

def sh(*cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} -> {res.returncode}: {res.stderr.strip()}")
    return res


def uplinks() -> list[str]:
    out = sh("ip", "-o", "-4", "route", "show", "default", check=False).stdout.split()
    devs = [out[i + 1] for i, w in enumerate(out) if w == "dev" and i + 1 < len(out)]
    return sorted(set(devs))


def build_loadgen(tmp: str) -> str:
    path = os.path.join(tmp, "loadgen")
    sh("gcc", "-O2", "-pthread", "-o", path, str(HERE / "loadgen.c"))
    return path


class Guard:
    """Our own FORWARD chain: 10.244.0.0/16 never leaves through the uplink."""

    def __init__(self) -> None:
        self.chain = f"AXB-G-{secrets.token_hex(3)}"
        self.installed = False

    def install(self) -> None:
        sh("iptables", "-w", "-N", self.chain)
        self.installed = True
        for dev in uplinks():
            sh("iptables", "-w", "-A", self.chain, "-s", "10.244.0.0/16", "-o", dev, "-j", "DROP")
        sh("iptables", "-w", "-I", "FORWARD", "1", "-j", self.chain)

    def remove(self) -> None:
        if not self.installed:
            return
        not_owner()
        sh("iptables", "-w", "-D", "FORWARD", "-j", self.chain, check=False)
        sh("iptables", "-w", "-F", self.chain, check=False)
        sh("iptables", "-w", "-X", self.chain, check=False)
        self.installed = False


class StatefulRule:
    """The classic stateful firewall in front of the per-endpoint chains:
    ESTABLISHED/RELATED packets are accepted before any policy rule."""

    def __init__(self) -> None:
        self.chain = f"AXB-S-{secrets.token_hex(3)}"
        self.installed = False

    def install(self) -> None:
        sh("iptables", "-w", "-N", self.chain)
        self.installed = True
        sh("iptables", "-w", "-A", self.chain, "-m", "conntrack", "--ctstate",
           "ESTABLISHED,RELATED", "-j", "ACCEPT")
        sh("iptables", "-w", "-I", "FORWARD", "1", "-j", self.chain)

    def remove(self) -> None:
        if not self.installed:
            return
        not_owner()
        sh("iptables", "-w", "-D", "FORWARD", "-j", self.chain, check=False)
        sh("iptables", "-w", "-F", self.chain, check=False)
        sh("iptables", "-w", "-X", self.chain, check=False)
        self.installed = False


# ---- topology -----------------------------------------------------------------------------

def _used_pod_nets() -> set[ipaddress.IPv4Network]:
    used = set()
    for line in sh("ip", "-4", "route", "show", check=False).stdout.splitlines():
        try:
            net = ipaddress.ip_network(line.split()[0], strict=False)
        except (ValueError, IndexError):
            continue
        if isinstance(net, ipaddress.IPv4Network) and net.prefixlen >= 17:
            used.add(net)
    return used


def free_subnet() -> str:
    """A /24 prefix in 10.244.16-127.x with no route in it (other tests' pods differ)."""
    used = _used_pod_nets()
    thirds = list(range(16, 128))
    random.shuffle(thirds)
    for t in thirds:
        net = ipaddress.ip_network(f"10.244.{t}.0/24")
        if not any(u.overlaps(net) for u in used):
            return f"10.244.{t}"
    raise RuntimeError("no free /24 in 10.244.16.0-10.244.127.255")


@dataclass
class Pod:
    name: str
    netns: str
    host_if: str
    ip: str
    ifindex: int = 0
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def cmd(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]


class Topology:
    """Fresh namespaces for one trial: server, client and intruder pods."""

    def __init__(self, names: Sequence[str] = ("srv", "cli", "bad")) -> None:
        self.sfx = secrets.token_hex(3)
        self.names = names
        self.pods: dict[str, Pod] = {}
        self._ns: list[str] = []
        self._links: list[str] = []
        self._routes: list[str] = []

    def create(self) -> Topology:
        base = free_subnet()
        for i, name in enumerate(self.names):
            pod = Pod(name, f"axb-{self.sfx}-{name}", f"axb{self.sfx}{name[0]}", f"{base}.{10 + i}")
            self.pods[name] = pod
            self._add(pod)
        for p in self.pods.values():  # never send anything the uplink would see
            route = sh("ip", "-o", "route", "get", p.ip).stdout
            if f"dev {p.host_if}" not in route:
                raise RuntimeError(f"route to {p.ip} is not via {p.host_if}: {route}")
        return self

    def _add(self, pod: Pod) -> None:
        self._ns.append(pod.netns)  # recorded first: an interrupt never leaks it
        _testnet.add_netns(pod.netns)  # its own resolv.conf: never the host's resolver
        self._links.append(pod.host_if)
        sh("ip", "link", "add", pod.host_if, "type", "veth", "peer", "name", "eth0",
           "netns", pod.netns)
        sh("ip", "link", "set", pod.host_if, "up")
        sh("sysctl", "-qw", f"net.ipv4.conf.{pod.host_if}.proxy_arp=1")
        sh("ip", "-n", pod.netns, "link", "set", "lo", "up")
        sh("ip", "-n", pod.netns, "link", "set", "eth0", "up")
        sh("ip", "-n", pod.netns, "addr", "add", f"{pod.ip}/32", "dev", "eth0")
        sh("ip", "-n", pod.netns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link")
        sh("ip", "-n", pod.netns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0")
        host_mac = Path(f"/sys/class/net/{pod.host_if}/address").read_text().strip()
        sh("ip", "-n", pod.netns, "neigh", "replace", "169.254.1.1", "lladdr", host_mac,
           "dev", "eth0")
        pod_mac = sh("ip", "-n", pod.netns, "-o", "link", "show", "eth0").stdout \
            .split("link/ether")[1].split()[0]
        self._routes.append(f"{pod.ip}/32")
        sh("ip", "route", "add", f"{pod.ip}/32", "dev", pod.host_if)
        sh("ip", "neigh", "replace", pod.ip, "lladdr", pod_mac, "dev", pod.host_if)
        pod.ifindex = int(Path(f"/sys/class/net/{pod.host_if}/ifindex").read_text())

    def spawn(self, pod: str, *args: str, cpu: int | None = None) -> subprocess.Popen[str]:
        cmd = (["taskset", "-c", str(cpu)] if cpu is not None else []) + list(args)
        p = subprocess.Popen(self.pods[pod].cmd(*cmd), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.pods[pod].procs.append(p)
        return p

    def destroy(self) -> None:
        not_owner()
        for pod in self.pods.values():
            for p in pod.procs:
                if p.poll() is None:
                    try:
                        os.killpg(p.pid, signal.SIGKILL)  # our own session: ip netns exec + child
                    except ProcessLookupError:
                        pass
                try:
                    p.communicate(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        for link in self._links:
            sh("ip", "link", "del", link, check=False)
        for ns in self._ns:
            _testnet.del_netns(ns)
        for r in self._routes:
            sh("ip", "route", "del", r, check=False)


# ---- traffic -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    value: float
    rc: int


def _parse(out: str, word: str) -> float:
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == word:
            return float(parts[1])
    return 0.0


def client_run(topo: Topology, lg: str, pod: str, kind: str, ip: str, port: int,
               seconds: float, cpu: int | None) -> Run:
    p = topo.spawn(pod, lg, kind, ip, str(port), str(seconds), cpu=cpu)
    try:
        out, _ = p.communicate(timeout=seconds + 15)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        return Run(0.0, 124)
    return Run(_parse(out, "tps"), p.returncode)


def clients_parallel(topo: Topology, lg: str, runs: list[tuple[str, str, str, int]],
                     seconds: float) -> list[Run]:
    """Probes at once (each waits up to 1 s for an answer that should never come)."""
    procs = [topo.spawn(pod, lg, kind, ip, str(port), str(seconds)) for pod, kind, ip, port in runs]
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=seconds + 15)
            out.append(Run(_parse(text, "tps"), p.returncode))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            out.append(Run(0.0, 124))
    return out


def flood_run(topo: Topology, lg: str, seconds: float) -> Run:
    srv = topo.pods["srv"]
    sink = topo.spawn("srv", lg, "sink", str(SINK_PORT), str(seconds), cpu=0)
    time.sleep(0.2)
    fl = topo.spawn("cli", lg, "flood", srv.ip, str(SINK_PORT), str(seconds + 0.5), cpu=1)
    try:
        fl.communicate(timeout=seconds + 20)
        out, _ = sink.communicate(timeout=seconds + 20)
    except subprocess.TimeoutExpired:
        for p in (fl, sink):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        return Run(0.0, 124)
    return Run(_parse(out, "pps"), sink.returncode)


def wait_allowed(topo: Topology, lg: str, timeout: float = 5.0) -> bool:
    ip = topo.pods["srv"].ip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client_run(topo, lg, "cli", "udp_rr", ip, PORT, 0.1, None).rc == 0 and \
                client_run(topo, lg, "cli", "tcp_rr", ip, PORT, 0.1, None).rc == 0:
            return True
        time.sleep(0.1)
    return False


# ---- policies -----------------------------------------------------------------------------

def fake_ip(i: int) -> str:
    return str(FAKE_NET.network_address + 1 + i)


@dataclass
class PolicySet:
    """N peer identities with /32s in 10.244.128.0/17, each allowed on one port;
    the real client's identity is the largest, so datapaths that order rules
    by key put it LAST; the intruder has an identity but no allow."""

    n: int
    cli_ip: str
    bad_ip: str
    srv_ip: str

    @property
    def cli_id(self) -> int:
        return PEER_BASE_ID + self.n + 10

    @property
    def bad_id(self) -> int:
        return PEER_BASE_ID + self.n + 20

    def ipcache(self) -> dict[Any, int]:
        out = {ipaddress.ip_network(f"{fake_ip(i)}/32"): PEER_BASE_ID + i for i in range(self.n)}
        out[ipaddress.ip_network(f"{self.cli_ip}/32")] = self.cli_id
        out[ipaddress.ip_network(f"{self.bad_ip}/32")] = self.bad_id
        out[ipaddress.ip_network(f"{self.srv_ip}/32")] = SRV_ID
        return out

    def client_keys(self) -> list[Any]:
        from axoneme.core.mapstate import Direction, Key, Protocol

        return [Key(self.cli_id, Direction.INGRESS, Protocol.TCP, PORT, 16),
                Key(self.cli_id, Direction.INGRESS, Protocol.UDP, PORT, 16),
                Key(self.cli_id, Direction.INGRESS, Protocol.UDP, SINK_PORT, 16)]

    def mapstate(self) -> Any:
        from axoneme.core.mapstate import ALLOW, Direction, Key, MapState, Protocol

        entries = {}
        for i in range(self.n):
            proto = Protocol.TCP if i % 2 == 0 else Protocol.UDP
            entries[Key(PEER_BASE_ID + i, Direction.INGRESS, proto, PORT, 16)] = ALLOW
        for k in self.client_keys():
            entries[k] = ALLOW
        # egress is not enforced: the agent's convention is an allow-all wildcard
        entries[Key(0, Direction.EGRESS)] = ALLOW
        return MapState(entries)


def verify_last_position(ep_id: int, ps: PolicySet, mode: str) -> str:
    """Read iptables-save: the client's rules must come after N peer rules."""
    from axoneme.datapath.iptables import _render as rd

    chain = rd.ep_chain(ep_id, _ingress())
    rules = [line.split(" ", 2)[2] for line in sh("iptables-save", "-t", "filter").stdout.splitlines()
             if line.startswith(f"-A {chain} ")]
    mark = f"{ps.cli_ip}/32" if mode == "plain" else rd.set_name(ps.cli_id, 4)
    idx = [i for i, r in enumerate(rules) if mark in r]
    peers = [i for i, r in enumerate(rules) if "AXK:" in r and mark not in r]
    if not idx:
        raise RuntimeError(f"no rule for the client ({mark}) in {chain}")
    if len(peers) < ps.n or max(peers, default=-1) > min(idx):
        raise RuntimeError(f"client rule is not after the {ps.n} peer rules in {chain} "
                           f"(client at {idx}, {len(peers)} peer rules, last at {max(peers, default=-1)})")
    return f"{chain}: {len(rules)} rules, client rules at positions {idx[0] + 1}..{idx[-1] + 1}"


def verify_hooked(ep_id: int, host_if: str) -> None:
    """FORWARD reaches AXON-FWD, which sends traffic to the server to its chain."""
    from axoneme.datapath.iptables import _render as rd

    save = sh("iptables-save", "-t", "filter").stdout.splitlines()
    chain = rd.ep_chain(ep_id, _ingress())
    if not any(line.startswith("-A FORWARD ") and line.endswith(f"-j {rd.FWD_CHAIN}")
               for line in save):
        raise RuntimeError(f"FORWARD does not jump to {rd.FWD_CHAIN}")
    if not any(line.startswith(f"-A {rd.FWD_CHAIN} ") and f"-o {host_if} " in line
               and line.endswith(f"-j {chain}") for line in save):
        raise RuntimeError(f"{rd.FWD_CHAIN} does not send -o {host_if} to {chain}")


def _ingress() -> Any:
    from axoneme.core.mapstate import Direction

    return Direction.INGRESS


# ---- datapaths ---------------------------------------------------------------------------

class Conditions:
    """Creates datapaths on demand; the eBPF one is compiled once per session."""

    def __init__(self, tmp: str, max_n: int) -> None:
        self.tmp = tmp
        self.max_n = max_n
        self.bpffs = f"/sys/fs/bpf/axb-suite-{secrets.token_hex(4)}"
        self._ebpf: Any = None
        self.unavailable: dict[str, str] = {}
        self.ebpf_start_seconds = 0.0

    def ebpf(self) -> Any:
        if self._ebpf is None:
            from axoneme.core.datapath import DatapathConfig
            from axoneme.datapath.ebpf import EbpfDatapath

            dp = EbpfDatapath(DatapathConfig(
                state_dir=self.tmp, bpffs_root=self.bpffs, policy_map_max=self.max_n + 64,
                ipcache_max=self.max_n + 4096, ct_max=65536,
                options={"max_endpoints": 4, "policy_map_total": 2 * (self.max_n + 64)}))
            dp.probe()
            t0 = time.perf_counter()
            dp.start()
            self.ebpf_start_seconds = time.perf_counter() - t0
            self._ebpf = dp
        return self._ebpf

    def iptables(self, mode: str) -> Any:
        from axoneme.core.datapath import DatapathConfig
        from axoneme.datapath.iptables import IptablesDatapath

        # the bench's pods are not lxc*: no unknown-endpoint catch-all, which would
        # claim the pods of agents of other runs on this host
        dp = IptablesDatapath(DatapathConfig(state_dir=self.tmp, mode=mode,
                                             options={"events": False, "host_ifname_prefix": ""}))
        dp.probe()
        dp.start()
        return dp

    def get(self, cond: str) -> Any:
        if cond == "ebpf":
            return self.ebpf()
        if cond in ("iptables-plain", "iptables-stateful"):
            return self.iptables("plain")
        if cond == "iptables-ipset":
            return self.iptables("ipset")
        raise ValueError(cond)

    def release(self, cond: str, dp: Any) -> None:
        """After a trial: iptables datapaths are removed entirely; eBPF keeps its programs."""
        if cond.startswith("iptables"):
            try:
                dp.cleanup()
            except Exception:
                # another process's AXON- set may vanish between list and destroy: once more
                LOG.warning("iptables cleanup failed once, retrying", exc_info=True)
                time.sleep(0.5)
                dp.cleanup()

    def close(self) -> None:
        not_owner()
        if self._ebpf is not None:
            try:
                self._ebpf.cleanup()
            finally:
                self._ebpf = None
        shutil.rmtree(self.bpffs, ignore_errors=True)


def endpoint_for(pod: Pod, ep_id: int, identity: int = SRV_ID) -> Any:
    from axoneme.core.endpoint import Endpoint
    from axoneme.core.labels import Labels

    return Endpoint(id=ep_id, identity=identity, labels=Labels(), ipv4=pod.ip,
                    host_ifname=pod.host_if, host_ifindex=pod.ifindex, netns=pod.netns,
                    namespace="bench", pod_name=pod.name)


def _ipcache_changes(up: dict[Any, int] | None = None, deletes: Any = ()) -> Any:
    from axoneme.core.datapath import IPCacheChanges

    return IPCacheChanges(upserts=up or {}, deletes=frozenset(deletes))


# ---- results --------------------------------------------------------------------------------

@dataclass
class Trial:
    bench: str
    condition: str
    n: int
    rep: int
    metrics: dict[str, float] = field(default_factory=dict)
    enforced: bool = False
    proof: str = ""
    error: str = ""


@dataclass
class Results:
    plan: dict[str, Any]
    machine: dict[str, Any]
    trials: list[Trial] = field(default_factory=list)
    not_run: dict[str, str] = field(default_factory=dict)  # "bench/condition" -> reason
    extra: dict[str, Any] = field(default_factory=dict)

    def counted(self, bench: str, cond: str, n: int) -> list[Trial]:
        return [t for t in self.trials if t.bench == bench and t.condition == cond and t.n == n
                and t.enforced and not t.error]


def machine_info() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "python": platform.python_version(),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


# ---- B2/B3/B4: traffic trials --------------------------------------------------------------

def traffic_trial(cond: str, n: int, rep: int, conds: Conditions, lg: str, seconds: float,
                  ep_id: int) -> Trial:
    trial = Trial("traffic", cond, n, rep)
    topo = Topology()
    dp = None
    ep = None
    ps = None
    stateful = StatefulRule() if cond == "iptables-stateful" else None
    try:
        topo.create()
        srv, cli, bad = topo.pods["srv"], topo.pods["cli"], topo.pods["bad"]
        server = topo.spawn("srv", lg, "server", str(PORT), cpu=0)
        topo.spawn("srv", lg, "server", str(DENIED_PORT), cpu=0)
        time.sleep(0.1)
        if server.poll() is not None:
            raise RuntimeError(f"loadgen server exited: {server.communicate()[1]}")
        proof: list[str] = []
        if cond != "none":
            dp = conds.get(cond)
            ep = endpoint_for(srv, ep_id)
            ps = PolicySet(n, cli.ip, bad.ip, srv.ip)
            t0 = time.perf_counter()
            dp.ipcache_apply(_ipcache_changes(ps.ipcache()))
            dp.endpoint_added(ep, True, False)
            dp.sync(ep, ps.mapstate())
            trial.metrics["setup_s"] = time.perf_counter() - t0
            if cond.startswith("iptables"):
                proof.append(verify_last_position(ep_id, ps, "ipset" if cond == "iptables-ipset"
                                                  else "plain"))
                verify_hooked(ep_id, srv.host_if)
            if stateful is not None:
                stateful.install()
        if not wait_allowed(topo, lg):
            raise RuntimeError("the allowed client never got an answer")
        c0 = ebpf_counter(dp, ep, ps) if cond == "ebpf" else 0
        runs = {
            "udp_rr": client_run(topo, lg, "cli", "udp_rr", srv.ip, PORT, seconds, 0),
            "tcp_rr": client_run(topo, lg, "cli", "tcp_rr", srv.ip, PORT, seconds, 0),
            "tcp_crr": client_run(topo, lg, "cli", "tcp_crr", srv.ip, PORT, seconds, 0),
            "flood_pps": flood_run(topo, lg, seconds),
        }
        for k, r in runs.items():
            trial.metrics[k] = r.value
        allowed_ok = all(r.rc == 0 and r.value > 0 for r in runs.values())
        proof.append("allowed traffic: " + ", ".join(f"{k} rc={r.rc}" for k, r in runs.items()))
        if cond == "ebpf":
            moved = ebpf_counter(dp, ep, ps) - c0
            proof.append(f"allow counter moved by {moved} packets")
            allowed_ok = allowed_ok and moved > 0
        # the intruder (an identity with no allow) and a port nobody is allowed on
        d_udp, d_tcp, d_port = clients_parallel(topo, lg, [
            ("bad", "udp_rr", srv.ip, PORT), ("bad", "tcp_rr", srv.ip, PORT),
            ("cli", "tcp_rr", srv.ip, DENIED_PORT)], 0.5)
        dropped = d_udp.rc == 3 and d_tcp.rc == 3 and d_port.rc == 3 and \
            d_udp.value == d_tcp.value == d_port.value == 0
        proof.append(f"denied probes (intruder udp/tcp, client on port {DENIED_PORT}): "
                     f"rc={d_udp.rc}/{d_tcp.rc}/{d_port.rc}")
        if cond.startswith("iptables") and ps is not None:
            # other processes on this machine may run an AXON- cleanup; a trial whose
            # chains vanished measured nothing enforced and must not count
            try:
                verify_last_position(ep_id, ps, "ipset" if cond == "iptables-ipset" else "plain")
                verify_hooked(ep_id, srv.host_if)
            except RuntimeError as e:
                raise RuntimeError(f"policy chains changed under the trial "
                                   f"(another process's AXON- cleanup?): {e}") from e
        if cond == "none":
            # the baseline enforces nothing: the same probes must get through
            trial.enforced = allowed_ok and d_udp.rc == 0 and d_tcp.rc == 0
            proof.append("baseline: no policy, denied probes answered as expected"
                         if trial.enforced else "baseline probes did not behave")
        else:
            trial.enforced = allowed_ok and dropped
        trial.proof = "; ".join(proof)
    except Exception as e:
        trial.error = f"{type(e).__name__}: {e}"
        LOG.warning("trial %s N=%d rep %d failed: %s", cond, n, rep, traceback.format_exc())
    finally:
        if stateful is not None:
            stateful.remove()
        if dp is not None:
            _teardown_dp(cond, dp, ep, ps, conds)
        topo.destroy()
    return trial


def ebpf_counter(dp: Any, ep: Any, ps: PolicySet | None) -> int:
    if dp is None or ps is None:
        return 0
    return sum(dp.policy_counters(ep, k)[0] for k in ps.client_keys())


def _teardown_dp(cond: str, dp: Any, ep: Any, ps: PolicySet | None, conds: Conditions) -> None:
    not_owner()
    try:
        if cond == "ebpf":
            if ep is not None:
                dp.endpoint_removed(ep)
            if ps is not None:
                dp.ipcache_apply(_ipcache_changes(deletes=ps.ipcache().keys()))
        conds.release(cond, dp)
    except Exception:
        LOG.error("datapath teardown after %s failed", cond, exc_info=True)


# ---- B1: BPF_PROG_TEST_RUN ------------------------------------------------------------------

def bench_b1(plan: Plan, res: Results) -> None:
    """Per-packet cost of the real from-container program (egress policy lookup)."""
    try:
        from axoneme.core.datapath import DatapathConfig
        from axoneme.core.mapstate import ALLOW, Direction, Key, MapState, Protocol
        from axoneme.datapath.ebpf import EbpfDatapath, _bpf, _layout, _packets  # noqa: F401
    except Exception as e:
        res.not_run["B1/ebpf"] = f"eBPF datapath not importable: {e!r}"
        return
    root = f"/sys/fs/bpf/axb-b1-{secrets.token_hex(4)}"
    ep = endpoint_for(Pod("b1", "", "lo", "10.244.127.1", 1), 21, 4021)
    max_n = max(plan.b1_sizes)
    dp = EbpfDatapath(DatapathConfig(bpffs_root=root, policy_map_max=max_n + 16,
                                     ipcache_max=max_n + 4096, ct_max=4096,
                                     options={"max_endpoints": 4}))
    repeat = 20_000 if plan.quick else 200_000
    try:
        dp.probe()
        dp.start()
        dp._register(ep, 1, "lo")  # test runs only: nothing is attached to lo
        fd = dp.program_fd("from_container")
        for n in plan.b1_sizes:
            peers = {ipaddress.ip_network(f"{fake_ip(i)}/32"): PEER_BASE_ID + i for i in range(n)}
            dp.ipcache_apply(_ipcache_changes(peers))
            keys = {Key(PEER_BASE_ID + i, Direction.EGRESS, Protocol.TCP, PORT, 16): ALLOW
                    for i in range(n)}
            dp.sync(ep, MapState(keys))
            for rep in range(plan.reps):
                for kind in ("established", "policy-hot", "policy-random"):
                    t = Trial("B1", f"ebpf-{kind}", n, rep)
                    try:
                        t.metrics["ns_per_packet"], t.enforced, t.proof = _b1_once(
                            dp, fd, ep, n, kind, repeat)
                    except Exception as e:
                        t.error = f"{type(e).__name__}: {e}"
                    res.trials.append(t)
            dp.sync(ep, MapState())
            dp.ipcache_apply(_ipcache_changes(deletes=peers.keys()))
    except Exception as e:
        res.not_run["B1/ebpf"] = f"{type(e).__name__}: {e}"
        LOG.warning("B1 failed: %s", traceback.format_exc())
    finally:
        not_owner()
        try:
            dp.cleanup()
        except Exception:
            LOG.error("B1 cleanup failed", exc_info=True)
        shutil.rmtree(root, ignore_errors=True)


def _b1_once(dp: Any, fd: int, ep: Any, n: int, kind: str, repeat: int) -> tuple[float, bool, str]:
    """One B1 measurement. ``established``: the same allowed packet again and
    again, so after the first the verdict cached in the CT entry decides (the
    steady state of a connection). ``policy-*``: packets carry the proxy's
    upstream mark, which the program never answers from the CT cache, so every
    packet runs the full policy lookup (hot: one key; random: keys drawn
    uniformly from the N, 100 repetitions each)."""
    from axoneme.core.mapstate import Direction, Key, Protocol
    from axoneme.core.marks import MARK_MAGIC_PROXY_INGRESS
    from axoneme.datapath.ebpf import _bpf
    from axoneme.datapath.ebpf import _packets as P

    hot = n - 1
    mark = MARK_MAGIC_PROXY_INGRESS if kind.startswith("policy") else 0
    allowed = P.ipv4(ep.ipv4, fake_ip(hot), sport=40000, dport=PORT, flags=P.TCP_ACK,
                     payload=b"x" * 64)
    denied = P.ipv4(ep.ipv4, fake_ip(hot), sport=40001, dport=PORT + 7)
    hk = Key(PEER_BASE_ID + hot, Direction.EGRESS, Protocol.TCP, PORT, 16)
    c0 = dp.policy_counters(ep, hk)[0]
    ok = _bpf.prog_test_run(fd, allowed, mark=mark).retval == 0
    shot = _bpf.prog_test_run(fd, denied, mark=mark).retval == 2
    want = 1
    if kind != "policy-random":
        r = _bpf.prog_test_run(fd, allowed, repeat=repeat, mark=mark)
        ns = float(r.duration_ns)
        ok = ok and r.retval == 0
        if kind == "policy-hot":
            want = 1 + repeat
    else:
        per = 100
        durs = []
        rnd = random.Random(n)
        for _ in range(max(20, repeat // per // 4)):
            i = rnd.randrange(n)
            pkt = P.ipv4(ep.ipv4, fake_ip(i), sport=40000 + i % 20000, dport=PORT,
                         flags=P.TCP_ACK, payload=b"x" * 64)
            r = _bpf.prog_test_run(fd, pkt, repeat=per, mark=mark)
            ok = ok and r.retval == 0
            durs.append(r.duration_ns)
        ns = float(statistics.median(durs))
    moved = dp.policy_counters(ep, hk)[0] - c0
    enforced = ok and shot and moved >= want
    proof = (f"allowed -> TC_ACT_OK: {ok}, denied port -> TC_ACT_SHOT: {shot}, "
             f"hot-key counter +{moved} (need >= {want})")
    return ns, enforced, proof


# ---- B5/B6: one change and full resync through Datapath ------------------------------------

def bench_b5_b6(plan: Plan, res: Results, conds: Conditions, order: list[str]) -> None:
    from axoneme.core.mapstate import ALLOW, Direction, Key, MapChanges, MapState, Protocol

    for cond in order:
        for n in plan.b5_sizes:
            prev = [(t.n, t.metrics["sync_s"]) for t in res.trials
                    if t.bench == "B6" and t.condition == cond and "sync_s" in t.metrics]
            if prev:
                pn, ps_ = max(prev)
                if ps_ * n / pn > plan.setup_budget_s:
                    res.not_run[f"B5/{cond}/N={n}"] = (
                        f"loading N={n:,} entries would take ~{ps_ * n / pn:.0f} s (extrapolated "
                        f"from N={pn:,}), over the {plan.setup_budget_s:.0f} s budget")
                    continue
            topo = Topology(("srv", "cli", "bad"))
            dp = ep = ps = None
            lock = iptables_host_lock(cond)
            lock.__enter__()
            t5 = Trial("B5", cond, n, 0)
            t6 = Trial("B6", cond, n, 0)
            try:
                topo.create()
                srv = topo.pods["srv"]
                dp = conds.get(cond)
                ep = endpoint_for(srv, random.randrange(60_000, 62_000))
                ps = PolicySet(n, topo.pods["cli"].ip, topo.pods["bad"].ip, srv.ip)
                state = ps.mapstate()
                extra_id = ps.bad_id  # has an ipcache entry: the change is a real rule
                dp.ipcache_apply(_ipcache_changes(ps.ipcache()))
                dp.endpoint_added(ep, True, False)
                dp.sync(ep, MapState({Key(0, Direction.EGRESS): ALLOW}))
                t0 = time.perf_counter()
                dp.sync(ep, state)
                t6.metrics["sync_s"] = time.perf_counter() - t0
                got = dp.dump(ep)
                t6.enforced = got == state
                t6.proof = f"dump() holds the {len(state)} entries: {t6.enforced}"
                key = Key(extra_id, Direction.INGRESS, Protocol.TCP, PORT, 16)
                iters = plan.b5_iters_ebpf if cond == "ebpf" else plan.b5_iters_ipt
                lat: list[float] = []
                checked = False
                cell_start = time.monotonic()
                for it in range(iters):
                    if it >= 2 and time.monotonic() - cell_start > plan.b5_budget_s:
                        break
                    add = MapChanges(adds={key: ALLOW})
                    t0 = time.perf_counter()
                    dp.apply(ep, add)
                    lat.append(time.perf_counter() - t0)
                    if not checked:
                        checked = dp.dump(ep).get(key) == ALLOW
                    t0 = time.perf_counter()
                    dp.apply(ep, MapChanges(deletes=frozenset({key})))
                    lat.append(time.perf_counter() - t0)
                lat.sort()
                t5.metrics["p50_s"] = lat[len(lat) // 2]
                t5.metrics["p99_s"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
                t5.metrics["samples"] = len(lat)
                gone = key not in dp.dump(ep)
                t5.enforced = checked and gone
                t5.proof = f"after the add dump() held the key: {checked}; after the delete it was gone: {gone}"
            except Exception as e:
                t5.error = t6.error = f"{type(e).__name__}: {e}"
                LOG.warning("B5/B6 %s N=%d failed: %s", cond, n, traceback.format_exc())
            finally:
                if dp is not None:
                    _teardown_dp(cond, dp, ep, ps, conds)
                topo.destroy()
                lock.__exit__(None, None, None)
            res.trials += [t5, t6]


# ---- B7 and B5 through the agent ------------------------------------------------------------

def _mem_split_mb(pid: int) -> dict[str, float]:
    """RssAnon, RssFile (file-backed pages: shared libraries, e.g. the BPF
    compiler's code, shared with every other process mapping them) and PSS."""
    out: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("RssAnon:", "RssFile:")):
                out[line.split(":")[0].lower()] = int(line.split()[1]) / 1024
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss"] = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def bench_b7(plan: Plan, res: Results, conds: Conditions) -> None:
    """Agent start through the real CLI, and eBPF compile/populate/RSS via the Datapath."""
    from axoneme.core.mapstate import ALLOW, Direction, Key, MapState, Protocol

    # Datapath level: compile (first start of the session), populate, RSS growth
    try:
        dp = conds.ebpf()
        t = Trial("B7", "ebpf-datapath", plan.b7_populate, 0)
        t.metrics["compile_s"] = conds.ebpf_start_seconds
        topo = Topology(("srv",))
        try:
            topo.create()
            ep = endpoint_for(topo.pods["srv"], random.randrange(62_000, 64_000))
            dp.endpoint_added(ep, True, False)
            rss0 = _rss_kb(os.getpid())
            state = MapState({Key(PEER_BASE_ID + i, Direction.INGRESS, Protocol.TCP, PORT, 16): ALLOW
                              for i in range(plan.b7_populate)})
            t0 = time.perf_counter()
            dp.sync(ep, state)
            t.metrics["populate_s"] = time.perf_counter() - t0
            t.metrics["rss_mb"] = _rss_kb(os.getpid()) / 1024
            t.metrics["rss_growth_mb"] = (_rss_kb(os.getpid()) - rss0) / 1024
            t.enforced = len(dp.dump(ep)) == plan.b7_populate
            t.proof = f"dump() holds {plan.b7_populate} entries: {t.enforced}"
            dp.endpoint_removed(ep)
        finally:
            topo.destroy()
        res.trials.append(t)
    except Exception as e:
        res.not_run["B7/ebpf-datapath"] = f"{type(e).__name__}: {e}"

    for cond, args in (("ebpf", ["--datapath", "ebpf"]),
                       ("iptables-plain", ["--datapath", "iptables", "--iptables-mode", "plain"]),
                       ("iptables-ipset", ["--datapath", "iptables", "--iptables-mode", "ipset"])):
        for rep in range(1 if plan.quick else 3):
            t = Trial("B7", f"agent-{cond}", 0, rep)
            try:
                with iptables_host_lock(cond):
                    t.metrics.update(agent_start(args))
                t.enforced = True
                t.proof = "agent answered /v1/healthz"
            except Exception as e:
                t.error = f"{type(e).__name__}: {e}"
            res.trials.append(t)


def agent_start(args: list[str]) -> dict[str, float]:
    work = tempfile.mkdtemp(prefix="axb-", dir="/tmp")
    sock = os.path.join(work, "a.sock")
    state = os.path.join(work, "state")
    env = dict(os.environ, AXONEME_API_SOCKET=sock,
               PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}")
    log = open(os.path.join(work, "agent.log"), "wb")
    cmd = [AXONEME, "agent", "run", *args, "--state-dir", state, "--api-socket", sock,
           "--pod-cidr", free_subnet() + ".0/24",
           "--bpffs-root", f"/sys/fs/bpf/axb-agent-{secrets.token_hex(4)}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    try:
        from axoneme.agent.client import AgentClient, AgentUnreachable

        client = AgentClient(sock, timeout=2.0)
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited {proc.returncode}: "
                                   f"{Path(work, 'agent.log').read_text(errors='replace')[-500:]}")
            try:
                client.get("/v1/healthz")
                break
            except AgentUnreachable:
                if time.monotonic() > deadline:
                    raise RuntimeError("agent not healthy after 120 s") from None
                time.sleep(0.02)
        ready = time.perf_counter() - t0
        return {"ready_s": ready, "rss_mb": _rss_kb(proc.pid) / 1024}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        log.close()
        subprocess.run([AXONEME, "agent", "cleanup", "--state-dir", state], capture_output=True,
                       env=env, timeout=120)
        shutil.rmtree(work, ignore_errors=True)


class Agent:
    """One ``axoneme agent run`` with its own state dir, socket and pod CIDR.

    With ``node=True`` the agent (and every CLI call of ours) runs in a network
    namespace of its own that plays a node (``nsenter --net`` only: the pod
    namespaces it mounts stay visible): its chains, routes and pods live
    there, so an iptables agent never meets the host's chains or the
    cluster's agent and needs no host lock. The node has no uplink."""

    def __init__(self, args: list[str], node: bool = False, netns: str = "",
                 pod_cidr: str = "") -> None:
        """``netns``: run in this existing namespace of the caller's (it stays)."""
        self.work = tempfile.mkdtemp(prefix="axb-", dir="/tmp")
        self.sock = os.path.join(self.work, "a.sock")
        self.state = os.path.join(self.work, "state")
        self.env = dict(os.environ, AXONEME_API_SOCKET=self.sock,
                        PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}")
        # an installed agent starts from compiled bytecode (pip writes it): a
        # session's PYTHONDONTWRITEBYTECODE made every start (and the restart
        # measured) compile the changed sources again
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.node = ""
        self.prefix: list[str] = []
        if netns:
            self.prefix = ["nsenter", f"--net=/run/netns/{netns}"]
        elif node:
            from axoneme.testing.netns import add_netns

            self.node = add_netns(f"axb-node-{os.getpid()}-{secrets.token_hex(3)}")
            self.prefix = ["nsenter", f"--net=/run/netns/{self.node}"]
            subprocess.run([*self.prefix, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True,
                           capture_output=True)
        # its own bpffs root: pinned maps are never shared with another agent
        # (a default-root agent of a test running beside the suite)
        self.cmd = [*self.prefix, AXONEME, "agent", "run", *args, "--state-dir", self.state,
                    "--api-socket", self.sock, "--pod-cidr",
                    pod_cidr or ("10.244.16" if node else free_subnet()) + ".0/24",
                    "--bpffs-root", f"/sys/fs/bpf/axb-agent-{secrets.token_hex(4)}"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120) -> float:
        from axoneme.agent.client import AgentClient, AgentUnreachable

        log = open(os.path.join(self.work, "agent.log"), "wb")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        log.close()
        client = AgentClient(self.sock, timeout=2.0)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}: {self.log()[-400:]}")
            try:
                client.get("/v1/healthz")
                return time.perf_counter() - t0
            except AgentUnreachable:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agent not healthy after {timeout:.0f} s") from None
                time.sleep(0.02)

    def log(self) -> str:
        try:
            return Path(self.work, "agent.log").read_text(errors="replace")
        except OSError:
            return ""

    def api(self, timeout: float = 600, keep_alive: bool = False) -> Any:
        from axoneme.agent.client import AgentClient

        return AgentClient(self.sock, timeout=timeout, keep_alive=keep_alive)

    def cli(self, *args: str, timeout: float = 120) -> str:
        res = subprocess.run([*self.prefix, AXONEME, *args], capture_output=True, text=True,
                             env=self.env, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"axoneme {' '.join(args[:3])} -> {res.returncode}: "
                               f"{res.stderr.strip()[-300:]}")
        return res.stdout

    def close(self) -> None:
        not_owner()
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(10)
            subprocess.run([*self.prefix, AXONEME, "agent", "cleanup", "--state-dir", self.state],
                           capture_output=True, env=self.env, timeout=300)
        finally:
            shutil.rmtree(self.work, ignore_errors=True)
            if self.node:  # its veths, routes and chains go with it
                from axoneme.testing.netns import del_netns

                del_netns(self.node)


def _cnp(name: str, ingress: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "srv"}}, "ingress": ingress}}


def _ports(*protos: str) -> list[dict[str, Any]]:
    return [{"ports": [{"port": str(PORT), "protocol": p} for p in protos]}]


def bench_b5_agent(plan: Plan, res: Results, lg: str, order: list[str]) -> None:
    """One policy change end to end through the agent API: POST /v1/policies with
    a policy allowing the client pod -> the first UDP echo the client gets
    through the kernel (a prober in the client pod sends every 2 ms), with N
    fromCIDR /32 peers already in force."""
    # N fromCIDR peers x (TCP, UDP) entries: size the policy map for it (the
    # default 16,384, Cilium's too, holds N = 8k)
    map_max = str(2 * max(plan.b5a_sizes) + 64)
    args = {"ebpf": ["--datapath", "ebpf", "--policy-map-max", map_max],
            "iptables-plain": ["--datapath", "iptables", "--iptables-mode", "plain"],
            "iptables-ipset": ["--datapath", "iptables", "--iptables-mode", "ipset"]}
    # AXONEME_B5A_CONDITIONS=ebpf,iptables-plain: these, in this order
    only = [c for c in os.environ.get("AXONEME_B5A_CONDITIONS", "").split(",") if c in args]
    for cond in only or order:
        # every agent in a node netns of its own: no host lock, one topology for all
        _b5_agent_one(plan, res, lg, cond, args[cond])


def _b5_agent_one(plan: Plan, res: Results, lg: str, cond: str, args: list[str]) -> None:
    agent = Agent(args, node=True)
    try:
        agent.start()
        agent.cli("namespace", "create", "bench")
        agent.cli("pod", "run", "srv", "-n", "bench", "--labels", "app=srv", "--",
                  lg, "server", str(PORT))
        agent.cli("pod", "run", "cli", "-n", "bench", "--labels", "app=cli", "--",
                  "sleep", "86400")
        pods = {p["name"]: p for p in json.loads(agent.cli("pod", "list", "-o", "json"))}
        eps = {e["pod"]: e for e in json.loads(agent.cli("endpoint", "list", "-o", "json"))}
        srv_ip, cli_ns = pods["srv"]["ip"], eps["bench/cli"]["netns"]
        srv_ep = eps["bench/srv"]["id"]
        # one connection kept for every request, as a controller's client does
        # (the CLI, a process per call, makes one per call; B5CUT)
        api = agent.api(keep_alive=True)
    except Exception as e:
        res.not_run[f"B5/agent-{cond}"] = f"agent unusable: {type(e).__name__}: {e}"
        agent.close()
        return
    try:
        for n in plan.b5a_sizes[:1] if plan.quick else plan.b5a_sizes:
            prev = [(t.n, t.metrics["base_apply_s"]) for t in res.trials
                    if t.condition == f"agent-{cond}" and "base_apply_s" in t.metrics]
            if prev and max(prev)[1] * n / max(prev)[0] > plan.b5a_setup_budget_s:
                pn, pv = max(prev)
                res.not_run[f"B5/agent-{cond}/N={n}"] = (
                    f"applying the N={n:,} base policy through the agent would take "
                    f"~{pv * n / pn:.0f} s (extrapolated from N={pn:,}), over the "
                    f"{plan.b5a_setup_budget_s:.0f} s budget")
                break
            t = Trial("B5", f"agent-{cond}", n, 0)
            try:
                _b5_agent_cell(plan, t, api, lg, srv_ip, cli_ns, srv_ep, n,
                               agent.proc.pid if agent.proc is not None else 0)
            except Exception as e:
                t.error = f"{type(e).__name__}: {e}"
                LOG.warning("B5 agent %s N=%d: %s", cond, n, traceback.format_exc())
            res.trials.append(t)
            if t.error:
                break  # a bigger N will not go better
        else:
            if not plan.quick and cond == "ebpf":
                res.trials.append(_agent_adopt(agent, plan.b5a_sizes[-1], srv_ep))
    finally:
        api.close()
        agent.close()


def _timed_get(api: Any, path: str) -> float:
    t0 = time.perf_counter()
    api.get(path)
    return time.perf_counter() - t0


def _views_timed(t: Trial, api: Any, srv_ep: int, get: bool = True) -> None:
    """The read paths at this policy size: status and lists must not grow with
    it (O(1) in policy size); endpoint get is O(that endpoint's entries)."""
    for name, path in (("status_s", "/v1/status"), ("ep_list_s", "/v1/endpoints"),
                       ("pol_list_s", "/v1/policies")):
        t.metrics[name] = min(_timed_get(api, path) for _ in range(3))
    if get:
        t.metrics["ep_get_s"] = _timed_get(api, f"/v1/endpoints/{srv_ep}")


def _agent_adopt(agent: Agent, n: int, srv_ep: int) -> Trial:
    """With the N-peer policy in force (N CIDR identities): the agent's RSS,
    then a restart that adopts the state (SIGTERM keeps the kernel's state;
    the new agent reloads its state file and the pinned maps) until healthy,
    its RSS again, and proof the kernel still holds the computed policy."""
    t = Trial("B5", "agent-ebpf-adopt", n, 0)
    try:
        assert agent.proc is not None
        t.metrics["rss_mb_before"] = _rss_kb(agent.proc.pid) / 1024
        t.metrics.update({f"{k}_mb_before": v for k, v in _mem_split_mb(agent.proc.pid).items()})
        t.metrics["identities"] = len(agent.api().get("/v1/identities"))
        agent.proc.send_signal(signal.SIGTERM)
        agent.proc.wait(120)
        t.metrics["ready_s"] = agent.start(timeout=300)
        # an adopting restart answers /v1/healthz before its policy state is
        # rebuilt in the background (agent/_checkpoint.py); every other request
        # waits for the rebuild, the first one measures it
        t0 = time.perf_counter()
        t.metrics["adopting"] = float(bool(agent.api().get("/v1/healthz").get("adopting")))
        agent.api().get("/v1/status")
        t.metrics["rebuilt_s"] = t.metrics["ready_s"] + time.perf_counter() - t0
        t.metrics["rss_mb"] = _rss_kb(agent.proc.pid) / 1024
        t.metrics.update({f"{k}_mb": v for k, v in _mem_split_mb(agent.proc.pid).items()})
        metrics = subprocess.run(["curl", "-s", "--unix-socket", agent.sock, "http://x/metrics"],
                                 capture_output=True, text=True, timeout=60).stdout
        compile_s = [float(line.split()[-1]) for line in metrics.splitlines()
                     if "compile_seconds" in line and not line.startswith("#")]
        t.metrics["datapath_load_s"] = compile_s[0] if compile_s else float("nan")
        api = agent.api()
        view = api.get(f"/v1/endpoints/{srv_ep}")
        held = len(view.get("datapath") or [])
        t.enforced = bool(view.get("in_sync")) and held >= n
        t.proof = (f"after the restart the kernel's copy equals the computed policy "
                   f"(in_sync {view.get('in_sync')}, {held:,} entries)")
        _views_timed(t, api, srv_ep)
    except Exception as e:
        t.error = f"{type(e).__name__}: {e}"
        LOG.warning("agent adopt N=%d: %s", n, traceback.format_exc())
    return t


def _probe(lg: str, cli_ns: str, srv_ip: str, seconds: float,
           gap_us: int = 100, rt: bool = False) -> subprocess.Popen[str]:
    """``rt``: the measuring prober runs SCHED_FIFO, so that it sends its next
    probe when its gap ends, not when the two vCPUs are free of what the change
    set going after the map write (the agent's journal sync and answer, this
    client reading it): at N = 1k its lag after the kernel's map write fell
    from 0.11-0.25 to 0.07-0.10 ms p50 (ANALYSIS.md B5PROBE). It sleeps
    between probes (~5 us of CPU a probe), so it takes little from the agent."""
    prio = ["chrt", "-f", "10"] if rt else []
    return subprocess.Popen([*prio, "nsenter", f"--net={cli_ns}", lg, "udp_wait", srv_ip,
                             str(PORT), str(seconds), str(gap_us)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


# The waiting prober's gap: 100 us for eBPF (sub-ms latencies); 2 ms for
# iptables, whose per-packet rule walk at N = 10k+ would turn 10k denied
# packets a second into the machine's bottleneck (B2: ipset 10k forwards
# ~150 packets/s) and slow the very change being measured.
PROBE_GAP_US = {"agent-ebpf": 100}


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _b5_agent_cell(plan: Plan, t: Trial, api: Any, lg: str, srv_ip: str, cli_ns: str,
                   srv_ep: int, n: int, pid: int = 0) -> None:
    doc = lambda obj: {"documents": [{"file": "bench", "index": 0, "obj": obj}]}  # noqa: E731
    base = _cnp("peers", [{"fromCIDR": [f"{fake_ip(i)}/32" for i in range(n)],
                           "toPorts": _ports("TCP", "UDP")}])
    cpu0 = _cpu_s(pid) if pid else 0.0
    t0 = time.perf_counter()
    # the agent applies synchronously: the POST returns once the kernel holds the policy
    api.post("/v1/policies", doc(base))
    t.metrics["base_apply_s"] = time.perf_counter() - t0
    if pid:
        # the agent's own CPU time for it: what a shared, loaded machine does not inflate
        t.metrics["base_apply_cpu_s"] = _cpu_s(pid) - cpu0
    # proof (not timed): the kernel's copy (dump) equals the computed policy, N peers in it
    t1 = time.perf_counter()
    view = api.get(f"/v1/endpoints/{srv_ep}")
    dp = view.get("datapath") or []
    size = len(dp) if isinstance(dp, list | dict) else 0
    if not view.get("in_sync") or size < n:
        raise RuntimeError(f"N={n} policy not in the datapath after the POST returned (holds "
                           f"{size}, in_sync {view.get('in_sync')})")
    t.metrics["verify_get_s"] = t.metrics["ep_get_s"] = time.perf_counter() - t1
    _views_timed(t, api, srv_ep, get=False)
    change = _cnp("client", [{"fromEndpoints": [{"matchLabels": {"app": "cli"}}],
                              "toPorts": _ports("UDP")}])
    lat: list[float] = []
    echo_lat: list[float] = []
    api_lat: list[float] = []
    denied_before = True
    start = time.monotonic()
    iters = 20 if t.condition == "agent-ebpf" and not plan.quick else plan.b5_iters_ipt
    # a change may take as long as the base load did (iptables re-renders): the
    # prober and the revocation wait get that long and two minutes more
    wait_s = 120 + 3 * t.metrics["base_apply_s"]
    for it in range(iters):
        ran = time.monotonic() - start
        if (it >= 3 and ran > plan.b5_budget_s) or (it >= 1 and ran > plan.b5a_cell_cap_s):
            break
        # the client must be denied before the change
        before = _probe(lg, cli_ns, srv_ip, 0.3)
        before.communicate(timeout=30)
        denied_before = denied_before and before.returncode == 3
        prober = _probe(lg, cli_ns, srv_ip, wait_s, PROBE_GAP_US.get(t.condition, 2000),
                        rt=True)
        time.sleep(0.05)  # the prober is sending before the change
        # CLOCK_MONOTONIC both here and in the prober (it prints when the echo came)
        t0 = time.monotonic()
        resp = api.post("/v1/policies", doc(change))
        api_lat.append(time.monotonic() - t0)
        out, err = prober.communicate(timeout=wait_s + 60)
        if prober.returncode != 0:
            faults = api.get("/v1/status").get("faults")
            raise RuntimeError(f"the client was never allowed after the change (prober exit "
                               f"{prober.returncode}: {out.strip()} {err.strip()[-200:]}; round "
                               f"{it}; the POST's errors {resp.get('errors')}; faults {faults})")
        words = out.split()
        # enforced in the kernel: when the send of the first request it let
        # through returned (the verdict is taken inside that send on a veth);
        # the answer's arrival in the prober adds the echo's two wake-ups
        lat.append(float(words[words.index("sent") + 1]) - t0)
        echo_lat.append(float(words[words.index("at") + 1]) - t0)
        api.post("/v1/policies/delete", {"refs": [{"kind": "CiliumNetworkPolicy",
                                                   "namespace": "bench", "name": "client"}]})
        # wait for the revocation to reach the kernel before the next round
        revoke_by = time.monotonic() + wait_s
        while time.monotonic() < revoke_by:
            p = _probe(lg, cli_ns, srv_ip, 0.05)
            p.communicate(timeout=30)
            if p.returncode == 3:
                break
    lat.sort()
    api_lat.sort()
    t.metrics["p50_s"] = lat[len(lat) // 2]
    t.metrics["p99_s"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    t.metrics["api_p50_s"] = api_lat[len(api_lat) // 2]
    echo_lat.sort()
    t.metrics["echo_p50_s"] = echo_lat[len(echo_lat) // 2]
    t.metrics["samples"] = len(lat)
    t.enforced = denied_before and len(lat) > 0
    t.proof = (f"client denied before every change: {denied_before}; after each change its UDP "
               f"echo came back ({len(lat)} rounds)")


# ---- the suite ------------------------------------------------------------------------------

def over_budget(res: Results, cond: str, n: int, budget: float) -> str:
    """Why (cond, n) is skipped: its policy setup (measured at n, or extrapolated
    linearly from the largest smaller N) exceeds the per-trial budget."""
    for t in res.trials:
        if t.bench == "traffic" and t.condition == cond and t.n == n and "timed out" in t.error:
            return f"policy setup timed out in an earlier repetition ({t.error[:160]})"
    setups = [(t.n, t.metrics["setup_s"]) for t in res.trials
              if t.bench == "traffic" and t.condition == cond and "setup_s" in t.metrics
              and t.n <= n]
    if not setups:
        return ""
    m = max(x for x, _ in setups)
    est = statistics.median([v for x, v in setups if x == m]) * n / m
    if est > budget:
        how = "measured" if m == n else f"extrapolated from N={m:,}"
        return (f"policy setup (ipcache_apply + endpoint_added + sync) takes {est:.0f} s per "
                f"trial ({how}), over the {budget:.0f} s per-trial budget of this session")
    return ""


def run_suite(plan: Plan, progress: Callable[[str], None] = lambda s: None,
              benches: Sequence[str] = ("B1", "B2", "B5", "B5A", "B7")) -> Results:
    """Everything: B1, B2/B3/B4 (one traffic trial measures RR, CRR and flood),
    B5/B6 and B7. Conditions round-robin in a shuffled order per repetition."""
    if os.geteuid() != 0:
        raise PermissionError("the benchmark suite needs root (netns, veth, BPF, iptables)")
    global OWNER_PID
    OWNER_PID = os.getpid()
    rnd = random.Random(plan.seed)
    res = Results(plan=asdict(plan), machine=machine_info())
    tmp = tempfile.mkdtemp(prefix="axbench-")
    guard = Guard()
    max_n = max(max(v) for v in plan.sizes.values())
    max_n = max(max_n, max(plan.b5_sizes), plan.b7_populate)
    conds = Conditions(tmp, max_n)
    old_fwd = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
    try:
        guard.install()  # before anything that could forward
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1")
        lg = build_loadgen(tmp)
        for cond in CONDITIONS[1:]:
            try:
                if cond == "ebpf":
                    conds.ebpf()
                else:
                    conds.release(cond, conds.get(cond))
            except Exception as e:
                conds.unavailable[cond] = f"{type(e).__name__}: {e}"
                res.not_run[f"datapath/{cond}"] = conds.unavailable[cond]
        if "B1" in benches:
            progress("B1: BPF_PROG_TEST_RUN")
            bench_b1(plan, res)
        if "B2" in benches:
            items = [(c, n) for c in CONDITIONS for n in plan.sizes[c] if c not in conds.unavailable]
            # endpoint ids far from what agents on this machine allocate
            ep_id = rnd.randrange(20_000, 60_000)
            for rep in range(plan.reps):
                rnd.shuffle(items)
                if rep == 0:
                    # the first round keeps each condition's N ascending (conditions still
                    # interleave at random) so the setup budget can extrapolate before a big N
                    for cond in {c for c, _ in items}:
                        slots = [i for i, (c, _) in enumerate(items) if c == cond]
                        ns = sorted(items[i][1] for i in slots)
                        for i, n in zip(slots, ns, strict=True):
                            items[i] = (cond, n)
                for cond, n in items:
                    ep_id += 1
                    reason = over_budget(res, cond, n, plan.setup_budget_s)
                    if reason:
                        res.not_run[f"B2/{cond}/N={n}"] = reason
                        progress(f"skip {cond} N={n}: {reason}")
                        continue
                    progress(f"traffic rep {rep + 1}/{plan.reps}: {cond} N={n}")
                    with iptables_host_lock(cond):
                        t = traffic_trial(cond, n, rep, conds, lg, plan.seconds, ep_id)
                    res.trials.append(t)
                    if t.error or not t.enforced:
                        progress(f"  NOT COUNTED: {t.error or t.proof}")
        if "B5" in benches:
            order = [c for c in ("ebpf", "iptables-plain", "iptables-ipset")
                     if c not in conds.unavailable]
            rnd.shuffle(order)
            progress(f"B5/B6: {order}")
            bench_b5_b6(plan, res, conds, order)
        if "B5A" in benches:
            order = [c for c in ("ebpf", "iptables-plain", "iptables-ipset")
                     if c not in conds.unavailable]
            rnd.shuffle(order)
            progress(f"B5 through the agent API: {order}")
            bench_b5_agent(plan, res, lg, order)
        if "B7" in benches:
            progress("B7: agent start")
            bench_b7(plan, res, conds)
        res.extra["ebpf_start_seconds"] = conds.ebpf_start_seconds
        res.machine["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    finally:
        not_owner()
        conds.close()
        # the iptables datapath owns AXON- chains/ipsets: one last cleanup in case a trial died
        for mode in ("plain", "ipset"):
            if "iptables-" + mode not in conds.unavailable:
                try:
                    conds.iptables(mode).cleanup()
                except Exception:
                    LOG.debug("final iptables cleanup (%s)", mode, exc_info=True)
        if old_fwd == "0":
            sh("sysctl", "-qw", "net.ipv4.ip_forward=0", check=False)
        guard.remove()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def run_xnode(plan: Plan, res: Results, progress: Callable[[str], None]) -> None:
    """XNODE (tests/bench/xnode.py): cross-node traffic through agents in node
    namespaces of its own; nothing on the host's network, so no guard or lock."""
    if os.geteuid() != 0:
        raise PermissionError("the benchmark suite needs root (netns, veth, BPF, iptables)")
    X = sibling("xnode")
    xplan = X.XPlan.quick() if plan.quick else X.XPlan()
    only = xnode_conds()
    if only:
        import dataclasses

        xplan = dataclasses.replace(xplan, conds=tuple(only))
    tmp = tempfile.mkdtemp(prefix="axbench-xnode-")
    try:
        X.bench_xnode(sys.modules[__name__], xplan, res, build_loadgen(tmp), plan.seed, progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    res.machine["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())


def xnode_conds() -> list[str]:
    """AXONEME_XNODE_CONDS=none,ebpf,ebpf-devices,...: these XNODE conditions only."""
    return [c for c in os.environ.get("AXONEME_XNODE_CONDS", "").split(",") if c]


def sibling(name: str) -> Any:
    """A module next to this file (tests/bench is not a package)."""
    import importlib.util

    key = f"axoneme_bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


def _group(bench: str, cond: str) -> str:
    if bench == "traffic":
        return "B2"
    if bench in ("B5", "B6"):
        return "B5A" if cond.startswith("agent-") else "B5"
    return bench


def merge(res: Results, old: dict[str, Any], ran: Sequence[str]) -> None:
    """Keep an earlier run's trials of the benchmarks not run now (same plan
    shape); with AXONEME_B5A_CONDITIONS, B5A trials of the other conditions too."""
    only = {f"agent-{c}" for c in os.environ.get("AXONEME_B5A_CONDITIONS", "").split(",") if c}

    def kept(group: str, cond: str) -> bool:
        # agent-ebpf-adopt (the restart after agent-ebpf's cells) goes with agent-ebpf
        return group not in ran or (group == "B5A" and bool(only)
                                    and cond.removesuffix("-adopt") not in only)

    for t in old["trials"]:
        if kept(_group(t["bench"], t["condition"]), t["condition"]):
            res.trials.append(Trial(**t))
    for k, v in old["not_run"].items():
        head, _, rest = k.partition("/")
        group = "B5A" if head == "B5" and rest.startswith("agent-") else head
        if kept(group, rest.split("/")[0]) and k not in res.not_run:
            res.not_run[k] = v
    res.plan = old["plan"]
    res.machine = {**old["machine"], "merged_date": res.machine["date"]}
    res.extra = {**old.get("extra", {}), **res.extra,
                 "merged_elapsed_s": old.get("extra", {}).get("elapsed_s", 0)}
    res.extra["command"] = old.get("extra", {}).get("command", "scripts/bench")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "bench-results"))
    ap.add_argument("--quick", action="store_true",
                    default=os.environ.get("AXONEME_BENCH_QUICK") == "1")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--only", default="B1,B2,B5,B5A,B7,XNODE",
                    help="comma list of B1,B2,B5,B5A,B7,XNODE (cross-node, tests/bench/xnode.py)")
    ap.add_argument("--merge", help="results.json of an earlier run: keep its trials of the "
                    "benchmarks not run now")
    ap.add_argument("--report-only", metavar="RESULTS_JSON",
                    help="only (re)write the report and charts from a results.json")
    a = ap.parse_args(argv)
    if a.report_only:
        d = json.loads(Path(a.report_only).read_text())
        res = Results(plan=d["plan"], machine=d["machine"],
                      trials=[Trial(**t) for t in d["trials"]], not_run=d["not_run"],
                      extra=d.get("extra", {}))
        out = Path(a.out)
        sibling("report").write_report(res, out, res.extra.get("command", "scripts/bench"),
                                       float(res.extra.get("elapsed_s", 0)))
        print(f"report: {out / 'README.md'}")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    plan = Plan.make(a.quick, a.seed)

    main_pid = os.getpid()

    def _stop(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:
            # a forked child (multiprocessing, a helper's fork): die as by default,
            # never run the suite's cleanup there
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every cleanup

    # a background launch (nohup, &) ignores SIGINT: make both signals clean up
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    t0 = time.time()
    benches = [b.strip().upper() for b in a.only.split(",") if b.strip()]
    unknown = set(benches) - {"B1", "B2", "B5", "B5A", "B7", "XNODE"}
    if unknown:
        ap.error(f"--only: unknown benchmark(s) {', '.join(sorted(unknown))}")
    bad = set(xnode_conds()) - set(sibling("xnode").CONDS)
    if bad:
        ap.error(f"AXONEME_XNODE_CONDS: unknown condition(s) {', '.join(sorted(bad))} "
                 f"(known: {', '.join(sibling('xnode').CONDS)})")
    progress = lambda s: print(f"[{time.time() - t0:7.1f}s] {s}", flush=True)  # noqa: E731
    suite = [b for b in benches if b != "XNODE"]
    res = run_suite(plan, progress, benches=suite) if suite else \
        Results(plan=asdict(plan), machine=machine_info())
    if "XNODE" in benches:
        run_xnode(plan, res, progress)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(sys.argv)
    if a.merge:
        merge(res, json.loads(Path(a.merge).read_text()), benches)
        command = f"{res.extra.get('command', '')} + {command}"
    res.extra["command"] = command
    (out / "results.json").write_text(json.dumps(
        {"plan": res.plan, "machine": res.machine, "not_run": res.not_run, "extra": res.extra,
         "trials": [asdict(t) for t in res.trials]}, indent=1))
    elapsed = time.time() - t0 + float(res.extra.get("merged_elapsed_s", 0))
    res.extra["elapsed_s"] = elapsed
    sibling("report").write_report(res, out, command, elapsed)
    print(f"report: {out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
