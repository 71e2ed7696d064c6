"""ClusterIP services for pods, without kube-proxy (Kubernetes mode).

Cilium replaces kube-proxy by translating a Service's ClusterIP to one of its
backends where the pod's traffic starts (socket-LB at connect(), or
bpf_lxc on the pod's device), so that every policy decision downstream sees
the backend pod, not the virtual address. axoneme does the same at the same
place: each local pod's network namespace gets one nftables table,
``ip axoneme_svc``, whose ``translate`` chain (NAT, output hook) rewrites ClusterIP:port to a
backend chosen at random (conntrack in the pod's namespace undoes it on the
replies), and whose ``refuse`` chain refuses a service with no ready
endpoint (ICMP port unreachable, TCP RST; kube-proxy's answer). Egress and
ingress policy, on every datapath, then judge backend pods by identity.

The table is rendered from Services and EndpointSlices (``ServiceTable``)
and written whole, in one nft transaction, into every local pod's namespace
when it changes and into a new pod's before its CNI ADD returns. The host
itself gets no translation: a hostNetwork client reaches services by their
endpoints (the agent reaches the API server on the node address).

The same Services and EndpointSlices resolve CiliumNetworkPolicy
``toServices`` (``ServicePolicies``, with or without the translation): a
``ServiceCatalog`` of core follows the watch events and hands each changed
Service to ``PolicyEngine.update_services``, which translates the policies
selecting it again (semantics in ``axoneme.core.policy.services``); the
datapath follows in the same regeneration as any policy change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from typing import Any

from axoneme.core.policy.engine import PolicyEngine
from axoneme.core.policy.services import ServiceCatalog

LOG = logging.getLogger(__name__)

TABLE = "axoneme_svc"
PROTOCOLS = {"TCP": "tcp", "UDP": "udp", "SCTP": "sctp"}
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

Obj = Mapping[str, Any]
Frontend = tuple[str, str, int]  # ClusterIP, protocol (tcp|udp|sctp), port
Backend = tuple[str, int]  # pod IP, target port


@dataclass(frozen=True)
class ServicePort:
    name: str
    protocol: str
    port: int


def _v4(value: object) -> str | None:
    try:
        addr = ip_address(str(value))
    except ValueError:
        return None
    return str(addr) if isinstance(addr, IPv4Address) else None


def service_ports(svc: Obj) -> tuple[list[str], list[ServicePort]]:
    """A Service's IPv4 ClusterIPs and ports; none for headless or ExternalName."""
    spec = svc.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return [], []
    ips = [ip for ip in (_v4(x) for x in (spec.get("clusterIPs") or [spec.get("clusterIP")]))
           if ip is not None]
    ports = []
    for p in spec.get("ports") or []:
        proto = PROTOCOLS.get(str(p.get("protocol") or "TCP"))
        if proto and isinstance(p.get("port"), int):
            ports.append(ServicePort(str(p.get("name") or ""), proto, int(p["port"])))
    return ips, ports


def slice_backends(eps: Obj) -> dict[tuple[str, str], list[Backend]]:
    """An EndpointSlice: (port name, protocol) -> ready IPv4 backends."""
    if eps.get("addressType") not in (None, "IPv4"):
        return {}
    ready = []
    for ep in eps.get("endpoints") or []:
        cond = ep.get("conditions") or {}
        # ready endpoints only (unset means ready); kube-proxy's fallback to
        # serving-but-terminating endpoints is not done
        if cond.get("ready") is False:
            continue
        ready += [ip for ip in (_v4(a) for a in ep.get("addresses") or []) if ip]
    out: dict[tuple[str, str], list[Backend]] = {}
    for p in eps.get("ports") or []:
        proto = PROTOCOLS.get(str(p.get("protocol") or "TCP"))
        if proto and isinstance(p.get("port"), int):
            out[(str(p.get("name") or ""), proto)] = [(ip, int(p["port"])) for ip in ready]
    return out


def _key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace') or ''}/{meta.get('name') or ''}"


class ServiceTable:
    """Services and EndpointSlices -> frontend -> backends."""

    def __init__(self) -> None:
        self.services: dict[str, tuple[list[str], list[ServicePort]]] = {}
        # EndpointSlice key -> (service key, its backends by port)
        self.slices: dict[str, tuple[str, dict[tuple[str, str], list[Backend]]]] = {}

    def apply(self, kind: str, events: Iterable[tuple[str, Obj]]) -> None:
        for etype, obj in events:
            key = _key(obj)
            if kind == "services":
                if etype == "DELETED":
                    self.services.pop(key, None)
                else:
                    self.services[key] = service_ports(obj)
                continue
            if etype == "DELETED":
                self.slices.pop(key, None)
                continue
            meta = obj.get("metadata") or {}
            svc = str((meta.get("labels") or {}).get(SERVICE_NAME_LABEL) or "")
            if svc:
                self.slices[key] = (f"{meta.get('namespace') or ''}/{svc}", slice_backends(obj))
            else:
                self.slices.pop(key, None)

    def frontends(self) -> dict[Frontend, tuple[Backend, ...]]:
        by_service: dict[str, dict[tuple[str, str], set[Backend]]] = {}
        for svc, ports in self.slices.values():
            into = by_service.setdefault(svc, {})
            for port_key, backends in ports.items():
                into.setdefault(port_key, set()).update(backends)
        out: dict[Frontend, tuple[Backend, ...]] = {}
        for svc, (ips, ports) in self.services.items():
            found = by_service.get(svc, {})
            for p in ports:
                backends = tuple(sorted(found.get((p.name, p.protocol), ()),
                                        key=lambda b: (IPv4Address(b[0]), b[1])))
                for ip in ips:
                    out[(ip, p.protocol, p.port)] = backends
        return out


def render(frontends: Mapping[Frontend, tuple[Backend, ...]]) -> str:
    """The nft script that replaces the table in one transaction."""
    nat, reject = [], []
    for (vip, proto, port), backends in sorted(frontends.items()):
        match = f"ip daddr {vip} {proto} dport {port}"
        if not backends:
            how = "reject with tcp reset" if proto == "tcp" else "reject"
            reject.append(f"    {match} {how}")
        elif len(backends) == 1:
            nat.append(f"    {match} dnat to {backends[0][0]}:{backends[0][1]}")
        else:
            elems = ", ".join(f"{i} : {ip} . {p}" for i, (ip, p) in enumerate(backends))
            nat.append(f"    {match} dnat to numgen random mod {len(backends)} map {{ {elems} }}")
    return "\n".join([
        f"table ip {TABLE}", f"delete table ip {TABLE}", f"table ip {TABLE} {{",
        "  chain translate {", "    type nat hook output priority -100; policy accept;", *nat, "  }",
        "  chain refuse {", "    type filter hook output priority 0; policy accept;", *reject,
        "  }", "}", ""])


async def write_table(netns_path: str, script: str) -> None:
    """Replace the table inside one network namespace (``nsenter``, ``nft -f -``)."""
    proc = await asyncio.create_subprocess_exec(
        "nsenter", f"--net={netns_path}", "nft", "-f", "-", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate(script.encode())
    if proc.returncode != 0:
        raise RuntimeError(f"nft in {netns_path}: {err.decode(errors='replace').strip()}")


class ServiceTranslator:
    """Keeps every local pod's ``axoneme_svc`` table equal to the ServiceTable."""

    def __init__(self, netns_paths: Any) -> None:
        self.table = ServiceTable()
        self._netns_paths = netns_paths  # () -> {endpoint key: netns path}
        self._script = render({})
        self._written: dict[str, str] = {}  # netns path -> script written there
        self._lock = asyncio.Lock()
        self.synced = False
        self.errors = 0
        self.last_error = ""

    async def on_events(self, kind: str, events: Iterable[tuple[str, Obj]]) -> None:
        self.table.apply(kind, events)
        if self.synced:
            await self.sync()

    async def sync(self) -> None:
        """Render; write where the namespace's table differs (all pods' namespaces)."""
        async with self._lock:
            self._script = render(self.table.frontends())
            paths = set(self._netns_paths().values())
            for gone in set(self._written) - paths:
                del self._written[gone]
            for path in sorted(paths):
                await self._write(path)

    async def endpoint_ready(self, netns_path: str) -> None:
        """A new pod: its table before its CNI ADD returns."""
        async with self._lock:
            self._written.pop(netns_path, None)
            await self._write(netns_path)

    async def _write(self, path: str) -> None:
        if self._written.get(path) == self._script:
            return
        try:
            await write_table(path, self._script)
            self._written[path] = self._script
        except (OSError, RuntimeError) as e:
            self.errors += 1
            self.last_error = str(e)
            LOG.error("service translation: %s", e)

    def view(self) -> dict[str, Any]:
        fronts = self.table.frontends()
        return {"services": len(self.table.services), "frontends": len(fronts),
                "without_endpoints": sum(1 for b in fronts.values() if not b),
                "namespaces": len(self._written), "errors": self.errors,
                "last_error": self.last_error}


# informer name -> the kind ServiceCatalog.apply takes
_KINDS = {"services": "Service", "endpointslices": "EndpointSlice"}


class ServicePolicies:
    """toServices in Kubernetes mode: watch events -> ``engine.update_services``.

    ``policies`` is the ``PolicyService`` (its engine, and its regenerator:
    the only writer to the datapath); ``store`` the state store, whose lock
    a Service change holds as a policy change does."""

    def __init__(self, policies: Any, store: Any) -> None:
        self.catalog = ServiceCatalog()
        self.policies = policies
        self.store = store
        self.translations = 0  # policies translated again after a Service change

    async def on_events(self, informer: str, events: Iterable[tuple[str, Obj]]) -> None:
        kind = _KINDS[informer]
        changed: set[tuple[str, str]] = set()
        for etype, obj in events:
            changed |= self.catalog.apply(kind, etype, obj)
        if not changed:
            return
        async with self.store.lock:
            engine: PolicyEngine = self.policies.engine
            refs = engine.update_services({k: self.catalog.get(k) for k in changed})
            if refs:
                LOG.info("toServices: %d Services changed, %d policies translated again: %s",
                         len(changed), len(refs), ", ".join(str(r) for r in refs))
                self.translations += len(refs)
                await self.policies.regen.regenerate()

    def view(self) -> dict[str, Any]:
        return {"services": len(self.catalog.services()), "translations": self.translations}
