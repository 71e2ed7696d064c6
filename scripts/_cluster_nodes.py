"""scripts/cluster --nodes N: the plumbing of nodes 2..N on this one machine (kind without
containers). scripts/_cluster.py starts the processes; this module makes and removes the
namespaces, links, mounts and guard rules they live in.

Node 1 is the machine's own network namespace, as with one node. Node k >= 2 is:
- the network namespace `axon-node<k>` (its "host network"): `lo` and `eth0` with
  10.255.254.<k>/24, no default route (nothing beyond the cluster is routable from it);
- joined to the other nodes by the bridge `br0` in a namespace of its own, `axon-fabric`: each
  node's `eth0` (node 1: `axon-n1` in the machine's namespace, which carries the API server's
  address 10.255.254.1/24 instead of `lo`) is a veth whose peer `n<k>` is a port of `br0`.
  The bridge is not in the machine's namespace, so node-to-node frames never meet its
  iptables, and it has no port on the machine's uplink;
- a mount namespace of its own (persisted by a bind mount of its nsfs file at
  `.cluster/ns/node<k>`, as `ip netns` persists network namespaces): a slave of the
  machine's (it sees the machine's mounts, its own never reach the machine) and shared
  inside (kubelet's HostToContainer volumes see the pod network namespaces containerd
  mounts), with a fresh bpffs instance on /sys/fs/bpf and per-node bind mounts over the paths
  the DaemonSet's hostPaths name (/var/run/axoneme, .cluster/agent, .cluster/cni), so the one
  DaemonSet gives every node its own state, pins and CNI files;
- its containerd and kubelet run in both namespaces (`nsenter --net --mount`), with their
  own root dirs under `.cluster/nodes/node<k>/`, cgroup parent `/axoneme-cluster/node<k>`,
  node name `axoneme-node<k>` and node IP 10.255.254.<k>.

Guards (DESIGN.md, "Test network and safety"): in each node's namespace the chain
`AXON-NODE-GUARD` (jumped to first from FORWARD) drops forwarded pod traffic (10.244.0.0/16)
leaving by `eth0` to anything but pods and nodes; in the machine's namespace `AXON-FABRIC-GUARD`
drops anything arriving from `axon-n1` that would leave by the uplink (the default routes'
devices). The agents' own guard (`AXON-GUARD`) runs in every node too. All of it is found by
name and removed by `down`; deleting a node's namespaces removes what its kubelet and agent
made inside them.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

FABRIC_NS = "axon-fabric"
BRIDGE = "br0"
HOST_LINK = "axon-n1"  # node 1's link to the fabric (in the machine's namespace)
NODE_LINK = "eth0"  # node k's link, in its namespace
NET_PREFIX = "10.255.254"
PREFIXLEN = 24
MAX_NODES = 3
NODE_GUARD = "AXON-NODE-GUARD"
HOST_GUARD = "AXON-FABRIC-GUARD"
POD_NET = "10.244.0.0/16"
NETNS_DIR = Path("/run/netns")
AGENT_RUN = Path("/var/run/axoneme")  # deploy/daemonset.yaml's hostPath for the agent's runtime files


class NodeError(Exception):
    pass


def _run(*argv: str | Path, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    res = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise NodeError(f"{' '.join(map(str, argv))} failed ({res.returncode}): "
                        f"{(res.stderr or res.stdout).strip()[-1000:]}")
    return res


@dataclass(frozen=True)
class Node:
    """Node k (>= 2) of the cluster, and where its files live under `root` (.cluster/)."""

    k: int
    root: Path

    @property
    def name(self) -> str:
        return f"axoneme-node{self.k}"

    @property
    def ip(self) -> str:
        return f"{NET_PREFIX}.{self.k}"

    @property
    def netns(self) -> str:
        return f"axon-node{self.k}"

    @property
    def dir(self) -> Path:
        return self.root / "nodes" / f"node{self.k}"

    @property
    def mntns(self) -> Path:
        return self.root / "ns" / f"node{self.k}"

    @property
    def sock(self) -> Path:
        return self.dir / "containerd" / "containerd.sock"

    @property
    def cgroup(self) -> str:
        return f"node{self.k}"  # under the cluster's cgroup root

    def label(self, component: str) -> str:
        """The component's name in .cluster/pids and logs/ (`kubelet@node2`)."""
        return f"{component}@node{self.k}"

    def enter(self, mount: bool = True) -> list[str]:
        """The prefix that runs a command in this node (its network and mount namespaces)."""
        argv = ["nsenter", f"--net={NETNS_DIR / self.netns}"]
        return argv + ([f"--mount={self.mntns}"] if mount else [])

    def binds(self) -> list[tuple[Path, Path]]:
        """(this node's directory, the path every node's DaemonSet pod names) bind mounts."""
        return [(self.dir / "run-axoneme", AGENT_RUN), (self.dir / "agent", self.root / "agent"),
                (self.dir / "cni", self.root / "cni")]


def nodes(root: Path, n: int) -> list[Node]:
    return [Node(k, root) for k in range(2, n + 1)]


def host_ip() -> str:
    return f"{NET_PREFIX}.1"


# -- the fabric ----------------------------------------------------------------------------------

def netns_exists(name: str) -> bool:
    return (NETNS_DIR / name).exists()


def link_exists(name: str, netns: str | None = None) -> bool:
    pre = ["-n", netns] if netns else []
    return _run("ip", *pre, "link", "show", "dev", name, check=False).returncode == 0


def make_fabric(root: Path, n: int) -> None:
    """The bridge namespace, node 1's link with the API server's address, nodes 2..n's
    namespaces and links. Idempotent parts are checked by name first."""
    if not netns_exists(FABRIC_NS):
        _run("ip", "netns", "add", FABRIC_NS)
    _run("ip", "-n", FABRIC_NS, "link", "set", "lo", "up")
    if not link_exists(BRIDGE, FABRIC_NS):
        # no STP, no forwarding delay: ports forward at once
        _run("ip", "-n", FABRIC_NS, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0",
             "forward_delay", "0")
    _run("ip", "-n", FABRIC_NS, "link", "set", BRIDGE, "up")
    if not link_exists(HOST_LINK):
        _run("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", "n1", "netns", FABRIC_NS)
    _run("ip", "-n", FABRIC_NS, "link", "set", "n1", "master", BRIDGE, "up")
    addr = f"{host_ip()}/{PREFIXLEN}"
    if f"inet {addr} " not in _run("ip", "-4", "addr", "show", "dev", HOST_LINK).stdout:
        _run("ip", "addr", "add", addr, "dev", HOST_LINK)
    _run("ip", "link", "set", HOST_LINK, "up")
    for node in nodes(root, n):
        if not netns_exists(node.netns):
            _run("ip", "netns", "add", node.netns)
        ns = ("ip", "-n", node.netns)
        _run(*ns, "link", "set", "lo", "up")
        if not link_exists(NODE_LINK, node.netns):
            _run("ip", "-n", FABRIC_NS, "link", "add", f"n{node.k}", "type", "veth", "peer", "name",
                 NODE_LINK, "netns", node.netns)
        _run("ip", "-n", FABRIC_NS, "link", "set", f"n{node.k}", "master", BRIDGE, "up")
        if f"inet {node.ip}/" not in _run(*ns, "-4", "addr", "show", "dev", NODE_LINK).stdout:
            _run(*ns, "addr", "add", f"{node.ip}/{PREFIXLEN}", "dev", NODE_LINK)
        _run(*ns, "link", "set", NODE_LINK, "up")
        install_node_guard(node)


def remove_fabric(root: Path) -> list[str]:
    """Every node namespace, the fabric (its veths go with it), node 1's link, the host guard."""
    done = []
    for path in sorted(NETNS_DIR.glob("axon-node*")) if NETNS_DIR.is_dir() else []:
        if path.name[len("axon-node"):].isdigit():
            _run("ip", "netns", "del", path.name, check=False)
            done.append(f"netns {path.name}")
    if netns_exists(FABRIC_NS):
        _run("ip", "netns", "del", FABRIC_NS, check=False)
        done.append(f"netns {FABRIC_NS}")
    if link_exists(HOST_LINK):  # its peer's namespace may live on a while: remove it by name
        _run("ip", "link", "del", HOST_LINK, check=False)
        done.append(f"link {HOST_LINK}")
    if remove_host_guard():
        done.append(f"iptables {HOST_GUARD}")
    del root
    return done


# -- guards --------------------------------------------------------------------------------------

def _iptables(prefix: list[str], *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return _run(*prefix, "iptables", "-w", "5", *args, check=check)


def install_node_guard(node: Node) -> None:
    pre = node.enter(mount=False)
    if _iptables(pre, "-S", NODE_GUARD, check=False).returncode == 0:
        return
    _iptables(pre, "-N", NODE_GUARD)
    for dst in (POD_NET, f"{NET_PREFIX}.0/{PREFIXLEN}"):
        _iptables(pre, "-A", NODE_GUARD, "-d", dst, "-j", "RETURN")
    _iptables(pre, "-A", NODE_GUARD, "-s", POD_NET, "-o", NODE_LINK, "-j", "DROP")
    _iptables(pre, "-I", "FORWARD", "1", "-j", NODE_GUARD)


def uplinks() -> list[str]:
    out = _run("ip", "-4", "route", "show", "default", check=False).stdout
    devs = []
    for line in out.splitlines():
        words = line.split()
        if "dev" in words and words[words.index("dev") + 1] not in devs:
            devs.append(words[words.index("dev") + 1])
    return devs


def install_host_guard() -> None:
    """Nothing from the fabric leaves by the machine's uplink (before any node forwards)."""
    if _iptables([], "-S", HOST_GUARD, check=False).returncode != 0:
        _iptables([], "-N", HOST_GUARD)
    _iptables([], "-F", HOST_GUARD)
    for dev in uplinks():
        _iptables([], "-A", HOST_GUARD, "-i", HOST_LINK, "-o", dev, "-j", "DROP")
    if _iptables([], "-C", "FORWARD", "-j", HOST_GUARD, check=False).returncode != 0:
        _iptables([], "-I", "FORWARD", "1", "-j", HOST_GUARD)


def remove_host_guard() -> bool:
    if _iptables([], "-S", HOST_GUARD, check=False).returncode != 0:
        return False
    while _iptables([], "-D", "FORWARD", "-j", HOST_GUARD, check=False).returncode == 0:
        pass
    _iptables([], "-F", HOST_GUARD, check=False)
    _iptables([], "-X", HOST_GUARD, check=False)
    return True


# -- mount namespaces ----------------------------------------------------------------------------

def _mounted(path: Path) -> bool:
    target = str(path)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        if line.split()[4].encode().decode("unicode_escape") == target:
            return True
    return False


def make_mount_ns(node: Node) -> None:
    """The node's mount namespace with its bpffs and bind mounts (see the module docstring)."""
    nsdir = node.mntns.parent
    nsdir.mkdir(parents=True, exist_ok=True)
    if not _mounted(nsdir):
        # an nsfs file can only be bind-mounted into a private mount (no propagation loops)
        _run("mount", "--bind", nsdir, nsdir)
        _run("mount", "--make-private", nsdir)
    for src, dst in node.binds():
        src.mkdir(parents=True, exist_ok=True)
        dst.mkdir(parents=True, exist_ok=True)  # the mount point, on the machine's filesystem
    (node.dir / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
    (node.dir / "cni" / "bin").mkdir(parents=True, exist_ok=True)
    if _mounted(node.mntns):
        return
    node.mntns.touch()
    _run("unshare", f"--mount={node.mntns}", "--propagation", "slave", "true")
    script = ["set -e",
              # the other nodes' persisted namespaces: not held by this one
              f"umount -l {nsdir}",
              # slave of the machine, shared inside: HostToContainer volumes see new mounts
              "mount --make-rshared /",
              "mount -t bpf bpf /sys/fs/bpf"]
    script += [f"mount --bind {src} {dst}" for src, dst in node.binds()]
    _run("nsenter", f"--mount={node.mntns}", "sh", "-c", "\n".join(script))


def remove_mount_ns(node: Node) -> bool:
    """Drop the persisted namespace (it goes once no process is left in it)."""
    if not _mounted(node.mntns):
        return False
    if _run("umount", node.mntns, check=False).returncode != 0:
        _run("umount", "-l", node.mntns, check=False)
    return True


def in_node(node: Node, *argv: str | Path, check: bool = False,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return _run(*node.enter(), *argv, check=check, timeout=timeout)


def http_ok_in(node: Node, url: str) -> bool:
    """A plain-HTTP health check on the node's own loopback (kubelet's healthz)."""
    code = ("import sys, urllib.request\n"
            f"sys.exit(0 if urllib.request.urlopen({url!r}, timeout=3).status == 200 else 1)")
    return in_node(node, "python3", "-c", code, timeout=15).returncode == 0


def recorded_nodes(root: Path) -> list[Node]:
    """The extra nodes `up` left (by their directories, namespaces and nsfs files)."""
    ks: set[int] = set()
    for base, prefix in ((root / "nodes", "node"), (root / "ns", "node"), (NETNS_DIR, "axon-node")):
        if base.is_dir():
            for p in base.iterdir():
                if p.name.startswith(prefix) and p.name[len(prefix):].isdigit():
                    ks.add(int(p.name[len(prefix):]))
    return [Node(k, root) for k in sorted(ks) if k >= 2]
