"""toServices: Services and EndpointSlices -> the peers of a CNP/CCNP egress rule.

Cilium's semantics (pkg/policy/k8s/service.go, Documentation/policy/language.rst
"Services based"), which the engine applies by translation, as Cilium does:
a rule's ``ServicePeer`` items are replaced by the peers of the Services
they match, and re-translated whenever one of those Services or its
EndpointSlices changes.

1. Which Services: ``k8sService`` matches by name, ``k8sServiceSelector``
   by the Service's own labels (label sources ignored); both only in
   ``namespace`` when it is set, in every namespace when it is empty or
   absent (Cilium; not the policy's namespace). Every Service counts,
   headless ones included.
2. A Service with a selector gives one endpoint selector: its selector's
   labels plus ``k8s:io.kubernetes.pod.namespace=<its namespace>``. The
   peers are the pods the Service selects, by identity, wherever they run;
   EndpointSlices play no part.
3. A Service without a selector gives one host CIDR (/32, /128) per address
   of its EndpointSlices (endpoints that are ready, or serving while they
   terminate; IPv4 and IPv6 slices), with Cilium's CIDR meaning: it selects
   non-cluster peers only, unless the engine's ``cidr_match_mode``
   (``--policy-cidr-match-mode``) adds pods or nodes: "CIDR selectors
   cannot select pods, and that limitation applies here as well".
4. No matching Service (yet): the rule selects no peer (it still enforces
   egress). toPorts on the same rule apply to the Services' peers (the
   backends' ports: policy sees traffic after ClusterIP translation).
5. Deny rules cannot use it (the parser refuses: Cilium translates it in
   allow rules only).

Where no Service source exists the parser refuses ``toServices``
(``parse_policy(..., services=False)``, the default).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from axoneme.core.labels import POD_NAMESPACE_LABEL, SOURCE_K8S, Label, Labels
from axoneme.core.policy._documents import load_paths
from axoneme.core.policy.api import CIDRPeer, EndpointPeer, Peer, Policy, ServicePeer
from axoneme.core.selectors import LabelSelector, Operator, Requirement

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ServiceKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True, slots=True)
class Service:
    """What toServices reads of one Service and its EndpointSlices."""

    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...] = ()
    selector: tuple[tuple[str, str], ...] = ()  # empty: a Service without a selector
    addresses: tuple[str, ...] = ()  # its EndpointSlices' addresses (rule 3), sorted

    @property
    def key(self) -> ServiceKey:
        return (self.namespace, self.name)


def service_matches(peer: ServicePeer, svc: Service) -> bool:
    """Rule 1: whether a toServices item selects ``svc``."""
    if peer.namespace is not None and peer.namespace != svc.namespace:
        return False
    if peer.name is not None:
        return peer.name == svc.name
    assert peer.selector is not None
    return peer.selector.matches(Labels(Label(SOURCE_K8S, k, v) for k, v in svc.labels))


def service_peers(svc: Service) -> tuple[Peer, ...]:
    """Rules 2 and 3: the peers one Service gives."""
    if svc.selector:
        sel = LabelSelector.build(dict(svc.selector)).with_requirement(
            Requirement(f"k8s:{POD_NAMESPACE_LABEL}", Operator.IN, frozenset({svc.namespace})))
        return (EndpointPeer(sel),)
    return tuple(CIDRPeer(ipaddress.ip_network(a)) for a in svc.addresses)


def has_service_peers(policy: Policy) -> bool:
    # loops, not any() over a generator: every policy upsert asks (issue 17, B5ENGINE)
    for rule in policy.rules:
        for pr in rule.rules:
            for p in pr.peers or ():
                if isinstance(p, ServicePeer):
                    return True
    return False


def policy_uses(policy: Policy, svc: Service | None) -> bool:
    """Whether one of the policy's toServices items selects ``svc``."""
    return svc is not None and any(
        isinstance(p, ServicePeer) and service_matches(p, svc)
        for rule in policy.rules for pr in rule.rules for p in pr.peers or ())


def translate(policy: Policy, services: Mapping[ServiceKey, Service]) -> Policy:
    """``policy`` with each ServicePeer replaced by the peers of the Services
    it matches (rule 4: none, nothing), in a stable order."""
    ordered = [services[k] for k in sorted(services)]
    rules = []
    for rule in policy.rules:
        prs = []
        for pr in rule.rules:
            if pr.peers is None or not any(isinstance(p, ServicePeer) for p in pr.peers):
                prs.append(pr)
                continue
            peers: list[Peer] = []
            for p in pr.peers:
                got = [q for svc in ordered if service_matches(p, svc) for q in service_peers(svc)] \
                    if isinstance(p, ServicePeer) else [p]
                peers.extend(q for q in got if q not in peers)
            prs.append(dataclasses.replace(pr, peers=tuple(peers)))
        rules.append(dataclasses.replace(rule, rules=tuple(prs)))
    return dataclasses.replace(policy, rules=tuple(rules))


# -- Kubernetes objects -> Services --------------------------------------------------

def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return _mapping(obj.get("metadata"))


def _str_map(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        return ()
    return tuple(sorted((str(k), "" if v is None else str(v)) for k, v in value.items()))


def _ip_order(a: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(a)
    return (ip.version, int(ip))


def slice_addresses(eps: Mapping[str, Any]) -> tuple[str, ...]:
    """Rule 3's addresses of one EndpointSlice: ready endpoints (unset means
    ready) and serving ones that terminate; FQDN slices give none."""
    if eps.get("addressType") not in (None, "IPv4", "IPv6"):
        return ()
    out: set[str] = set()
    for ep in eps.get("endpoints") or []:
        if not isinstance(ep, Mapping):
            continue
        cond = _mapping(ep.get("conditions"))
        if cond.get("ready") is False and cond.get("serving") is not True:
            continue
        for a in ep.get("addresses") or []:
            try:
                out.add(str(ipaddress.ip_address(str(a))))
            except ValueError:
                continue
    return tuple(sorted(out, key=_ip_order))


class ServiceCatalog:
    """Services and EndpointSlices (API objects, as watched or listed) -> ``Service``s."""

    def __init__(self) -> None:
        self._svcs: dict[ServiceKey, tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]] = {}
        self._owner: dict[ServiceKey, ServiceKey] = {}  # EndpointSlice -> its Service
        self._slices: dict[ServiceKey, dict[ServiceKey, tuple[str, ...]]] = {}  # Service -> slices

    def apply(self, kind: str, etype: str, obj: Mapping[str, Any]) -> set[ServiceKey]:
        """One watch event (``kind`` Service or EndpointSlice; ``etype`` ADDED,
        MODIFIED or DELETED); returns the Services it may have changed."""
        meta = _meta(obj)
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        if kind == "Service":
            if etype == "DELETED":
                self._svcs.pop(key, None)
            else:
                spec = _mapping(obj.get("spec"))
                self._svcs[key] = (_str_map(meta.get("labels")), _str_map(spec.get("selector")))
            return {key}
        changed = set()
        old = self._owner.pop(key, None)
        if old is not None:
            changed.add(old)
            self._slices[old].pop(key, None)
            if not self._slices[old]:
                del self._slices[old]
        labels = _mapping(meta.get("labels"))
        owner = str(labels.get(SERVICE_NAME_LABEL) or "")
        if etype != "DELETED" and owner:
            svc = (key[0], owner)
            self._owner[key] = svc
            self._slices.setdefault(svc, {})[key] = slice_addresses(obj)
            changed.add(svc)
        return changed

    def get(self, key: ServiceKey) -> Service | None:
        found = self._svcs.get(key)
        if found is None:
            return None
        addrs = {a for slice_addrs in self._slices.get(key, {}).values() for a in slice_addrs}
        return Service(key[0], key[1], found[0], found[1], tuple(sorted(addrs, key=_ip_order)))

    def services(self) -> list[Service]:
        return [s for k in sorted(self._svcs) if (s := self.get(k)) is not None]

    @property
    def has_services(self) -> bool:
        """Whether any Service is known: then it is a Service source."""
        return bool(self._svcs)

    @classmethod
    def from_objects(cls, objs: Iterable[object]) -> ServiceCatalog:
        """Service and EndpointSlice objects among ``objs`` (others are skipped)."""
        cat = cls()
        for obj in objs:
            if isinstance(obj, Mapping) and obj.get("kind") in ("Service", "EndpointSlice"):
                cat.apply(str(obj["kind"]), "ADDED", obj)
        return cat

    @classmethod
    def load(cls, paths: Sequence[str]) -> ServiceCatalog:
        """The Services and EndpointSlices of cluster files (offline commands'
        ``--cluster``; what cannot be read is reported by ``Cluster.load``)."""
        _, docs, _ = load_paths(paths)
        return cls.from_objects(d.obj for d in docs)


__all__ = ["SERVICE_NAME_LABEL", "Service", "ServiceCatalog", "has_service_peers", "policy_uses",
           "service_matches", "service_peers", "slice_addresses", "translate"]
