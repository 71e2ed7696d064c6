"""Least-privilege policies from observed traffic (``axoneme policy recommend``).

From the connections that passed (``observed.observe``), one policy per
workload: the pods of one namespace that share a stable selector.

1. A workload's selector is its pod labels without the churning ones
   (``CHURNING``: pod-template-hash, controller-revision-hash, ...) and the
   identity bookkeeping ones (namespace, namespace labels, service account,
   cluster); then, if present, ``app.kubernetes.io/name`` (with
   ``app.kubernetes.io/instance``/``component`` when set), else ``app``,
   else ``k8s-app``, else ``name``, else every remaining label. A pod with
   no stable label gets no policy (it is listed in ``Recommendation.notes``):
   an empty selector would select its whole namespace.
2. Each passed connection adds an ingress rule to the destination's
   workload (peer = the source) and an egress rule to the source's (peer =
   the destination), on the observed protocol and port (ICMP: type).
3. A pod peer is its workload selector (another namespace: with a
   namespace selector on ``kubernetes.io/metadata.name``; CNP: the
   ``k8s:io.kubernetes.pod.namespace`` label); a peer with no stable label
   is its whole namespace. Any other peer is its address as a /32 (/128)
   ``ipBlock``/``toCIDR``, except, in a CNP, reserved identities
   (host, remote-node, kube-apiserver, ...) as entities and egress to an
   address the client resolved through DNS as ``toFQDNs`` ``matchName``
   (with a ``dns`` rule on the client's port-53 egress, so the agent's DNS
   proxy keeps learning the names).
4. Peers with the same ports share one rule. Both directions are enforced:
   a workload that was never seen sending gets ``egress: []`` (NP) or
   ``egress: [{}]`` (CNP).
5. ICMP cannot be said in a NetworkPolicy: those connections are listed in
   the notes (use ``kind="cnp"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from axoneme.core.cluster import NAMESPACE_NAME_LABEL
from axoneme.core.identity import RESERVED_NAMES
from axoneme.core.labels import (
    CLUSTER_LABEL,
    NAMESPACE_LABELS_PREFIX,
    POD_NAMESPACE_LABEL,
    SERVICE_ACCOUNT_LABEL,
)
from axoneme.core.mapstate import Protocol
from axoneme.core.policy.observed import Connection, Observed, PeerInfo

__all__ = ["CHURNING", "Recommendation", "recommend", "stable_selector"]

NP, CNP = "np", "cnp"

# Labels that change from one pod of a workload to the next (or with each rollout).
CHURNING = frozenset({
    "pod-template-hash", "controller-revision-hash", "pod-template-generation",
    "statefulset.kubernetes.io/pod-name", "apps.kubernetes.io/pod-index",
    "controller-uid", "batch.kubernetes.io/controller-uid",
    "batch.kubernetes.io/job-completion-index", "job-name", "batch.kubernetes.io/job-name",
})
_BOOKKEEPING = frozenset({POD_NAMESPACE_LABEL, SERVICE_ACCOUNT_LABEL, CLUSTER_LABEL})
_PREFERRED = ("app", "k8s-app", "name")
_APP_NAME = "app.kubernetes.io/name"
_APP_DETAIL = ("app.kubernetes.io/instance", "app.kubernetes.io/component")
_CNP_NAMESPACE_KEY = f"k8s:{POD_NAMESPACE_LABEL}"
_ICMP = (Protocol.ICMP, Protocol.ICMPV6)
_DNS_PORT = 53


def stable_selector(labels: Mapping[str, str]) -> dict[str, str]:
    """Rule 1: the labels that select a workload ({} when none is stable)."""
    stable = {k: v for k, v in labels.items()
              if k not in CHURNING and k not in _BOOKKEEPING and not k.startswith(NAMESPACE_LABELS_PREFIX)
              and not k.startswith("io.cilium.")}
    if _APP_NAME in stable:
        return {k: stable[k] for k in (_APP_NAME, *_APP_DETAIL) if k in stable}
    for key in _PREFERRED:
        if key in stable:
            return {key: stable[key]}
    return dict(sorted(stable.items()))


@dataclass(frozen=True, slots=True)
class _Peer:
    kind: str  # pod | cidr | entity | fqdn
    namespace: str = ""
    selector: tuple[tuple[str, str], ...] = ()
    value: str = ""  # cidr, entity name or DNS name

    @property
    def order(self) -> tuple[str, str, tuple[tuple[str, str], ...], str]:
        return (self.kind, self.namespace, self.selector, self.value)


@dataclass
class _Workload:
    namespace: str
    selector: dict[str, str]
    pods: set[str] = field(default_factory=set)
    # direction -> peer -> {(protocol, port)}
    rules: dict[str, dict[_Peer, set[tuple[Protocol, int]]]] = field(
        default_factory=lambda: {"ingress": {}, "egress": {}})
    flows: int = 0


@dataclass
class Recommendation:
    """The recommended policy documents and what could not be said in them."""

    documents: list[dict[str, Any]]
    notes: list[str]
    connections: int


def _labels_of(peer: PeerInfo, pod_labels: Mapping[str, Mapping[str, str]]) -> dict[str, str] | None:
    if peer.pod in pod_labels:
        return dict(pod_labels[peer.pod])
    own = peer.k8s_labels()
    return own or None


def _cidr(ip: str) -> str:
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


class _Builder:
    def __init__(self, kind: str, namespaces: set[str] | None, observed: Observed,
                 pod_labels: Mapping[str, Mapping[str, str]]) -> None:
        self.kind = kind
        self.namespaces = namespaces
        self.observed = observed
        self.pod_labels = pod_labels
        self.workloads: dict[tuple[str, tuple[tuple[str, str], ...]], _Workload] = {}
        self.notes: list[str] = []
        self._noted: set[str] = set()

    def note(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text)
            self.notes.append(text)

    def workload(self, peer: PeerInfo) -> _Workload | None:
        if not peer.pod or (self.namespaces is not None and peer.namespace not in self.namespaces):
            return None
        labels = _labels_of(peer, self.pod_labels)
        selector = stable_selector(labels or {})
        if not selector:
            self.note(f"{peer.pod}: no stable label to select it by: no policy recommended for it")
            return None
        key = (peer.namespace, tuple(sorted(selector.items())))
        w = self.workloads.get(key)
        if w is None:
            w = self.workloads[key] = _Workload(peer.namespace, selector)
        w.pods.add(peer.pod)
        return w

    def peer(self, peer: PeerInfo, client: str, egress: bool) -> list[_Peer]:
        if peer.pod:
            labels = _labels_of(peer, self.pod_labels)
            return [_Peer("pod", peer.namespace, tuple(sorted(stable_selector(labels or {}).items())))]
        if self.kind == CNP:
            name = RESERVED_NAMES.get(peer.identity)  # type: ignore[call-overload]
            if name is not None and not name.startswith("world"):
                return [_Peer("entity", value=name)]
            names = self.observed.names_for(client, peer.ip) if egress else set()
            if names:
                return [_Peer("fqdn", value=n) for n in sorted(names)]
        return [_Peer("cidr", value=_cidr(peer.ip))]

    def add(self, conn: Connection) -> None:
        if self.kind == NP and conn.protocol in _ICMP:
            self.note(f"{conn.source.name} -> {conn.destination.name} {conn.what()}: ICMP cannot be "
                      f"allowed by a NetworkPolicy (use --kind cnp)")
            return
        port = (conn.protocol, conn.port)
        src_w, dst_w = self.workload(conn.source), self.workload(conn.destination)
        if dst_w is not None:
            dst_w.flows += conn.count
            for p in self.peer(conn.source, conn.destination.pod, egress=False):
                dst_w.rules["ingress"].setdefault(p, set()).add(port)
        if src_w is not None:
            src_w.flows += conn.count
            for p in self.peer(conn.destination, conn.source.pod, egress=True):
                src_w.rules["egress"].setdefault(p, set()).add(port)


def recommend(observed: Observed, kind: str = NP, namespaces: Iterable[str] | None = None,
              pod_labels: Mapping[str, Mapping[str, str]] | None = None) -> Recommendation:
    """Rules 1-5 of the module doc; ``pod_labels``: ``ns/name`` -> labels (else the flows' labels)."""
    if kind not in (NP, CNP):
        raise ValueError(f"kind must be {NP} or {CNP}")
    b = _Builder(kind, set(namespaces) if namespaces is not None else None, observed, pod_labels or {})
    used = 0
    for conn in observed.connections:
        if conn.passed:
            used += 1
            b.add(conn)
    docs: list[dict[str, Any]] = []
    names: set[tuple[str, str]] = set()
    for key in sorted(b.workloads):
        w = b.workloads[key]
        name = _policy_name(w.selector, w.namespace, names)
        render = _np if kind == NP else _cnp
        docs.append(render(w, name, b.observed))
    return Recommendation(docs, b.notes, used)


def _policy_name(selector: Mapping[str, str], namespace: str, used: set[tuple[str, str]]) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", "-".join(selector.values()).lower()).strip("-")[:50] or "workload"
    name, n = f"recommend-{slug}", 1
    while (namespace, name) in used:
        n += 1
        name = f"recommend-{slug}-{n}"
    used.add((namespace, name))
    return name


def _metadata(w: _Workload, name: str) -> dict[str, Any]:
    return {"name": name, "namespace": w.namespace,
            "annotations": {"policy.axoneme.io/recommended-from":
                            f"{w.flows} flows of {', '.join(sorted(w.pods))}"}}


def _grouped(rules: Mapping[_Peer, set[tuple[Protocol, int]]]
             ) -> list[tuple[tuple[tuple[Protocol, int], ...], list[_Peer]]]:
    """Rule 4: peers with the same port set share a rule (L4 ports and ICMP types apart)."""
    groups: dict[tuple[tuple[Protocol, int], ...], list[_Peer]] = {}
    for peer in sorted(rules, key=lambda p: p.order):
        ports = rules[peer]
        for part in ({p for p in ports if p[0] not in _ICMP}, {p for p in ports if p[0] in _ICMP}):
            if part:
                groups.setdefault(tuple(sorted(part)), []).append(peer)
    return sorted(groups.items(), key=lambda kv: (kv[1][0].order, kv[0]))


def _np_peer(p: _Peer, own_namespace: str) -> dict[str, Any]:
    if p.kind != "pod":
        return {"ipBlock": {"cidr": p.value}}
    out: dict[str, Any] = {"podSelector": {"matchLabels": dict(p.selector)} if p.selector else {}}
    if p.namespace != own_namespace:
        out["namespaceSelector"] = {"matchLabels": {NAMESPACE_NAME_LABEL: p.namespace}}
    return out


def _np(w: _Workload, name: str, observed: Observed) -> dict[str, Any]:
    spec: dict[str, Any] = {"podSelector": {"matchLabels": dict(w.selector)},
                            "policyTypes": ["Ingress", "Egress"]}
    for direction, peer_field in (("ingress", "from"), ("egress", "to")):
        spec[direction] = [
            {peer_field: [_np_peer(p, w.namespace) for p in peers],
             "ports": [{"protocol": str(proto), "port": port} for proto, port in ports]}
            for ports, peers in _grouped(w.rules[direction])]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _metadata(w, name), "spec": spec}


_CNP_FIELDS = {("ingress", "pod"): "fromEndpoints", ("ingress", "cidr"): "fromCIDR",
               ("ingress", "entity"): "fromEntities", ("egress", "pod"): "toEndpoints",
               ("egress", "cidr"): "toCIDR", ("egress", "entity"): "toEntities",
               ("egress", "fqdn"): "toFQDNs"}


def _cnp_peer(p: _Peer, own_namespace: str) -> Any:
    if p.kind == "pod":
        labels = dict(p.selector)
        if p.namespace != own_namespace:
            labels[_CNP_NAMESPACE_KEY] = p.namespace
        return {"matchLabels": labels} if labels else {}
    if p.kind == "fqdn":
        return {"matchName": p.value}
    return p.value


def _cnp_ports(ports: tuple[tuple[Protocol, int], ...], dns_rule: bool) -> dict[str, Any]:
    if ports[0][0] in _ICMP:
        return {"icmps": [{"fields": [{"type": port, "family": "IPv6" if proto is Protocol.ICMPV6 else "IPv4"}
                                      for proto, port in ports]}]}
    dns = [p for p in ports if dns_rule and p[1] == _DNS_PORT and p[0] in (Protocol.UDP, Protocol.TCP)]
    rest = [p for p in ports if p not in dns]
    entries: list[dict[str, Any]] = []
    if dns:
        entries.append({"ports": [{"port": str(port), "protocol": str(proto)} for proto, port in dns],
                        "rules": {"dns": [{"matchPattern": "*"}]}})
    if rest:
        entries.append({"ports": [{"port": str(port), "protocol": str(proto)} for proto, port in rest]})
    return {"toPorts": entries}


def _cnp(w: _Workload, name: str, observed: Observed) -> dict[str, Any]:
    # the DNS proxy must keep seeing the answers of a workload that talks to FQDNs
    fqdn = any(p.kind == "fqdn" for p in w.rules["egress"])
    dns_rule = fqdn or bool(w.pods & observed.dns_proxied)
    spec: dict[str, Any] = {"endpointSelector": {"matchLabels": dict(w.selector)}}
    for direction in ("ingress", "egress"):
        rules: list[dict[str, Any]] = []
        for ports, peers in _grouped(w.rules[direction]):
            by_kind: dict[str, list[Any]] = {}
            for p in peers:
                by_kind.setdefault(_CNP_FIELDS[(direction, p.kind)], []).append(_cnp_peer(p, w.namespace))
            for fld, values in by_kind.items():
                rules.append({fld: values, **_cnp_ports(ports, dns_rule and direction == "egress")})
        spec[direction] = rules or [{}]
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": _metadata(w, name), "spec": spec}
