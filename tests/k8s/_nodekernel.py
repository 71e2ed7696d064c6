"""What the multi-node identity and node-loss tests read and do below the API (issue 20).

- ``kernel_ipcache(cl, node)``: a node's ipcache as the kernel holds it: bpftool on the pinned
  maps of the cluster agents' bpffs root (node k >= 2: in its own mount namespace, which has a
  bpffs instance of its own; scripts/_cluster_nodes.py);
- ``ctr(cl, node, ...)``: containerd's own client against that node's containerd (kill or
  pause a container the way a crash or a dead machine would, without the kubelet);
- ``GhostPods``: pods of a Node object with no kubelet behind it (tests/bench/k8s_converge.py's
  way): they never run, their addresses come by a status patch, and every real node's agent
  puts them in its ipcache with the identity of their labels, allocated through the API;
- ``Prober``: a probe loop inside a pod (one ``kubectl exec``), one verdict per line.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import threading
import time
from pathlib import Path

from .conftest import REPO, Cluster

BPFFS = "/sys/fs/bpf/axoneme-cluster"  # scripts/_cluster.py BPFFS_ROOT
IPCACHE_MAPS = ("axoneme_ipcache_host_v1", "axoneme_ipcache_v1")


def _node_k(node: str) -> int:
    return int(node.removeprefix("axoneme-node") or "1")


def kernel_ipcache(cl: Cluster, node: str) -> dict[str, int]:
    """``node``'s pinned ipcache maps, IPv4 /32 entries that are not node entries: address ->
    identity. Key: prefixlen (32 + the address prefix), family (4), pad, address; value:
    identity, flags (lib/ipcache.h; bit 0: a node's address)."""
    k = _node_k(node)
    prefix = [] if k == 1 else ["nsenter", f"--mount={cl.dir / 'ns' / f'node{k}'}"]
    out: dict[str, int] = {}
    for name in IPCACHE_MAPS:
        res = subprocess.run([*prefix, "bpftool", "-j", "map", "dump", "pinned", f"{BPFFS}/{name}"],
                             capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise AssertionError(f"{node}: bpftool map dump {name}: {(res.stderr or res.stdout)[-500:]}")
        for item in json.loads(res.stdout or "[]"):
            if not isinstance(item.get("key"), list) or not isinstance(item.get("value"), list):
                continue  # bpftool's "value": "error": the entry went between its walk and read
            key = bytes(int(x, 16) for x in item["key"])
            val = bytes(int(x, 16) for x in item["value"])
            if key[4] != 4 or int.from_bytes(key[0:4], "little") != 64:
                continue
            if not int.from_bytes(val[4:8], "little") & 1:
                out[str(ipaddress.ip_address(key[8:12]))] = int.from_bytes(val[0:4], "little")
    return out


def _ctr_bin() -> str:
    bindir = subprocess.run([str(REPO / "scripts" / "k8s-build"), "--print-dir"], check=True,
                            capture_output=True, text=True).stdout.strip()
    return str(Path(bindir) / "ctr")


def ctr(cl: Cluster, node: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``ctr -n k8s.io ARGS`` against ``node``'s containerd (its socket is a file under
    .cluster/, reachable from here as scripts/cluster's own health check does)."""
    k = _node_k(node)
    sock = cl.dir / ("containerd" if k == 1 else f"nodes/node{k}/containerd") / "containerd.sock"
    res = subprocess.run([_ctr_bin(), "--address", str(sock), "-n", "k8s.io", *args],
                         capture_output=True, text=True, timeout=60)
    if check and res.returncode != 0:
        raise AssertionError(f"ctr {' '.join(args)} on {node}: {(res.stderr or res.stdout)[-500:]}")
    return res


def agent_container(cl: Cluster, node: str) -> tuple[str, int]:
    """The agent pod's container on ``node``: (containerd id, "" while there is none; restart
    count)."""
    pod = json.loads(cl.kubectl("-n", "kube-system", "get", "pod", cl.agent_pod(node),
                                "-o", "json").stdout)
    status = next(s for s in pod["status"].get("containerStatuses") or [] if s["name"] == "agent")
    return (status.get("containerID") or "").partition("://")[2], int(status["restartCount"])


class GhostPods:
    """Pods bound to a Node object of ours with no kubelet (``node``), in namespace ``ns``,
    through the Kubernetes Python client; addresses from ``cidr``."""

    def __init__(self, cl: Cluster, node: str, ns: str, cidr: str) -> None:
        from kubernetes import client, config

        self.api = config.new_client_from_config(config_file=str(cl.kubeconfig))
        self.core = client.CoreV1Api(self.api)
        self.node, self.ns, self.cidr = node, ns, cidr
        self._ips = (str(a) for a in ipaddress.ip_network(cidr).hosts())
        self.lock = threading.Lock()
        self.living: dict[str, tuple[int, str]] = {}  # pod -> (group, address)

    def setup(self) -> None:
        self.core.create_node({"apiVersion": "v1", "kind": "Node", "metadata": {"name": self.node},
                               "spec": {"podCIDR": self.cidr, "podCIDRs": [self.cidr]}})
        self.core.create_namespace({"apiVersion": "v1", "kind": "Namespace",
                                    "metadata": {"name": self.ns}})

    def teardown(self) -> None:
        from kubernetes.client.rest import ApiException

        for call in (lambda: self.core.delete_collection_namespaced_pod(self.ns, grace_period_seconds=0),
                     lambda: self.core.delete_namespace(self.ns),
                     lambda: self.core.delete_node(self.node)):
            try:
                call()
            except ApiException as e:
                if e.status != 404:
                    raise

    def create(self, name: str, group: int) -> None:
        with self.lock:
            ip = next(self._ips)
        self.core.create_namespaced_pod(self.ns, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": {"app": f"g{group}"}},
            "spec": {"nodeName": self.node, "tolerations": [{"operator": "Exists"}],
                     "containers": [{"name": "c", "image": "none"}]}})
        self.core.patch_namespaced_pod_status(name, self.ns, {"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
        with self.lock:
            self.living[name] = (group, ip)

    def delete(self, name: str) -> None:
        with self.lock:
            self.living.pop(name, None)
        self.core.delete_namespaced_pod(name, self.ns, grace_period_seconds=0)


class Prober:
    """``/agnhost connect TARGET`` in a loop inside pod ``ns/pod`` (one ``kubectl exec``) until
    ``stop()`` or ``limit`` seconds; ``verdicts`` is every probe's "ok"/"no", in order."""

    def __init__(self, cl: Cluster, ns: str, pod: str, target: str, limit: int = 240) -> None:
        self.cl, self.ns, self.pod = cl, ns, pod
        loop = (f"rm -f /tmp/stop; end=$(( $(cut -d. -f1 /proc/uptime) + {limit} )); "
                f"while [ ! -f /tmp/stop ] && [ $(cut -d. -f1 /proc/uptime) -lt $end ]; do "
                f"if /agnhost connect {target} --timeout=1s --protocol=tcp >/dev/null 2>&1; "
                f"then echo ok; else echo no; fi; sleep 0.2 2>/dev/null || sleep 1; done")
        self.proc = subprocess.Popen([cl.kubectl_bin, "--kubeconfig", str(cl.kubeconfig), "-n", ns,
                                      "exec", pod, "--", "sh", "-c", loop],
                                     stdout=subprocess.PIPE, text=True)
        self.verdicts: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() in ("ok", "no"):
                self.verdicts.append(line.strip())

    def wait_started(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self.verdicts and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.05)
        assert self.verdicts, f"no probe from {self.ns}/{self.pod} within {timeout:.0f} s"

    def stop(self) -> list[str]:
        self.cl.exec(self.ns, self.pod, "touch", "/tmp/stop")
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        return list(self.verdicts)
