"""scripts/cluster: a Kubernetes cluster from upstream components, with axoneme installed from
deploy/ as a user installs it; one node, or up to three on this machine (--nodes N: nodes 2..N
are namespaces of ours, scripts/_cluster_nodes.py).

    scripts/cluster up [--nodes N] [--datapath ebpf|iptables] [--iptables-mode plain|ipset]
                       [--routing-mode native|tunnel]
    scripts/cluster down
    scripts/cluster status

Everything lives under REPO/.cluster (git-ignored): pki, etcd data, logs, pids, containerd's
root/state/socket, the kubelet's root dir, the CNI dirs containerd reads (the agent's DaemonSet
installs axoneme-cni there), the kustomize overlay, the kubeconfig and bin/kubectl. Outside it,
by name: the node address 10.255.254.1/32 on lo, the cgroup root /axoneme-cluster in every v1
hierarchy, the pods' netns (/var/run/netns/cni-*, the ones this cluster's containerd made), the
kubelet's iptables chains, the agent's kernel objects (pins under /sys/fs/bpf/axoneme-cluster).
`down` removes all of it. docs/kubernetes.md, "scripts/cluster", says why each setting is there;
"Several nodes on one machine" what --nodes adds (under .cluster/nodes and .cluster/ns; the
namespaces axon-fabric and axon-node<k>, the link axon-n1, the chain AXON-FABRIC-GUARD).
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import _cluster_nodes as cn
import yaml

REPO = Path(__file__).resolve().parents[1]
D = REPO / ".cluster"
NODE_IP = "10.255.254.1"
API_PORT = 6443
NODE_NAME = "axoneme-node"
CGROUP_ROOT = "axoneme-cluster"
CLUSTER_CIDR = "10.244.0.0/16"
POD_CIDR = "10.244.0.0/24"
SERVICE_CIDR = "10.96.0.0/16"
BPFFS_ROOT = "/sys/fs/bpf/axoneme-cluster"
# a resolver address of ours that nothing answers (TEST-NET-2): pods never get the host's resolver
NAMESERVER = "198.51.100.53"
IMAGES = ("registry.k8s.io/pause:3.10.2", "registry.k8s.io/e2e-test-images/agnhost:2.66.1",
          "localhost/axoneme:dev")
KUBELET_CHAINS = ("KUBE-FIREWALL", "KUBE-KUBELET-CANARY", "KUBE-IPTABLES-HINT")
# started in this order, stopped in the reverse one
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler",
              "containerd", "kubelet")

PKI = D / "pki"
LOGS = D / "logs"
PIDS = D / "pids"
STATE = D / "state.json"
KUBECONFIG = D / "kubeconfig"
KUBECTL = D / "bin" / "kubectl"
CTRD = D / "containerd"
SOCK = CTRD / "containerd.sock"
KUBELET_DIR = D / "kubelet"
CNI_CONF = D / "cni" / "net.d"
CNI_BIN = D / "cni" / "bin"
AGENT_STATE = D / "agent"
OVERLAY = D / "kustomize"
RESOLV = D / "resolv.conf"
RUN_CONTAINERD = Path("/run/containerd")  # shim sockets and fifos: not moved by `state`


class ClusterError(Exception):
    pass


def say(msg: str) -> None:
    print(f"cluster: {msg}", flush=True)


def run(*argv: str | Path, check: bool = True, timeout: float = 120,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                         input=input)
    if check and res.returncode != 0:
        raise ClusterError(f"{' '.join(map(str, argv))} failed ({res.returncode}): "
                           f"{(res.stderr or res.stdout).strip()[-2000:]}")
    return res


def kubectl(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run(KUBECTL, "--kubeconfig", KUBECONFIG, *args, check=check, timeout=timeout)


def bin_dir() -> Path:
    return Path(run(REPO / "scripts" / "k8s-build", "--print-dir").stdout.strip())


def poll(what: str, timeout: float, ready: Callable[[], bool],
         alive: Callable[[], None] = lambda: None, progress: Callable[[], str] | None = None) -> None:
    """Wait until ready() is true; alive() raises when something it waits on died."""
    t0 = time.monotonic()
    last = t0
    while True:
        alive()
        try:
            if ready():
                say(f"{what} after {time.monotonic() - t0:.1f} s")
                return
        except (OSError, subprocess.SubprocessError, ValueError):
            pass
        now = time.monotonic()
        if now - t0 > timeout:
            detail = f": {progress()}" if progress else ""
            raise ClusterError(f"{what} not ready after {timeout:.0f} s{detail}")
        if progress and now - last >= 15:
            say(f"waiting for {what} ({now - t0:.0f} s): {progress()}")
            last = now
        time.sleep(0.5)


# -- processes -------------------------------------------------------------------------------

def recorded() -> dict[str, int]:
    """name -> PID of what this cluster started (a restarted component's last line wins)."""
    out: dict[str, int] = {}
    if PIDS.exists():
        for line in PIDS.read_text().splitlines():
            pid, _, name = line.partition(" ")
            if pid.isdigit():
                out[name] = int(pid)
    return out


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def is_ours(pid: int, name: str) -> bool:
    """The PID still runs the binary we started (a PID is never trusted alone: it may be reused)."""
    argv = cmdline(pid)
    binary = name.split("@")[0]  # `kubelet@node2`: node 2's kubelet
    return bool(argv) and os.path.basename(argv[0]) == binary and _state_of(pid) != "Z"


def _state_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "X"


def start(name: str, *args: str | Path, env: dict[str, str] | None = None,
          node: cn.Node | None = None) -> int:
    """BIN/name detached; with `node`, inside that node's namespaces (nsenter execs it: the
    PID is the component's), recorded as `name@nodeK`."""
    LOGS.mkdir(parents=True, exist_ok=True)
    label = node.label(name) if node else name
    prefix = node.enter() if node else []
    with open(LOGS / f"{label}.log", "ab") as log:
        proc = subprocess.Popen([*prefix, str(BIN / name), *map(str, args)], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, cwd=D, env=env or os.environ.copy(),
                                start_new_session=True)
    with open(PIDS, "a") as f:
        f.write(f"{proc.pid} {label}\n")
    for _ in range(100):  # /proc/PID/cmdline is empty (or nsenter's) until the exec is done
        if is_ours(proc.pid, label) or proc.poll() is not None:
            break
        time.sleep(0.02)
    say(f"started {label} (pid {proc.pid})")
    return proc.pid


def check_alive(*names: str) -> Callable[[], None]:
    def alive() -> None:
        pids = recorded()
        for name in names:
            if not is_ours(pids.get(name, 0), name):
                raise ClusterError(f"{name} exited: {last_error(name)} (log {LOGS / name}.log)")
    return alive


def last_error(name: str) -> str:
    try:
        lines = (LOGS / f"{name}.log").read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    errs = [ln for ln in lines if re.match(r"^[EF]\d{4}|level=(error|fatal)|Error", ln)]
    return (errs or lines or ["empty log"])[-1][:400]


def stop_pid(pid: int, name: str, grace: float = 10) -> None:
    if not is_ours(pid, name):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        t0 = time.monotonic()
        while time.monotonic() - t0 < wait:
            if not is_ours(pid, name):
                say(f"stopped {name} (pid {pid})")
                return
            time.sleep(0.1)
    raise ClusterError(f"{name} (pid {pid}) did not stop")


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def http_ok(url: str) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=3, context=ctx if url.startswith("https") else None) as r:
            return bool(r.status == 200)
    except (OSError, ValueError):
        return False


# -- certificates and kubeconfigs ----------------------------------------------------------------

def make_pki(extra: Sequence[cn.Node] = ()) -> None:
    PKI.mkdir(parents=True, exist_ok=True)
    os.chmod(PKI, 0o700)

    def ssl_(*args: str) -> None:
        run("openssl", *args, timeout=60)

    def cert(name: str, subj: str, ext: str) -> None:
        ssl_("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{PKI}/{name}.key",
             "-out", f"{PKI}/{name}.csr", "-subj", subj)
        (PKI / f"{name}.ext").write_text(ext + "keyUsage=critical,digitalSignature,keyEncipherment\n")
        ssl_("x509", "-req", "-in", f"{PKI}/{name}.csr", "-CA", f"{PKI}/ca.crt", "-CAkey",
             f"{PKI}/ca.key", "-CAcreateserial", "-out", f"{PKI}/{name}.crt", "-days", "365",
             "-extfile", f"{PKI}/{name}.ext")

    ssl_("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{PKI}/ca.key",
         "-out", f"{PKI}/ca.crt", "-days", "365", "-subj", "/CN=axoneme-cluster-ca")
    dns = ",".join(f"DNS:{n}" for n in ("localhost", "kubernetes", "kubernetes.default",
                                        "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"))
    cert("apiserver", "/CN=kube-apiserver",
         f"subjectAltName=IP:{NODE_IP},IP:127.0.0.1,IP:10.96.0.1,{dns}\nextendedKeyUsage=serverAuth\n")
    # the apiserver dials the kubelet on the node's InternalIP: the serving cert must carry it
    cert("kubelet", f"/CN={NODE_NAME}",
         f"subjectAltName=IP:{NODE_IP},DNS:{NODE_NAME}\nextendedKeyUsage=serverAuth\n")
    for name, cname, org in (("admin", "admin", "system:masters"),
                             ("kcm", "system:kube-controller-manager", ""),
                             ("scheduler", "system:kube-scheduler", ""),
                             ("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"),
                             ("node", f"system:node:{NODE_NAME}", "system:nodes"),
                             *((f"node{n.k}", f"system:node:{n.name}", "system:nodes") for n in extra)):
        cert(name, (f"/O={org}" if org else "") + f"/CN={cname}", "extendedKeyUsage=clientAuth\n")
    for n in extra:  # each kubelet serves on its node's address
        cert(f"kubelet{n.k}", f"/CN={n.name}",
             f"subjectAltName=IP:{n.ip},DNS:{n.name}\nextendedKeyUsage=serverAuth\n")
    ssl_("genrsa", "-out", f"{PKI}/sa.key", "2048")
    ssl_("rsa", "-in", f"{PKI}/sa.key", "-pubout", "-out", f"{PKI}/sa.pub")


def write_kubeconfig(path: Path, user: str) -> None:
    doc = {"apiVersion": "v1", "kind": "Config",
           "clusters": [{"name": "axoneme", "cluster": {
               "certificate-authority": str(PKI / "ca.crt"), "server": f"https://{NODE_IP}:{API_PORT}"}}],
           "users": [{"name": user, "user": {"client-certificate": str(PKI / f"{user}.crt"),
                                             "client-key": str(PKI / f"{user}.key")}}],
           "contexts": [{"name": "axoneme", "context": {"cluster": "axoneme", "user": user}}],
           "current-context": "axoneme"}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


# -- node plumbing -------------------------------------------------------------------------------

def lo_has_ip() -> bool:
    return f"inet {NODE_IP}/32 " in run("ip", "-4", "addr", "show", "dev", "lo").stdout


def cgroup_hierarchies() -> list[Path]:
    return sorted(p for p in Path("/sys/fs/cgroup").iterdir() if p.is_dir() and not p.is_symlink())


def make_cgroups(extra: Sequence[cn.Node] = ()) -> None:
    """kubelet wants its cgroupRoot in every v1 hierarchy; cpuset needs cpus/mems to take tasks.
    Node k's kubelet has /axoneme-cluster/node<k> (inside the cluster's: `down` and the stray
    killer find every node's processes by the one root)."""
    for h in cgroup_hierarchies():
        for rel in (CGROUP_ROOT, *(f"{CGROUP_ROOT}/{n.cgroup}" for n in extra)):
            (h / rel).mkdir(exist_ok=True)
            if h.name == "cpuset":
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (h / rel / f).write_text((h / f).read_text())


def containerd_config(ctrd: Path = CTRD) -> str:
    """Node 1's (CTRD) or node k's (its own dir; the same CNI paths, which its mount
    namespace resolves to its own)."""
    sock = ctrd / "containerd.sock"
    return f"""\
# written by scripts/cluster: everything under {D}
version = 4
root = '{ctrd}/root'
state = '{ctrd}/state'
imports = []

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = '{IMAGES[0]}'

[plugins.'io.containerd.cri.v1.runtime']
  cdi_spec_dirs = []
  # root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj (kubelet asks -998 for
  # critical pods), so clamp it to containerd's own
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['{CNI_BIN}']
    conf_dir = '{CNI_CONF}'
    # containerd brings the pod's lo up itself: no `loopback` plugin binary in bin_dirs
    use_internal_loopback = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
    SystemdCgroup = false
    Root = '{ctrd}/runc'

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = '127.0.0.1'

[plugins.'io.containerd.internal.v1.opt']
  path = '{ctrd}/opt'

[plugins.'io.containerd.image-verifier.v1.bindir']
  bin_dir = '{ctrd}/image-verifier'

[plugins.'io.containerd.nri.v1.nri']
  disable = true

[plugins.'io.containerd.server.v1.grpc']
  address = '{sock}'

[plugins.'io.containerd.server.v1.ttrpc']
  address = '{sock}.ttrpc'
"""


def kubelet_config(ports: dict[str, int], node: cn.Node | None = None) -> dict[str, object]:
    """Node 1's kubelet, or node k's (its address, socket, logs, cgroup parent, serving cert;
    the ports are the same: each node has its own network namespace)."""
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        # this VM runs cgroup v1: kubelet 1.35+ refuses it unless told (KEP-5573)
        "failCgroupV1": False, "cgroupDriver": "cgroupfs",
        "cgroupRoot": f"/{CGROUP_ROOT}" + (f"/{node.cgroup}" if node else ""),
        "failSwapOn": False,
        "address": node.ip if node else NODE_IP, "port": ports["kubelet"], "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1", "healthzPort": ports["kubelet-healthz"],
        "containerRuntimeEndpoint": f"unix://{node.sock if node else SOCK}",
        "podLogsDir": str((node.dir if node else D) / "pod-logs"),
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                           "x509": {"clientCAFile": str(PKI / "ca.crt")}},
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(PKI / f"kubelet{node.k if node else ''}.crt"),
        "tlsPrivateKeyFile": str(PKI / f"kubelet{node.k if node else ''}.key"),
        "clusterDomain": "cluster.local", "clusterDNS": ["10.96.0.10"],
        "resolvConf": str(RESOLV),
        # a development VM's disk is often fuller than kubelet's defaults like
        "evictionHard": {"memory.available": "100Mi", "nodefs.available": "2%",
                         "imagefs.available": "2%"},
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
    }


# -- the axoneme overlay ---------------------------------------------------------------------

def base_config() -> dict[str, object]:
    """deploy/configmap.yaml's config.yaml."""
    for doc in yaml.safe_load_all((REPO / "deploy" / "configmap.yaml").read_text()):
        if doc and doc.get("kind") == "ConfigMap" and doc["metadata"]["name"] == "axoneme-config":
            return dict(yaml.safe_load(doc["data"]["config.yaml"]) or {})
    raise ClusterError("deploy/configmap.yaml: no ConfigMap axoneme-config with data.config.yaml")


def write_overlay(datapath: str, mode: str, routing_mode: str = "native") -> None:
    """deploy/ as a user changes it (docs/kubernetes.md, "Overlays"): the datapath in config.yaml,
    the cluster's CNI dirs, and the agent state dir at the same path on the host and in the
    container (the plugin on the host dials the socket the conflist names)."""
    conf = base_config()
    # pod_cidr is the cluster's: each agent hands out IPs from its Node's spec.podCIDR
    conf.update({"datapath": datapath, "iptables_mode": mode, "pod_cidr": CLUSTER_CIDR,
                 "routing_mode": routing_mode,
                 # its own pin root: agents on the host (tests) keep /sys/fs/bpf/axoneme
                 "bpffs_root": BPFFS_ROOT})
    sock = str(AGENT_STATE / "axoneme.sock")
    kust = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(REPO / "deploy", OVERLAY)],
        "configMapGenerator": [{"name": "axoneme-config", "namespace": "kube-system", "behavior": "merge",
                                "files": ["config.yaml"],
                                "literals": [f"k8sServiceHost={NODE_IP}", f"k8sServicePort={API_PORT}"]}],
        "generatorOptions": {"disableNameSuffixHash": True},
        "patches": [{"patch": yaml.safe_dump({
            "apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "axoneme", "namespace": "kube-system"},
            "spec": {"template": {"spec": {
                "containers": [{
                    "name": "agent",
                    "env": [{"name": "AXONEME_STATE_DIR", "value": str(AGENT_STATE)},
                            {"name": "AXONEME_API_SOCKET", "value": sock}],
                    "volumeMounts": [{"mountPath": "/var/run/axoneme", "$patch": "delete"},
                                     {"name": "state", "mountPath": str(AGENT_STATE)}]}],
                "volumes": [{"name": "cni-conf", "hostPath": {"path": str(CNI_CONF)}},
                            {"name": "cni-bin", "hostPath": {"path": str(CNI_BIN)}},
                            {"name": "state", "hostPath": {"path": str(AGENT_STATE)}}]}}}},
            sort_keys=False)}]}
    OVERLAY.mkdir(parents=True, exist_ok=True)
    (OVERLAY / "config.yaml").write_text("# deploy/configmap.yaml's config.yaml, as scripts/cluster up set it\n"
                                         + yaml.safe_dump(conf, sort_keys=False))
    (OVERLAY / "kustomization.yaml").write_text(
        "# written by scripts/cluster up: deploy/ with this cluster's paths and datapath\n"
        + yaml.safe_dump(kust, sort_keys=False))


# -- health ----------------------------------------------------------------------------------

def load_state() -> dict[str, object]:
    try:
        return dict(json.loads(STATE.read_text()))
    except (OSError, ValueError):
        return {}


def save_state(**kw: object) -> None:
    state = load_state()
    state.update(kw)
    STATE.write_text(json.dumps(state, indent=1) + "\n")


def extra_nodes(state: dict[str, object]) -> list[cn.Node]:
    """Nodes 2..N of the cluster `state` describes."""
    return cn.nodes(D, int(state.get("nodes", 1)))  # type: ignore[call-overload]


def node_names(state: dict[str, object]) -> list[str]:
    return [NODE_NAME, *(n.name for n in extra_nodes(state))]


def node_ready(name: str = NODE_NAME) -> bool:
    out = kubectl("get", "node", name, "-o",
                  'jsonpath={.status.conditions[?(@.type=="Ready")].status}', check=False, timeout=15)
    return out.returncode == 0 and out.stdout.strip() == "True"


def ds_ready(n: int = 1) -> bool:
    """The DaemonSet's pod ready on each of the n nodes."""
    out = kubectl("-n", "kube-system", "get", "ds", "axoneme", "-o",
                  "jsonpath={.status.desiredNumberScheduled} {.status.numberReady} {.status.updatedNumberScheduled}",
                  check=False, timeout=15)
    parts = out.stdout.split()
    return out.returncode == 0 and len(parts) == 3 and parts[0] == parts[1] == parts[2] == str(n)


def component_health(state: dict[str, object]) -> dict[str, tuple[int, bool]]:
    """name -> (pid, alive and answering)."""
    ports: dict[str, int] = state.get("ports", {})  # type: ignore[assignment]
    checks: dict[str, Callable[[], bool]] = {
        "etcd": lambda: http_ok(f"http://127.0.0.1:{ports['etcd']}/health"),
        "kube-apiserver": lambda: kubectl("get", "--raw", "/readyz", check=False, timeout=10).returncode == 0,
        "kube-controller-manager": lambda: http_ok(f"https://127.0.0.1:{ports['kcm']}/healthz"),
        "kube-scheduler": lambda: http_ok(f"https://127.0.0.1:{ports['scheduler']}/healthz"),
        "containerd": lambda: run(BIN / "ctr", "--address", SOCK, "version", check=False,
                                  timeout=10).returncode == 0,
        "kubelet": lambda: http_ok(f"http://127.0.0.1:{ports['kubelet-healthz']}/healthz"),
    }
    pids = recorded()
    out = {}
    for name in COMPONENTS:
        pid = pids.get(name, 0)
        ok = is_ours(pid, name)
        if ok:
            try:
                ok = checks[name]()
            except (KeyError, OSError, subprocess.SubprocessError):
                ok = False
        out[name] = (pid, ok)
    for node in extra_nodes(state):  # node k's containerd and kubelet, in its namespaces
        node_checks: dict[str, Callable[[], bool]] = {
            "containerd": lambda n=node: run(BIN / "ctr", "--address", n.sock, "version", check=False,
                                             timeout=10).returncode == 0,
            "kubelet": lambda n=node: cn.http_ok_in(
                n, f"http://127.0.0.1:{ports['kubelet-healthz']}/healthz")}
        for name, check in node_checks.items():
            label = node.label(name)
            pid = pids.get(label, 0)
            ok = is_ours(pid, label)
            if ok:
                try:
                    ok = check()
                except (KeyError, OSError, subprocess.SubprocessError):
                    ok = False
            out[label] = (pid, ok)
    return out


def healthy(state: dict[str, object]) -> bool:
    if state.get("phase") != "up":
        return False
    return (all(ok for _, ok in component_health(state).values())
            and all(node_ready(name) for name in node_names(state))
            and ds_ready(int(state.get("nodes", 1))))  # type: ignore[call-overload]


# -- up --------------------------------------------------------------------------------------

def cmd_up(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    state = load_state()
    want = (args.datapath, args.iptables_mode, args.nodes, args.routing_mode)
    if state:
        if healthy(state):
            have = (state.get("datapath"), state.get("iptables_mode"), state.get("nodes", 1),
                    state.get("routing_mode", "native"))
            if have == want:
                say(f"already up ({args.datapath}, {args.nodes} node(s), {args.routing_mode} routing), healthy")
                print(f"KUBECONFIG={KUBECONFIG}")
                return 0
            # another datapath: the old one's kernel state (pins or chains) is only removed by the
            # agent cleanup `down` runs; a rollout would leave it behind. Other nodes or routing:
            # the nodes' namespaces and routes are made by `up` and removed by `down` alike
            say(f"up with datapath {have[0]}/{have[1]}, {have[2]} node(s), {have[3]} routing: "
                f"recreating it with {args.datapath}/{args.iptables_mode}, {args.nodes} node(s), "
                f"{args.routing_mode} routing")
        else:
            say("a previous cluster is not healthy (crashed or half made): cleaning it up first")
        do_down()
    elif (D.exists() and (PIDS.exists() or any(mounts_under(D)))) or cn.netns_exists(cn.FABRIC_NS):
        say("leftovers of a previous cluster: cleaning them up first")
        do_down()

    say("building what is missing (scripts/k8s-build)")
    if subprocess.run([str(REPO / "scripts" / "k8s-build")], stdout=sys.stdout, stderr=sys.stderr).returncode:
        raise ClusterError("scripts/k8s-build failed (above)")
    for d in (D, LOGS, CTRD, KUBELET_DIR, CNI_CONF, CNI_BIN, AGENT_STATE, KUBECTL.parent):
        d.mkdir(parents=True, exist_ok=True)
    ports = dict(zip(("etcd", "etcd-peer", "kcm", "scheduler", "kubelet-healthz"), free_ports(5), strict=True))
    ports["kubelet"] = 10250
    save_state(phase="starting", datapath=args.datapath, iptables_mode=args.iptables_mode, ports=ports,
               node=NODE_NAME, node_ip=NODE_IP, nodes=args.nodes, routing_mode=args.routing_mode)
    extra = cn.nodes(D, args.nodes)
    try:
        os.link(BIN / "kubectl", KUBECTL)
    except OSError:
        shutil.copy2(BIN / "kubectl", KUBECTL)
    RESOLV.write_text(f"# pods' resolver (scripts/cluster): not the host's\nnameserver {NAMESERVER}\n")

    if extra:
        # the API server's address is node 1's on the fabric, which nodes 2..N reach directly
        say(f"nodes 2..{args.nodes}: namespaces axon-node2.., bridge {cn.BRIDGE} in {cn.FABRIC_NS}, "
            f"node address {NODE_IP}/{cn.PREFIXLEN} on {cn.HOST_LINK}; guard {cn.HOST_GUARD}")
        cn.install_host_guard()
        try:
            cn.make_fabric(D, args.nodes)
        except cn.NodeError as e:
            raise ClusterError(str(e)) from e
    else:
        say(f"node address {NODE_IP}/32 on lo")
        if not lo_has_ip():
            run("ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo")
    say("certificates")
    make_pki(extra)
    write_kubeconfig(KUBECONFIG, "admin")
    for user in ("kcm", "scheduler", "node", *(f"node{n.k}" for n in extra)):
        write_kubeconfig(D / f"{user}.kubeconfig", user)

    start("etcd", "--name", "axoneme", "--data-dir", D / "etcd-data",
          "--listen-client-urls", f"http://127.0.0.1:{ports['etcd']}",
          "--advertise-client-urls", f"http://127.0.0.1:{ports['etcd']}",
          "--listen-peer-urls", f"http://127.0.0.1:{ports['etcd-peer']}",
          "--initial-advertise-peer-urls", f"http://127.0.0.1:{ports['etcd-peer']}",
          "--initial-cluster", f"axoneme=http://127.0.0.1:{ports['etcd-peer']}",
          "--initial-cluster-state", "new", "--listen-metrics-urls", "")
    poll("etcd ready", 60, lambda: http_ok(f"http://127.0.0.1:{ports['etcd']}/health"), check_alive("etcd"))
    # on the node address, not loopback: the default endpoint reconciler refuses a loopback
    # advertise address, and the `kubernetes` Service then has an endpoint
    start("kube-apiserver", "--bind-address", NODE_IP, "--advertise-address", NODE_IP,
          "--secure-port", str(API_PORT), "--etcd-servers", f"http://127.0.0.1:{ports['etcd']}",
          "--service-cluster-ip-range", SERVICE_CIDR, "--authorization-mode", "Node,RBAC",
          "--client-ca-file", PKI / "ca.crt",
          "--tls-cert-file", PKI / "apiserver.crt", "--tls-private-key-file", PKI / "apiserver.key",
          "--kubelet-client-certificate", PKI / "apiserver-kubelet-client.crt",
          "--kubelet-client-key", PKI / "apiserver-kubelet-client.key",
          "--kubelet-preferred-address-types", "InternalIP",
          "--service-account-key-file", PKI / "sa.pub", "--service-account-signing-key-file", PKI / "sa.key",
          "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
          "--allow-privileged=true", "--enable-admission-plugins", "NodeRestriction")
    poll("kube-apiserver ready", 180, lambda: kubectl("get", "--raw", "/readyz", check=False,
                                                timeout=10).returncode == 0,
         check_alive("etcd", "kube-apiserver"))
    kcm = D / "kcm.kubeconfig"
    start("kube-controller-manager", "--kubeconfig", kcm, "--authentication-kubeconfig", kcm,
          "--authorization-kubeconfig", kcm, "--bind-address", "127.0.0.1", "--secure-port", str(ports["kcm"]),
          "--service-account-private-key-file", PKI / "sa.key", "--root-ca-file", PKI / "ca.crt",
          "--cluster-signing-cert-file", PKI / "ca.crt", "--cluster-signing-key-file", PKI / "ca.key",
          "--use-service-account-credentials=true", "--leader-elect=false",
          "--service-cluster-ip-range", SERVICE_CIDR,
          "--allocate-node-cidrs", "--cluster-cidr", CLUSTER_CIDR, "--node-cidr-mask-size", "24")
    sched = D / "scheduler.kubeconfig"
    start("kube-scheduler", "--kubeconfig", sched, "--authentication-kubeconfig", sched,
          "--authorization-kubeconfig", sched, "--bind-address", "127.0.0.1",
          "--secure-port", str(ports["scheduler"]), "--leader-elect=false")

    make_cgroups(extra)
    save_state(made_run_containerd=not RUN_CONTAINERD.exists())
    (CTRD / "config.toml").write_text(containerd_config())
    env = os.environ.copy()
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"  # the shim, runc
    start("containerd", "--config", CTRD / "config.toml", env=env)
    for node in extra:
        try:
            cn.make_mount_ns(node)
        except cn.NodeError as e:
            raise ClusterError(f"node {node.name}: {e}") from e
        (node.dir / "containerd").mkdir(parents=True, exist_ok=True)
        (node.dir / "containerd" / "config.toml").write_text(containerd_config(node.dir / "containerd"))
        start("containerd", "--config", node.dir / "containerd" / "config.toml", env=env, node=node)
    everything = [*COMPONENTS[:-1], *(n.label("containerd") for n in extra)]
    poll("containerd ready", 60, lambda: all(
        run(BIN / "ctr", "--address", sock, "version", check=False, timeout=10).returncode == 0
        for sock in (SOCK, *(n.sock for n in extra))), check_alive(*everything))
    poll("kube-controller-manager ready", 60, lambda: http_ok(f"https://127.0.0.1:{ports['kcm']}/healthz"),
         check_alive("kube-controller-manager"))
    poll("kube-scheduler ready", 60, lambda: http_ok(f"https://127.0.0.1:{ports['scheduler']}/healthz"),
         check_alive("kube-scheduler"))

    for sock in (SOCK, *(n.sock for n in extra)):
        import_images(sock)

    (D / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(ports), sort_keys=False))
    start("kubelet", "--config", D / "kubelet.yaml", "--kubeconfig", D / "node.kubeconfig",
          "--root-dir", KUBELET_DIR, "--cert-dir", KUBELET_DIR / "pki",
          "--hostname-override", NODE_NAME, "--node-ip", NODE_IP, env=env)
    everything.append("kubelet")
    wait_node(NODE_NAME, POD_CIDR, everything)
    # one kubelet after the other: the controller-manager hands out /24s in registration
    # order, so node k's pod CIDR is usually 10.244.<k-1>.0/24; not always: its range
    # allocator can handle a node twice, lose the race on the second patch and release that
    # /24 with its cursor already past it (seen: node 3 got 10.244.3.0/24), so any free /24
    # of the cluster CIDR is taken
    for node in extra:
        (node.dir / "kubelet").mkdir(parents=True, exist_ok=True)
        (node.dir / "kubelet.yaml").write_text(yaml.safe_dump(kubelet_config(ports, node), sort_keys=False))
        start("kubelet", "--config", node.dir / "kubelet.yaml", "--kubeconfig", D / f"node{node.k}.kubeconfig",
              "--root-dir", node.dir / "kubelet", "--cert-dir", node.dir / "kubelet" / "pki",
              "--hostname-override", node.name, "--node-ip", node.ip, env=env, node=node)
        everything.append(node.label("kubelet"))
        wait_node(node.name, None, everything)

    say(f"installing axoneme: kubectl apply -k {OVERLAY.relative_to(REPO)} (deploy/, datapath "
        f"{args.datapath}, iptables mode {args.iptables_mode}, routing {args.routing_mode})")
    write_overlay(args.datapath, args.iptables_mode, args.routing_mode)
    apply_overlay()
    poll(f"DaemonSet kube-system/axoneme ready on {args.nodes} node(s)", 900,
         lambda: ds_ready(args.nodes), check_alive(*everything), agent_progress)
    for name in (NODE_NAME, *(n.name for n in extra)):
        poll(f"node {name} Ready", 120, lambda nm=name: node_ready(nm), check_alive(*everything),
             lambda nm=name: node_progress(nm))
    save_state(phase="up")
    say(f"up in {time.monotonic() - t0:.1f} s")
    print(f"KUBECONFIG={KUBECONFIG}", flush=True)
    return 0


def wait_node(name: str, cidr: str | None, components: Sequence[str]) -> None:
    """The node registered and given ``cidr`` (None: any /24 of the cluster CIDR)."""
    poll(f"node {name} registered", 120,
         lambda: kubectl("get", "node", name, check=False, timeout=10).returncode == 0,
         check_alive(*components))

    def pod_cidr() -> str:
        return kubectl("get", "node", name, "-o", "jsonpath={.spec.podCIDR}", check=False,
                       timeout=10).stdout.strip()

    def ready() -> bool:
        got = pod_cidr()
        if cidr is not None or not got:
            return got == cidr
        net = ipaddress.ip_network(got)
        return net.prefixlen == 24 and net.subnet_of(ipaddress.ip_network(CLUSTER_CIDR))

    poll(f"node {name} pod CIDR {cidr or '(a /24 of ' + CLUSTER_CIDR + ')'}", 60, ready,
         check_alive(*components), lambda: "its pod CIDR is " + (pod_cidr() or "not set"))


def apply_overlay() -> None:
    res = kubectl("apply", "-k", str(OVERLAY), check=False, timeout=120)
    if res.returncode != 0:
        raise ClusterError(f"kubectl apply -k {OVERLAY} failed: {res.stderr.strip()[-2000:]}")
    for line in res.stdout.splitlines():
        say(f"  {line}")


def import_images(sock: Path = SOCK) -> None:
    script = REPO / "scripts" / "k8s-images"
    if not script.exists():
        raise ClusterError("scripts/k8s-images is missing: it builds and imports the pause, agnhost and "
                           "axoneme images")
    say(f"images (scripts/k8s-images --address {sock})")
    if subprocess.run([str(script), "--address", str(sock)], stdout=sys.stdout,
                      stderr=sys.stderr).returncode:
        raise ClusterError("scripts/k8s-images failed (above)")
    have = set(run(BIN / "ctr", "--address", sock, "-n", "k8s.io", "images", "ls", "-q").stdout.split())
    missing = [i for i in IMAGES if i not in have]
    if missing:
        raise ClusterError(f"images missing in containerd after scripts/k8s-images: {', '.join(missing)}")


def agent_progress() -> str:
    out = kubectl("-n", "kube-system", "get", "pods", "-l", "k8s-app=axoneme", "-o",
                  "jsonpath={range .items[*]}{.metadata.name} {.status.phase} "
                  "{.status.containerStatuses[0].ready} {.status.containerStatuses[0].restartCount} "
                  "{.status.containerStatuses[0].state}{'\\n'}{end}", check=False, timeout=15)
    return (out.stdout.strip() or out.stderr.strip() or "no agent pod yet")[:600]


def node_progress(name: str = NODE_NAME) -> str:
    out = kubectl("get", "node", name, "-o",
                  'jsonpath={.status.conditions[?(@.type=="Ready")].message}', check=False, timeout=15)
    return out.stdout.strip()[:400]


# -- down ------------------------------------------------------------------------------------

def mounts_under(root: Path) -> Iterable[str]:
    prefix = str(root)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].encode().decode("unicode_escape")
        if mp == prefix or mp.startswith(prefix + "/"):
            yield mp


def umount_all(paths: Iterable[str]) -> None:
    for mp in sorted(set(paths), key=lambda p: (-p.count("/"), p)):
        if run("umount", mp, check=False).returncode != 0:
            run("umount", "-l", mp, check=False)


def containerd_cleanup(env: dict[str, str], node: cn.Node | None = None) -> None:
    """Kill every container of this cluster's containerd (node 1's, or node k's: the same in
    its namespaces) (starting it again if it died, to list them) and umount/remove their
    network namespaces."""
    ctrd = node.dir / "containerd" if node else CTRD
    sock = node.sock if node else SOCK
    label = node.label("containerd") if node else "containerd"
    cfg = ctrd / "config.toml"
    if not cfg.exists():
        return
    pids = recorded()
    temp = None
    if not is_ours(pids.get(label, 0), label):
        if not (ctrd / "root").exists():
            return
        if node and not (cn.netns_exists(node.netns) and cn._mounted(node.mntns)):
            say(f"{node.name}'s namespaces are gone: its containers are found by cgroup")
            return
        say(f"starting {label} again to list its containers")
        temp = start("containerd", "--config", cfg, env=env, node=node)
        try:
            poll(f"{label} ready", 30, lambda: run(BIN / "ctr", "--address", sock, "version", check=False,
                                                  timeout=10).returncode == 0, check_alive(label))
        except ClusterError as e:
            say(f"{label} does not start ({e}): its containers are found by cgroup")
            return
    ctr = (str(BIN / "ctr"), "--address", str(sock), "-n", "k8s.io")
    netns: set[str] = set()
    ids = run(*ctr, "containers", "ls", "-q", check=False).stdout.split()
    for cid in ids:
        info = run(*ctr, "containers", "info", cid, check=False)
        try:
            spec = json.loads(info.stdout)["Spec"]
            for ns in spec["linux"]["namespaces"]:
                if ns.get("type") == "network" and ns.get("path", "").startswith("/var/run/netns/"):
                    netns.add(ns["path"])
        except (ValueError, KeyError, TypeError):
            pass
    for cid in ids:
        run(*ctr, "tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=30)
    for cid in ids:
        run(*ctr, "tasks", "delete", "-f", cid, check=False, timeout=30)
        # containerd puts shim sockets in /run/containerd/s whatever its state dir, named by the
        # hash of address/namespace/id; a killed shim leaves its socket behind
        digest = hashlib.sha256(f"{sock}/k8s.io/{cid}".encode()).hexdigest()
        Path(RUN_CONTAINERD / "s" / digest).unlink(missing_ok=True)
    if ids:
        say(f"killed {len(ids)} containers of {label}")
    for path in sorted(netns):
        if os.path.exists(path):
            # node k's pod namespaces are mounted in its mount namespace only
            run(*(["nsenter", f"--mount={node.mntns}"] if node else []), "umount", path, check=False)
            try:
                os.unlink(path)
                say(f"removed netns {os.path.basename(path)}")
            except OSError:
                pass
    if temp:
        stop_pid(temp, label)


def kill_strays() -> None:
    """Shims of this cluster's containerds and processes in this cluster's cgroups, by PID."""
    marker = f"/{CGROUP_ROOT}/"
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        pid = int(p.name)
        argv = cmdline(pid)
        shim = bool(argv) and "containerd-shim" in os.path.basename(argv[0]) and any(
            a.startswith(str(D) + "/") and a.endswith("containerd.sock") for a in argv)
        try:
            in_cg = any(marker in ln for ln in (p / "cgroup").read_text().splitlines())
        except OSError:
            in_cg = False
        if shim or in_cg:
            try:
                os.kill(pid, signal.SIGKILL)
                say(f"killed {'shim' if shim else 'container process'} {pid} ({' '.join(argv)[:80]})")
            except ProcessLookupError:
                pass


def remove_chains() -> None:
    for tool in ("iptables", "ip6tables"):
        if not shutil.which(tool):
            continue
        for table in ("filter", "nat", "mangle"):
            listing = run(tool, "-w", "-t", table, "-S", check=False).stdout.splitlines()
            ours = [c for c in KUBELET_CHAINS if f"-N {c}" in listing]
            for rule in listing:  # jumps into our chains, from any chain
                parts = rule.split()
                if parts[:1] == ["-A"] and "-j" in parts and parts[parts.index("-j") + 1] in ours:
                    run(tool, "-w", "-t", table, "-D", *parts[1:], check=False)
            for chain in ours:
                run(tool, "-w", "-t", table, "-F", chain, check=False)
                run(tool, "-w", "-t", table, "-X", chain, check=False)
                say(f"removed {tool} {table} {chain}")


def remove_cgroups() -> None:
    for h in cgroup_hierarchies():
        root = h / CGROUP_ROOT
        if not root.is_dir():
            continue
        for dirpath, _, _ in sorted(os.walk(root), key=lambda t: -t[0].count("/")):
            try:
                os.rmdir(dirpath)
            except OSError as e:
                say(f"cannot remove cgroup {dirpath}: {e}")


def do_down() -> None:
    global BIN
    BIN = bin_dir()
    env = os.environ.copy()
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
    pids = recorded()
    extra = cn.recorded_nodes(D)
    for label in ("kubelet", *(n.label("kubelet") for n in extra)):  # first: they would restart pods
        if label in pids:
            stop_pid(pids[label], label)
    if D.exists():
        containerd_cleanup(env)
        for node in extra:
            containerd_cleanup(env, node)
    kill_strays()
    if AGENT_STATE.is_dir():
        res = run(REPO / ".venv" / "bin" / "axoneme", "agent", "cleanup", "--state-dir", AGENT_STATE,
                  check=False, timeout=300)
        say(f"axoneme agent cleanup --state-dir {AGENT_STATE}: exit {res.returncode} "
            f"{(res.stderr or res.stdout).strip()[-300:]}")
    for name in (*(n.label("containerd") for n in extra), *reversed(COMPONENTS)):
        pid = recorded().get(name)
        if pid:
            stop_pid(pid, name)
    kill_strays()
    for node in extra:  # its mounts (bpffs, binds, containerd's, kubelet's) go with it
        if cn.remove_mount_ns(node):
            say(f"removed {node.name}'s mount namespace")
    umount_all(mounts_under(D))
    if load_state().get("made_run_containerd") and RUN_CONTAINERD.is_dir():
        # empty dirs only (s, fifo, runc/k8s.io: a dead shim's cleanup uses runc's default root)
        for dirpath, _, _ in sorted(os.walk(RUN_CONTAINERD), key=lambda t: -t[0].count("/")):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
    if Path(BPFFS_ROOT).exists():
        shutil.rmtree(BPFFS_ROOT, ignore_errors=True)
        say(f"removed {BPFFS_ROOT}")
    remove_chains()
    remove_cgroups()
    for link in Path("/var/log/containers").glob("*.log"):  # kubelet's legacy symlinks
        if link.is_symlink() and os.readlink(link).startswith(str(D) + "/"):
            link.unlink()
    if lo_has_ip():
        run("ip", "addr", "del", f"{NODE_IP}/32", "dev", "lo")
        say(f"removed {NODE_IP}/32 from lo")
    for what in cn.remove_fabric(D):  # node namespaces (their kernel state with them), bridge, guard
        say(f"removed {what}")
    left = list(mounts_under(D))
    if left:
        raise ClusterError(f"mounts left under {D}, not removing it: {left[:5]}")
    if D.exists():
        shutil.rmtree(D)
        say(f"removed {D}")


def cmd_down(args: argparse.Namespace) -> int:
    del args
    do_down()
    say("down")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    del args
    state = load_state()
    if not state:
        say(f"not up (no {STATE})")
        return 1
    global BIN
    BIN = bin_dir()
    ok = True
    for name, (pid, alive) in component_health(state).items():
        print(f"{name:24} pid {pid or '-':>7}  {'running' if alive else 'DOWN'}")
        ok &= alive
    n = int(state.get("nodes", 1))  # type: ignore[call-overload]
    agents = agents_by_node()
    for name in node_names(state):
        ready = node_ready(name)
        ok &= ready
        cidr = kubectl("get", "node", name, "-o", "jsonpath={.spec.podCIDR} {.status.addresses[0].address}",
                       check=False, timeout=15).stdout.split()
        pod, pod_ready = agents.get(name, ("-", False))
        print(f"{'node ' + name:24} {'Ready' if ready else 'NOT Ready':9}  address {(cidr[1:] or ['-'])[0]:14} "
              f"pod CIDR {(cidr or ['-'])[0]:15} agent {pod} {'ready' if pod_ready else 'NOT ready'}")
    dr = ds_ready(n)
    print(f"{'daemonset axoneme':24} {'ready' if dr else 'NOT ready'} ({n} node(s))")
    print(f"{'datapath':24} {state.get('datapath')} (iptables mode {state.get('iptables_mode')})")
    print(f"{'routing':24} {state.get('routing_mode', 'native')}")
    print(f"{'phase':24} {state.get('phase')}")
    print(f"KUBECONFIG={KUBECONFIG}")
    return 0 if ok and dr and state.get("phase") == "up" else 1


def agents_by_node() -> dict[str, tuple[str, bool]]:
    """node name -> (its axoneme agent pod, ready)."""
    out = kubectl("-n", "kube-system", "get", "pods", "-l", "k8s-app=axoneme", "-o", "json",
                  check=False, timeout=15)
    try:
        items = json.loads(out.stdout)["items"]
    except (ValueError, KeyError):
        return {}
    return {str(p["spec"].get("nodeName")): (
        p["metadata"]["name"],
        any(c.get("type") == "Ready" and c.get("status") == "True"
            for c in (p.get("status") or {}).get("conditions") or [])) for p in items}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/cluster", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the cluster (idempotent)")
    up.add_argument("--datapath", choices=("ebpf", "iptables"), default="ebpf")
    up.add_argument("--iptables-mode", choices=("plain", "ipset"), default="plain")
    up.add_argument("--nodes", type=int, default=1,
                    help=f"nodes (1 to {cn.MAX_NODES}): node 1 is this machine's network namespace, "
                         "node k a network and mount namespace of its own (default 1)")
    up.add_argument("--routing-mode", choices=("native", "tunnel"), default="native",
                    help="pod traffic between nodes: routes via the nodes' addresses, or VXLAN "
                         "(the agents' routing_mode; default native)")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop everything and remove everything it made").set_defaults(func=cmd_down)
    sub.add_parser("status", help="components, nodes, DaemonSet; exit 0 when all is up").set_defaults(
        func=cmd_status)
    args = p.parse_args(argv)
    if args.cmd == "up" and not 1 <= args.nodes <= cn.MAX_NODES:
        p.error(f"--nodes {args.nodes}: 1 to {cn.MAX_NODES} nodes")
    if os.geteuid() != 0:
        print("scripts/cluster: needs root (containerd, kubelet, the node address, the agent)", file=sys.stderr)
        return 1
    if args.cmd == "up":
        global BIN
        BIN = bin_dir()
    try:
        return int(args.func(args))
    except ClusterError as e:
        print(f"scripts/cluster: error: {e}", file=sys.stderr)
        if args.cmd == "up":
            print(f"scripts/cluster: logs in {LOGS}; `scripts/cluster down` cleans up", file=sys.stderr)
        return 1


BIN = Path()

if __name__ == "__main__":
    sys.exit(main())
