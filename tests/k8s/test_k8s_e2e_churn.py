"""Churn on a real cluster: labels and pods change, policy follows within 1 s.

A server (agnhost netexec) behind a policy that admits only ``role: client``
pods, and from namespaces labelled ``team: blue``. Probes run inside the client
pods in a tight loop (``agnhost connect`` with a 200 ms timeout) and print the
pod's /proc/uptime with each result, mapped onto the test's clock (see
``_flip_after``), so the time from the ``kubectl label`` command to the first
probe with the new verdict is measured, not guessed. Also: a deleted and recreated pod
with other labels is judged by its new labels, and no identity of the old
labels is left in the agent.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
import yaml

from .conftest import Cluster, cluster_up

NS, NS_B = "churn", "churn-b"
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"
LIMIT_S = 1.0


def _pod(ns: str, name: str, labels: dict, command: list[str]) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "spec": {"terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": AGNHOST, "command": command,
                                     "imagePullPolicy": "IfNotPresent"}]}}


SLEEPER = ["/agnhost", "pause"]
POLICY = {
    "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
    "metadata": {"name": "server-ingress", "namespace": NS},
    "spec": {"podSelector": {"matchLabels": {"app": "server"}},
             "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}},
                                   {"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]},
}


@pytest.fixture(scope="module")
def churn(cluster_session):
    cl = cluster_up("ebpf")
    objs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS_B,
                                                                    "labels": {"team": "red"}}},
            _pod(NS, "server", {"app": "server"}, ["/agnhost", "netexec", "--http-port=80"]),
            _pod(NS, "client1", {"role": "client"}, SLEEPER),
            _pod(NS, "client2", {"role": "other"}, SLEEPER),
            _pod(NS_B, "client3", {"role": "other"}, SLEEPER),
            POLICY]
    cl.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objs))
    try:
        cl.wait_pods_ready(NS)
        cl.wait_pods_ready(NS_B)
        yield cl, cl.pod_ip(NS, "server")
    finally:
        cl.kubectl("delete", "ns", NS, NS_B, "--wait=true", "--timeout=120s", check=False,
                   timeout=150)


def _flip_after(cl: Cluster, ns: str, pod: str, server: str, want_ok: bool, change) -> float:
    """Seconds from ``change()`` to the first probe from ``pod`` with the new verdict.

    Each probe line carries the pod's /proc/uptime. The test's own view of that
    clock may differ (CI runs the suite in a sandbox whose /proc is not the
    pods'), so the pod's stamps are mapped onto the test's monotonic clock: every
    line is also stamped when it arrives here, and the smallest arrival-minus-pod
    difference is the offset (the clock offset plus the least streaming delay).
    """
    verdict = "ok" if want_ok else "no"
    loop = (f"end=$(( $(cut -d. -f1 /proc/uptime) + 8 )); "
            f"while [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do "
            f"if /agnhost connect {server}:80 --timeout=200ms --protocol=tcp >/dev/null 2>&1; "
            f"then r=ok; else r=no; fi; echo \"$(cut -d' ' -f1 /proc/uptime) $r\"; "
            f"[ $r = {verdict} ] && [ -n \"$go\" ] && break; "
            f"[ -f /tmp/go ] && go=1; done")
    cl.exec(ns, pod, "rm", "-f", "/tmp/go")
    proc = subprocess.Popen([cl.kubectl_bin, "--kubeconfig", str(cl.kubeconfig), "-n", ns, "exec",
                             pod, "--", "sh", "-c", loop], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines: list[tuple[float, float, str]] = []  # (arrival here, pod stamp, verdict)

    def read() -> None:
        for ln in proc.stdout:
            if ln.strip():
                stamp, r = ln.split()
                lines.append((time.monotonic(), float(stamp), r))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # the loop runs and shows the old verdict first (kubectl exec can take seconds to
    # start on a loaded machine: wait for its first probe, not a fixed time)
    deadline = time.monotonic() + 60
    while not lines and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert lines, f"no probe from {ns}/{pod} within 60 s"
    t0 = time.monotonic()
    try:
        change()
        cl.exec(ns, pod, "touch", "/tmp/go")
    finally:
        proc.wait(timeout=30)
        reader.join(timeout=5)
    offset = min(arrived - stamp for arrived, stamp, _ in lines)
    probes = [(stamp + offset, r) for _, stamp, r in lines]
    out = "\n".join(f"{t - t0:+.3f} s {r}" for t, r in probes)
    before = [r for t, r in probes if t < t0]
    assert before and before[-1] != verdict, f"{ns}/{pod} had the new verdict before the change:\n{out}"
    after = [t for t, r in probes if t >= t0 and r == verdict]
    assert after, f"{ns}/{pod} never got verdict {verdict} after the change:\n{out[-1500:]}"
    return after[0] - t0


def test_pod_label_change_follows_within_1s(churn):
    cl, server = churn
    def relabel(role: str):
        return lambda: cl.kubectl("-n", NS, "label", "pod", "client2", f"role={role}", "--overwrite")

    try:
        allowed = _flip_after(cl, NS, "client2", server, True, relabel("client"))
        denied = _flip_after(cl, NS, "client2", server, False, relabel("other"))
    finally:  # the later tests count role=client identities: never leave client2 as one
        relabel("other")()
    print(f"pod label -> allowed {allowed * 1000:.0f} ms, -> denied {denied * 1000:.0f} ms")
    assert allowed < LIMIT_S and denied < LIMIT_S, (allowed, denied)


def test_namespace_label_change_follows_within_1s(churn):
    cl, server = churn
    def relabel(team: str):
        return lambda: cl.kubectl("label", "ns", NS_B, f"team={team}", "--overwrite")

    try:
        allowed = _flip_after(cl, NS_B, "client3", server, True, relabel("blue"))
        denied = _flip_after(cl, NS_B, "client3", server, False, relabel("red"))
    finally:
        relabel("red")()
    print(f"namespace label -> allowed {allowed * 1000:.0f} ms, -> denied {denied * 1000:.0f} ms")
    assert allowed < LIMIT_S and denied < LIMIT_S, (allowed, denied)


def test_pod_recreated_with_other_labels_leaves_no_stale_identity(churn):
    cl, server = churn
    cl.kubectl("-n", NS, "delete", "pod", "client1", "--wait=true")
    cl.kubectl("apply", "-f", "-", input=yaml.safe_dump(
        _pod(NS, "client1", {"role": "intruder"}, SLEEPER)))
    cl.kubectl("-n", NS, "wait", "--for=condition=Ready", "pod/client1", "--timeout=120s",
               timeout=150)
    res = cl.exec(NS, "client1", "/agnhost", "connect", f"{server}:80", "--timeout=1s",
                  "--protocol=tcp")
    assert res.returncode != 0, "client1 recreated as role=intruder still reaches the server"

    def stale() -> list:
        # held by an endpoint: the cluster-wide identity itself (a CiliumIdentity) stays
        # known until the collector deletes it (test_k8s_identities.py)
        out = cl.agent("identity", "list", "-o", "json")
        assert out.returncode == 0, out.stderr
        return [i for i in json.loads(out.stdout)
                if f"k8s:io.kubernetes.pod.namespace={NS}" in i["labels"]
                and "k8s:role=client" in i["labels"] and i["endpoints"]]

    deadline = time.monotonic() + 10
    left = stale()
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = stale()
    assert not left, f"identities of pods that no longer exist: {left}"
