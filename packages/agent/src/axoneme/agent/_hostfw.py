"""The host firewall (Cilium's ``--enable-host-firewall``): the node's own
network namespace as an endpoint that host policies (CCNP ``nodeSelector``)
select by the node's labels.

- Off unless asked (``host_firewall: true`` / ``--enable-host-firewall``), and
  never in the machine's initial network namespace nor in any namespace with a
  default route (``check_netns``): a host
  policy there would police the real machine's own traffic (its uplink, its
  SSH, its resolver). The agent exits 2 instead. Nodes that are network
  namespaces of ours (``scripts/cluster up --nodes N``, the kernel tests) are
  where it runs.
- The node's labels: in Kubernetes mode this node's Node object's labels
  (followed: a label change selects or unselects host policies at once); in
  standalone mode the ``node_labels`` config key / ``--node-labels k=v,...``.
  Each is an identity-style label ``k8s:<key>=<value>``, beside
  ``reserved:host`` (so ``nodeSelector: {matchLabels: {k: v}}`` matches, with
  or without the ``k8s:`` source, as Cilium).
- The devices: the datapath enforces the host endpoint's policy where the
  node's traffic enters and leaves (eBPF: tc programs on these devices;
  iptables: the INPUT and OUTPUT chains). ``devices`` (config key /
  ``--devices``, Cilium's name) lists them; by default every interface of the
  netns that is up and is not loopback, a pod's veth (``lxc*``) or our VXLAN
  device.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from axoneme.agent._k8sinformer import Event
from axoneme.core.endpoint import HOST_ENDPOINT_ID, Endpoint, host_endpoint
from axoneme.core.errors import ConfigError
from axoneme.core.labels import valid_label_key, valid_label_value

LOG = logging.getLogger(__name__)

#: interfaces never treated as the node's external devices
_NOT_DEVICES = ("lo", "axon_vxlan")
_POD_VETH_PREFIX = "lxc"


def _netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def has_default_route() -> bool:
    """Whether this network namespace has a default route (IPv4 or IPv6)."""
    for family in ("-4", "-6"):
        out = subprocess.run(["ip", family, "route", "show", "default"], capture_output=True,
                             text=True, check=False)
        if out.returncode != 0 or out.stdout.strip():
            return True  # unknown counts as yes
    return False


# the kernel's fixed inode of the initial PID namespace (PROC_PID_INIT_INO, 0xEFFFFFFC)
INIT_PID_NS_INODE = 0xEFFFFFFC


def nested_pid_namespace(pid_ns: str = "/proc/self/ns/pid") -> bool:
    """Whether this process runs in a PID namespace of its own (a container): its PID
    namespace is not the initial one, whose inode the kernel fixes. (``NSpid`` in
    /proc/self/status is no sign: a container mounts its own /proc, where it lists
    one pid.) Unreadable counts as not nested, so PID 1's netns is then compared."""
    try:
        link = os.readlink(pid_ns)
    except OSError:
        return False
    match = re.fullmatch(r"pid:\[(\d+)\]", link)
    return match is not None and int(match.group(1)) != INIT_PID_NS_INODE


def in_initial_netns(self_ns: str = "/proc/self/ns/net", init_ns: str = "/proc/1/ns/net",
                     pid_ns: str = "/proc/self/ns/pid") -> bool:
    """Whether this process may run in the machine's own network namespace:
    PID 1's (when readable, and PID 1 is the machine's: in a container, PID 1 is
    the container's own init, which shares a hostNetwork pod's namespace), or any
    namespace holding a default route (the way to the real uplink; nodes of ours
    have none)."""
    if not nested_pid_namespace(pid_ns):
        mine, init = _netns_inode(self_ns), _netns_inode(init_ns)
        if mine is not None and mine == init:
            return True
    return has_default_route()


def check_netns(enabled: bool, initial: bool | None = None) -> None:
    """ConfigError (exit 2) when the host firewall is asked for in the machine's
    initial network namespace: it is only for nodes that are namespaces of ours."""
    if not enabled:
        return
    if in_initial_netns() if initial is None else initial:
        raise ConfigError(
            "host_firewall (--enable-host-firewall) refused: this agent runs in the machine's "
            "initial network namespace (or one with a default route), whose own traffic a "
            "host policy must never police; run the agent in a node's network namespace "
            "without a default route (scripts/cluster up --nodes N, ip netns exec NODE ...)")


def host_firewall_here(cfg: Any, path: str | None = None) -> None:
    """Whether this agent turns the host firewall on: ``host_firewall``, and in
    Kubernetes mode this node among ``host_firewall_nodes`` (when set; else it
    is turned off here, logged); then ``check_netns`` (ConfigError, exit 2)."""
    nodes = cfg.host_firewall_nodes
    if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
        raise ConfigError(f"config key host_firewall_nodes: expected a list of node names"
                          f"{f' ({path})' if path else ''}")
    if cfg.host_firewall and nodes and cfg.k8s_mode:
        from axoneme.agent._k8sclient import node_name

        me = node_name(cfg)
        if me not in nodes:
            LOG.warning("host firewall off on node %s: not in host_firewall_nodes (%s)", me,
                        ", ".join(nodes))
            cfg.host_firewall = False
    check_netns(cfg.host_firewall)


def parse_node_labels(value: Any, where: str = "--node-labels") -> dict[str, str]:
    """``k=v,k2=v2`` (flag) or a mapping (config key) -> {key: value};
    ConfigError naming ``where`` for anything else."""
    if value is None:
        return {}
    items: list[tuple[str, str]] = []
    if isinstance(value, str):
        for part in (p.strip() for p in value.split(",")):
            if not part:
                continue
            key, sep, val = part.partition("=")
            if not sep:
                raise ConfigError(f"{where}: expected KEY=VALUE, got {part!r}")
            items.append((key.strip(), val.strip()))
    elif isinstance(value, Mapping):
        items = [(str(k), "" if v is None else str(v)) for k, v in value.items()]
    else:
        raise ConfigError(f"{where}: expected a mapping of label keys to values or "
                          f"KEY=VALUE,..., got {type(value).__name__}")
    out: dict[str, str] = {}
    for key, val in items:
        if not valid_label_key(key):
            raise ConfigError(f"{where}: invalid label key {key!r}")
        if not valid_label_value(val):
            raise ConfigError(f"{where}: invalid value {val!r} of label {key!r}")
        out[key] = val
    return out


def parse_devices(value: Any, where: str = "--devices") -> list[str]:
    if value is None:
        return []
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: expected interface names (a list, or NAME,NAME)")
    out = [n.strip() for n in names if n.strip()]
    for n in out:
        if len(n) > 15 or "/" in n or " " in n:
            raise ConfigError(f"{where}: invalid interface name {n!r}")
    return out


def external_devices() -> list[str]:
    """The netns's interfaces that are up and are neither loopback, a pod's
    veth nor our VXLAN device (the default ``devices``)."""
    out = subprocess.run(["ip", "-o", "link", "show", "up"], capture_output=True, text=True,
                         check=False).stdout
    found: list[str] = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 3:
            continue
        name = parts[1].strip().split("@", 1)[0]
        if name in _NOT_DEVICES or name.startswith(_POD_VETH_PREFIX):
            continue
        found.append(name)
    return sorted(found)


class HostFirewall:
    """Keeps the host endpoint in the engine and the datapath (agent wiring)."""

    def __init__(self, config: Any, engine: Any, regenerator: Any, store: Any,
                 node: str = "") -> None:
        self.config = config
        self.engine = engine
        self.regen = regenerator
        self.store = store
        self.node = node  # Kubernetes mode: this node's name
        self.labels: dict[str, str] = dict(config.node_labels or {})
        self.devices: list[str] = []
        self.started = False

    def endpoint(self) -> Endpoint:
        return host_endpoint(self.labels, self.devices)

    async def start(self) -> None:
        """Attach the host endpoint with its resolved policy (after the pods are adopted)."""
        import asyncio

        self.devices = list(self.config.devices or []) or await asyncio.to_thread(external_devices)
        if not self.devices:
            raise ConfigError("host firewall: no device to enforce on (no interface is up "
                              "besides loopback and pods; set devices / --devices)")
        async with self.store.lock:
            ep = self.endpoint()
            self.engine.set_host_endpoint(ep)
            await self.regen.host_endpoint_added(ep)
        self.started = True
        LOG.warning("host firewall on: devices %s, node labels %s", ", ".join(self.devices),
                    ", ".join(f"{k}={v}" for k, v in sorted(self.labels.items())) or "none")

    async def set_labels(self, labels: Mapping[str, str]) -> None:
        if dict(labels) == self.labels:
            return
        self.labels = dict(labels)
        if not self.started:
            return
        async with self.store.lock:
            ep = self.endpoint()
            self.engine.set_host_endpoint(ep)
            self.regen.host_endpoint = ep
            await self.regen.regenerate()
        LOG.info("node labels changed: %s",
                 ", ".join(f"{k}={v}" for k, v in sorted(self.labels.items())) or "none")

    async def on_nodes(self, events: Sequence[Event], initial: bool) -> None:
        """Kubernetes mode: this node's Node object's labels are the host's."""
        for kind, obj in events:
            meta = obj.get("metadata") or {}
            if meta.get("name") != self.node or kind == "DELETED":
                continue
            labels = meta.get("labels") or {}
            await self.set_labels({str(k): str(v) for k, v in labels.items()})

    def view(self) -> dict[str, Any]:
        """``status -o json`` components.host_firewall."""
        out: dict[str, Any] = {"enabled": self.started, "endpoint": HOST_ENDPOINT_ID,
                               "devices": self.devices,
                               "node_labels": dict(sorted(self.labels.items()))}
        if self.started:
            ingress, egress = self.engine.enforcement(HOST_ENDPOINT_ID)
            out["policy_enforcement"] = {"ingress": ingress, "egress": egress}
            out["policies"] = sorted({r.ref.name for r in
                                      self.engine.selecting_rules(HOST_ENDPOINT_ID)})
        return out


__all__ = ["HostFirewall", "check_netns", "external_devices", "host_firewall_here",
           "in_initial_netns", "parse_devices", "parse_node_labels"]
