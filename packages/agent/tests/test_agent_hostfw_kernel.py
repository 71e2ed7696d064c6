"""The host firewall on the real kernel, each datapath (eBPF; iptables plain and
ipset): an agent runs inside a network namespace of ours that plays a node
(its "uplink" a veth to a second namespace holding a peer outside the cluster,
198.51.100.2), with one pod of its own. A CCNP whose nodeSelector matches the
node's labels allows only the ``cluster`` entity to TCP 30080 on the node:
the outside peer is dropped there (and the drop is in ``observe``, the
policy named), the node's pod gets through, other ports of the node are in
default deny for the pod too (host <-> local pod traffic meets the host's
policy, as Cilium's), and the node's egress stays open (no egress section).

Nothing of this touches the machine's own network: every address lives in the
two namespaces, which go (with their links, tc filters and chains) at the end;
the pinned maps go with ``agent cleanup``. The iptables cases run under
``flock /tmp/axon-cluster.lock`` by convention (see docs/cli.md).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from axoneme.core.endpoint import HOST_ENDPOINT_ID
from axoneme.testing.capability import lacks_root, lacks_tools
from axoneme.testing.netns import add_netns, del_netns
from axoneme.testing.twonodes import in_netns, sh

pytestmark = [pytest.mark.privileged]

AX = str(Path(sys.executable).with_name("axoneme"))
NODE_IP, PEER_IP = "198.51.100.1", "198.51.100.2"
PORT, OTHER_PORT = 30080, 30081

POLICY = textwrap.dedent(f"""\
    apiVersion: cilium.io/v2
    kind: CiliumClusterwideNetworkPolicy
    metadata: {{name: nodeport-cluster-only}}
    spec:
      nodeSelector: {{matchLabels: {{node-role: worker}}}}
      ingress:
      - fromEntities: [cluster]
        toPorts: [{{ports: [{{port: "{PORT}", protocol: TCP}}]}}]
    """)

_PROBE = textwrap.dedent("""\
    import socket, sys
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.0).close()
        print("open")
    except OSError as e:
        print("closed", e)
""")
_SERVE = textwrap.dedent("""\
    import socket, sys, threading
    def serve(port):
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port)); s.listen(64)
        while True:
            s.accept()[0].close()
    for p in sys.argv[2:]:
        threading.Thread(target=serve, args=(int(p),), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
""")


@dataclass
class NodeNet:
    node: str
    out: str
    tmp: Path
    bpffs: str

    def env(self) -> dict[str, str]:
        return {**os.environ, "AXONEME_API_SOCKET": str(self.tmp / "api.sock")}

    def ax(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh(AX, *args, netns=self.node, check=check, env=self.env())


@pytest.fixture
def nodenet(tmp_path: Path) -> Iterator[NodeNet]:
    why = lacks_root() or lacks_tools("ip", "nsenter")
    if why:
        pytest.skip(why)
    tag = secrets.token_hex(3)
    net = NodeNet(f"axhf-{tag}-node", f"axhf-{tag}-out", tmp_path, f"/sys/fs/bpf/axhf-{tag}")
    made: list[str] = []
    try:
        for ns in (net.node, net.out):
            add_netns(ns)
            made.append(ns)
        sh("ip", "-n", net.node, "link", "add", "hfu0", "type", "veth", "peer", "name", "hfo0",
           "netns", net.out)
        sh("ip", "-n", net.node, "addr", "add", f"{NODE_IP}/24", "dev", "hfu0")
        sh("ip", "-n", net.out, "addr", "add", f"{PEER_IP}/24", "dev", "hfo0")
        for ns, dev in ((net.node, "hfu0"), (net.out, "hfo0")):
            sh("ip", "-n", ns, "link", "set", dev, "up")
        yield net
    finally:
        for ns in reversed(made):
            del_netns(ns)
        shutil.rmtree(net.bpffs, ignore_errors=True)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert tag not in left


def probe(net: NodeNet, netns: str, ip: str, port: int) -> bool:
    out = sh(sys.executable, "-c", _PROBE, ip, str(port), netns=netns, check=False).stdout
    return out.startswith("open")


def pod_probe(net: NodeNet, ip: str, port: int) -> bool:
    r = net.ax("pod", "exec", "client", "--", sys.executable, "-c", _PROBE, ip, str(port),
               check=False)
    if not r.stdout.startswith("open"):
        print("pod probe", ip, port, r.returncode, r.stdout, r.stderr)
    return r.stdout.startswith("open")


def _start(net: NodeNet, *extra: str, datapath: str = "ebpf") -> subprocess.Popen[bytes]:
    """The agent in the node's namespace, once it answers."""
    cmd = [AX, "agent", "run", "--datapath", datapath, "--state-dir", str(net.tmp / "state"),
           "--api-socket", str(net.tmp / "api.sock"), "--bpffs-root", net.bpffs,
           "--pod-cidr", "10.244.250.0/24", "--no-l7-proxies", *extra]
    agent = subprocess.Popen([*in_netns(net.node), *cmd], stdout=(net.tmp / "agent.log").open("ab"),
                             stderr=subprocess.STDOUT, env=net.env())
    deadline = time.monotonic() + 90
    while net.ax("status", check=False).returncode != 0:
        assert agent.poll() is None and time.monotonic() < deadline, \
            (net.tmp / "agent.log").read_text()
        time.sleep(0.3)
    return agent


def _stop(agent: subprocess.Popen[bytes]) -> None:
    agent.terminate()
    try:
        agent.wait(30)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


DATAPATHS = [pytest.param(("ebpf", ""), id="ebpf"),
             pytest.param(("iptables", "plain"), id="iptables-plain"),
             pytest.param(("iptables", "ipset"), id="iptables-ipset")]


@pytest.mark.parametrize("datapath", DATAPATHS)
def test_host_policy_allows_only_cluster_to_a_node_port(nodenet: NodeNet,
                                                        datapath: tuple[str, str]) -> None:
    name, mode = datapath
    if name == "iptables" and lacks_tools("iptables", *(["ipset"] if mode == "ipset" else [])):
        pytest.skip(lacks_tools("iptables", "ipset"))
    net = nodenet
    state = net.tmp / "state"
    server = subprocess.Popen([*in_netns(net.node), sys.executable, "-c", _SERVE,
                               "-", str(PORT), str(OTHER_PORT)], stdout=subprocess.PIPE, text=True)
    outside = subprocess.Popen([*in_netns(net.out), sys.executable, "-c", _SERVE,
                                "-", "8080"], stdout=subprocess.PIPE, text=True)
    agent = None
    try:
        for proc in (server, outside):
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        agent = _start(net, "--enable-host-firewall", "--node-labels", "node-role=worker,zone=a",
                       *(["--datapath-opt", f"mode={mode}"] if mode else []), datapath=name)
        net.ax("pod", "run", "client", "--labels", "app=client", "--", "sleep", "600")

        # no host policy yet: the host is not enforced
        assert probe(net, net.out, NODE_IP, PORT)
        assert pod_probe(net, NODE_IP, OTHER_PORT)

        (net.tmp / "hostpol.yaml").write_text(POLICY)
        net.ax("policy", "apply", "-f", str(net.tmp / "hostpol.yaml"))
        time.sleep(1.0)  # the regeneration reaches the kernel
        status = json.loads(net.ax("status", "-o", "json").stdout)["components"]["host_firewall"]
        assert status["enabled"] and status["devices"] == ["hfu0"], status
        assert status["policy_enforcement"] == {"ingress": True, "egress": False}
        assert status["policies"] == ["nodeport-cluster-only"]
        assert not probe(net, net.out, NODE_IP, PORT)  # world: dropped
        assert pod_probe(net, NODE_IP, PORT)  # cluster (a pod of the node): allowed
        assert not pod_probe(net, NODE_IP, OTHER_PORT)  # the host's default deny
        assert probe(net, net.node, PEER_IP, 8080)  # egress not selected: open

        flows = [json.loads(line) for line in net.ax(
            "observe", "--last", "200", "-o", "json").stdout.splitlines() if line.strip()]
        drops = [f for f in flows if f.get("verdict") == "DROPPED"
                 and f.get("IP", {}).get("source") == PEER_IP
                 and f.get("IP", {}).get("destination") == NODE_IP]
        assert drops, json.dumps(flows[-10:], indent=1)
        drop = drops[-1]
        assert drop["destination"]["identity"] == 1 and drop["source"]["identity"] == 2
        assert drop["traffic_direction"] == "INGRESS"
        assert drop["drop_reason_desc"] == "POLICY_DENIED"
        assert [p["name"] for p in drop["ingress_denied_by"]] == ["nodeport-cluster-only"]
        assert drop["destination"].get("ID", drop["destination"].get("id")) in (
            HOST_ENDPOINT_ID, None)

        # the policy deleted: the host leaves default deny
        net.ax("policy", "delete", "CiliumClusterwideNetworkPolicy/nodeport-cluster-only")
        time.sleep(1.0)
        assert probe(net, net.out, NODE_IP, PORT)
        assert pod_probe(net, NODE_IP, OTHER_PORT)
        net.ax("pod", "delete", "client")
    finally:
        for proc in (server, outside):
            proc.kill()
            proc.wait(10)
        if agent is not None:
            _stop(agent)
        sh(AX, "agent", "cleanup", "--state-dir", str(state), netns=net.node, check=False,
           env=net.env())


def test_an_agent_restarted_without_the_host_firewall_removes_it(nodenet: NodeNet) -> None:
    """Kernel state outlives the agent: a restart with the host firewall off must
    not leave the previous run's host policy enforcing (eBPF)."""
    net = nodenet
    server = subprocess.Popen([*in_netns(net.node), sys.executable, "-c", _SERVE, "-", str(PORT)],
                              stdout=subprocess.PIPE, text=True)
    agent = None
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        agent = _start(net, "--enable-host-firewall", "--node-labels", "node-role=worker")
        (net.tmp / "hostpol.yaml").write_text(POLICY)
        net.ax("policy", "apply", "-f", str(net.tmp / "hostpol.yaml"))
        time.sleep(1.0)
        assert not probe(net, net.out, NODE_IP, PORT)
        _stop(agent)
        assert not probe(net, net.out, NODE_IP, PORT)  # enforcement stays in the kernel
        agent = _start(net)  # the policy is still there; the host firewall is not
        assert probe(net, net.out, NODE_IP, PORT)
        status = json.loads(net.ax("status", "-o", "json").stdout)["components"]
        assert "host_firewall" not in status
    finally:
        server.kill()
        server.wait(10)
        if agent is not None:
            _stop(agent)
        sh(AX, "agent", "cleanup", "--state-dir", str(net.tmp / "state"), netns=net.node,
           check=False, env=net.env())
