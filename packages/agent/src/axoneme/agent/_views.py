"""Views: what the API shows (status, endpoints, identities) and the pod
details flows are enriched with. Read-only over the other services."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from axoneme.agent._config import AgentConfig
from axoneme.agent._endpoints import EndpointService
from axoneme.agent._errors import NotFound
from axoneme.agent._flowstore import FlowStore
from axoneme.agent._l7proxies import L7Proxies
from axoneme.agent._policies import PolicyService
from axoneme.agent._records import EndpointRecord
from axoneme.agent._regenerator import Regenerator
from axoneme.agent._state import StateStore
from axoneme.core.flow import Flow, FlowEndpoint
from axoneme.core.identity import IdentityAllocator
from axoneme.core.labels import Labels
from axoneme.core.mapstate import Key, MapState
from axoneme.core.policy.engine import PolicyEngine


def _key_order(key: Key) -> tuple[Any, ...]:
    # Key's own order (its fields, in order), compared as one C tuple
    return (key.identity, key.direction, key.protocol, key.port, key.prefix_len, key.address)


def mapstate_view(ms: MapState) -> list[dict[str, Any]]:
    """The entries in Key order (``endpoint get``): O(entries); what is the same
    for many entries (an entry shared by N peers, the L4 part of a key) is
    formatted once."""
    return list(mapstate_entries(ms))


def mapstate_entries(ms: MapState) -> Iterator[dict[str, Any]]:
    """``mapstate_view``'s entries, each formatted when read."""
    entries: dict[int, tuple[str, list[str]]] = {}  # id(entry) -> (str, derived_from)
    l4s: dict[tuple[Any, ...], tuple[str, str, tuple[str, str]]] = {}  # -> key str parts
    for key in sorted(ms, key=_key_order):
        entry = ms[key]
        shown = entries.get(id(entry))
        if shown is None:
            shown = entries[id(entry)] = (str(entry), sorted(entry.derived_from))
        if key.address or key.identity == 0:
            text, dname, proto = str(key), key.direction.name, str(key.protocol)
        else:
            l4 = (key.direction, key.protocol, key.port, key.prefix_len)
            parts = l4s.get(l4)
            if parts is None:
                # str(Key) with identity 1, split around it: "<dir> id=<identity> <l4>"
                head, _, tail = str(Key(1, *l4)).partition(" id=1 ")
                parts = l4s[l4] = (f"{head} id=", f" {tail}", (key.direction.name,
                                                               str(key.protocol)))
            text = f"{parts[0]}{key.identity}{parts[1]}"
            dname, proto = parts[2]
        yield {"key": text, "identity": key.identity, "direction": dname,
               "protocol": proto, "port": key.port, "prefix_len": key.prefix_len,
               "address": key.address,  # an address key's peer address, else ""
               "entry": shown[0], "deny": entry.deny, "proxy_port": entry.proxy_port,
               "derived_from": list(shown[1])}


_ENCODER = json.JSONEncoder(default=str)  # the API's json.dumps(..., default=str)


def json_chunks(view: dict[str, Any], lists: dict[str, Iterable[Any] | None],
                size: int = 1 << 18) -> list[bytes]:
    """``json.dumps(view | lists, default=str)``, the same text, as UTF-8 chunks
    of about ``size`` bytes; the lists are read and serialized a batch at a time
    (a 100k-peer endpoint: no list of 400k entry dicts and no 100 MB string
    at once, whose freed memory the process kept: issue 17, RSS). ``view``
    holds the lists' keys (any value) where they go."""
    text = _ENCODER.encode({**view, **{name: f"\0{name}\0" for name in lists}})
    out: list[bytes] = []
    buf: list[str] = []
    held = 0

    def put(part: str) -> None:
        nonlocal held
        buf.append(part)
        held += len(part)
        if held >= size:
            out.append("".join(buf).encode())
            buf.clear()
            held = 0

    for name, items in lists.items():
        head, text = text.split(_ENCODER.encode(f"\0{name}\0"), 1)
        put(head)
        if items is None:
            put("null")
            continue
        put("[")
        it = iter(items)
        sep = ""
        while batch := list(itertools.islice(it, 512)):
            put(sep + _ENCODER.encode(batch)[1:-1])  # "[a, b]" -> "a, b"
            sep = ", "
        put("]")
    put(text)
    if buf:
        out.append("".join(buf).encode())
    return out


class FlowEnricher:
    """Fills in pod names, namespaces and labels a datapath event lacks.

    Flows of one endpoint or identity share its side (``FlowEndpoint``) and
    label texts: the ring (``DEFAULT_FLOW_BUFFER``, 4,095 flows) kept a copy
    of each side's label strings per flow, ~1.3 KB of a flow's ~2.5 KB
    (issue 17, B5HIST). Bounded: emptied past ``MAX_SHARED`` entries."""

    MAX_SHARED = 4096

    def __init__(self, store: StateStore, engine: PolicyEngine,
                 allocator: IdentityAllocator) -> None:
        self.store = store
        self.engine = engine
        self.allocator = allocator
        self._sides: dict[tuple[Any, ...], FlowEndpoint] = {}
        self._texts: dict[Labels, tuple[str, ...]] = {}

    def _shared(self, key: tuple[Any, ...], make: Callable[[], FlowEndpoint]) -> FlowEndpoint:
        side = self._sides.get(key)
        if side is None:
            if len(self._sides) >= self.MAX_SHARED:
                self._sides.clear()
            side = self._sides[key] = make()
        return side

    def _label_texts(self, labels: Labels) -> tuple[str, ...]:
        texts = self._texts.get(labels)
        if texts is None:
            if len(self._texts) >= self.MAX_SHARED:
                self._texts.clear()
            texts = self._texts[labels] = tuple(labels.sorted_strings())
        return texts

    def __call__(self, flow: Flow) -> Flow:
        src = self._side(flow.source, flow.ip_source)
        dst = self._side(flow.destination, flow.ip_destination)
        if src is flow.source and dst is flow.destination:
            return flow
        return dataclasses.replace(flow, source=src, destination=dst)

    def _side(self, side: FlowEndpoint, ip: str) -> FlowEndpoint:
        if side.pod_name:
            return side
        rec = self.store.endpoint_by_ip(ip) if ip else None
        if rec is not None:
            ep = self.store.endpoint_objs.get(rec.id)
            labels = self._label_texts(ep.labels) if ep else side.labels
            identity = side.identity or rec.identity
            return self._shared(
                (rec.id, identity, rec.namespace, rec.pod_name, labels),
                lambda: FlowEndpoint(identity=identity, namespace=rec.namespace,
                                     pod_name=rec.pod_name, labels=labels, id=rec.id))
        if not side.identity and ip:
            try:
                ident = self.engine.identity_of_ip(ip)
            except Exception:
                return side
            obj = self.allocator.get(ident)
            texts = self._label_texts(obj.labels) if obj else ()
            return self._shared((ident, texts),
                                lambda: FlowEndpoint(identity=ident, labels=texts))
        if side.identity and not side.labels:
            obj = self.allocator.get(side.identity)
            if obj is not None:
                return dataclasses.replace(side, labels=self._label_texts(obj.labels))
        return side


class Views:
    """Status, endpoint and identity lists. ``guard_installed`` and
    ``started`` are set by the agent."""

    def __init__(self, config: AgentConfig, store: StateStore, engine: PolicyEngine,
                 allocator: IdentityAllocator, regen: Regenerator, proxies: L7Proxies,
                 policies: PolicyService, endpoints: EndpointService, flows: FlowStore) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        self.allocator = allocator
        self.regen = regen
        self.proxies = proxies
        self.policies = policies
        self.endpoints = endpoints
        self.flows = flows
        self.guard_installed = False
        self.started = 0.0
        self.k8s: Any = None  # Kubernetes mode: the KubernetesSource (view(), faults())
        self.routing: Any = None  # Kubernetes mode: _routing.RoutingService (view(), faults())
        self.hostfw: Any = None  # the host firewall (_hostfw.HostFirewall), when on

    # -- endpoints, identities ------------------------------------------------------------
    def endpoint_view(self, rec: EndpointRecord) -> dict[str, Any]:
        ep = self.store.endpoint_objs.get(rec.id)
        ing = egr = False
        if ep is not None:
            try:
                ing, egr = self.engine.enforcement(rec.id)
            except Exception:
                pass
        labels = ep.labels.sorted_strings() if ep else self.endpoints.identity_labels(
            rec.namespace, rec.pod_name).sorted_strings()
        return {"id": rec.id, "identity": rec.identity, "labels": labels, "ipv4": rec.ipv4,
                "policy_enforcement": {"ingress": bool(ing), "egress": bool(egr)},
                # audit mode (agent-wide or `endpoint config`): would-be drops forwarded
                "policy_audit_mode": bool(ep is not None and self.engine.audit_mode(rec.id)),
                "status": rec.status, "pod": f"{rec.namespace}/{rec.pod_name}",
                "container_id": rec.container_id, "host_ifname": rec.host_ifname,
                "host_ifindex": rec.host_ifindex, "netns": rec.netns_path,
                "network": rec.network, "ready_ms": rec.ready_ms,
                "named_ports": [{"name": p.name, "port": p.port, "protocol": p.protocol}
                                for p in (ep.named_ports if ep else ())]}

    def endpoint_list(self) -> list[dict[str, Any]]:
        return [self.endpoint_view(r)
                for r in sorted(self.store.endpoints.values(), key=lambda r: r.id)]

    def endpoint_get(self, ep_id: int) -> dict[str, Any]:
        """One endpoint with its resolved policy and the datapath's copy (worker thread)."""
        view, lists = self._endpoint_get(ep_id)
        view.update({k: None if v is None else list(v) for k, v in lists.items()})
        return view

    def endpoint_get_json(self, ep_id: int) -> list[bytes]:
        """``endpoint_get`` as the API's JSON, in chunks (``json_chunks``; worker thread)."""
        return json_chunks(*self._endpoint_get(ep_id))

    def _endpoint_get(self, ep_id: int) -> tuple[dict[str, Any], dict[str, Iterable[Any] | None]]:
        """The view, its two entry lists as iterables (formatted when read)."""
        rec = self.store.endpoint_record(ep_id)
        if rec is None:
            raise NotFound(f"endpoint {ep_id} not found")
        view = self.endpoint_view(rec)
        lists: dict[str, Iterable[Any] | None] = {}
        ep = self.store.endpoint_objs.get(ep_id)
        if ep is not None:
            resolved = self.engine.resolve(ep_id)
            try:
                dumped: MapState | None = self.regen.dump(ep)
                dump_error = ""
            except Exception as e:
                dumped, dump_error = None, str(e)
            lists["policy"] = mapstate_entries(resolved)
            lists["datapath"] = mapstate_entries(dumped) if dumped is not None else None
            view.update(lists)  # their places (key order)
            view["datapath_error"] = dump_error
            view["in_sync"] = dumped is not None and dumped == resolved
        return view, lists

    def identity_list(self) -> list[dict[str, Any]]:
        used: dict[int, int] = {}
        for rec in self.store.endpoints.values():
            used[rec.identity] = used.get(rec.identity, 0) + 1
        return [{"id": i.id, "labels": i.label_strings(), "reserved": i.reserved,
                 "endpoints": used.get(i.id, 0)} for i in self.allocator.all()]

    # -- status ------------------------------------------------------------------------------
    def _datapath_view(self) -> dict[str, Any]:
        dp = self.regen.datapath
        if dp is None:
            return {"name": self.config.datapath, "mode": "", "healthy": False,
                    "detail": "not started", "capabilities": []}
        caps = sorted(dp.capabilities)
        try:
            st = dp.status()
            return {"name": st.name, "mode": st.mode, "healthy": st.healthy, "detail": st.detail,
                    "capabilities": caps}
        except Exception as e:
            return {"name": self.config.datapath, "mode": "", "healthy": False, "detail": str(e),
                    "capabilities": caps}

    def faults(self, dpv: dict[str, Any], proxy_fault: str | None) -> list[str]:
        """What is wrong now, one line each (``status`` shows them first)."""
        out = []
        if not dpv.get("healthy"):
            out.append(f"datapath {dpv.get('name')}: {dpv.get('detail') or 'unhealthy'}")
        out += self.regen.faults()
        if self.store.error:
            out.append(f"state: {self.store.error}")
        if proxy_fault:
            out.append(f"l7 proxy: {proxy_fault}")
        out += self.policies.faults()
        if self.k8s is not None:
            out += self.k8s.faults()
        if self.routing is not None:
            out += self.routing.faults()
        return out

    def status(self) -> dict[str, Any]:
        dpv = self._datapath_view()
        proxy = self.proxies.view()
        store = self.store
        return {
            "datapath": dpv,
            "endpoints": len(store.endpoints),
            "identities": len(self.allocator.snapshot()),
            "policy_revision": self.policies.revision,
            "faults": self.faults(dpv, proxy["fault"] or None),
            "components": {
                "api": {"socket": self.config.api_socket, "healthy": True},
                "state": {"dir": self.config.state_dir, "healthy": not store.error,
                          "last_error": store.error},
                "l7_proxy": proxy,
                "guard": {"installed": self.guard_installed, "pod_cidr": self.config.pod_cidr},
                "ipam": self.endpoints.ipam_view(),
                "flows": {"stored": len(self.flows), "capacity": self.flows.capacity,
                          "seen": self.flows.seen},
                "policies": self.policies.view(),
                "pods": len(store.pods),
                "ipcache": self.regen.ipcache_view(),
                "fail_closed": self.regen.fail_closed_view(),
                "l7_proxies": self.proxies.listeners(),
                "uptime_seconds": round(time.time() - self.started, 1) if self.started else 0,
                **({"kubernetes": self.k8s.view()} if self.k8s is not None else {}),
                **({"routing": self.routing.view()} if self.routing is not None else {}),
                **({"host_firewall": self.hostfw.view()} if self.hostfw is not None else {}),
            },
        }
