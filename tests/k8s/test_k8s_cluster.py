"""scripts/cluster itself: up (cold or warm, timed), a pod on the pod network, the agent's CLI
in its pod, up again (idempotent), recovery from a dead component, down leaving nothing.

The tests run in order on one cluster (module fixture). The module always ends with
`scripts/cluster down`: while a kubelet runs, its KUBE-FIREWALL rule (filter INPUT/OUTPUT)
drops traffic that other iptables tests send.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from axoneme.testing import capability

REPO = Path(__file__).resolve().parents[2]
D = REPO / ".cluster"
SCRIPT = REPO / "scripts" / "cluster"
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"

pytestmark = [pytest.mark.privileged, pytest.mark.timeout(1800)]


def cluster(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def kubectl(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(D / "bin" / "kubectl"), "--kubeconfig", str(D / "kubeconfig"), *args],
                         capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {res.stderr.strip()}")
    return res


def pids() -> dict[str, int]:
    out = {}
    for line in (D / "pids").read_text().splitlines():
        pid, name = line.split()
        out[name] = int(pid)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def chains() -> set[str]:
    out = set()
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            res = subprocess.run([tool, "-w", "-t", table, "-S"], capture_output=True, text=True)
            out |= {f"{tool} {table} {ln.split()[1]}" for ln in res.stdout.splitlines()
                    if ln.startswith("-N KUBE-")}
    return out


def mounts_under(root: Path) -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [ln.split()[4] for ln in lines if ln.split()[4].startswith(str(root))]


@dataclass
class Seen:
    """What the cluster made that `down` must remove."""
    up_seconds: float = 0.0
    cold: bool = False
    processes: set[int] = field(default_factory=set)
    netns: set[str] = field(default_factory=set)
    links: set[str] = field(default_factory=set)

    def note_processes(self) -> None:
        self.processes |= set(pids().values())
        sock = str(D / "containerd" / "containerd.sock")
        for p in Path("/proc").iterdir():  # the shims of this cluster's containerd
            try:
                if p.name.isdigit() and sock in (p / "cmdline").read_bytes().decode(errors="replace"):
                    self.processes.add(int(p.name))
            except OSError:
                pass


@pytest.fixture(scope="module")
def seen() -> Iterator[Seen]:
    capability.require_root("containerd, kubelet and the agent's DaemonSet run as root")
    s = Seen(cold=not D.exists())
    t0 = time.monotonic()
    res = cluster("up")
    s.up_seconds = time.monotonic() - t0
    print(f"scripts/cluster up ({'cold' if s.cold else 'warm'}): {s.up_seconds:.1f} s")
    try:
        lines = res.stdout.strip().splitlines()
        assert res.returncode == 0 and lines, f"up failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
        assert lines[-1] == f"KUBECONFIG={D / 'kubeconfig'}", lines[-3:]
        s.note_processes()
        yield s
    finally:
        cluster("down", timeout=600)


def test_bad_input_exit_2():
    for args in (["up", "--datapath", "xdp"], ["up", "--iptables-mode", "nft"], ["up", "--nodes", "4"],
                 ["up", "--nodes", "0"],
                 ["sideways"]):
        res = cluster(*args, timeout=60)
        assert res.returncode == 2, (args, res.stderr)
        assert res.stderr.strip(), args


def test_up_node_and_daemonset_ready(seen):
    node = json.loads(kubectl("get", "node", "-o", "json").stdout)["items"]
    assert len(node) == 1
    conds = {c["type"]: c["status"] for c in node[0]["status"]["conditions"]}
    assert conds["Ready"] == "True"
    assert node[0]["spec"]["podCIDR"] == "10.244.0.0/24"
    assert {"type": "InternalIP", "address": "10.255.254.1"} in node[0]["status"]["addresses"]
    ds = json.loads(kubectl("-n", "kube-system", "get", "ds", "axoneme", "-o", "json").stdout)
    assert ds["status"]["numberReady"] == 1
    # the `kubernetes` Service has the node address as its endpoint (default endpoint reconciler)
    eps = kubectl("get", "endpointslices", "-l", "kubernetes.io/service-name=kubernetes", "-o",
                  "jsonpath={.items[0].endpoints[0].addresses[0]}:{.items[0].ports[0].port}").stdout
    assert eps == "10.255.254.1:6443"
    st = cluster("status", timeout=60)
    assert st.returncode == 0, st.stdout + st.stderr
    lines = {ln.split()[0]: ln.split()[1:] for ln in st.stdout.splitlines() if ln.strip()}
    for name, pid in pids().items():
        assert lines[name] == ["pid", str(pid), "running"], (name, st.stdout)


def test_pod_on_pod_network_exec_and_logs(seen):
    kubectl("run", "web", f"--image={AGNHOST}", "--image-pull-policy=Never", "--",
            "netexec", "--http-port=8080")
    kubectl("wait", "--for=condition=Ready", "pod/web", "--timeout=120s", timeout=150)
    ip = kubectl("get", "pod", "web", "-o", "jsonpath={.status.podIP}").stdout
    assert ipaddress.ip_address(ip) in ipaddress.ip_network("10.244.0.0/24"), ip
    # exec through the kubelet: the pod reaches itself on its own address
    res = kubectl("exec", "web", "--", "/agnhost", "connect", "--timeout=5s", f"{ip}:8080", check=False)
    assert res.returncode == 0, res.stderr
    assert "Started HTTP server" in kubectl("logs", "web").stdout
    # its network namespace and host-side link, which `down` must remove
    sandbox_ns = [n for n in os.listdir("/var/run/netns") if n.startswith("cni-")]
    assert sandbox_ns
    seen.netns |= set(sandbox_ns)
    route = subprocess.run(["ip", "-4", "route", "get", ip], capture_output=True, text=True).stdout.split()
    seen.links.add(route[route.index("dev") + 1])
    seen.note_processes()


def test_containerd_runs_the_native_cni_plugin(seen):
    """The agent installed the image's native plugin as axoneme-cni and the Python plugin's zipapp
    beside it; a new pod's ADD is answered by the native one: the endpoint appears while a
    stand-in put over the zipapp (which records any hand-over, then runs the zipapp) stays unused."""
    bin_dir = D / "cni" / "bin"
    plugin, fallback = bin_dir / "axoneme-cni", bin_dir / "axoneme-cni-python"
    assert plugin.read_bytes()[:4] == b"\x7fELF", "axoneme-cni is not the native plugin"
    assert fallback.read_bytes().startswith(b"#!/usr/bin/env python3\n")
    logs = kubectl("-n", "kube-system", "logs", "ds/axoneme").stdout
    assert "(native /opt/axoneme/bin/axoneme-cni-native, its fallback axoneme-cni-python" in logs

    def endpoints() -> list[str]:
        res = kubectl("-n", "kube-system", "exec", "ds/axoneme", "--", "axoneme", "endpoint", "list",
                      "-o", "json")
        return sorted(e["pod"] for e in json.loads(res.stdout))

    before = endpoints()
    real, marker = bin_dir / "axoneme-cni-python.real", bin_dir / "handed-over"
    fallback.rename(real)
    try:
        stand_in = bin_dir / "axoneme-cni-python.tmp"
        stand_in.write_text(f"#!/bin/sh\necho \"$CNI_COMMAND\" >> {marker}\nexec {real} \"$@\"\n")
        stand_in.chmod(0o755)
        stand_in.replace(fallback)
        kubectl("run", "native", f"--image={AGNHOST}", "--image-pull-policy=Never", "--", "pause")
        kubectl("wait", "--for=condition=Ready", "pod/native", "--timeout=120s", timeout=150)
        assert endpoints() == sorted([*before, "default/native"])
        assert not marker.exists(), f"handed to the Python plugin: {marker.read_text()}"
    finally:
        real.replace(fallback)
        marker.unlink(missing_ok=True)
        kubectl("delete", "pod", "native", "--wait=true", "--timeout=60s", check=False, timeout=90)


def test_agent_cli_in_its_pod(seen):
    res = kubectl("-n", "kube-system", "exec", "ds/axoneme", "--", "axoneme", "status", "-o", "json",
                  check=False)
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    assert status["datapath"]["name"] == "ebpf", status["datapath"]
    assert status["datapath"]["healthy"], status["datapath"]
    assert status["faults"] == [], status["faults"]
    assert status["endpoints"] >= 1  # the web pod
    assert "kubernetes" in status["components"]
    # the agent's pins live under the cluster's own bpffs root
    assert Path("/sys/fs/bpf/axoneme-cluster").is_dir()


def test_up_again_is_idempotent_and_fast(seen):
    before = pids()
    t0 = time.monotonic()
    res = cluster("up", timeout=300)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1] == f"KUBECONFIG={D / 'kubeconfig'}"
    assert "already up" in res.stdout
    assert pids() == before
    assert took < 15, took


def test_up_recovers_from_a_dead_component(seen):
    kubelet = pids()["kubelet"]
    os.kill(kubelet, 9)
    for _ in range(50):
        if not alive(kubelet):
            break
        time.sleep(0.1)
    assert cluster("status", timeout=60).returncode == 1
    res = cluster("up")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "not healthy" in res.stdout
    assert res.stdout.strip().splitlines()[-1] == f"KUBECONFIG={D / 'kubeconfig'}"
    assert pids()["kubelet"] != kubelet
    assert cluster("status", timeout=60).returncode == 0
    seen.note_processes()


def test_down_leaves_nothing(seen):
    res = cluster("down", timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not D.exists()
    assert not [p for p in seen.processes if alive(p)]
    assert not mounts_under(D)
    assert not [n for n in seen.netns if os.path.exists(f"/var/run/netns/{n}")]
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    assert not [ln for ln in seen.links if f"\n{ln}@" in "\n" + links or f"\n{ln} " in "\n" + links]
    assert not chains() & {f"{t} {tb} {c}" for t in ("iptables", "ip6tables")
                           for tb in ("filter", "nat", "mangle")
                           for c in ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT")}
    assert not Path("/sys/fs/bpf/axoneme-cluster").exists()
    assert not list(Path("/sys/fs/cgroup").glob("*/axoneme-cluster"))
    lo = subprocess.run(["ip", "-4", "addr", "show", "dev", "lo"], capture_output=True, text=True).stdout
    assert "10.255.254.1" not in lo
    assert cluster("status", timeout=60).returncode == 1
    # down again: nothing to do, still exit 0
    assert cluster("down", timeout=120).returncode == 0
