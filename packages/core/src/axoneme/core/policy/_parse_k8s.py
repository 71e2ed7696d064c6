"""Kubernetes ``networking.k8s.io/v1 NetworkPolicy`` -> rules."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from axoneme.core import yamlsafe
from axoneme.core.labels import NAMESPACE_LABELS_PREFIX, POD_NAMESPACE_LABEL, valid_label_key
from axoneme.core.mapstate import Direction
from axoneme.core.policy._parse_base import _ParserBase
from axoneme.core.policy.api import (
    CLUSTER_ADDRESS_CLASSES,
    CIDRPeer,
    EndpointPeer,
    PeerRule,
    PolicyRef,
    PortProtocol,
    PortRule,
    Rule,
)
from axoneme.core.policy.walk import item, join
from axoneme.core.selectors import LabelSelector, Operator, Requirement

_q = yamlsafe.excerpt
_NP_PROTOCOLS = ("TCP", "UDP", "SCTP")


class _NetworkPolicyParser(_ParserBase):
    def network_policy(self, m: Mapping[str, Any], ref: PolicyRef) -> list[Rule]:
        w = self.w
        if "specs" in m:
            w.problem("specs", "unknown field \"specs\"")
        if m.get("spec") is None:
            w.problem("spec", "missing required field \"spec\"")
            return []
        spec = w.mapping(m["spec"], "spec", ("podSelector", "ingress", "egress", "policyTypes"))
        if spec is None:
            return []
        ns = self.namespace
        pod_key: Callable[[str], str] = lambda k: f"k8s:{k}"  # noqa: E731
        subject = self.selector(spec.get("podSelector"), "spec.podSelector", pod_key, valid_label_key)
        if subject is not None:
            subject = subject.with_requirement(Requirement(f"k8s:{POD_NAMESPACE_LABEL}", Operator.IN, frozenset({ns})))
        types: list[str] = []
        if spec.get("policyTypes") is not None:
            for i, t in enumerate(w.list(spec["policyTypes"], "spec.policyTypes")):
                if t not in ("Ingress", "Egress"):
                    w.problem(item("spec.policyTypes", i),
                              f"invalid policy type \"{_q(t)}\" (expected Ingress or Egress)")
                elif t not in types:
                    types.append(t)
        else:
            # Kubernetes defaulting: Ingress always, Egress when egress rules exist.
            types.append("Ingress")
            eg = spec.get("egress")
            if isinstance(eg, list) and eg:
                types.append("Egress")
        peer_rules: list[PeerRule] = []
        for direction, field, peer_field in (
            (Direction.INGRESS, "ingress", "from"), (Direction.EGRESS, "egress", "to"),
        ):
            fp = join("spec", field)
            for i, r in enumerate(w.list(spec.get(field), fp)):
                pr = self.np_rule(r, item(fp, i), direction, peer_field)
                # Rules of a direction not in policyTypes are ignored (Kubernetes).
                if pr is not None and direction.name.capitalize() in types:
                    peer_rules.append(pr)
        if subject is None:
            return []
        return [Rule(
            ref=ref, subject=subject, rules=tuple(peer_rules),
            enforce_ingress="Ingress" in types, enforce_egress="Egress" in types,
            origin=w.file, document=w.index,
        )]

    def np_rule(self, value: object, path: str, direction: Direction, peer_field: str) -> PeerRule | None:
        w = self.w
        m = w.mapping(value, path, (peer_field, "ports"))
        if m is None:
            return None
        ok = True
        peers: list[Any] = []
        pp = join(path, peer_field)
        for i, p in enumerate(w.list(m.get(peer_field), pp)):
            got = self.np_peer(p, item(pp, i))
            if got is None:
                ok = False
            else:
                peers.append(got)
        ports: list[PortProtocol] = []
        portsp = join(path, "ports")
        for i, p in enumerate(w.list(m.get("ports"), portsp)):
            got_port = self.np_port(p, item(portsp, i))
            if got_port is None:
                ok = False
            else:
                ports.append(got_port)
        if not ok:
            return None
        return PeerRule(
            direction=direction,
            peers=tuple(peers) if peers else None,
            ports=(PortRule(ports=tuple(ports)),) if ports else (),
            path=path,
        )

    def np_peer(self, value: object, path: str) -> EndpointPeer | CIDRPeer | None:
        w = self.w
        m = w.mapping(value, path, ("podSelector", "namespaceSelector", "ipBlock"))
        if m is None:
            return None
        has_pod = m.get("podSelector") is not None
        has_ns = m.get("namespaceSelector") is not None
        has_ip = m.get("ipBlock") is not None
        if has_ip and (has_pod or has_ns):
            w.problem(path, "ipBlock may not be combined with podSelector or namespaceSelector")
            return None
        if not (has_ip or has_pod or has_ns):
            w.problem(path, "a peer must have podSelector, namespaceSelector or ipBlock")
            return None
        if has_ip:
            ip = w.mapping(m["ipBlock"], join(path, "ipBlock"), ("cidr", "except"))
            if ip is None:
                return None
            block = self.cidr_set(ip, join(path, "ipBlock"), except_field="except")
            # Upstream: an ipBlock matches every address in it, pods and nodes included.
            return None if block is None else replace(block, match=CLUSTER_ADDRESS_CLASSES)
        reqs: set[Requirement] = set()
        ok = True
        if has_pod:
            sel = self.selector(m["podSelector"], join(path, "podSelector"), lambda k: f"k8s:{k}", valid_label_key)
            if sel is None:
                ok = False
            else:
                reqs |= sel.requirements
        if has_ns:
            sel = self.selector(m["namespaceSelector"], join(path, "namespaceSelector"),
                                lambda k: f"k8s:{NAMESPACE_LABELS_PREFIX}{k}", valid_label_key)
            if sel is None:
                ok = False
            elif sel.is_wildcard:
                # Any namespace, but only pods (Cilium: Exists on the namespace label).
                reqs.add(Requirement(f"k8s:{POD_NAMESPACE_LABEL}", Operator.EXISTS))
            else:
                reqs |= sel.requirements
        if not ok:
            return None
        if not has_ns:
            reqs.add(Requirement(f"k8s:{POD_NAMESPACE_LABEL}", Operator.IN, frozenset({self.namespace})))
        return EndpointPeer(LabelSelector(frozenset(reqs)))

    def np_port(self, value: object, path: str) -> PortProtocol | None:
        def protocol(text: str, where: str) -> str | None:
            if text not in _NP_PROTOCOLS:
                self.w.problem(where, f"invalid protocol \"{_q(text)}\" (expected TCP, UDP or SCTP)")
                return None
            return text

        return self.port_block(value, path, default="TCP", protocol=protocol)
