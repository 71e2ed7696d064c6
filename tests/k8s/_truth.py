"""Truth tables on a real cluster: every pod probes every pod on one port, from inside the
source pod, and the table is compared with ``axoneme policy matrix --cluster`` fed with
``kubectl get -o json`` of the same namespaces and pods (the multi-node tests)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .conftest import Cluster

AXONEME = str(Path(sys.executable).parent / "axoneme")
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"
Table = dict[tuple[str, str], bool]


def porter_pod(ns: str, name: str, port: int, placement: dict[str, Any]) -> dict[str, Any]:
    """An agnhost porter serving TCP ``port``, labelled ``pod=<name>``, placed by ``placement``
    (``nodeSelector`` or ``nodeName``, merged into the spec)."""
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"pod": name}},
            "spec": {"terminationGracePeriodSeconds": 1, **placement, "containers": [{
                "name": "agnhost", "image": AGNHOST, "imagePullPolicy": "IfNotPresent",
                "command": ["/agnhost", "porter"],
                "env": [{"name": f"SERVE_TCP_PORT_{port}", "value": "foo"}],
                "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}]}]}}


def pods_of(cl: Cluster, namespaces: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    out = {}
    for ns in namespaces:
        for item in json.loads(cl.kubectl("-n", ns, "get", "pods", "-o", "json").stdout)["items"]:
            out[f"{ns}/{item['metadata']['name']}"] = item
    return out


def probe_all(cl: Cluster, pods: dict[str, dict[str, Any]], port: int) -> Table:
    """Every pod to every pod on ``port`` (one exec per source, the connects in parallel)."""
    ips = {k: p["status"]["podIP"] for k, p in pods.items()}
    script = ("for t in " + " ".join(f"{ip}:{port}" for ip in ips.values()) + "; do "
              "( if /agnhost connect $t --timeout=1s --protocol=tcp >/dev/null 2>&1; "
              "then echo \"$t ok\"; else echo \"$t no\"; fi ) & done; wait")
    by_ip = {ip: key for key, ip in ips.items()}
    out: Table = {}
    for src in ips:
        ns, name = src.split("/")
        res = cl.exec(ns, name, "sh", "-c", script, timeout=90)
        assert res.returncode == 0, f"probe from {src} failed: {res.stderr}"
        for line in res.stdout.splitlines():
            if line.strip():
                target, verdict = line.split()
                out[(src, by_ip[target.rsplit(":", 1)[0]])] = verdict == "ok"
    assert len(out) == len(ips) ** 2, "some probes did not answer"
    return out


def matrix(cl: Cluster, namespaces: tuple[str, ...], policies: list[dict[str, Any]], port: int,
           work: Path) -> Table:
    """``axoneme policy matrix --cluster`` on the cluster's own objects (JSON files: kubectl and
    YAML 1.1 read a bare namespace name ``y`` as true)."""
    items = []
    for ns in namespaces:
        items.append(json.loads(cl.kubectl("get", "ns", ns, "-o", "json").stdout))
        items += json.loads(cl.kubectl("-n", ns, "get", "pods", "-o", "json").stdout)["items"]
    (work / "cluster.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    (work / "policies.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": policies}))
    res = subprocess.run([AXONEME, "policy", "matrix", "--cluster", str(work / "cluster.json"),
                          "-f", str(work / "policies.json"), "--port", str(port), "-o", "json"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return {(p["from"], p["to"]): p["verdict"] == "allowed" for p in json.loads(res.stdout)["probes"]}


def settled(cl: Cluster, pods: dict[str, dict[str, Any]], want: Table, port: int,
            tries: int = 4) -> list[str]:
    """Probe until the table equals ``want`` (programming is asynchronous); the differences
    left after ``tries`` rounds."""
    diff: list[str] = []
    for _ in range(tries):
        got = probe_all(cl, pods, port)
        diff = [f"{s} -> {d}: probe {'allowed' if v else 'denied'}, matrix "
                f"{'allowed' if want.get((s, d)) else 'denied'}"
                for (s, d), v in sorted(got.items()) if v != want.get((s, d))]
        if not diff:
            return []
        time.sleep(1.0)
    return diff
