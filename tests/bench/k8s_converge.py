"""Kubernetes mode at cluster scale (issue 17): convergence under churn, CPU per pod event.

Both measures use pods of another node: a Node object of ours (``bench-remote``,
no kubelet behind it) and pods bound to it whose addresses come by a status
patch, as a kubelet would write them. They never run; the agent must still put
every one of them into its ipcache with the identity of its labels (Cilium
fills its ipcache from every node's endpoints), and a local server pod's policy
must follow them. The pods tolerate every taint (the node never reports Ready)
and are deleted with a grace period of 0 (no kubelet to confirm).

- converge: with 200 such pods in 50 label groups present, 1,000 pod events
  (500 creates, each followed by its status patch, and 500 deletes that leave
  every group at least one pod) and 100 NetworkPolicy changes (20 policies over
  the server, each allowing one group on one port, created, changed and
  deleted) are written concurrently from two threads. Then the kernel is read
  directly (bpftool on the pinned maps, not the agent's API) until it holds
  exactly the expected state: the ipcache entries in the bench's pod range are
  the living pods' addresses with their identity numbers (read from the
  CiliumIdentity objects), and the server endpoint's ingress entries for the
  groups' identities are exactly the surviving policies' (identity, TCP port)
  pairs. Reported: the time from the last write to that state, and from the
  first write.
- cpu per pod event: the agent's CPU time (utime + stime of its process, seen
  from the host) for a batch of pod events (creates with their status patch,
  and deletes; 600 per batch, the median of 3 batches) at 100, 1,000 and 5,000
  pods in the API, once the agent is quiet (its CPU rate under 2 % over 2 s),
  minus that idle rate over the batch's wall time; flat means max/min <= 1.5.
"""

from __future__ import annotations

import concurrent.futures as cf
import ipaddress
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

NS = "bench-conv"
NODE = "bench-remote"
POD_RANGE = ipaddress.ip_network("10.244.192.0/18")
GROUPS = 50
BPFFS = "/sys/fs/bpf/axoneme-cluster"  # scripts/_cluster.py BPFFS_ROOT: the cluster agents' pin root
IPCACHE_MAPS = ("axoneme_ipcache_host_v1", "axoneme_ipcache_v1")
POLICY_MAPS = ("axoneme_policy_hash_v1", "axoneme_policy_v1")
PORT_BASE = 8000


def _hexbytes(v: Any) -> bytes:
    return bytes(int(x, 16) for x in v)


def _map_items(name: str) -> Iterable[tuple[bytes, bytes]]:
    out = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", f"{BPFFS}/{name}"],
                         capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise SystemExit(f"bpftool map dump {BPFFS}/{name} failed: {(out.stderr or out.stdout).strip()}")
    for item in json.loads(out.stdout or "[]"):
        if "key" in item and "value" in item:
            yield _hexbytes(item["key"]), _hexbytes(item["value"])


def kernel_ipcache() -> dict[str, int]:
    """The pinned ipcache maps' IPv4 /32 entries in POD_RANGE (not node entries):
    address -> identity. Key: prefixlen (32 + the address prefix), family (4), pad,
    address; value: identity, flags (lib/ipcache.h)."""
    out = {}
    for name in IPCACHE_MAPS:
        for k, v in _map_items(name):
            if k[4] != 4 or int.from_bytes(k[0:4], "little") != 64:
                continue
            addr = ipaddress.ip_address(k[8:12])
            if addr in POD_RANGE and not int.from_bytes(v[4:8], "little") & 1:
                out[str(addr)] = int.from_bytes(v[0:4], "little")
    return out


def kernel_ingress(ep_id: int, identities: set[int]) -> set[tuple[int, int]]:
    """The server endpoint's ingress TCP entries for ``identities``: (identity, port)."""
    out = set()
    for name in POLICY_MAPS:
        for k, _v in _map_items(name):
            ep, ident, direction, proto = (int.from_bytes(k[4:8], "little"),
                                           int.from_bytes(k[8:12], "little"), k[12], k[13])
            if ep == ep_id and direction == 0 and proto == 6 and ident in identities:
                out.add((ident, int.from_bytes(k[14:16], "big")))
    return out


class Api:
    """The real API server through the Kubernetes Python client."""

    def __init__(self, kubeconfig: str) -> None:
        from kubernetes import client, config

        self.client = config.new_client_from_config(config_file=kubeconfig)
        self.core = client.CoreV1Api(self.client)
        self.net = client.NetworkingV1Api(self.client)
        self.custom = client.CustomObjectsApi(self.client)
        self.ips = (str(a) for a in POD_RANGE.hosts())
        self.lock = threading.Lock()
        self.pods: dict[str, tuple[int, str]] = {}  # name -> (group, ip)

    def setup(self) -> None:
        self.core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE},
                               "spec": {"podCIDR": str(POD_RANGE), "podCIDRs": [str(POD_RANGE)]}})
        self.core.create_namespace({"apiVersion": "v1", "kind": "Namespace",
                                    "metadata": {"name": NS}})

    def teardown(self) -> None:
        from kubernetes.client.rest import ApiException

        for call in (lambda: self.core.delete_collection_namespaced_pod(NS, grace_period_seconds=0),
                     lambda: self.net.delete_collection_namespaced_network_policy(NS),
                     lambda: self.core.delete_namespace(NS),
                     lambda: self.core.delete_node(NODE)):
            try:
                call()
            except ApiException as e:
                if e.status != 404:
                    print(f"teardown: {e.status} {e.reason}", flush=True)

    def create_pod(self, name: str, group: int) -> None:
        with self.lock:
            ip = next(self.ips)
        self.core.create_namespaced_pod(NS, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": f"a{group}"}},
            "spec": {"nodeName": NODE, "tolerations": [{"operator": "Exists"}],
                     "containers": [{"name": "c", "image": "none"}]}})
        self.core.patch_namespaced_pod_status(name, NS, {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
        with self.lock:
            self.pods[name] = (group, ip)

    def delete_pod(self, name: str) -> None:
        self.core.delete_namespaced_pod(name, NS, grace_period_seconds=0)
        with self.lock:
            del self.pods[name]

    def policy(self, name: str, group: int, port: int) -> dict[str, Any]:
        return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"podSelector": {"matchLabels": {"app": "srv"}}, "policyTypes": ["Ingress"],
                         "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": f"a{group}"}}}],
                                      "ports": [{"protocol": "TCP", "port": port}]}]}}

    def identities(self) -> dict[int, int]:
        """group -> identity number, from the CiliumIdentity objects."""
        objs = self.custom.list_cluster_custom_object("cilium.io", "v2", "ciliumidentities")
        out = {}
        for o in objs.get("items", []):
            labels = o.get("security-labels") or {}
            app = labels.get("k8s:app", "")
            if labels.get("k8s:io.kubernetes.pod.namespace") == NS and app.startswith("a"):
                out[int(app[1:])] = int(o["metadata"]["name"])
        return out


def pool(fn: Callable[[Any], None], items: Iterable[Any], workers: int = 8) -> None:
    with cf.ThreadPoolExecutor(workers) as ex:
        for f in [ex.submit(fn, i) for i in items]:
            f.result()


def agent_cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(cond: Callable[[], bool], timeout: float, interval: float = 0.25) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return time.monotonic()
        time.sleep(interval)
    return None


def _ipcache_matches(api: Api, ids: dict[int, int]) -> bool:
    with api.lock:
        want = {ip: ids.get(g, -1) for g, ip in api.pods.values()}
    return kernel_ipcache() == want


def bench_converge(api: Api, ep_id: int, events: int = 1000, changes: int = 100,
                   seed: int = 17) -> dict[str, Any]:
    rnd = random.Random(seed)
    # the starting population: 4 pods per group
    pool(lambda i: api.create_pod(f"base-{i}", i % GROUPS), range(4 * GROUPS))
    ids = {}
    got = wait_until(lambda: len(ids.update(api.identities()) or ids) == GROUPS
                     and _ipcache_matches(api, ids), 120)
    if got is None:
        raise SystemExit(f"the starting 200 pods never reached the kernel: {len(ids)} identities")
    creates, deletes = events // 2, events - events // 2  # interleaved: even i creates
    policies: dict[str, tuple[int, int]] = {}

    def churn_pods() -> None:
        def one(i: int) -> None:
            if i % 2 == 0:
                api.create_pod(f"c-{i}", i % GROUPS)
                return
            with api.lock:  # a victim whose group keeps a pod; gone from the model at once
                counts: dict[int, int] = {}
                for g, _ip in api.pods.values():
                    counts[g] = counts.get(g, 0) + 1
                name = rnd.choice([n for n, (g, _ip) in api.pods.items() if counts[g] > 1])
                del api.pods[name]
            api.core.delete_namespaced_pod(name, NS, grace_period_seconds=0)
        pool(one, range(creates + deletes))

    def churn_policies() -> None:
        for i in range(changes):
            name = f"np-{i % 20}"
            if name in policies and i % 5 == 4:
                api.net.delete_namespaced_network_policy(name, NS)
                del policies[name]
                continue
            group, port = rnd.randrange(GROUPS), PORT_BASE + rnd.randrange(20)
            body = api.policy(name, group, port)
            if name in policies:
                api.net.replace_namespaced_network_policy(name, NS, body)
            else:
                api.net.create_namespaced_network_policy(NS, body)
            policies[name] = (group, port)

    t_start = time.monotonic()
    threads = [threading.Thread(target=churn_pods), threading.Thread(target=churn_policies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_last = time.monotonic()

    def converged() -> bool:
        if not _ipcache_matches(api, ids):
            return False
        want = {(ids[g], p) for g, p in policies.values()}
        return kernel_ingress(ep_id, set(ids.values())) == want
    t_done = wait_until(converged, 60)
    with api.lock:
        pods_left = len(api.pods)
    if t_done is None:
        want = {(ids[g], p) for g, p in policies.values()}
        have = kernel_ingress(ep_id, set(ids.values()))
        raise SystemExit(f"not converged 60 s after the last write: policy missing "
                         f"{sorted(want - have)[:5]} extra {sorted(have - want)[:5]}; ipcache "
                         f"{len(kernel_ipcache())} entries vs {pods_left} pods")
    return {"pod_events": creates + deletes, "policy_changes": changes, "pods_at_end": pods_left,
            "policies_at_end": len(policies), "writes_s": round(t_last - t_start, 2),
            "converged_after_last_write_s": round(t_done - t_last, 2),
            "converged_after_first_write_s": round(t_done - t_start, 2)}


def settle(pid: int, window: float = 2.0, quiet: float = 0.02, timeout: float = 60) -> float:
    """Wait until the agent's CPU rate over ``window`` is below ``quiet`` (it has
    absorbed the last burst of events); that rate, the idle rate subtracted after."""
    rate = float("inf")
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        c0, w0 = agent_cpu_s(pid), time.monotonic()
        time.sleep(window)
        rate = (agent_cpu_s(pid) - c0) / (time.monotonic() - w0)
        if rate < quiet:
            break
    return rate


def bench_cpu_per_event(api: Api, pid: int, sizes: tuple[int, ...] = (100, 1000, 5000),
                        batch: int = 600, repeats: int = 3) -> list[dict[str, Any]]:
    out = []
    made = 0
    ids: dict[int, int] = {}
    for size in sizes:
        with api.lock:
            have = list(api.pods)
        pool(api.delete_pod, have[size:])  # down to ``size`` (the churn left ~200)
        pool(lambda i: api.create_pod(f"bg-{i}", i % GROUPS), range(made, made + size - len(have)))
        made += max(0, size - len(have))
        if wait_until(lambda: (ids.update(api.identities()) or True)
                      and _ipcache_matches(api, ids), 300) is None:
            raise SystemExit(f"{size} pods never reached the kernel")
        idle_rate = settle(pid)
        runs = []
        for rep in range(repeats):
            c0, w0 = agent_cpu_s(pid), time.monotonic()
            names = [f"ev-{size}-{rep}-{i}" for i in range(batch // 2)]
            pool(lambda i, names=names: api.create_pod(names[i], i % GROUPS), range(len(names)))
            pool(api.delete_pod, names)
            if wait_until(lambda: _ipcache_matches(api, ids), 120) is None:
                raise SystemExit(f"the batch at {size} pods never converged")
            settle(pid)  # until the agent is quiet again: all of the batch's work counted
            cpu, wall = agent_cpu_s(pid) - c0, time.monotonic() - w0
            runs.append((cpu - idle_rate * wall) / batch)
        out.append({"pods": size, "events": batch, "repeats": repeats,
                    "idle_cpu_rate": round(idle_rate, 4),
                    "cpu_ms_per_event_runs": [round(r * 1000, 3) for r in runs],
                    "cpu_ms_per_event": round(sorted(runs)[len(runs) // 2] * 1000, 3)})
        print(f"cpu per pod event at {size} pods: {out[-1]}", flush=True)
    return out


def server_endpoint(kubectl: Callable[..., subprocess.CompletedProcess[str]]) -> int:
    """The local server pod's endpoint id, from the agent on this node."""
    eps = json.loads(kubectl("-n", "kube-system", "exec", "ds/axoneme", "--", "axoneme", "endpoint",
                             "list", "-o", "json").stdout)
    for ep in eps:
        if ep.get("pod") == f"{NS}/srv":
            return int(ep["id"])
    raise SystemExit(f"no endpoint for {NS}/srv in the agent: {eps}")


def run(kubectl: Callable[..., subprocess.CompletedProcess[str]], kubeconfig: str, pid: int,
        sizes: tuple[int, ...]) -> dict[str, Any]:
    """Both measures on the running cluster; everything made is deleted after."""
    api = Api(kubeconfig)
    api.teardown()  # a previous run's leftovers
    wait_until(lambda: NS not in kubectl("get", "ns", "-o", "name", check=False).stdout, 120, 1)
    api.setup()
    try:
        api.core.create_namespaced_pod(NS, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "srv", "labels": {"app": "srv"}},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                "name": "c", "image": "registry.k8s.io/e2e-test-images/agnhost:2.66.1",
                "imagePullPolicy": "IfNotPresent", "command": ["/agnhost", "pause"]}]}})
        kubectl("-n", NS, "wait", "--for=condition=Ready", "pod/srv", "--timeout=120s", timeout=150)
        ep_id = server_endpoint(kubectl)
        conv = bench_converge(api, ep_id)
        print(f"converge: {conv}", flush=True)
        cpu = bench_cpu_per_event(api, pid, sizes)
        per = [r["cpu_ms_per_event"] for r in cpu]
        spread = max(per) / min(per) if min(per) > 0 else float("inf")
        return {"converge": conv, "cpu_per_pod_event": cpu, "cpu_spread": round(spread, 2)}
    finally:
        api.teardown()
