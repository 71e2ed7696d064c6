"""The source's identity in the VXLAN header (VNI), on the real kernel: two
nodes (network namespaces of ours, each with its own agent on the eBPF
datapath, ``axoneme.testing.twonodes``) joined by a collect_md VXLAN tunnel,
as Cilium's tunnel routing carries identities.

Node b's ipcache does not know node a's pods (standalone agents share no
API): without the VNI its ingress policy would judge them as world. The
test makes that worse on purpose, writing a WRONG entry into node b's
pinned ipcache (the intruder's address -> the client's identity), and shows
the decision follows the identity the packet carries: the client (allowed
by its labels) gets through with no ipcache entry at all, the intruder is
dropped although the ipcache says it is the client. A capture on the wire
shows each packet's VNI is its sender's identity. The same nodes on a plain
VXLAN device (no identity in the VNI) judge by the ipcache alone: the
client is dropped, the intruder gets in, which is what the VNI prevents.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from axoneme.datapath.ebpf import _bpf
from axoneme.datapath.ebpf import _layout as L
from axoneme.datapath.ebpf._datapath import ipcache_key
from axoneme.testing.twonodes import TCP_PROBE, VXLAN, VXLAN_PORT, TwoNodes, in_netns, two_nodes

pytestmark = [pytest.mark.privileged]

PORT = 8080
POLICY = textwrap.dedent(f"""\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {{name: server-from-client, namespace: default}}
    spec:
      endpointSelector: {{matchLabels: {{app: server}}}}
      ingress:
      - fromEndpoints: [{{matchLabels: {{app: client}}}}]
        toPorts: [{{ports: [{{port: "{PORT}", protocol: TCP}}]}}]
    """)
SERVE = textwrap.dedent("""\
    import socket
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", @N@)); s.listen(64)
    while True:
        s.accept()[0].close()
""".replace("@N@", str(PORT)))
# VXLAN frames through a bridge port of the wire: (VNI, inner source address), as JSON
CAPTURE = textwrap.dedent("""\
    import json, socket, struct, sys, time
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
    s.bind((sys.argv[1], 3)); s.settimeout(0.2)
    print("ready", flush=True)
    seen, end = set(), time.monotonic() + float(sys.argv[2])
    while time.monotonic() < end:
        try:
            f = s.recv(4096)
        except socket.timeout:
            continue
        if f[12:14] != b"\\x08\\x00":
            continue
        ihl = (f[14] & 15) * 4
        if f[23] != 17 or struct.unpack("!H", f[14 + ihl + 2:14 + ihl + 4])[0] != @N@:
            continue
        vx = 14 + ihl + 8
        vni = int.from_bytes(f[vx + 4:vx + 7], "big")
        inner = vx + 8 + 14
        if f[vx + 8 + 12:vx + 8 + 14] == b"\\x08\\x00":
            seen.add((vni, socket.inet_ntoa(f[inner + 12:inner + 16])))
    print(json.dumps(sorted(seen)))
""".replace("@N@", str(VXLAN_PORT)))


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[TwoNodes]:
    with two_nodes(tmp_path) as net:
        yield net


def probe(net: TwoNodes, pod: str, ip: str) -> bool:
    out = net.a.exec(pod, sys.executable, "-c", TCP_PROBE, ip, str(PORT)).stdout
    return out.startswith("open")


def write_ipcache(bpffs: str, ip: str, identity: int) -> None:
    """An entry of our own in a node's pinned ipcache (the /32 hash)."""
    fd = _bpf.libbpf().bpf_obj_get(os.path.join(bpffs, "axoneme_ipcache_host_v1").encode())
    assert fd >= 0, "node b's pinned ipcache is missing"
    try:
        val = L.IPCacheValue()
        val.identity, val.flags = identity, 0
        _bpf.map_update(fd, ipcache_key(ipaddress.ip_network(f"{ip}/32")), val)
    finally:
        os.close(fd)


def start_agents(net: TwoNodes) -> None:
    for node in (net.a, net.b):
        node.start("ebpf", "", "--devices", f"und0,{VXLAN}", "--no-l7-proxies")


def test_vni_carries_the_source_identity(nodes: TwoNodes) -> None:
    net = nodes
    net.route("tunnel", external=True)
    start_agents(net)
    client = net.a.pod("client-a", "app=client")
    intruder = net.a.pod("intruder-a", "app=intruder")
    server = net.b.pod("server-b", "app=server", sys.executable, "-c", SERVE)
    twin = net.b.pod("twin-b", "app=client")  # node b knows the client's labels' identity
    assert client["identity"] == twin["identity"] != intruder["identity"]
    (net.b.tmp / "policy.yaml").write_text(POLICY)
    net.b.ax("policy", "apply", "-f", str(net.b.tmp / "policy.yaml"))
    server_ip = str(server["ipv4"])
    # node b's ipcache: nothing for the client, the client's identity for the intruder
    write_ipcache(net.b.bpffs, str(intruder["ipv4"]), int(str(client["identity"])))
    time.sleep(1.0)  # the policy reaches the kernel

    cap = subprocess.Popen([*in_netns(net.wire), sys.executable, "-c", CAPTURE, "wa", "12"],
                           stdout=subprocess.PIPE, text=True)
    assert cap.stdout is not None and cap.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 20
    while not probe(net, "client-a", server_ip):  # the server pod may still be starting
        assert time.monotonic() < deadline, net.b.log()
    assert not probe(net, "intruder-a", server_ip)
    seen = json.loads(cap.communicate(timeout=30)[0])
    assert [int(str(client["identity"])), str(client["ipv4"])] in seen, seen
    assert [int(str(intruder["identity"])), str(intruder["ipv4"])] in seen, seen
    # the server's replies carry its identity back
    assert [int(str(server["identity"])), server_ip] in seen, seen

    # node b's flows name the identities the packets carried
    flows = [json.loads(line) for line in net.b.ax("observe", "--last", "200", "-o",
                                                   "json").stdout.splitlines() if line.strip()]
    mine = [(f["verdict"], f["source"]["identity"]) for f in flows
            if f.get("IP", {}).get("destination") == server_ip
            and f.get("traffic_direction") == "INGRESS"]
    assert ("FORWARDED", client["identity"]) in mine, mine
    assert ("DROPPED", intruder["identity"]) in mine, mine

    # the control: a plain VXLAN device (VNI 1, no identity): the ipcache decides
    for node in (net.a, net.b):
        node.stop()
    net.route("tunnel", external=False)
    start_agents(net)
    write_ipcache(net.b.bpffs, str(intruder["ipv4"]), int(str(client["identity"])))
    time.sleep(1.0)
    assert not probe(net, "client-a", server_ip)  # world to node b
    assert probe(net, "intruder-a", server_ip)  # the wrong ipcache entry lets it in
