"""Host policies on a node of the cluster (issue 20, acceptance "Host policy"): a CCNP that
allows only `cluster` to reach a node port on node 2 blocks a peer outside the cluster and
is reported in flows.

``scripts/cluster up --nodes 2`` (eBPF, native routing). Node 2 (``axon-node2``, a network
namespace of ours, no default route) gets:
- a second link ``hfk0`` to a namespace of this test holding the outside peer 198.51.100.2
  (node side 198.51.100.1/24): nothing of it leaves those two namespaces;
- the label ``axoneme.io/hostfw-test=on`` on its Node object (host policies select by it);
- the host firewall on its agent only: the ConfigMap's config.yaml gets ``host_firewall:
  true`` and ``host_firewall_nodes: [axoneme-node2]`` (node 1 is this machine, where the
  agent refuses it), then node 2's agent pod is recreated (it finds ``hfk0`` at start);
- a hostNetwork pod on node 2 serving TCP 30080 (and 30081) on every node address.
Then, with the CCNP ``hostfw-cluster-only`` (nodeSelector on that label, ingress
fromEntities [cluster] to 30080/TCP and to kubelet's 10250/TCP, which the host's default deny
would otherwise close to the API server, cutting off ``kubectl exec`` as in Cilium):
- the outside peer cannot connect to 198.51.100.1:30080 (it could before the policy);
- a pod on node 1 reaches node 2's address 10.255.254.2:30080 (cluster: its identity is
  known on node 2 through the ipcache), and not 30081 (the host's default deny);
- node 2's flows (``observe -o json`` in its agent pod) hold the drop: source
  198.51.100.2 (identity world), destination identity 1 (host), traffic_direction INGRESS,
  ingress_denied_by naming the CCNP; node 1's agent has no host endpoint (status).
Everything is put back at the end (policy, label, ConfigMap, node 2's agent, namespaces).
"""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from axoneme.testing.netns import add_netns, del_netns
from axoneme.testing.twonodes import TCP_PROBE

from .conftest import Cluster, cluster_up

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]

NODE1, NODE2 = "axoneme-node", "axoneme-node2"
NODE2_NETNS, NODE2_IP = "axon-node2", "10.255.254.2"
OUT_NETNS, NODE_OUT_IP, PEER_IP = "axhf-k8s-out", "198.51.100.1", "198.51.100.2"
LABEL = ("axoneme.io/hostfw-test", "on")
PORT, OTHER_PORT = 30080, 30081
# the host's default deny would cut the API server off node 2's kubelet (kubectl exec/logs),
# as it would in Cilium: the policy lets the cluster reach it too
KUBELET_PORT = 10250
NS = "hostfw"
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"

POLICY = textwrap.dedent(f"""\
    apiVersion: cilium.io/v2
    kind: CiliumClusterwideNetworkPolicy
    metadata: {{name: hostfw-cluster-only}}
    spec:
      nodeSelector: {{matchLabels: {{"{LABEL[0]}": "{LABEL[1]}"}}}}
      ingress:
      - fromEntities: [cluster]
        toPorts: [{{ports: [{{port: "{PORT}", protocol: TCP}},
                            {{port: "{KUBELET_PORT}", protocol: TCP}}]}}]
    """)



def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {res.stderr}")
    return res


def _outside_probe(port: int) -> bool:
    out = _sh("ip", "netns", "exec", OUT_NETNS, "python3", "-c", TCP_PROBE, NODE_OUT_IP, str(port),
              check=False).stdout
    return out.startswith("open")


def _pod_probe(cl: Cluster, ip: str, port: int) -> bool:
    res = cl.exec(NS, "client", "/agnhost", "connect", "--timeout=2s", f"{ip}:{port}")
    return res.returncode == 0


def _diag(cl: Cluster) -> str:
    """Node 2's host endpoint and agent log tail, for a failure message."""
    status = cl.agent_on(NODE2, "status", "-o", "json")
    try:
        hostfw = json.loads(status.stdout)["components"].get("host_firewall")
    except (ValueError, KeyError):
        hostfw = status.stdout + status.stderr
    logs = cl.kubectl("-n", "kube-system", "logs", "--tail=40", cl.agent_pod(NODE2), check=False)
    return f"host_firewall: {json.dumps(hostfw, indent=1)}\nagent log:\n{logs.stdout}{logs.stderr}"


def _config(cl: Cluster) -> str:
    out = cl.kubectl("-n", "kube-system", "get", "configmap", "axoneme-config", "-o", "json").stdout
    return str(json.loads(out)["data"]["config.yaml"])


def _set_config(cl: Cluster, text: str) -> None:
    patch = json.dumps({"data": {"config.yaml": text}})
    cl.kubectl("-n", "kube-system", "patch", "configmap", "axoneme-config", "--type=merge",
               "-p", patch)


def _restart_agent(cl: Cluster, node: str) -> None:
    old = cl.agent_pod(node)
    cl.kubectl("-n", "kube-system", "delete", "pod", old, "--wait=true", "--timeout=120s",
               timeout=150)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            pod = cl.agent_pod(node)
        except AssertionError:
            time.sleep(1)
            continue
        if pod != old and cl.agent_on(node, "status").returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"the agent on {node} did not come back")


def _pod(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
            "spec": {"terminationGracePeriodSeconds": 1, **spec}}


@pytest.fixture(scope="module")
def hostfw(cluster_session: None) -> Iterator[Cluster]:
    cl = cluster_up("ebpf", nodes=2, routing="native")
    before = _config(cl)
    made_out = False
    try:
        # the outside peer: a namespace of ours linked to node 2 only
        add_netns(OUT_NETNS)
        made_out = True
        _sh("ip", "-n", NODE2_NETNS, "link", "add", "hfk0", "type", "veth", "peer", "name",
            "hfo0", "netns", OUT_NETNS)
        _sh("ip", "-n", NODE2_NETNS, "addr", "add", f"{NODE_OUT_IP}/24", "dev", "hfk0")
        _sh("ip", "-n", OUT_NETNS, "addr", "add", f"{PEER_IP}/24", "dev", "hfo0")
        for ns, dev in ((NODE2_NETNS, "hfk0"), (OUT_NETNS, "hfo0"), (OUT_NETNS, "lo")):
            _sh("ip", "-n", ns, "link", "set", dev, "up")
        cl.kubectl("label", "node", NODE2, f"{LABEL[0]}={LABEL[1]}", "--overwrite")
        conf = yaml.safe_load(before) or {}
        conf.update({"host_firewall": True, "host_firewall_nodes": [NODE2]})
        _set_config(cl, yaml.safe_dump(conf))
        _restart_agent(cl, NODE2)
        server = {"hostNetwork": True, "nodeName": NODE2, "containers": [{
            "name": "agnhost", "image": AGNHOST, "imagePullPolicy": "IfNotPresent",
            "command": ["/agnhost", "porter"],
            "env": [{"name": f"SERVE_TCP_PORT_{p}", "value": "foo"} for p in (PORT, OTHER_PORT)]}]}
        client = {"nodeName": NODE1, "containers": [{
            "name": "agnhost", "image": AGNHOST, "imagePullPolicy": "IfNotPresent",
            "command": ["/agnhost", "pause"]}]}
        objs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
                _pod("server", server), _pod("client", client)]
        with cl.objects(objs, [NS]):
            yield cl
    finally:
        cl.kubectl("delete", "ccnp", "hostfw-cluster-only", "--ignore-not-found", check=False)
        cl.kubectl("label", "node", NODE2, f"{LABEL[0]}-", check=False)
        _set_config(cl, before)
        try:
            _restart_agent(cl, NODE2)
        finally:
            _sh("ip", "-n", NODE2_NETNS, "link", "del", "hfk0", check=False)
            if made_out:
                del_netns(OUT_NETNS)


def test_host_policy_on_node2_blocks_the_outside_peer_and_is_in_flows(hostfw: Cluster) -> None:
    cl = hostfw
    # node 2's agent runs the host firewall, node 1's does not (the machine itself)
    logs = cl.kubectl("-n", "kube-system", "logs", cl.agent_pod(NODE2))
    assert "host firewall on" in logs.stdout + logs.stderr
    # (node 1's agent is not restarted: a node left out of host_firewall_nodes stays off,
    # packages/agent/tests/test_agent_hostfw.py)
    for node, on in ((NODE1, False), (NODE2, True)):
        res = cl.agent_on(node, "status", "-o", "json")
        assert res.returncode == 0, res.stderr
        hostfw = json.loads(res.stdout)["components"].get("host_firewall") or {}
        assert hostfw.get("enabled", False) is on, (node, hostfw)
    # no host policy yet: the node port is open to everyone
    assert _outside_probe(PORT)
    assert _pod_probe(cl, NODE2_IP, PORT) and _pod_probe(cl, NODE2_IP, OTHER_PORT)

    cl.apply(POLICY)
    deadline = time.monotonic() + 30
    while _outside_probe(PORT) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _outside_probe(PORT), "the outside peer still reaches node 2's port"
    assert _pod_probe(cl, NODE2_IP, PORT)  # a pod of the cluster (node 1): allowed
    assert not _pod_probe(cl, NODE2_IP, OTHER_PORT)  # the host's default deny

    res = cl.agent_on(NODE2, "observe", "--last", "500", "-o", "json")
    assert res.returncode == 0, res.stderr
    flows = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
    drops = [f for f in flows if f.get("verdict") == "DROPPED"
             and f.get("IP", {}).get("source") == PEER_IP
             and f.get("IP", {}).get("destination") == NODE_OUT_IP]
    assert drops, json.dumps(flows[-10:], indent=1)
    drop = drops[-1]
    assert drop["destination"]["identity"] == 1 and drop["source"]["identity"] == 2, drop
    assert drop["traffic_direction"] == "INGRESS"
    assert [p["name"] for p in drop.get("ingress_denied_by", [])] == ["hostfw-cluster-only"]

    # the label gone: node 2 is no longer selected, the port opens again
    cl.kubectl("label", "node", NODE2, f"{LABEL[0]}-")
    deadline = time.monotonic() + 30
    while not _outside_probe(PORT) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _outside_probe(PORT), "node 2 unselected, but the port stays closed\n" + _diag(cl)
    cl.kubectl("label", "node", NODE2, f"{LABEL[0]}={LABEL[1]}", "--overwrite")
    cl.kubectl("delete", "ccnp", "hostfw-cluster-only")
