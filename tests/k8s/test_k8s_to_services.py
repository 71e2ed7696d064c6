"""CiliumNetworkPolicy ``toServices`` on a real cluster (issue 16): the agent
resolves it from the Services and EndpointSlices it watches.

Namespaces svcx (the client), svcy (db, web1, web2) and svcz (a second db with
the same labels). In svcy: Service ``db`` selects ``app: db``; Service ``ext``
has no selector and a hand-written EndpointSlice listing web1's address. A CNP
lets the client reach both Services, nothing else:

- default agent config: the client reaches svcy/db (directly and through db's
  ClusterIP) and nothing else: not svcz/db (same labels, not the Service's
  namespace), not web1 (a selector-less Service's addresses are CIDRs, and
  CIDRs do not select pods in Cilium's meaning), not web2;
- with ``policy_cidr_match_mode: pods`` (the ConfigMap patched, the agent
  restarted, and put back afterwards): web1 is reached and web2 is not; the
  EndpointSlice moved to web2's address: web2 is reached and web1 no longer.

Every expectation is also checked against ``axoneme policy matrix`` fed with
the cluster's own objects (Services and EndpointSlices included).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from .conftest import Cluster, cluster_up

X, Y, Z = "svcx", "svcy", "svcz"
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"
AXONEME = str(Path(sys.executable).parent / "axoneme")
PODS = {f"{X}/client": {"app": "client"}, f"{Y}/db": {"app": "db"}, f"{Y}/web1": {"app": "web"},
        f"{Y}/web2": {"app": "web"}, f"{Z}/db": {"app": "db"}}
TARGETS = [k for k in PODS if k != f"{X}/client"]


def _pod(key: str, labels: dict[str, str]) -> dict:
    ns, name = key.split("/")
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "agnhost", "image": AGNHOST,
                                     "imagePullPolicy": "IfNotPresent",
                                     "command": ["/agnhost", "porter"],
                                     "env": [{"name": "SERVE_TCP_PORT_80", "value": "foo"}],
                                     "ports": [{"containerPort": 80, "protocol": "TCP"}]}]}}


def _service(name: str, selector: dict[str, str] | None) -> dict:
    spec: dict = {"ports": [{"port": 80, "targetPort": 80, "protocol": "TCP"}]}
    if selector:
        spec["selector"] = selector
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": Y},
            "spec": spec}


def _slice(address: str) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "ext-1", "namespace": Y,
                         "labels": {"kubernetes.io/service-name": "ext",
                                    "endpointslice.kubernetes.io/managed-by": "e2e.axoneme.io"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
            "ports": [{"port": 80, "protocol": "TCP"}]}


CNP = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
       "metadata": {"name": "client-to-services", "namespace": X},
       "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
                "egress": [{"toServices": [
                    {"k8sService": {"serviceName": "db", "namespace": Y}},
                    {"k8sService": {"serviceName": "ext", "namespace": Y}}]}]}}


def _apply(cl: Cluster, *objs: dict) -> None:
    # JSON, not YAML: kubectl reads YAML 1.1 (a bare y would be true)
    cl.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                     "items": list(objs)}))


def _ips(cl: Cluster) -> dict[str, str]:
    out = {}
    for key in PODS:
        ns, name = key.split("/")
        out[key] = cl.pod_ip(ns, name)
    return out


def _probe(cl: Cluster, targets: dict[str, str]) -> dict[str, bool]:
    """From the client pod, one connect per target (name -> IP) at once."""
    script = ("for t in " + " ".join(f"{name}={ip}:80" for name, ip in targets.items()) + "; do "
              "( n=${t%%=*}; a=${t#*=}; "
              "if /agnhost connect $a --timeout=1s --protocol=tcp >/dev/null 2>&1; "
              "then echo \"$n ok\"; else echo \"$n no\"; fi ) & done; wait")
    res = cl.exec(X, "client", "sh", "-c", script, timeout=60)
    assert res.returncode == 0, f"probe failed: {res.stderr}"
    got = dict(line.split() for line in res.stdout.splitlines() if line.strip())
    assert set(got) == set(targets), got
    return {k: v == "ok" for k, v in got.items()}


def _predicted(cl: Cluster, mode: str = "") -> dict[str, bool]:
    """``axoneme policy matrix`` on the cluster's own objects: client -> each pod."""
    items = []
    for ns in (X, Y, Z):
        items.append(json.loads(cl.kubectl("get", "ns", ns, "-o", "json").stdout))
        for kind in ("pods", "services", "endpointslices"):
            items += json.loads(cl.kubectl("-n", ns, "get", kind, "-o", "json").stdout)["items"]
    with tempfile.TemporaryDirectory(prefix="ax-tosvc-") as tmp:
        cluster_file, policy_file = Path(tmp) / "cluster.yaml", Path(tmp) / "cnp.json"
        cluster_file.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
        policy_file.write_text(json.dumps(CNP))
        res = subprocess.run([AXONEME, "policy", "matrix", "--cluster", str(cluster_file),
                              "-f", str(policy_file), "--port", "80", "-o", "json",
                              "--policy-cidr-match-mode", mode],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return {p["to"]: p["verdict"] == "allowed" for p in json.loads(res.stdout)["probes"]
            if p["from"] == f"{X}/client" and p["to"] in TARGETS}


def _eventually(cl: Cluster, targets: dict[str, str], want: dict[str, bool]) -> None:
    """Programming is asynchronous: probe until it matches, for a while."""
    got: dict[str, bool] = {}
    for _ in range(10):
        got = _probe(cl, targets)
        if got == want:
            return
        time.sleep(1.0)
    assert got == want, f"probes {got}, expected {want}"


@pytest.fixture(scope="module")
def services_cluster(cluster_session):
    cl = cluster_up("ebpf")
    _apply(cl, *[{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}
                 for ns in (X, Y, Z)], *[_pod(k, v) for k, v in PODS.items()])
    try:
        for ns in (X, Y, Z):
            cl.wait_pods_ready(ns)
        ips = _ips(cl)
        _apply(cl, _service("db", {"app": "db"}), _service("ext", None), _slice(ips[f"{Y}/web1"]),
               CNP)
        yield cl, ips
    finally:
        cl.kubectl("delete", "ns", X, Y, Z, "--wait=true", "--timeout=120s", check=False,
                   timeout=150)


def test_egress_to_service_backends_only(services_cluster):
    cl, ips = services_cluster
    db_vip = cl.kubectl("-n", Y, "get", "svc", "db", "-o", "jsonpath={.spec.clusterIP}").stdout
    want = {f"{Y}/db": True, f"{Z}/db": False, f"{Y}/web1": False, f"{Y}/web2": False}
    assert _predicted(cl) == want
    _eventually(cl, {**{k: ips[k] for k in TARGETS}, "db-clusterip": db_vip},
                {**want, "db-clusterip": True})
    status = cl.agent("status", "-o", "json")
    assert status.returncode == 0, status.stderr
    k8s = json.loads(status.stdout)["components"]["kubernetes"]
    assert k8s["to_services"]["services"] >= 2 and not k8s["refused_policies"], k8s


def _set_cidr_match_mode(cl: Cluster, mode: str | None, original: str) -> None:
    """Patch the agent's config.yaml (None: the original) and restart the agent."""
    text = original if mode is None else original.rstrip("\n") + f"\npolicy_cidr_match_mode: {mode}\n"
    cl.kubectl("-n", "kube-system", "patch", "configmap", "axoneme-config", "--type", "merge",
               "-p", json.dumps({"data": {"config.yaml": text}}))
    cl.kubectl("-n", "kube-system", "rollout", "restart", "ds/axoneme")
    cl.kubectl("-n", "kube-system", "rollout", "status", "ds/axoneme", "--timeout=300s",
               timeout=320)


def test_pods_match_mode_follows_the_endpoint_slice(services_cluster):
    cl, ips = services_cluster
    original = json.loads(cl.kubectl("-n", "kube-system", "get", "configmap", "axoneme-config",
                                     "-o", "json").stdout)["data"]["config.yaml"]
    assert "policy_cidr_match_mode" not in original, original
    targets = {k: ips[k] for k in TARGETS}
    _set_cidr_match_mode(cl, "pods", original)
    try:
        want = {f"{Y}/db": True, f"{Z}/db": False, f"{Y}/web1": True, f"{Y}/web2": False}
        assert _predicted(cl, "pods") == want
        _eventually(cl, targets, want)
        # the EndpointSlice moves to web2: the agent follows it
        _apply(cl, _slice(ips[f"{Y}/web2"]))
        want = {**want, f"{Y}/web1": False, f"{Y}/web2": True}
        assert _predicted(cl, "pods") == want
        _eventually(cl, targets, want)
    finally:
        _set_cidr_match_mode(cl, None, original)
