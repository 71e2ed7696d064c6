"""XNODE: cross-node pod traffic through real agents, eBPF vs iptables plain/ipset
(vs agents with the noop datapath and no policy), N = 10, 1k, 10k identities.

Two "nodes" are network namespaces of ours joined by a bridge in a third one
(the host's own network is never involved: no node has a default route);
each node runs its own ``axoneme agent run`` (``nsenter --net``, its own
state dir, API socket and bpffs root) and ``axoneme pod run`` wires its pods.
Node a holds the client and an intruder, node b the server. The nodes route
each other's pod CIDR as the agent's ``NodeRouting`` does in Kubernetes mode:
native (a route via the other node) or tunnel (VXLAN, ``axon_vxlan``).

The server's node knows the client through its ipcache: a standalone agent
has no Pod objects of other nodes, so the client's /32 is a ``fromCIDR``
peer (a CIDR identity, as B5A's peers). Policy on node b: N fake peers
(10.244.128.0/17, one /32 each, TCP/UDP alternating on the service port: N
entries, N identities), applied first, then the client's own /32 on the
service port (TCP, UDP) and the sink port (UDP), so its identity is the
newest, which the iptables renderer orders LAST (checked from
``iptables-save`` inside node b in every counted trial). A trial counts only
if the allowed runs succeeded, the kernel holds the policy (``endpoint get``
in_sync, >= N entries) and the intruder (UDP, TCP) and the client on a port
nobody is allowed on were dropped; the no-policy baseline instead requires
those probes answered.

Every piece (namespaces, links, routes, the agents' chains and sets inside
node netns, pinned maps, processes by PID) is removed on success and failure.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import signal
import subprocess
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NODE_NET = "10.255.250"  # the wire between nodes (inside our namespaces only)
POD_NETS = {"a": "10.244.120", "b": "10.244.121"}
SIZES = (10, 1000, 10_000)
CONDS = {"none": ["--datapath", "noop"],
         "ebpf": ["--datapath", "ebpf", "--policy-map-max", str(2 * max(SIZES) + 64)],
         # eBPF as Kubernetes mode runs it (docs/cli.md, "L7 ingress across nodes"): the
         # node's uplink named as a device, so traffic from other nodes is decided at
         # from-netdev before routing (not in the default plan: --only XNODE with
         # AXONEME_XNODE_CONDS=ebpf-devices,...)
         "ebpf-devices": ["--datapath", "ebpf", "--policy-map-max", str(2 * max(SIZES) + 64),
                          "--devices", "und0"],
         "iptables-plain": ["--datapath", "iptables", "--iptables-mode", "plain"],
         "iptables-ipset": ["--datapath", "iptables", "--iptables-mode", "ipset"]}
MODES = ("native", "tunnel")


@dataclass(frozen=True)
class XPlan:
    reps: int = 3
    seconds: float = 2.0  # per traffic measurement
    sizes: tuple[int, ...] = SIZES
    modes: tuple[str, ...] = MODES
    conds: tuple[str, ...] = tuple(c for c in CONDS if c != "ebpf-devices")

    @classmethod
    def quick(cls) -> XPlan:
        """CI: one repetition, N = 10, native routing, short measurements."""
        return cls(1, 0.5, (10,), ("native",))


class Nodes:
    """The wire, two node namespaces with an uplink each, forwarding on."""

    def __init__(self, sh: Callable[..., Any]) -> None:
        self.sh = sh
        self.tag = secrets.token_hex(3)
        self.wire = f"axx-{self.tag}-w"
        self.ns = {k: f"axx-{self.tag}-{k}" for k in ("a", "b")}
        self.made: list[str] = []

    def create(self) -> Nodes:
        from axoneme.testing.netns import add_netns

        sh = self.sh
        for name in (self.wire, *self.ns.values()):
            self.made.append(name)  # recorded first: an interrupt never leaks it
            add_netns(name)
        sh("ip", "-n", self.wire, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.wire, "link", "set", "br0", "up")
        for k, ns in self.ns.items():
            sh("ip", "-n", self.wire, "link", "add", f"w{k}", "type", "veth", "peer", "name",
               "und0", "netns", ns)
            sh("ip", "-n", self.wire, "link", "set", f"w{k}", "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(k)}/24", "dev", "und0")
            sh("ip", "-n", ns, "link", "set", "und0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        return self

    @staticmethod
    def ip(k: str) -> str:
        return f"{NODE_NET}.{1 + 'ab'.index(k)}"

    def infos(self) -> list[Any]:
        from axoneme.agent._routing import NodeInfo

        return [NodeInfo(k, ipaddress.IPv4Address(self.ip(k)),
                         ipaddress.IPv4Network(f"{POD_NETS[k]}.0/24")) for k in self.ns]

    def route(self, mode: str) -> None:
        """Both nodes in ``mode`` (the agent's NodeRouting: exact switch between modes)."""
        from axoneme.agent._noderoutes import NodeRouting
        from axoneme.agent._routing import desired_state

        infos = self.infos()
        for k, me in zip(self.ns, infos, strict=True):
            problems = NodeRouting(netns=self.ns[k]).apply(desired_state(mode, me, infos))
            if problems:
                raise RuntimeError(f"routing {mode} on node {k}: {problems}")

    def close(self) -> None:
        from axoneme.testing.netns import del_netns

        for name in reversed(self.made):  # links and routes go with each
            del_netns(name)


@dataclass
class Cell:
    """One (condition) setup: two agents and the pods; measured at every N and mode."""

    cond: str
    nodes: Nodes
    agents: dict[str, Any]
    srv_ip: str = ""
    cli_ip: str = ""
    bad_ip: str = ""
    srv_ep: int = 0
    netns: dict[str, str] | None = None  # pod -> its netns path


def _start_cell(S: Any, cell: Cell) -> None:
    """The agents (recorded in ``cell`` before they start: the caller closes them)
    and the pods."""
    for k, ns in cell.nodes.ns.items():
        agent = S.Agent([*CONDS[cell.cond], "--no-l7-proxies", "--hubble-socket-path", ""],
                        netns=ns, pod_cidr=f"{POD_NETS[k]}.0/24")
        cell.agents[k] = agent
        agent.start()
        agent.cli("namespace", "create", "bench")
    a, b = cell.agents["a"], cell.agents["b"]
    b.cli("pod", "run", "srv", "-n", "bench", "--labels", "app=srv", "--", "sleep", "86400")
    a.cli("pod", "run", "cli", "-n", "bench", "--labels", "app=cli", "--", "sleep", "86400")
    a.cli("pod", "run", "bad", "-n", "bench", "--labels", "app=bad", "--", "sleep", "86400")
    cell.netns = {}
    for agent in (a, b):
        for e in json.loads(agent.cli("endpoint", "list", "-o", "json")):
            if e.get("pod", "").startswith("bench/"):
                name = e["pod"].split("/", 1)[1]
                cell.netns[name] = e["netns"]
                if name == "srv":
                    cell.srv_ep = int(e["id"])
    pods = {p["name"]: p["ip"] for agent in (a, b)
            for p in json.loads(agent.cli("pod", "list", "-o", "json"))}
    cell.srv_ip, cell.cli_ip, cell.bad_ip = pods["srv"], pods["cli"], pods["bad"]


def _spawn(netns: str, *args: str, cpu: int | None = None) -> subprocess.Popen[str]:
    cmd = ["nsenter", f"--net={netns}", *(["taskset", "-c", str(cpu)] if cpu is not None else []),
           *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _finish(S: Any, p: subprocess.Popen[str], word: str, timeout: float) -> Any:
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return S.Run(0.0, 124)
    return S.Run(S._parse(out, word), p.returncode)


def _client(S: Any, cell: Cell, lg: str, pod: str, kind: str, port: int, seconds: float,
            cpu: int | None = 0) -> Any:
    assert cell.netns is not None
    p = _spawn(cell.netns[pod], lg, kind, cell.srv_ip, str(port), str(seconds), cpu=cpu)
    return _finish(S, p, "tps", seconds + 15)


def _flood(S: Any, cell: Cell, lg: str, seconds: float) -> Any:
    assert cell.netns is not None
    sink = _spawn(cell.netns["srv"], lg, "sink", str(S.SINK_PORT), str(seconds), cpu=0)
    time.sleep(0.2)
    fl = _spawn(cell.netns["cli"], lg, "flood", cell.srv_ip, str(S.SINK_PORT),
                str(seconds + 0.5), cpu=1)
    _finish(S, fl, "sent", seconds + 20)
    return _finish(S, sink, "pps", seconds + 20)


def _cnp(name: str, ingress: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"endpointSelector": {"matchLabels": {"app": "srv"}}, "ingress": ingress}}


def _policies(S: Any, n: int, cli_ip: str) -> list[dict[str, Any]]:
    """The N peers (TCP/UDP alternating: N entries), then the client's own policy."""
    peers = [f"{S.fake_ip(i)}/32" for i in range(n)]
    port = str(S.PORT)
    return [
        _cnp("peers", [{"fromCIDR": peers[0::2], "toPorts": [{"ports": [
            {"port": port, "protocol": "TCP"}]}]}, {"fromCIDR": peers[1::2], "toPorts": [
                {"ports": [{"port": port, "protocol": "UDP"}]}]}]),
        _cnp("client", [{"fromCIDR": [f"{cli_ip}/32"], "toPorts": [{"ports": [
            {"port": port, "protocol": "TCP"}, {"port": port, "protocol": "UDP"},
            {"port": str(S.SINK_PORT), "protocol": "UDP"}]}]}]),
    ]


def _apply(agent: Any, obj: dict[str, Any]) -> None:
    doc = {"documents": [{"file": "xnode", "index": 0, "obj": obj}]}
    resp = agent.api().post("/v1/policies", doc)
    if isinstance(resp, dict) and resp.get("errors"):
        raise RuntimeError(f"policy {obj['metadata']['name']}: {resp['errors']}")


def _delete(agent: Any, *names: str) -> None:
    agent.api().post("/v1/policies/delete", {"refs": [
        {"kind": "CiliumNetworkPolicy", "namespace": "bench", "name": n} for n in names]})


def _client_last(cell: Cell, n: int) -> str:
    """iptables-save in node b: the client's rules come after the N peer rules."""
    from axoneme.core.mapstate import Direction
    from axoneme.datapath.iptables import _render as rd

    b = cell.agents["b"]
    save = subprocess.run([*b.prefix, "iptables-save", "-t", "filter"], capture_output=True,
                          text=True, timeout=120).stdout.splitlines()
    chain = rd.ep_chain(cell.srv_ep, Direction.INGRESS)
    rules = [line.split(" ", 2)[2] for line in save if line.startswith(f"-A {chain} ")]
    if cell.cond == "iptables-ipset":
        ids = b.api().get("/v1/identities")
        want = f"cidr:{cell.cli_ip}/32"
        cli = [int(i["id"]) for i in ids if any(want in lab for lab in i.get("labels", []))]
        if not cli:
            raise RuntimeError(f"no identity with {want}")
        mark = rd.set_name(cli[0], 4)
    else:
        mark = f"{cell.cli_ip}/32"
    idx = [i for i, r in enumerate(rules) if mark in r]
    # policy rules of peers (identity >= 256: not the node's own `host` allow after them)
    peers = [i for i, r in enumerate(rules) if "AXK:" in r and mark not in r
             and int(r.split("AXK:", 1)[1].split(":", 1)[0]) >= 256]
    if not idx or len(peers) < n or max(peers, default=-1) > min(idx):
        raise RuntimeError(f"client ({mark}) not after the {n} peer rules in {chain}: client "
                           f"at {idx}, {len(peers)} peer rules, last {max(peers, default=-1)}"
                           + ("\n" + "\n".join(rules) if n <= 20 else ""))
    return f"{chain}: {len(rules)} rules, client rules at positions {idx[0] + 1}..{idx[-1] + 1}"


def _wait_allowed(S: Any, cell: Cell, lg: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _client(S, cell, lg, "cli", "udp_rr", S.PORT, 0.1, None).rc == 0 and \
                _client(S, cell, lg, "cli", "tcp_rr", S.PORT, 0.1, None).rc == 0:
            return True
        time.sleep(0.2)
    return False


def measure(S: Any, cell: Cell, lg: str, n: int, mode: str, rep: int, seconds: float) -> Any:
    """One trial: routing ``mode`` on, the policy of size N in force (set up by the
    caller), the three measurements and the denied probes."""
    t = S.Trial("XNODE", f"{cell.cond}/{mode}", n, rep)
    proof: list[str] = []
    try:
        if not _wait_allowed(S, cell, lg):
            raise RuntimeError("the allowed client never got an answer across the nodes")
        # the agents' own CPU while traffic runs: on 2 shared CPUs an agent busy with
        # its N identities would take cycles from the packets it is measured on
        pids = [a.proc.pid for a in cell.agents.values() if a.proc is not None]
        cpu0, w0 = sum(S._cpu_s(p) for p in pids), time.monotonic()
        runs = {"udp_rr": _client(S, cell, lg, "cli", "udp_rr", S.PORT, seconds),
                "tcp_rr": _client(S, cell, lg, "cli", "tcp_rr", S.PORT, seconds),
                "flood_pps": _flood(S, cell, lg, seconds)}
        t.metrics["agents_cpu_pct"] = 100 * (sum(S._cpu_s(p) for p in pids) - cpu0) / (
            time.monotonic() - w0)
        for k, r in runs.items():
            t.metrics[k] = r.value
        ok = all(r.rc == 0 and r.value > 0 for r in runs.values())
        proof.append("allowed: " + ", ".join(f"{k} rc={r.rc}" for k, r in runs.items()))
        assert cell.netns is not None
        probes = [_spawn(cell.netns[pod], lg, kind, cell.srv_ip, str(port), "0.5")
                  for pod, kind, port in (("bad", "udp_rr", S.PORT), ("bad", "tcp_rr", S.PORT),
                                          ("cli", "tcp_rr", S.DENIED_PORT))]
        d = [_finish(S, p, "tps", 20) for p in probes]
        proof.append(f"denied probes (intruder udp/tcp, client on port {S.DENIED_PORT}): "
                     f"rc={d[0].rc}/{d[1].rc}/{d[2].rc}")
        if cell.cond == "none":
            t.enforced = ok and all(x.rc == 0 for x in d)
        else:
            t.enforced = ok and all(x.rc == 3 and x.value == 0 for x in d)
            view = cell.agents["b"].api().get(f"/v1/endpoints/{cell.srv_ep}")
            held = view.get("datapath") or []
            proof.append(f"kernel holds {len(held)} entries, in_sync {view.get('in_sync')}")
            t.enforced = t.enforced and bool(view.get("in_sync")) and len(held) >= n
            if cell.cond.startswith("iptables"):
                proof.append(_client_last(cell, n))
            if cell.cond == "ebpf-devices":  # from-netdev is there to decide
                tc = subprocess.run([*cell.agents["b"].prefix, "tc", "filter", "show", "dev",
                                     "und0", "ingress"], capture_output=True, text=True,
                                    timeout=30).stdout
                proof.append(f"und0 ingress has ax_from_netdev: {'ax_from_netdev' in tc}")
                t.enforced = t.enforced and "ax_from_netdev" in tc
    except Exception as e:
        t.error = f"{type(e).__name__}: {e}"
        S.LOG.warning("xnode %s N=%d %s rep %d: %s", cell.cond, n, mode, rep,
                      traceback.format_exc())
    t.proof = "; ".join(proof)
    return t


def _servers(cell: Cell, lg: str, S: Any) -> list[subprocess.Popen[str]]:
    assert cell.netns is not None
    procs = [_spawn(cell.netns["srv"], lg, "server", str(port), cpu=0)
             for port in (S.PORT, S.DENIED_PORT)]
    time.sleep(0.2)
    for p in procs:
        if p.poll() is not None:
            raise RuntimeError(f"loadgen server exited: {p.communicate()[1]}")
    return procs


def run_cell(S: Any, plan: XPlan, res: Any, lg: str, cond: str, n: int, rep: int,
             rnd: random.Random, progress: Callable[[str], None]) -> None:
    """One (condition, N) in one repetition: fresh nodes and agents (a fresh
    allocator: the client's CIDR identity is the newest, so it comes after the
    N peers; identities an agent releases are not reused at once), the policy,
    then every routing mode in a shuffled order."""
    nodes = Nodes(S.sh)
    cell = Cell(cond, nodes, {})
    procs: list[subprocess.Popen[str]] = []
    try:
        nodes.create()
        t0 = time.perf_counter()
        _start_cell(S, cell)
        procs = _servers(cell, lg, S)
        res.extra.setdefault("xnode_setup_s", {}).setdefault(cond, []).append(
            round(time.perf_counter() - t0, 2))
        setup = 0.0
        if cond != "none":
            t0 = time.perf_counter()
            for pol in _policies(S, n, cell.cli_ip):
                _apply(cell.agents["b"], pol)
            setup = time.perf_counter() - t0
        modes = list(plan.modes)
        rnd.shuffle(modes)
        for mode in modes:
            progress(f"XNODE rep {rep + 1}/{plan.reps}: {cond} N={n} {mode}")
            nodes.route(mode)
            t = measure(S, cell, lg, n, mode, rep, plan.seconds)
            t.metrics["setup_s"] = setup
            res.trials.append(t)
            if t.error or not t.enforced:
                progress(f"  NOT COUNTED: {t.error or t.proof}")
    except Exception as e:
        res.not_run[f"XNODE/{cond}/N={n}/rep{rep}"] = f"{type(e).__name__}: {e}"
        S.LOG.warning("xnode %s N=%d rep %d: %s", cond, n, rep, traceback.format_exc())
        progress(f"  XNODE {cond} N={n} failed: {e}")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
        for agent in cell.agents.values():
            agent.close()  # kills it, `agent cleanup` in its node: pods, maps, chains
        nodes.close()


def bench_xnode(S: Any, plan: XPlan, res: Any, lg: str, seed: int,
                progress: Callable[[str], None] = lambda s: None) -> None:
    """Every (condition, N) in every repetition, in a fresh shuffled order."""
    rnd = random.Random(seed)
    res.extra["xnode_plan"] = {"reps": plan.reps, "seconds": plan.seconds,
                               "sizes": list(plan.sizes), "modes": list(plan.modes),
                               "conds": list(plan.conds)}
    res.extra.setdefault("xnode_load", []).append(
        " ".join(f"{x:.2f}" for x in os.getloadavg()))
    items = [(c, n) for c in plan.conds for n in ((0,) if c == "none" else plan.sizes)]
    for rep in range(plan.reps):
        rnd.shuffle(items)
        for cond, n in items:
            run_cell(S, plan, res, lg, cond, n, rep, rnd, progress)
    res.extra["xnode_load"].append(" ".join(f"{x:.2f}" for x in os.getloadavg()))
