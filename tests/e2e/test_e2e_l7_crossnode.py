"""L7 ingress across nodes, on every kernel datapath: an HTTP rule on a pod of
node b is enforced by node b's proxy for a client pod on node a (native
routing, and tunnel routing) and for a peer outside the cluster
(198.51.100.2, reaching node b's pods through node b).

The two nodes are network namespaces of ours, each with its own agent
(``axoneme.testing.twonodes``): nothing touches the machine's network. On
eBPF the ingress decision for such traffic is taken at the node's devices,
before routing (``ax_from_netdev``, ``ax_from_overlay``), where the TO_PROXY
mark still reaches the TPROXY rule; to-container, past routing, could not
redirect. On iptables the endpoint's rules in mangle PREROUTING mark it the
same way. The allowed path gets the server's 200, the other path the
proxy's 403, and node b's flows record both L7 decisions.

The iptables cases run agents with the iptables datapath (in the nodes'
own namespaces): run them under ``flock /tmp/axon-cluster.lock`` by
convention (docs/cli.md).
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import _capability  # tests/ is on sys.path (tests/conftest.py)
import pytest
from axoneme.testing.twonodes import (
    AX,
    HTTP_GET,
    HTTP_SERVER,
    OUTSIDE_PEER_IP,
    VXLAN,
    TwoNodes,
    http_status,
    sh,
    two_nodes,
)

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

PORT = 8080
POLICY = textwrap.dedent(f"""\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {{name: server-l7, namespace: default}}
    spec:
      endpointSelector: {{matchLabels: {{app: server}}}}
      ingress:
      - fromEntities: [all]
        toPorts:
        - ports: [{{port: "{PORT}", protocol: TCP}}]
          rules:
            http: [{{method: GET, path: /allowed}}]
    """)

CASES = [pytest.param(("ebpf", "", "native"), id="ebpf-native"),
         pytest.param(("ebpf", "", "tunnel"), id="ebpf-tunnel"),
         pytest.param(("iptables", "plain", "native"), id="iptables-plain-native"),
         pytest.param(("iptables", "ipset", "native"), id="iptables-ipset-native"),
         pytest.param(("iptables", "plain", "tunnel"), id="iptables-plain-tunnel")]


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[TwoNodes]:
    with two_nodes(tmp_path) as net:
        yield net


@pytest.mark.parametrize("case", CASES)
def test_l7_ingress_from_another_node_and_outside(nodes: TwoNodes,
                                                  case: tuple[str, str, str]) -> None:
    datapath, mode, routing = case
    why = _capability.probe_datapath(datapath, mode)
    if why:
        pytest.skip(why)
    net = nodes
    ebpf = datapath == "ebpf"
    # eBPF: the tunnel device is collect_md (the VNI carries identities)
    net.route(routing, external=ebpf and routing == "tunnel")
    tunnel = [VXLAN] if routing == "tunnel" else []
    for node, devices in ((net.a, ["und0", *tunnel]), (net.b, ["und0", "out0", *tunnel])):
        # the node's devices (Kubernetes mode adds its address's and the tunnel's itself)
        node.start(datapath, mode, *(["--devices", ",".join(devices)] if ebpf else []))
    net.a.pod("client-a", "app=client")
    server = net.b.pod("server-b", "app=server", sys.executable, "-c", HTTP_SERVER, str(PORT))
    url = f"http://{server['ipv4']}:{PORT}"

    def from_client(path: str) -> tuple[int, str]:
        return http_status(net.a.exec("client-a", sys.executable, "-c", HTTP_GET, url + path).stdout)

    def from_outside(path: str) -> tuple[int, str]:
        return http_status(sh(sys.executable, "-c", HTTP_GET, url + path, netns=net.outside,
                            check=False).stdout)

    deadline = time.monotonic() + 20
    while from_client("/warmup")[0] != 200:  # no policy yet: straight to the server
        assert time.monotonic() < deadline, net.b.log()
        time.sleep(0.5)
    assert from_outside("/warmup") == (200, "served /warmup")

    (net.b.tmp / "l7.yaml").write_text(POLICY)
    net.b.ax("policy", "apply", "-f", str(net.b.tmp / "l7.yaml"))
    time.sleep(1.5)  # the policy and the proxy's rules reach the kernel
    assert from_client("/allowed") == (200, "served /allowed"), net.b.log()
    assert from_client("/denied")[0] == 403  # the proxy's answer: the server never saw it
    assert from_outside("/allowed") == (200, "served /allowed")
    assert from_outside("/denied")[0] == 403

    flows = [json.loads(line) for line in net.b.ax("observe", "--last", "500", "-o",
                                                   "json").stdout.splitlines() if line.strip()]
    l7 = {(f["IP"]["source"], f["l7"]["http"]["url"].rsplit("/", 1)[-1], f["verdict"])
          for f in flows if f.get("Type") == "L7" and (f.get("l7") or {}).get("http")}
    client_ip = [e["ipv4"] for e in json.loads(net.a.ax("endpoint", "list", "-o",
                                                         "json").stdout)][0]
    for src in (client_ip, OUTSIDE_PEER_IP):
        assert (src, "allowed", "FORWARDED") in l7, sorted(l7)
        assert (src, "denied", "DROPPED") in l7, sorted(l7)


def test_a_device_that_does_not_exist_exits_2(tmp_path: Path) -> None:
    """Bad input: `--devices` naming no interface of the agent's network namespace
    exits 2 naming it, before any datapath is started."""
    res = sh(AX, "agent", "run", "--datapath", "noop", "--state-dir", str(tmp_path / "state"),
             "--api-socket", str(tmp_path / "api.sock"), "--no-guard", "--no-l7-proxies",
             "--hubble-socket-path", "", "--devices", "axnosuch0", check=False, timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "axnosuch0" in res.stderr and "--devices" in res.stderr, res.stderr
