"""One identity collector per cluster: the Lease election on 2 real nodes (issue 20).

``scripts/cluster up --nodes 2`` (eBPF, native routing), the agents with a short collector
(``identity_gc_interval: 1``, ``identity_heartbeat_timeout: 3``) and the default election
(Lease ``kube-system/axoneme-identity-gc``, 15 s lease, 10 s renew deadline, 2 s retry period;
agent/_identitylease.py):

1. Exactly one agent holds the Lease (its ``status`` says so, the other's names it as holder)
   and only its collector runs passes; the Lease has client-go's shape (MicroTimes, the node
   name as holder) and is renewed.
2. The holder's agent container is paused (a dead agent: it renews nothing, releases nothing):
   the other agent holds the Lease within the lease duration plus a retry period of the last
   renew (``leaseTransitions`` + 1), and its collector marks and deletes the identity of a pod
   deleted after the takeover. The paused agent, resumed, no longer collects.
3. The holder's agent pod deleted (SIGTERM, a clean stop): it releases the Lease and the other
   agent takes it at its next read (a retry period), not a lease duration later.

The cluster is brought down at the end. ``AXONEME_K8S_LEADER_RESULTS=FILE``: the figures as JSON.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from datetime import datetime
from typing import Any

import pytest

from . import _nodekernel as nk
from .conftest import Cluster, cluster_down, cluster_up
from .test_k8s_multinode_identities import (
    AGNHOST,
    _agent_json,
    _configmap,
    _healthy,
    _restart_agents,
    _set_configmap,
    _wait,
)

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]

LEASE = "axoneme-identity-gc"
LEASE_S, RENEW_S, RETRY_S = 15, 10, 2  # the defaults (AgentConfig leader_election_*)
GC_INTERVAL_S, HEARTBEAT_S = 1, 3
NS = "ldr"
MICRO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
FIGURES: dict[str, Any] = {"lease_s": LEASE_S, "renew_deadline_s": RENEW_S, "retry_s": RETRY_S,
                           "gc_interval_s": GC_INTERVAL_S, "heartbeat_timeout_s": HEARTBEAT_S}


@pytest.fixture(scope="module")
def ldr(cluster_session: None) -> Any:
    cl = cluster_up("ebpf", nodes=2, routing="native")
    try:
        conf = _configmap(cl)
        conf.update(identity_gc_interval=GC_INTERVAL_S, identity_heartbeat_timeout=HEARTBEAT_S)
        _set_configmap(cl, conf, "a short collector, the default election")
        _restart_agents(cl)
        cl.kubectl("apply", "-f", "-", input=json.dumps(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}))
        yield cl
        print("identity gc leader election:", json.dumps(FIGURES, sort_keys=True))
        path = os.environ.get("AXONEME_K8S_LEADER_RESULTS")
        if path:
            with open(path, "w") as f:
                json.dump({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), **FIGURES},
                          f, indent=2, sort_keys=True)
                f.write("\n")
    finally:
        cluster_down()  # the ConfigMap changed: the next module starts anew


def _gc(cl: Cluster, node: str) -> dict[str, Any]:
    gc: dict[str, Any] = _agent_json(cl, node, "status")["components"]["kubernetes"][
        "identities"]["gc"]
    return gc


def _lease(cl: Cluster) -> dict[str, Any] | None:
    res = cl.kubectl("-n", "kube-system", "get", "lease", LEASE, "-o", "json", check=False)
    return json.loads(res.stdout) if res.returncode == 0 else None


def _holder(cl: Cluster) -> str:
    lease = _lease(cl)
    return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")


def _epoch(micro: str) -> float:
    return datetime.fromisoformat(micro.replace("Z", "+00:00")).timestamp()


def _one_leader(cl: Cluster) -> tuple[str, str] | None:
    """(holder, other) when exactly one agent leads and both name it as the holder."""
    nodes = cl.node_names()
    views = {n: _gc(cl, n)["leader_election"] for n in nodes}
    leading = [n for n, v in views.items() if v["leading"]]
    if len(leading) != 1 or _holder(cl) != leading[0]:
        return None
    if any(v["holder"] != leading[0] for v in views.values()):
        return None
    return leading[0], next(n for n in nodes if n != leading[0])


def _replaced(cl: Cluster, node: str, old: str) -> bool:
    """``node``'s agent pod is a new one (not ``old``) and healthy."""
    try:
        return cl.agent_pod(node) != old and _healthy(cl, [node])
    except AssertionError:  # none yet (the old one terminating)
        return False


def _identity_of(cl: Cluster, app: str) -> dict[str, Any] | None:
    items = json.loads(cl.kubectl("get", "ciliumidentities", "-l", f"app={app}",
                                  "-o", "json").stdout)["items"]
    return items[0] if items else None


def _pod(name: str, node: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
            "spec": {"nodeName": node, "terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": AGNHOST, "imagePullPolicy": "IfNotPresent",
                                     "command": ["/agnhost", "pause"]}]}}


def test_one_agent_holds_the_lease_and_only_it_collects(ldr: Any) -> None:
    cl = ldr
    pair = _wait(lambda: _one_leader(cl), LEASE_S + 30, 1)
    assert pair, {n: _gc(cl, n)["leader_election"] for n in cl.node_names()}
    leader, other = pair
    spec = _lease(cl)["spec"]  # type: ignore[index]
    assert spec["holderIdentity"] == leader and spec["leaseDurationSeconds"] == LEASE_S, spec
    assert MICRO.match(spec["acquireTime"]) and MICRO.match(spec["renewTime"]), spec
    before = {n: _gc(cl, n)["runs"] for n in (leader, other)}
    time.sleep(6)
    after = {n: _gc(cl, n)["runs"] for n in (leader, other)}
    assert after[other] == before[other], (other, before, after)  # never collected
    assert after[leader] - before[leader] >= 3, (leader, before, after)  # every 1 s +-25 %
    renewed = _lease(cl)["spec"]  # type: ignore[index]
    assert renewed["holderIdentity"] == leader and renewed["renewTime"] != spec["renewTime"]
    assert renewed["acquireTime"] == spec["acquireTime"] or \
        renewed["leaseTransitions"] > spec["leaseTransitions"]
    FIGURES["first_leader"] = leader
    FIGURES["passes_in_6s"] = {n: after[n] - before[n] for n in after}


def test_the_other_agent_takes_over_a_dead_holder_and_collects(ldr: Any) -> None:
    cl = ldr
    pair = _wait(lambda: _one_leader(cl), LEASE_S + 30, 1)
    assert pair, "no single holder before the takeover"
    leader, other = pair
    cl.kubectl("apply", "-f", "-", input=json.dumps(_pod("victim", other)))
    cl.wait_pods_ready(NS)
    assert _wait(lambda: _identity_of(cl, "victim"), 30, 0.5), "no CiliumIdentity for the pod"
    container, _ = nk.agent_container(cl, leader)
    assert container, f"{leader}'s agent container has no id"
    last = _lease(cl)["spec"]  # type: ignore[index]
    nk.ctr(cl, leader, "task", "pause", container)  # dead: it renews and releases nothing
    t0 = time.monotonic()
    try:
        while True:
            lease = _lease(cl)
            spec = (lease or {}).get("spec") or {}
            if spec.get("holderIdentity") == other:
                break
            if spec.get("holderIdentity") == leader:
                last = spec  # its last renew before the pause
            assert time.monotonic() - t0 < LEASE_S + RETRY_S + 30, f"no takeover: {spec}"
            time.sleep(0.1)
        takeover_s = round(time.monotonic() - t0, 2)
        # the Lease's own clock (both nodes are this machine): the last renew to the takeover
        gap = round(_epoch(spec["acquireTime"]) - _epoch(last["renewTime"]), 2)
        assert spec["leaseTransitions"] == last["leaseTransitions"] + 1, (last, spec)
        assert LEASE_S - 0.5 <= gap <= LEASE_S + RETRY_S + 0.5, (gap, last, spec)
        assert takeover_s <= LEASE_S + RETRY_S + 2, takeover_s  # + the test's polling
        assert _wait(lambda: _gc(cl, other)["leader_election"]["leading"], 10, 0.5)
        # the new holder collects: the deleted pod's identity is marked, then deleted
        ran = _gc(cl, other)
        cl.kubectl("-n", NS, "delete", "pod", "victim", "--wait=false")
        t1 = time.monotonic()
        marked = _wait(lambda: "io.cilium.heartbeat" in (
            ((_identity_of(cl, "victim") or {}).get("metadata") or {}).get("annotations") or {})
            or _identity_of(cl, "victim") is None, 30, 0.2)
        marked_s = round(time.monotonic() - t1, 2)
        gone = _wait(lambda: _identity_of(cl, "victim") is None, 30, 0.2)
        gone_s = round(time.monotonic() - t1, 2)
        now = _gc(cl, other)
    finally:
        nk.ctr(cl, leader, "task", "resume", container, check=False)
    assert marked and gone, "the new holder did not collect the pod's identity within 30 s"
    assert now["deleted"] > ran["deleted"] and now["marked"] > ran["marked"], (ran, now)
    # the old holder, back, sees the other's Lease and does not collect
    assert _wait(lambda: _healthy(cl, [leader]), 90, 1), f"{leader}'s agent not back"
    back = _wait(lambda: (lambda v: not v["leading"] and v["holder"] == other)(
        _gc(cl, leader)["leader_election"]), RETRY_S * 3, 0.5)
    assert back, _gc(cl, leader)["leader_election"]
    runs = _gc(cl, leader)["runs"]
    time.sleep(3)
    assert _gc(cl, leader)["runs"] == runs, "the old holder still collects"
    FIGURES["dead_holder"] = {"from": leader, "to": other, "takeover_s": takeover_s,
                              "lease_gap_s": gap, "marked_s": marked_s, "deleted_s": gone_s}
    print(f"dead holder {leader}: {other} holds the lease {takeover_s} s after the pause "
          f"({gap} s after the last renew); deleted pod's identity marked {marked_s} s, "
          f"deleted {gone_s} s after the pod's delete")


def test_a_clean_stop_releases_the_lease_and_the_other_takes_it_at_once(ldr: Any) -> None:
    cl = ldr
    pair = _wait(lambda: _one_leader(cl), LEASE_S + 30, 1)
    assert pair, "no single holder before the clean stop"
    leader, other = pair
    before = _lease(cl)["spec"]  # type: ignore[index]
    pod = cl.agent_pod(leader)
    # its log to the end (what its stop did, when the handover fails)
    logs = subprocess.Popen([cl.kubectl_bin, "--kubeconfig", str(cl.kubeconfig), "-n",
                             "kube-system", "logs", "-f", "--tail=5", pod],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1)
        cl.kubectl("-n", "kube-system", "delete", "pod", pod, "--wait=false")
        t0 = time.monotonic()
        released = False
        while True:
            spec = (_lease(cl) or {}).get("spec") or {}
            released = released or spec.get("holderIdentity") in ("", None)
            if spec.get("holderIdentity") == other:
                break
            if time.monotonic() - t0 > LEASE_S + RETRY_S + 30:
                break
            time.sleep(0.1)
        handover_s = round(time.monotonic() - t0, 2)
    finally:
        try:
            out, _ = logs.communicate(timeout=40)  # ends with the pod
        except subprocess.TimeoutExpired:
            logs.kill()
            out, _ = logs.communicate()
    assert spec.get("holderIdentity") == other, f"no handover: {spec}; {pod}'s log:\n{out[-4000:]}"
    assert spec["leaseTransitions"] == before["leaseTransitions"] + 1, (before, spec)
    # released: the other took it at its next read, not after the lease duration
    assert handover_s <= RETRY_S + 5 < LEASE_S, handover_s
    assert _wait(lambda: _replaced(cl, leader, pod), 180, 1), f"{leader}'s agent not replaced"
    assert _wait(lambda: _one_leader(cl) == (other, leader), 30, 1), "not one holder afterwards"
    FIGURES["clean_stop"] = {"from": leader, "to": other, "handover_s": handover_s,
                             "empty_holder_seen": released}
    print(f"clean stop of {leader}'s agent: {other} holds the lease {handover_s} s after the "
          f"pod's delete (empty holder seen: {released})")
