"""``kubectl delete pod`` of the agent under continuous traffic.

A server (agnhost netexec, HTTP keep-alive) admits ``role: client`` only.
During the agent pod's deletion and the DaemonSet's replacement pod start:

- ``friend`` (allowed) holds ONE established keep-alive connection and sends a
  request on it every 100 ms: it must never be cut;
- ``foe`` (denied) opens a new connection every 100 ms: none may connect;
- afterwards the new agent pod has adopted the endpoints (same endpoint ids
  and identities) and the policy still holds.

The clients are Python in the axoneme image (stdlib http.client), their
counters read from ``kubectl logs``.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml

from .conftest import Cluster, cluster_up

NS = "restart"
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"

FRIEND = r'''
import http.client, os, sys, time
conn = http.client.HTTPConnection(os.environ["SERVER"], 80, timeout=2)
ok = 0
while not os.path.exists("/tmp/stop"):
    try:
        conn.request("GET", "/hostname")
        conn.getresponse().read()
        ok += 1
    except Exception as e:
        print(f"CUT after {ok} requests: {e!r}", flush=True)
        break
    if ok % 10 == 0:
        print(f"ok {ok}", flush=True)
    time.sleep(0.1)
print(f"DONE ok={ok}", flush=True)
time.sleep(3600)
'''

FOE = r'''
import os, socket, time
tries = delivered = 0
while not os.path.exists("/tmp/stop"):
    s = socket.socket()
    s.settimeout(0.2)
    try:
        s.connect((os.environ["SERVER"], 80))
        delivered += 1
        print("DELIVERED", flush=True)
    except OSError:
        pass
    finally:
        s.close()
    tries += 1
    time.sleep(0.1)
print(f"DONE tries={tries} delivered={delivered}", flush=True)
time.sleep(3600)
'''


def _client(name: str, labels: dict, script: str, server: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": "localhost/axoneme:dev",
                                     "imagePullPolicy": "Never",
                                     "command": ["python3", "-u", "-c", script],
                                     "env": [{"name": "SERVER", "value": server}]}]}}


def _agent_pod(cl: Cluster) -> str:
    pods = json.loads(cl.kubectl("-n", "kube-system", "get", "pods", "-o", "json").stdout)["items"]
    names = [p["metadata"]["name"] for p in pods if p["metadata"]["name"].startswith("axoneme-")
             and p["metadata"].get("deletionTimestamp") is None]
    assert len(names) == 1, names
    return names[0]


def _endpoints(cl: Cluster) -> dict[str, tuple[int, int]]:
    res = cl.agent("endpoint", "list", "-o", "json")
    assert res.returncode == 0, res.stderr
    return {e["pod"]: (e["id"], e["identity"]) for e in json.loads(res.stdout)
            if e["pod"].startswith(f"{NS}/")}


@pytest.fixture
def restart_setup(cluster_session):
    cl = cluster_up("ebpf")
    base = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
            {"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "server", "namespace": NS, "labels": {"app": "server"}},
             "spec": {"terminationGracePeriodSeconds": 1,
                      "containers": [{"name": "c", "image": AGNHOST, "imagePullPolicy": "IfNotPresent",
                                      "command": ["/agnhost", "netexec", "--http-port=80"]}]}},
            {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "server", "namespace": NS},
             "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                      "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}]}]}}]
    cl.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(base))
    try:
        cl.kubectl("-n", NS, "wait", "--for=condition=Ready", "pod/server", "--timeout=120s",
                   timeout=150)
        server = cl.pod_ip(NS, "server")
        clients = [_client("friend", {"role": "client"}, FRIEND, server),
                   _client("foe", {"role": "foe"}, FOE, server)]
        cl.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(clients))
        cl.wait_pods_ready(NS)
        yield cl
    finally:
        cl.kubectl("delete", "ns", NS, "--wait=true", "--timeout=120s", check=False, timeout=150)


def test_agent_pod_delete_keeps_enforcement_and_connections(restart_setup):
    cl = restart_setup
    time.sleep(2)  # both clients running
    before = _endpoints(cl)
    assert {f"{NS}/friend", f"{NS}/foe", f"{NS}/server"} <= set(before), before
    old = _agent_pod(cl)
    t0 = time.monotonic()
    cl.kubectl("-n", "kube-system", "delete", "pod", old, "--wait=true", "--timeout=120s",
               timeout=150)
    cl.kubectl("-n", "kube-system", "rollout", "status", "ds/axoneme", "--timeout=180s", timeout=200)
    new = _agent_pod(cl)
    assert new != old
    print(f"agent pod replaced in {time.monotonic() - t0:.1f} s")
    time.sleep(2)  # traffic continues under the new agent
    for pod in ("friend", "foe"):
        cl.exec(NS, pod, "touch", "/tmp/stop")
    time.sleep(1)
    friend = cl.kubectl("-n", NS, "logs", "friend").stdout
    foe = cl.kubectl("-n", NS, "logs", "foe").stdout
    assert "CUT" not in friend, f"the allowed connection was cut: {friend[-500:]}"
    assert "DONE ok=" in friend and int(friend.split("DONE ok=")[1].split()[0]) > 50, friend[-500:]
    assert "DELIVERED" not in foe, f"a denied connection got through: {foe[-500:]}"
    assert "DONE tries=" in foe and int(foe.split("DONE tries=")[1].split()[0]) > 20, foe[-500:]
    # the new agent adopted the endpoints: same ids and identities
    assert _endpoints(cl) == before
