"""The kernel side of node routing (``NodeRouting``) and the agent's
(``RoutingService``); what they keep the kernel in step with, and why, is
``_routing`` (the desired state from Node objects)."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from axoneme.agent._routing import (
    MIN_PREFIXLEN,
    MODES,
    ROUTE_PROTO,
    VXLAN_DEVICE,
    VXLAN_OVERHEAD,
    VXLAN_PORT,
    VXLAN_VNI,
    Desired,
    FdbEntry,
    Neighbour,
    NodeInfo,
    Route,
    RoutingError,
    desired_state,
    node_info,
    vtep_mac,
)

LOG = logging.getLogger(__name__)

__all__ = ["NodeRouting", "Observed", "RoutingService"]


# -- the kernel -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Observed:
    """What of ours the kernel holds."""

    routes: frozenset[Route]
    device: dict[str, Any] | None  # `ip -d -j link show` of the VXLAN device, if any
    neighbours: frozenset[Neighbour]
    fdb: frozenset[FdbEntry]


class NodeRouting:
    """Keeps one network namespace's routing in step with a ``Desired`` state.

    ``netns``: a named network namespace (``ip -n``), None for the agent's own.
    Not thread-safe: one caller at a time (``RoutingService`` serialises)."""

    def __init__(self, netns: str | None = None, device: str = VXLAN_DEVICE,
                 port: int = VXLAN_PORT, vni: int = VXLAN_VNI, proto: int = ROUTE_PROTO,
                 mtu: int = 1500, external: bool = False) -> None:
        self.netns = netns
        # tunnel mode: a collect_md ("external") VXLAN device, for a datapath that
        # sets each packet's VNI and remote itself (capability tunnel_identity):
        # no VNI of its own and no FDB entries (the neighbours stay, so the kernel
        # never ARPs through it); False: a plain device with VNI ``vni`` and FDB
        self.external = external
        self.mtu = mtu  # the agent's mtu: the VXLAN device's is at most this less the overhead
        self.device = device
        self.port = port
        self.vni = vni
        self.proto = proto
        self.problems: dict[str, str] = {}  # node name -> why it is not routed
        self.applied: Desired | None = None

    # -- commands ---------------------------------------------------------------------------
    def _cmd(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [tool] + (["-n", self.netns] if self.netns else []) + list(args)
        proc = subprocess.run(argv, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise RoutingError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")
        return proc

    def _json(self, tool: str, *args: str) -> list[dict[str, Any]]:
        out = self._cmd(tool, "-j", *args, check=False)
        if out.returncode != 0 or not out.stdout.strip():
            return []
        data = json.loads(out.stdout)
        return [d for d in data if isinstance(d, dict)] if isinstance(data, list) else []

    # -- reading ----------------------------------------------------------------------------
    def observe(self) -> Observed:
        routes = set()
        for r in self._json("ip", "-4", "route", "show", "table", "main", "proto",
                            str(self.proto)):
            try:
                dst = ipaddress.IPv4Network(_dst(r))
            except ValueError:
                continue
            if dst.prefixlen < MIN_PREFIXLEN:
                continue  # never one of ours: a default-ish route is never touched
            try:
                gw = ipaddress.IPv4Address(r["gateway"])
            except (KeyError, ValueError):
                # ours by protocol, but not a shape we make: removed too
                routes.add(Route(dst, ipaddress.IPv4Address(0), "?"))
                continue
            dev = str(r.get("dev") or "")
            routes.add(Route(dst, gw, dev if dev == self.device else ""))
        links = self._json("ip", "-d", "link", "show", "dev", self.device)
        device = links[0] if links else None
        neighbours: set[Neighbour] = set()
        fdb: set[FdbEntry] = set()
        if device is not None:
            for n in self._json("ip", "-4", "neigh", "show", "dev", self.device):
                if "PERMANENT" in (n.get("state") or []) and n.get("lladdr"):
                    neighbours.add(Neighbour(ipaddress.IPv4Address(n["dst"]), n["lladdr"]))
            for f in self._json("bridge", "fdb", "show", "dev", self.device):
                if f.get("dst") and f.get("mac"):
                    try:
                        fdb.add(FdbEntry(f["mac"], ipaddress.IPv4Address(f["dst"])))
                    except ValueError:
                        continue
        return Observed(frozenset(routes), device, frozenset(neighbours), frozenset(fdb))

    def _device_ok(self, dev: dict[str, Any] | None, local: ipaddress.IPv4Address,
                   mtu: int) -> bool:
        if dev is None or dev.get("mtu") != mtu:
            return False
        info = ((dev.get("linkinfo") or {}).get("info_data") or {})
        return ((dev.get("linkinfo") or {}).get("info_kind") == "vxlan"
                and bool(info.get("external", False)) == self.external
                and (self.external or info.get("id") == self.vni) and info.get("port") == self.port
                and info.get("local") == str(local) and not info.get("learning", False)
                and str(dev.get("address")) == vtep_mac(local)
                and "UP" in (dev.get("flags") or []))

    def _underlay_mtu(self, local: ipaddress.IPv4Address) -> int:
        for link in self._json("ip", "-4", "addr", "show"):
            if any(a.get("local") == str(local) for a in link.get("addr_info") or []):
                return int(link.get("mtu") or 1500)
        return 1500

    # -- writing ----------------------------------------------------------------------------
    def apply(self, desired: Desired) -> dict[str, str]:
        """Make the kernel hold exactly ``desired`` (of what is ours). Idempotent.
        Returns the nodes not routed and why (``desired``'s problems plus the
        kernel's refusals)."""
        problems = dict(desired.problems)
        if self.external:
            desired = dataclasses.replace(desired, fdb=frozenset())
        before = self.observe()
        desired = self._admit(desired, before, problems)
        # routes first out, devices last: nothing points at a device being removed;
        # a route whose destination stays is replaced below, never deleted first
        wanted = {r.dst for r in desired.routes}
        for route in sorted(r for r in before.routes - desired.routes if r.dst not in wanted):
            self._cmd("ip", "route", "del", str(route.dst), "proto", str(self.proto),
                      check=False)
        if desired.device_local is None:
            if before.device is not None:
                self._cmd("ip", "link", "del", "dev", self.device, check=False)
        else:
            if self._ensure_device(before.device, desired.device_local):
                before = self.observe()  # its routes, neighbours and FDB went with the old one
            for n in sorted(before.neighbours - desired.neighbours):
                self._cmd("ip", "neigh", "del", str(n.ip), "dev", self.device, check=False)
            for f in sorted(before.fdb - desired.fdb):
                self._cmd("bridge", "fdb", "del", f.mac, "dev", self.device, "dst", str(f.dst),
                          check=False)
            for f in sorted(desired.fdb - before.fdb):
                self._cmd("bridge", "fdb", "replace", f.mac, "dev", self.device, "dst",
                          str(f.dst), "self", "permanent")
            for n in sorted(desired.neighbours - before.neighbours):
                self._cmd("ip", "neigh", "replace", str(n.ip), "lladdr", n.mac, "dev",
                          self.device, "nud", "permanent")
        for route in sorted(desired.routes - before.routes):
            node = desired.owners.get(route.dst, str(route.dst))
            argv = ["route", "replace", str(route.dst), "via", str(route.gateway)]
            if route.device:
                argv += ["dev", route.device, "onlink"]
            proc = self._cmd("ip", *argv, "proto", str(self.proto), check=False)
            if proc.returncode != 0:
                problems[node] = f"ip {' '.join(argv)}: {proc.stderr.strip()}"
        self.problems = problems
        self.applied = desired
        return problems

    def _admit(self, desired: Desired, before: Observed, problems: dict[str, str]) -> Desired:
        """``desired`` without the nodes this node must not route to (their
        reasons added to ``problems``): a route to their pod CIDR that is not
        ours, or an address not on a connected network. Checked for routes not
        in place yet (one ``ip route get`` each), so a steady state costs none."""
        new = desired.routes - before.routes
        if not new:
            return desired
        foreign = self._foreign_routes({r.dst for r in new})
        dropped = set()
        for route in sorted(new):
            if route.dst in foreign:
                why = (f"the kernel already has a route to {route.dst} that is not ours "
                       f"({foreign[route.dst]}): left alone")
            else:
                why = self._not_connected(route.gateway)
            if why:
                node = desired.owners.get(route.dst, str(route.dst))
                problems[node] = why
                dropped.add(route)
        if not dropped:
            return desired
        gateways = {r.gateway for r in dropped}
        return dataclasses.replace(
            desired, routes=desired.routes - dropped,
            neighbours=frozenset(n for n in desired.neighbours if n.ip not in gateways),
            fdb=frozenset(f for f in desired.fdb if f.dst not in gateways))

    def _ensure_device(self, dev: dict[str, Any] | None, local: ipaddress.IPv4Address) -> bool:
        """The VXLAN device as it should be; True when it was (re)made."""
        mtu = min(self._underlay_mtu(local), self.mtu) - VXLAN_OVERHEAD
        if self._device_ok(dev, local, mtu):
            return False
        if dev is not None:  # another local address, MTU or shape: make it again
            self._cmd("ip", "link", "del", "dev", self.device, check=False)
        vni = ["external"] if self.external else ["id", str(self.vni)]
        self._cmd("ip", "link", "add", self.device, "address", vtep_mac(local), "mtu", str(mtu),
                  "type", "vxlan", *vni, "local", str(local), "dstport",
                  str(self.port), "nolearning")
        for key, value in (("rp_filter", "0"), ("forwarding", "1")):
            self._sysctl(f"net.ipv4.conf.{self.device}.{key}", value)
        self._cmd("ip", "link", "set", self.device, "up")
        return True

    def _sysctl(self, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        try:
            if self.netns is None:
                with open(path, "w") as f:
                    f.write(value)
                return
            # /proc/sys/net is the opener's namespace's: write it from inside
            proc = subprocess.run(["ip", "netns", "exec", self.netns, "sh", "-c",
                                   f"echo {value} > {path}"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise OSError(proc.stderr.strip())
        except OSError as e:
            LOG.warning("routing: %s=%s: %s", key, value, e)

    def device_of(self, ip: ipaddress.IPv4Address) -> str:
        """The interface holding address ``ip`` ('' when none does)."""
        for link in self._json("ip", "-4", "addr", "show"):
            if any(a.get("local") == str(ip) for a in link.get("addr_info") or []):
                return str(link.get("ifname") or "")
        return ""

    def _not_connected(self, ip: ipaddress.IPv4Address) -> str:
        """Why node address ``ip`` is not on a directly connected network ('' when
        it is). Both modes need it: native routes via it (the kernel would
        refuse too), and tunnel packets to it must not follow a default or
        other gatewayed route out of the machine's uplink."""
        found = self._json("ip", "-4", "route", "get", str(ip))
        if not found:
            return f"node address {ip}: no route to it"
        r = found[0]
        if r.get("gateway") or r.get("type", "unicast") not in ("unicast", "local"):
            how = f"via {r['gateway']}" if r.get("gateway") else str(r.get("type"))
            return (f"node address {ip} is not on a connected network (reached {how} dev "
                    f"{r.get('dev', '?')}): not routed")
        return ""

    def _foreign_routes(self, dsts: set[ipaddress.IPv4Network]) -> dict[ipaddress.IPv4Network, str]:
        """Routes of the main table to exactly one of ``dsts`` that are not ours."""
        out = {}
        for r in self._json("ip", "-4", "route", "show", "table", "main"):
            if r.get("protocol") == str(self.proto) or str(r.get("protocol")) == str(self.proto):
                continue
            try:
                dst = ipaddress.IPv4Network(_dst(r))
            except ValueError:
                continue
            if dst in dsts:
                out[dst] = f"dev {r.get('dev', '?')} proto {r.get('protocol', '?')}"
        return out

    def cleanup(self) -> int:
        """Remove every route and the device of ours (its neighbours and FDB
        entries go with it). Idempotent; returns how many routes and devices
        went."""
        before = self.observe()
        self.apply(Desired("native"))  # no routes, no device
        after = self.observe()
        return (len(before.routes) - len(after.routes)
                + int(before.device is not None and after.device is None))

    def view(self) -> dict[str, Any]:
        d = self.applied
        return {"mode": d.mode if d else "", "device": self.device if d and d.device_local else "",
                "routes": sorted(f"{r.dst} via {r.gateway}{' dev ' + r.device if r.device else ''}"
                                 for r in (d.routes if d else ())),
                "problems": dict(sorted(self.problems.items()))}


def _dst(route: Mapping[str, Any]) -> str:
    dst = str(route.get("dst") or "")
    return "0.0.0.0/0" if dst == "default" else dst


# -- the agent's side (Kubernetes mode) ------------------------------------------------------

class RoutingService:
    """Node events in, this node's routes out (in a worker thread, one at a time)."""

    def __init__(self, mode: str, node: str, kernel: NodeRouting | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown routing mode {mode!r} (one of {', '.join(MODES)})")
        self.mode = mode
        self.node = node
        self.kernel = kernel if kernel is not None else NodeRouting()
        self.nodes: dict[str, NodeInfo] = {}
        self._lock = threading.Lock()
        self.remote_pods: Any = None  # _remotepods.RemotePods: its count joins the view
        # the agent's: names this node's devices to the datapath after each apply
        self.devices_hook: Callable[[list[str]], None] | None = None
        self.devices_sent: list[str] = []

    async def on_node_events(self, events: Sequence[tuple[str, Mapping[str, Any]]],
                             initial: bool) -> None:
        changed = False
        for kind, obj in events:
            info = node_info(obj)
            if kind == "DELETED":
                changed |= self.nodes.pop(info.name, None) is not None
            elif self.nodes.get(info.name) != info:
                self.nodes[info.name] = info
                changed = True
        if changed or initial:
            await asyncio.to_thread(self.reconcile)

    def desired(self) -> Desired:
        local = self.nodes.get(self.node)
        return desired_state(self.mode, local, self.nodes.values())

    def reconcile(self) -> dict[str, str]:
        """Apply what the nodes say. A kernel failure is reported per node (the
        status faults) and logged, never raised: the Node informer goes on, and
        the next Node event tries again."""
        with self._lock:
            want = self.desired()
            try:
                problems = self.kernel.apply(want)
            except (RoutingError, OSError, ValueError) as e:
                LOG.error("routing (%s) failed: %s", self.mode, e)
                problems = {**{n: f"routing failed: {e}" for n in want.owners.values()},
                            **want.problems}
                self.kernel.problems = problems
            self._name_devices(want)
        for name, why in sorted(problems.items()):
            LOG.warning("routing (%s): node %s is not routed: %s", self.mode, name, why)
        LOG.info("routing (%s): %d remote pod CIDRs routed", self.mode,
                 len(want.routes) - len(set(problems) & set(want.owners.values())))
        return problems

    def node_devices(self, want: Desired) -> list[str]:
        """This node's devices: the one holding its address (other nodes' pods
        in native routing, peers outside the cluster) and, in tunnel mode, the
        VXLAN device."""
        out = []
        local = self.nodes.get(self.node)
        if local is not None and local.ip is not None:
            dev = self.kernel.device_of(local.ip)
            if dev:
                out.append(dev)
        if want.device_local is not None and self.kernel.observe().device is not None:
            out.append(self.kernel.device)
        return out

    def _name_devices(self, want: Desired) -> None:
        """Tell the datapath (``devices_hook``); a failure is logged, never
        raised (the next Node event tries again)."""
        if self.devices_hook is None:
            return
        try:
            devices = self.node_devices(want)
            self.devices_hook(devices)
            self.devices_sent = devices
        except Exception as e:  # a datapath error must not stop the Node informer
            LOG.error("routing (%s): naming the node's devices to the datapath failed: %s",
                      self.mode, e)

    def cleanup(self) -> None:
        with self._lock:
            self.kernel.cleanup()

    def view(self) -> dict[str, Any]:
        """``status`` components.routing: mode, device, routes, problems, nodes
        (and remote_pods: other nodes' pods in the ipcache)."""
        out = {**self.kernel.view(), "mode": self.mode, "nodes": len(self.nodes),
               "node_devices": list(self.devices_sent)}
        if self.remote_pods is not None:
            out.update(self.remote_pods.view())
        return out

    def faults(self) -> list[str]:
        return [f"routing: node {name} not routed: {why}"
                for name, why in sorted(self.kernel.problems.items())]
