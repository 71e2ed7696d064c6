"""Pod-to-pod routing between nodes: the kernel routes to other nodes' pod CIDRs.

Each Node object of the API says where its pods live (``spec.podCIDR``) and
how to reach the node (``status.addresses``, InternalIP). The agent keeps
this node's kernel in step with the other nodes, in one of Cilium's two
routing modes (``routing_mode``, ``agent run --routing-mode``):

- ``native`` (Cilium's native routing with auto-direct-node-routes): one
  route per remote pod CIDR via that node's IP,
  ``ip route replace 10.244.1.0/24 via 10.255.252.2 proto 164``.
- ``tunnel`` (Cilium's VXLAN tunnel): one VXLAN device of ours,
  ``axon_vxlan`` (Cilium: ``cilium_vxlan``), UDP port 8472 (the Linux VXLAN
  port Cilium uses), VNI 1, no learning, its address ``local`` = this node's
  IP, its MAC derived from that IP (``vtep_mac``: ``0e:ae`` + the four bytes
  of the address, so every node knows every other node's VTEP MAC without
  asking). Per remote node: the route ``<pod CIDR> via <node IP> dev
  axon_vxlan onlink proto 164``, a permanent neighbour ``<node IP> lladdr
  vtep_mac(node IP) dev axon_vxlan`` and an FDB entry ``vtep_mac(node IP)
  dev axon_vxlan dst <node IP>``: a packet to a remote pod leaves
  encapsulated in UDP to the remote node, which decapsulates it on its own
  ``axon_vxlan`` and forwards it to the pod. The device's MTU is the
  underlay's (at most the agent's ``mtu``) minus the 50 bytes of VXLAN over
  IPv4; pods get ``mtu`` minus 50 too (``AgentConfig.pod_mtu``).
  Identity in the VNI, as Cilium: with a datapath that has the capability
  ``tunnel_identity`` (eBPF) the device is collect_md ("external": no VNI of
  its own, no FDB entries; ``NodeRouting.external``) and the datapath's
  programs on it set each packet's VNI to the source's security identity
  and its remote to the route's next hop, and judge arriving packets by the
  VNI's identity, so a pod whose ipcache entry has not arrived (or is stale)
  is still judged by what it is. Otherwise (iptables) the device is plain,
  VNI 1 with the FDB entries above, and the receiving node finds the
  source's identity in its ipcache alone (``_remotepods``).

In both modes a node's address must be on a directly connected network
(``ip route get`` names no gateway): native routes need such a next hop, and
tunnel packets must never leave by a gateway, the uplink's default route
included. Such a node is not routed and is reported; the others are.

What is ours is found by name, never by guessing (``_noderoutes``): routes by their protocol
number (``ROUTE_PROTO`` = 164, in the main table), neighbours and FDB
entries by the device, the device by its name. ``NodeRouting.apply`` is
idempotent and diffs what the kernel holds against what the nodes say (a
node added, changed or deleted: its routes/entries follow; a mode switch
removes the other mode's state); ``cleanup`` removes all of it. Nothing else
is touched: no other link, no route of another protocol (a route of another
protocol with a pod CIDR as its exact destination is left alone and the node
reported), never a default route (a pod CIDR must be IPv4, /8 or longer, and
not contain any node's address).

This module is the desired state (pure: Node objects in, routes out);
``_noderoutes`` holds the kernel side (``NodeRouting``) and the agent's
(``RoutingService``). Kubernetes mode runs ``RoutingService``: Node events
from the informer (``KubernetesSource.listen``) -> ``NodeInfo`` ->
``NodeRouting.apply`` in a worker thread, one at a time. On a clean stop the routes stay, like the
datapath's enforcement (other nodes keep reaching this node's pods while its
agent restarts); ``axoneme agent cleanup`` and a restart without Kubernetes
mode remove them (the state file records that routing was on).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from axoneme.core.errors import AxonemeError

MODES = ("native", "tunnel")
ROUTE_PROTO = 164  # our routes' protocol number (rtm_protocol): how they are found again
VXLAN_DEVICE = "axon_vxlan"
VXLAN_PORT = 8472
VXLAN_VNI = 1
VXLAN_OVERHEAD = 50  # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8
MIN_PREFIXLEN = 8  # a pod CIDR shorter than this is refused: never a default-ish route

__all__ = ["MODES", "ROUTE_PROTO", "VXLAN_DEVICE", "VXLAN_OVERHEAD", "VXLAN_PORT",
           "VXLAN_VNI", "Desired", "FdbEntry", "Neighbour", "NodeInfo", "Route",
           "RoutingError", "desired_state", "node_info", "vtep_mac"]


class RoutingError(AxonemeError):
    """The kernel refused a routing change (the node it was for is reported)."""


# -- the nodes ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node as routing needs it: its name, address and pod CIDR (IPv4)."""

    name: str
    ip: ipaddress.IPv4Address | None
    pod_cidr: ipaddress.IPv4Network | None


def node_info(obj: Mapping[str, Any]) -> NodeInfo:
    """A Node object of the API -> NodeInfo: the first IPv4 of ``spec.podCIDRs``
    (else ``spec.podCIDR``) and the first IPv4 InternalIP of
    ``status.addresses`` (else ExternalIP, as Cilium). Missing or malformed:
    None in that field (the node is then not routed, and says why)."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    cidrs = [c for c in (spec.get("podCIDRs") or []) if isinstance(c, str)]
    if isinstance(spec.get("podCIDR"), str):
        cidrs.append(spec["podCIDR"])
    pod_cidr = None
    for text in cidrs:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except ValueError:
            continue
        if isinstance(net, ipaddress.IPv4Network):
            pod_cidr = net
            break
    ip = None
    addresses = [a for a in status.get("addresses") or [] if isinstance(a, dict)]
    for kind in ("InternalIP", "ExternalIP"):
        for a in addresses:
            if a.get("type") != kind:
                continue
            try:
                addr = ipaddress.ip_address(str(a.get("address")))
            except ValueError:
                continue
            if isinstance(addr, ipaddress.IPv4Address):
                ip = addr
                break
        if ip is not None:
            break
    return NodeInfo(str(meta.get("name") or ""), ip, pod_cidr)


def node_pod_cidr(nodes: Iterable[Mapping[str, Any]], name: str,
                  cluster_cidrs: str) -> tuple[str | None, str]:
    """This node's IPAM range in Kubernetes mode (Cilium's ``ipam: kubernetes``):
    the IPv4 pod CIDR of the Node called ``name`` among ``nodes`` (API objects).

    Returns (CIDR, "") when it has one inside ``cluster_cidrs`` (the agent's
    ``pod_cidr``: one CIDR or several, comma-separated), else (None, why): the
    agent then allocates from ``pod_cidr`` itself (a Node without a pod CIDR:
    a controller-manager without ``--allocate-node-cidrs``). A pod CIDR outside
    ``pod_cidr`` is refused (None, why): the guard and the datapath's pod
    scope cover ``pod_cidr`` only, so such pods would not be guarded."""
    obj = next((o for o in nodes if (o.get("metadata") or {}).get("name") == name), None)
    if obj is None:
        return None, f"no Node {name!r} in the API"
    info = node_info(obj)
    if info.pod_cidr is None:
        return None, f"Node {name!r} has no IPv4 spec.podCIDR"
    outer = []
    for text in cluster_cidrs.split(","):
        try:
            outer.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            continue
    if not any(isinstance(o, ipaddress.IPv4Network) and info.pod_cidr.subnet_of(o) for o in outer):
        return None, (f"Node {name!r} spec.podCIDR {info.pod_cidr} is outside pod_cidr "
                      f"{cluster_cidrs} (set pod_cidr to the cluster's CIDR)")
    return str(info.pod_cidr), ""


def vtep_mac(ip: ipaddress.IPv4Address) -> str:
    """The VXLAN device MAC of the node with address ``ip`` (locally administered
    unicast ``0e:ae`` + the address), known to every node without asking."""
    return "0e:ae:" + ":".join(f"{b:02x}" for b in ip.packed)


# -- what the kernel should hold ------------------------------------------------------------

@dataclass(frozen=True, slots=True, order=True)
class Route:
    """``dst via gateway [dev device onlink] proto ROUTE_PROTO``."""

    dst: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    device: str = ""  # tunnel mode: the VXLAN device (onlink); native: the kernel picks


@dataclass(frozen=True, slots=True, order=True)
class Neighbour:
    ip: ipaddress.IPv4Address
    mac: str


@dataclass(frozen=True, slots=True, order=True)
class FdbEntry:
    mac: str
    dst: ipaddress.IPv4Address


@dataclass(frozen=True, slots=True)
class Desired:
    """This node's routing state. ``device_local`` is the VXLAN device's local
    address (tunnel mode), None when no device should exist."""

    mode: str
    routes: frozenset[Route] = frozenset()
    neighbours: frozenset[Neighbour] = frozenset()
    fdb: frozenset[FdbEntry] = frozenset()
    device_local: ipaddress.IPv4Address | None = None
    problems: Mapping[str, str] = field(default_factory=dict)  # node name -> why not routed
    owners: Mapping[ipaddress.IPv4Network, str] = field(default_factory=dict)  # dst -> node


def desired_state(mode: str, local: NodeInfo | None, remotes: Iterable[NodeInfo]) -> Desired:
    """What the kernel of node ``local`` should hold to reach ``remotes``' pods.

    A remote node is skipped (named in ``problems``) when:
    1. it has no IPv4 address or no IPv4 pod CIDR;
    2. its pod CIDR is shorter than /8, or contains its own, this node's or
       another node's address (it would swallow node traffic);
    3. its pod CIDR overlaps this node's pod CIDR (this node's pods win);
    4. its pod CIDR overlaps one of a remote node whose name sorts first,
       or its address is this node's or such a node's;
    5. tunnel mode and this node has no address (no VXLAN device then).
    """
    if mode not in MODES:
        raise ValueError(f"unknown routing mode {mode!r} (one of {', '.join(MODES)})")
    problems: dict[str, str] = {}
    remotes = sorted((n for n in remotes if local is None or n.name != local.name),
                     key=lambda n: n.name)
    node_ips = {n.ip for n in remotes if n.ip is not None}
    if local is not None and local.ip is not None:
        node_ips.add(local.ip)
    if mode == "tunnel" and (local is None or local.ip is None):
        return Desired(mode, problems={n.name: "tunnel mode: this node has no IPv4 address "
                                               "(status.addresses InternalIP)" for n in remotes})
    taken: list[tuple[ipaddress.IPv4Network, str]] = []
    if local is not None and local.pod_cidr is not None:
        taken.append((local.pod_cidr, f"this node's pod CIDR ({local.name})"))
    seen_ips: dict[ipaddress.IPv4Address, str] = {}
    if local is not None and local.ip is not None:
        seen_ips[local.ip] = f"this node ({local.name})"
    routes: set[Route] = set()
    neighbours: set[Neighbour] = set()
    fdb: set[FdbEntry] = set()
    owners: dict[ipaddress.IPv4Network, str] = {}
    for node in remotes:
        if node.ip is None:
            problems[node.name] = "no IPv4 address (status.addresses InternalIP)"
            continue
        if node.pod_cidr is None:
            problems[node.name] = "no IPv4 pod CIDR (spec.podCIDR)"
            continue
        cidr = node.pod_cidr
        if cidr.prefixlen < MIN_PREFIXLEN:
            problems[node.name] = f"pod CIDR {cidr} is shorter than /{MIN_PREFIXLEN}"
            continue
        inside = sorted(str(ip) for ip in node_ips if ip in cidr)
        if inside:
            problems[node.name] = f"pod CIDR {cidr} contains node address {inside[0]}"
            continue
        clash = next((who for net, who in taken if net.overlaps(cidr)), None)
        if clash is not None:
            problems[node.name] = f"pod CIDR {cidr} overlaps {clash}"
            continue
        if node.ip in seen_ips:
            problems[node.name] = f"address {node.ip} is also {seen_ips[node.ip]}"
            continue
        taken.append((cidr, f"node {node.name}'s pod CIDR"))
        seen_ips[node.ip] = f"node {node.name}"
        owners[cidr] = node.name
        if mode == "native":
            routes.add(Route(cidr, node.ip))
        else:
            routes.add(Route(cidr, node.ip, VXLAN_DEVICE))
            neighbours.add(Neighbour(node.ip, vtep_mac(node.ip)))
            fdb.add(FdbEntry(vtep_mac(node.ip), node.ip))
    return Desired(mode, frozenset(routes), frozenset(neighbours), frozenset(fdb),
                   local.ip if mode == "tunnel" and local is not None else None, problems,
                   owners)
