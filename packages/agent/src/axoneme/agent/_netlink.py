"""Kernel plumbing for endpoints: network namespaces and the pod veth pair.

Routing follows Cilium: the pod holds its IP as a /32 on eth0, a link route
to the gateway 169.254.1.1 and a default route via it, with a permanent
neighbour entry for the gateway pointing at the host veth's MAC, so the pod
never needs ARP. The host routes the pod IP /32 to the host veth and holds a
permanent neighbour entry for the pod, proxy_arp is on and rp_filter off on
the host veth. Everything a failed setup created is removed again.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Protocol

from axoneme.core.errors import AxonemeError
from axoneme.core.netlink import NUD_PERMANENT, RT_SCOPE_LINK, Rtnl, RtnlError

LOG = logging.getLogger(__name__)

GATEWAY_IP = "169.254.1.1"
NETNS_DIR = "/run/netns"


class NetlinkError(AxonemeError):
    """Setting up or tearing down an endpoint's interfaces failed."""


@dataclass(frozen=True, slots=True)
class EndpointLink:
    host_ifname: str
    host_ifindex: int
    host_mac: str
    pod_ifname: str
    pod_mac: str
    mtu: int


class EndpointNetlink(Protocol):
    """What the endpoint service needs of the kernel (this module; a fake in
    root-free tests)."""

    GATEWAY_IP: str

    def host_ifname(self, container_id: str) -> str: ...

    def link_index(self, name: str) -> int: ...

    def setup_endpoint(self, container_id: str, netns_path: str, ifname: str, ip: str,
                       mtu: int = 1500) -> EndpointLink: ...

    def teardown_endpoint(self, host: str) -> bool: ...


def host_ifname(container_id: str) -> str:
    """``lxc`` + 11 hex chars of a hash of the container id (15 chars, IFNAMSIZ-1)."""
    return "lxc" + hashlib.sha256(container_id.encode()).hexdigest()[:11]


def _sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as e:
        LOG.warning("cannot set %s=%s: %s", path, value, e)


def enable_forwarding() -> None:
    _sysctl("/proc/sys/net/ipv4/ip_forward", "1")


def create_netns(name: str) -> str:
    proc = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if proc.returncode != 0:
        raise NetlinkError(f"cannot create network namespace {name}: {proc.stderr.strip()}")
    path = os.path.join(NETNS_DIR, name)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], capture_output=True)
    return path


def delete_netns(name: str) -> None:
    """Remove a named netns. Unknown namespaces are fine (idempotent)."""
    if not name or "/" in name:
        return
    if os.path.exists(os.path.join(NETNS_DIR, name)):
        proc = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
        if proc.returncode != 0 and os.path.exists(os.path.join(NETNS_DIR, name)):
            LOG.warning("cannot delete netns %s: %s", name, proc.stderr.strip())
    etc = os.path.join("/etc/netns", name)
    if os.path.isdir(etc):
        for entry in os.listdir(etc):
            try:
                os.unlink(os.path.join(etc, entry))
            except OSError:
                pass
        try:
            os.rmdir(etc)
        except OSError:
            pass


def warm_up() -> None:
    """Open one netlink socket now, so the first pod does not pay for it."""
    with Rtnl() as rtnl:
        rtnl.link_index("lo")


def link_index(name: str) -> int:
    """Index of a host link, 0 if it does not exist.

    Asked of the kernel in the calling thread's network namespace
    (SIOCGIFINDEX): /sys/class/net shows the namespace sysfs was mounted in,
    not the agent's when it runs in a node netns entered with ``nsenter --net``
    (its pods' veths looked gone there and a restart disconnected them)."""
    try:
        return socket.if_nametoindex(name)
    except (OSError, ValueError):
        return 0


def setup_endpoint(container_id: str, netns_path: str, ifname: str, ip: str,
                   mtu: int = 1500) -> EndpointLink:
    """Create the veth pair for one pod and configure both ends."""
    if not os.path.exists(netns_path):
        raise NetlinkError(f"network namespace {netns_path} does not exist")
    host = host_ifname(container_id)
    with Rtnl() as ipr:
        # a leftover from an interrupted ADD of the same container: ours, by name
        old = ipr.link_index(host)
        if old:
            ipr.link_del(old)
        nsfd = os.open(netns_path, os.O_RDONLY)
        try:
            ipr.veth_add(host, ifname, mtu, peer_netns_fd=nsfd)
        except Exception as e:
            raise NetlinkError(f"cannot create veth {host} / {ifname} in {netns_path}: {e}") from e
        finally:
            os.close(nsfd)
        try:
            link = ipr.link_get(name=host)
            if link is None:
                raise RtnlError(errno.ENODEV, f"veth {host} is gone")
            idx, host_mac = link.index, link.mac
            for key, value in (("proxy_arp", "1"), ("rp_filter", "0"), ("forwarding", "1")):
                _sysctl(f"/proc/sys/net/ipv4/conf/{host}/{key}", value)
            _sysctl(f"/proc/sys/net/ipv6/conf/{host}/disable_ipv6", "1")
            ipr.link_up(idx)
            with Rtnl(netns_path) as pod:
                lo = pod.link_index("lo")
                if lo:
                    pod.link_up(lo)
                peer = pod.link_get(name=ifname)
                if peer is None:
                    raise RtnlError(errno.ENODEV, f"{ifname} is not in {netns_path}")
                pidx, pod_mac = peer.index, peer.mac
                pod.addr_add(pidx, ip, 32)
                pod.link_up(pidx)
                pod.route_add(GATEWAY_IP, 32, pidx, scope=RT_SCOPE_LINK)
                pod.route_add("0.0.0.0", 0, pidx, gateway=GATEWAY_IP)
                pod.neigh_replace(pidx, GATEWAY_IP, host_mac, NUD_PERMANENT)
            ipr.route_add(ip, 32, idx, scope=RT_SCOPE_LINK, replace=True)
            ipr.neigh_replace(idx, ip, pod_mac, NUD_PERMANENT)
        except Exception as e:
            try:
                i = ipr.link_index(host)
                if i:
                    ipr.link_del(i)
            except Exception:  # pragma: no cover - best effort rollback
                LOG.debug("rollback of %s failed", host, exc_info=True)
            raise NetlinkError(f"cannot configure endpoint {host} ({ip}): {e}") from e
    return EndpointLink(host, idx, host_mac, ifname, pod_mac, mtu)


def teardown_endpoint(host: str) -> bool:
    """Delete the host veth (the pod end and the routes go with it).

    Idempotent: a missing link (ENODEV) counts as removed."""
    if not host:
        return False
    with Rtnl() as ipr:
        idx = ipr.link_index(host)
        if idx:
            try:
                ipr.link_del(idx)
            except RtnlError as e:  # ENODEV: already gone
                if e.errno != errno.ENODEV:
                    raise NetlinkError(f"cannot delete {host}: {e}") from e
        return bool(idx)


def host_addresses(exclude_cidr: str = "") -> list[str]:
    """The node's own unicast addresses (host identity), except loopback,
    link-local and any inside ``exclude_cidr`` (the pod CIDR).

    Read over netlink: the agent's tick calls this every second, and forking
    ``ip`` from an agent holding a large policy copies its page tables each time."""
    excluded = ipaddress.ip_network(exclude_cidr) if exclude_cidr else None
    found: set[str] = set()
    with Rtnl() as rtnl:
        addrs = rtnl.addr_dump()
    for addr in addrs:
        # IFA_LOCAL is the address of the interface (IFA_ADDRESS is the peer's
        # on a point-to-point link), as `ip addr` shows it
        raw = addr.local or addr.address
        if not raw:
            continue
        ip = ipaddress.ip_address(raw)
        if ip.is_loopback or ip.is_link_local or ip.is_multicast:
            continue
        if excluded is not None and ip.version == excluded.version and ip in excluded:
            continue
        found.add(str(ip))
    return sorted(found)
