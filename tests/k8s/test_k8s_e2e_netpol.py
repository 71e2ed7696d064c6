"""NetworkPolicy truth tables on a real cluster, compared probe by probe with
``axoneme policy matrix --cluster``.

Upstream's netpol e2e topology (test/e2e/network/netpol/model.go): namespaces
x, y, z labelled ``ns: <name>``, pods a, b, c labelled ``pod: <name>``, each one
agnhost container running ``/agnhost porter`` on 80 and 81/TCP under the named
ports serve-80-tcp / serve-81-tcp. Each case applies standard policies with
kubectl, probes every pod to every pod on both ports from inside the pods
(``/agnhost connect``, as upstream's kubeManager does), and compares each probe
with the verdict of the offline matrix fed with ``kubectl get ns,pods -o
yaml`` of the same objects and the same policy files.
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

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
PORTS = (80, 81)
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"
AXONEME = str(Path(sys.executable).parent / "axoneme")


def _pod(ns: str, name: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "agnhost", "image": AGNHOST, "imagePullPolicy": "IfNotPresent",
                "command": ["/agnhost", "porter"],
                "env": [{"name": f"SERVE_TCP_PORT_{p}", "value": "foo"} for p in PORTS],
                "ports": [{"name": f"serve-{p}-tcp", "containerPort": p, "protocol": "TCP"}
                          for p in PORTS],
            }],
        },
    }


def _np(name: str, ns: str, spec: dict) -> dict:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


# (case id, policies): upstream netpol test cases, written as users write them
CASES = [
    ("default-deny-ingress", [
        _np("deny-ingress", "x", {"podSelector": {}, "policyTypes": ["Ingress"]})]),
    ("allow-from-namespace-y-to-x-a", [
        _np("deny-ingress", "x", {"podSelector": {}, "policyTypes": ["Ingress"]}),
        _np("allow-ns-y", "x", {"podSelector": {"matchLabels": {"pod": "a"}},
                                "ingress": [{"from": [{"namespaceSelector":
                                                       {"matchLabels": {"ns": "y"}}}]}]})]),
    ("allow-pod-b-any-namespace-on-named-port-81", [
        _np("allow-b-81", "y", {"podSelector": {},
                                "ingress": [{"from": [{"namespaceSelector": {},
                                                       "podSelector": {"matchLabels": {"pod": "b"}}}],
                                             "ports": [{"port": "serve-81-tcp", "protocol": "TCP"}]}]})]),
    ("deny-all-egress-from-z", [
        _np("deny-egress", "z", {"podSelector": {}, "policyTypes": ["Egress"]})]),
    ("match-expressions-notin-and-egress-port", [
        _np("not-from-y", "x", {"podSelector": {"matchLabels": {"pod": "c"}},
                                "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [
                                    {"key": "ns", "operator": "NotIn", "values": ["y"]}]}}]}]}),
        _np("egress-80-only", "y", {"podSelector": {"matchLabels": {"pod": "a"}},
                                    "policyTypes": ["Egress"],
                                    "egress": [{"ports": [{"port": 80, "protocol": "TCP"}]}]})]),
]


@pytest.fixture(scope="module")
def netpol_cluster(cluster_session):
    cl = cluster_up("ebpf")
    objs = [{"apiVersion": "v1", "kind": "Namespace",
             "metadata": {"name": ns, "labels": {"ns": ns}}} for ns in NAMESPACES]
    objs += [_pod(ns, p) for ns in NAMESPACES for p in PODS]
    with cl.objects(objs, NAMESPACES):
        yield cl


def pod_ips(cl: Cluster) -> dict[str, str]:
    out = {}
    for ns in NAMESPACES:
        items = json.loads(cl.kubectl("-n", ns, "get", "pods", "-o", "json").stdout)["items"]
        for item in items:
            out[f"{ns}/{item['metadata']['name']}"] = item["status"]["podIP"]
    return out


def probe_all(cl: Cluster, ips: dict[str, str]) -> dict[tuple[str, str, int], bool]:
    """Every pod to every pod on every port, from inside the source pod: one
    ``kubectl exec`` per source running all its probes at once."""
    targets = [f"{ip}:{port}" for ip in ips.values() for port in PORTS]
    script = ("for t in " + " ".join(targets) + "; do "
              "( if /agnhost connect $t --timeout=1s --protocol=tcp >/dev/null 2>&1; "
              "then echo \"$t ok\"; else echo \"$t no\"; fi ) & done; wait")
    by_ip = {ip: key for key, ip in ips.items()}
    result: dict[tuple[str, str, int], bool] = {}
    for src in ips:
        ns, name = src.split("/")
        res = cl.exec(ns, name, "sh", "-c", script, timeout=60)
        assert res.returncode == 0, f"probe from {src} failed: {res.stderr}"
        for line in res.stdout.split("\n"):
            if not line.strip():
                continue
            target, verdict = line.split()
            ip, port = target.rsplit(":", 1)
            result[(src, by_ip[ip], int(port))] = verdict == "ok"
    assert len(result) == len(ips) * len(ips) * len(PORTS), "some probes did not answer"
    return result


def expected(cl: Cluster, policy_file: Path, workdir: Path) -> dict[tuple[str, str, int], bool]:
    """``axoneme policy matrix --cluster`` fed with the cluster's own objects."""
    items = []
    for ns in NAMESPACES:
        items.append(json.loads(cl.kubectl("get", "ns", ns, "-o", "json").stdout))
        items += json.loads(cl.kubectl("-n", ns, "get", "pods", "-o", "json").stdout)["items"]
    cluster_file = workdir / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": items}))
    args = [AXONEME, "policy", "matrix", "--cluster", str(cluster_file), "-f", str(policy_file),
            "-o", "json"]
    for p in PORTS:
        args += ["--port", str(p)]
    res = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return {(p["from"], p["to"], p["port"]): p["verdict"] == "allowed"
            for p in json.loads(res.stdout)["probes"]}


def _diff(got, want) -> list[str]:
    return [f"{s} -> {d}:{port}: probe {'allowed' if got[k] else 'denied'}, "
            f"matrix {'allowed' if want.get(k) else 'denied'}"
            for k in sorted(got) for (s, d, port) in [k] if got[k] != want.get(k)]


@pytest.mark.parametrize("case,policies", CASES, ids=[c[0] for c in CASES])
def test_truth_table_matches_matrix(netpol_cluster, case, policies):
    cl = netpol_cluster
    ips = pod_ips(cl)
    with tempfile.TemporaryDirectory(prefix="ax-netpol-") as tmp:
        work = Path(tmp)
        policy_file = work / "policies.json"
        policy_file.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": policies}))
        want = expected(cl, policy_file, work)
        assert any(not v for v in want.values()), "the case denies nothing: it tests nothing"
        cl.kubectl("apply", "-f", str(policy_file))
        try:
            # programming is asynchronous: re-probe a few times before calling a difference
            diff: list[str] = []
            for _ in range(4):
                diff = _diff(probe_all(cl, ips), want)
                if not diff:
                    break
                time.sleep(1.0)
            assert not diff, f"{case}: {len(diff)} probes differ from the matrix:\n" + "\n".join(diff)
        finally:
            cl.kubectl("delete", "-f", str(policy_file), "--wait=true", check=False)
