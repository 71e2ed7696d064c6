"""A real Kubernetes control plane for the Kubernetes-mode tests.

``control_plane`` (session scope): etcd, kube-apiserver, kube-controller-manager
and kube-scheduler built from upstream sources by ``scripts/k8s-build`` and
started on loopback by ``scripts/k8s-probe --keep``; torn down (every process
by its PID, its directory) at the end of the session. No kubelet: tests that
need pods on a node use ``scripts/cluster``.

``ControlPlane.restart(...)`` stops components by PID and starts them again
with the same command line, working directory and environment (the informer
test kills etcd and kube-apiserver during churn).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from axoneme.testing import capability

REPO = Path(__file__).resolve().parents[2]


@dataclass
class ControlPlane:
    dir: Path
    kubeconfig: Path
    bin: Path

    @property
    def kubectl_bin(self) -> str:
        return str(self.bin / "kubectl")

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), *args],
                             capture_output=True, text=True, input=input, timeout=timeout)
        if check and res.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({res.returncode}): "
                                 f"{res.stderr.strip()}")
        return res

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in (self.dir / "pids").read_text().splitlines():
            pid, name = line.split()
            out[name] = int(pid)  # a restarted component's last line wins
        return out

    def stop(self, names: Sequence[str]) -> dict[str, tuple[list[str], str, dict[str, str]]]:
        """SIGKILL the named components; returns what ``start`` needs to bring them back."""
        saved = {}
        pids = self.pids()
        for name in names:
            pid = pids[name]
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
            env = dict(kv.split("=", 1) for kv in
                       Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in kv)
            saved[name] = ([a.decode() for a in argv], os.readlink(f"/proc/{pid}/cwd"), env)
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid)
        return saved

    def start(self, saved: dict[str, tuple[list[str], str, dict[str, str]]]) -> None:
        for name, (argv, cwd, env) in saved.items():
            with open(self.dir / "logs" / f"{name}.log", "ab") as log:
                proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=log,
                                        start_new_session=True)
            with open(self.dir / "pids", "a") as f:
                f.write(f"{proc.pid} {name}\n")
        if "kube-apiserver" in saved:
            self.wait_ready()

    def restart(self, *names: str) -> None:
        self.start(self.stop(names))

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.kubectl("get", "--raw", "/readyz", check=False, timeout=10).returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"kube-apiserver not ready after {timeout}s (logs in {self.dir}/logs)")


def _wait_gone(pid: int) -> None:
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


K8S_TESTS = Path(__file__).resolve().parent
# the first test that needs the Kubernetes binaries builds them: ~20 min on a cold cache
# (docs/kubernetes.md, "Build times"), longer than the suite's default per-test timeout
BUILD_TIMEOUT_S = 2700


# the modules on a multi-node cluster, by the cluster they ask for (cluster_up): each change
# of cluster is a `down` and an `up` (1-2 min), so the tests run grouped by cluster
TWO_NODES_NATIVE = ("test_k8s_host_firewall", "test_k8s_multinode_identities")
TWO_NODES_BY_ROUTING = ("test_k8s_multinode", "test_k8s_multinode_l7")
THREE_NODES = ("test_k8s_multinode_matrix",)


def cluster_group(item: pytest.Item) -> float:
    """0: a single eBPF node; 0.5: a single iptables node (a module's datapath parameter);
    1: 2 nodes, native routing; 2: 2 nodes, tunnel; 3: 3 nodes."""
    module = Path(str(item.fspath)).stem
    params = getattr(getattr(item, "callspec", None), "params", {})
    if module in TWO_NODES_NATIVE:
        return 1
    if module in TWO_NODES_BY_ROUTING:
        return 2 if "tunnel" in params.values() else 1
    if module in THREE_NODES:
        return 3
    return 0.5 if any(str(v).startswith("iptables") for v in params.values()) else 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    slots = []
    for i, item in enumerate(items):
        if K8S_TESTS in Path(str(item.fspath)).resolve().parents:
            slots.append(i)
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(BUILD_TIMEOUT_S))
    # the Kubernetes tests keep their places among the others, grouped by cluster (stable)
    ordered = sorted((items[i] for i in slots), key=cluster_group)
    for i, item in zip(slots, ordered, strict=True):
        items[i] = item


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    capability.require_root("the control plane's test certificates and ports are set up as root")
    build = subprocess.run([str(REPO / "scripts" / "k8s-build")], capture_output=True, text=True)
    if build.returncode != 0:
        raise AssertionError(f"scripts/k8s-build failed: {build.stdout[-2000:]}{build.stderr[-2000:]}")
    bindir = subprocess.run([str(REPO / "scripts" / "k8s-build"), "--print-dir"], check=True,
                            capture_output=True, text=True).stdout.strip()
    res = subprocess.run([str(REPO / "scripts" / "k8s-probe"), "--keep"], capture_output=True,
                         text=True, timeout=300)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines or not lines[-1].startswith("KUBECONFIG="):
        raise AssertionError(f"scripts/k8s-probe --keep failed: {res.stdout[-2000:]}{res.stderr[-2000:]}")
    kubeconfig = Path(lines[-1].split("=", 1)[1])
    cp = ControlPlane(dir=kubeconfig.parent, kubeconfig=kubeconfig, bin=Path(bindir))
    try:
        yield cp
    finally:
        subprocess.run([str(REPO / "scripts" / "k8s-probe"), "--down", str(cp.dir)],
                       capture_output=True, text=True, timeout=120)


# -- the whole cluster (scripts/cluster): one node, or several (--nodes N) ---------------------

@dataclass
class Cluster(ControlPlane):
    datapath: str = "ebpf"
    nodes: int = 1
    routing: str = "native"

    def node_names(self) -> list[str]:
        """Node 1 (this machine's network namespace) first, then node k (axon-node<k>)."""
        return ["axoneme-node", *(f"axoneme-node{k}" for k in range(2, self.nodes + 1))]

    def agent_pod(self, node: str) -> str:
        """The DaemonSet's agent pod on ``node``."""
        out = self.kubectl("-n", "kube-system", "get", "pods", "-l", "k8s-app=axoneme",
                           "--field-selector", f"spec.nodeName={node}", "-o", "json").stdout
        names = [p["metadata"]["name"] for p in json.loads(out)["items"]
                 if p["metadata"].get("deletionTimestamp") is None]
        assert len(names) == 1, f"agent pods on {node}: {names}"
        return names[0]

    def agent_on(self, node: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The CLI inside ``node``'s agent pod (``agent`` picks any one of them)."""
        return self.kubectl("-n", "kube-system", "exec", self.agent_pod(node), "--", "axoneme", *cmd,
                            check=False, timeout=timeout)

    def pod_ip(self, ns: str, name: str) -> str:
        return self.kubectl("-n", ns, "get", "pod", name, "-o", "jsonpath={.status.podIP}").stdout

    def exec(self, ns: str, pod: str, *cmd: str, container: str | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
        args = ["-n", ns, "exec", pod]
        if container:
            args += ["-c", container]
        return self.kubectl(*args, "--", *cmd, check=False, timeout=timeout)

    def agent(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """The CLI inside the agent pod, as a Cilium user runs it."""
        return self.kubectl("-n", "kube-system", "exec", "ds/axoneme", "--", "axoneme", *cmd,
                            check=False, timeout=timeout)

    def apply(self, yaml_text: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.kubectl("apply", "-f", "-", *args, input=yaml_text)

    def wait_pods_ready(self, ns: str, timeout: int = 180) -> None:
        self.kubectl("-n", ns, "wait", "--for=condition=Ready", "pod", "--all",
                     f"--timeout={timeout}s", timeout=timeout + 30)

    @contextlib.contextmanager
    def objects(self, items: list[dict], namespaces: Sequence[str]) -> Iterator[Cluster]:
        """Apply ``items`` (namespaces and pods) as one List, wait until the pods of
        ``namespaces`` are Ready; delete those namespaces afterwards."""
        # JSON, not YAML: kubectl reads YAML 1.1, where a bare namespace name y is true
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                           "items": items}))
        try:
            for ns in namespaces:
                self.wait_pods_ready(ns)
            yield self
        finally:
            self.kubectl("delete", "ns", *namespaces, "--wait=true", "--timeout=120s", check=False,
                         timeout=150)


_CLUSTER: dict[str, Cluster] = {}
_TRIED: list[str] = []  # every `up` run: a failed one is brought down at the end as well


def _cluster_cmd(*args: str, timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(REPO / "scripts" / "cluster"), *args], capture_output=True,
                          text=True, timeout=timeout)


def cluster_up(datapath: str, nodes: int = 1, routing: str = "native") -> Cluster:
    """``scripts/cluster up --datapath D [--nodes N --routing-mode R]`` (a running cluster of
    another datapath, node count or routing is brought down first: `up` does that itself);
    brought down at the end of the session. Single-node tests ask for nodes=1 and get a
    single-node cluster again after a multi-node module."""
    capability.require_root("a kubelet, containerd and the agent's DaemonSet run as root")
    key = datapath if (nodes, routing) == (1, "native") else f"{datapath}/{nodes}/{routing}"
    if key in _CLUSTER:
        return _CLUSTER[key]
    _CLUSTER.clear()  # `up` replaces whatever runs
    _TRIED.append(key)
    dp, _, mode = datapath.partition(":")
    args = ["up", "--datapath", dp] + (["--iptables-mode", mode] if mode else [])
    if (nodes, routing) != (1, "native"):
        args += ["--nodes", str(nodes), "--routing-mode", routing]
    res = _cluster_cmd(*args)
    lines = res.stdout.strip().splitlines()
    if res.returncode != 0 or not lines or not lines[-1].startswith("KUBECONFIG="):
        raise AssertionError(f"scripts/cluster {' '.join(args)} failed ({res.returncode}):\n"
                             f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}")
    kubeconfig = Path(lines[-1].split("=", 1)[1])
    cl = Cluster(dir=kubeconfig.parent, kubeconfig=kubeconfig, bin=kubeconfig.parent / "bin",
                 datapath=datapath, nodes=nodes, routing=routing)
    _CLUSTER[key] = cl
    return cl


def cluster_down() -> None:
    _CLUSTER.clear()
    _TRIED.clear()
    res = _cluster_cmd("down", timeout=600)
    if res.returncode != 0:
        raise AssertionError(f"scripts/cluster down failed: {res.stdout[-3000:]}{res.stderr[-3000:]}")


@pytest.fixture(scope="session")
def cluster_session() -> Iterator[None]:
    try:
        yield
    finally:
        if _CLUSTER or _TRIED:
            cluster_down()
