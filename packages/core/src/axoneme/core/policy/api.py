"""The normalized policy model: what every policy kind is parsed into.

NetworkPolicy, CiliumNetworkPolicy (spec/specs) and
CiliumClusterwideNetworkPolicy all become ``Rule`` objects. Parsing
(``axoneme.core.policy.parse``) does every kind-specific translation, so
resolution knows nothing of kinds:

- Namespace scoping is already applied: a CNP/NP ``Rule.subject`` carries
  ``k8s:io.kubernetes.pod.namespace=<ns>``; peer ``EndpointPeer`` selectors
  carry it unless they name the pod-namespace key or a namespace-labels key;
  a CCNP empty peer selector carries ``Exists k8s:io.kubernetes.pod.namespace``.
- Kubernetes NetworkPolicy: podSelector/namespaceSelector become
  ``EndpointPeer`` selectors (namespaceSelector keys prefixed with
  ``io.cilium.k8s.namespace.labels.``), ipBlock becomes ``CIDRPeer`` that
  also matches pod and node addresses (``match``), an absent
  or empty ``from``/``to`` becomes ``peers=None`` (any peer), absent ``ports``
  all ports, port protocol defaulting to TCP; policyTypes (with its
  defaulting) sets ``enforce_ingress``/``enforce_egress``.
- Cilium: an empty rule ``{}`` (no peer field, no ports, no icmps) allows
  nothing but still enforces; a rule with only toPorts/icmps has
  ``peers=None`` (any peer); ``enableDefaultDeny`` sets the enforce flags.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from axoneme.core.mapstate import Direction
from axoneme.core.selectors import LabelSelector

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyKind(str, Enum):
    NETWORK_POLICY = "NetworkPolicy"
    CILIUM_NETWORK_POLICY = "CiliumNetworkPolicy"
    CILIUM_CLUSTERWIDE_NETWORK_POLICY = "CiliumClusterwideNetworkPolicy"

    @property
    def namespaced(self) -> bool:
        return self is not PolicyKind.CILIUM_CLUSTERWIDE_NETWORK_POLICY

    @property
    def short(self) -> str:
        return {"NetworkPolicy": "netpol", "CiliumNetworkPolicy": "cnp",
                "CiliumClusterwideNetworkPolicy": "ccnp"}[self.value]


@dataclass(frozen=True, slots=True, order=True)
class PolicyRef:
    """Identifies one policy object: kind, namespace ("" for CCNP), name."""

    kind: PolicyKind
    namespace: str
    name: str

    def __str__(self) -> str:
        # ``_value_``, not the ``value`` property (two calls into enum.py): every
        # peer rule a change computes names its policy (issue 17, B5ENGINE)
        if self.namespace:
            return f"{self.kind._value_} {self.namespace}/{self.name}"
        return f"{self.kind._value_} {self.name}"


# Per-policy staging (Calico's staged policies): a policy annotated
# ``policy.axoneme.io/mode: audit`` is computed as if enforced but only
# reported (flows with verdict AUDIT); ``enforce`` (or no annotation) enforces.
MODE_ANNOTATION = "policy.axoneme.io/mode"


def staged_document(obj: dict[str, Any]) -> dict[str, Any]:
    """A copy of policy document ``obj`` annotated ``policy.axoneme.io/mode: audit``
    (``policy apply --audit``): staged, counted and reported, not enforced."""
    meta = dict(obj.get("metadata") or {})
    meta["annotations"] = {**(meta.get("annotations") or {}), MODE_ANNOTATION: "audit"}
    return {**obj, "metadata": meta}
MODES = ("enforce", "audit")


# --- peers -------------------------------------------------------------------

ENTITIES = frozenset({
    "host", "remote-node", "kube-apiserver", "ingress", "cluster", "init",
    "health", "unmanaged", "world", "world-ipv4", "world-ipv6", "all", "none",
})


@dataclass(frozen=True, slots=True)
class EndpointPeer:
    """from/toEndpoints (and translated podSelector/namespaceSelector)."""

    selector: LabelSelector


@dataclass(frozen=True, slots=True)
class EntityPeer:
    """from/toEntities: one of ``ENTITIES``."""

    entity: str


# The cluster address classes a CIDR peer can match one by one (CIDRPeer.match).
ADDRESS_PODS, ADDRESS_NODES = "pods", "nodes"
CLUSTER_ADDRESS_CLASSES = frozenset({ADDRESS_PODS, ADDRESS_NODES})


@dataclass(frozen=True, slots=True)
class CIDRPeer:
    """from/toCIDR, from/toCIDRSet, ipBlock: a prefix minus its exceptions.

    Matches CIDR/world identities by prefix containment: an identity for
    prefix P is selected when P is inside ``cidr`` and not inside any of
    ``excepts``. A /0 also selects world.

    ``match`` names the cluster addresses it also matches, one by one
    (address keys, never their identities): ``pods`` (endpoint addresses) and
    ``nodes`` (node addresses). A NetworkPolicy ``ipBlock`` matches both
    (upstream Kubernetes); Cilium's CIDR fields match neither unless the
    engine's ``cidr_match_mode`` adds them (Cilium's ``policy-cidr-match-mode``).
    """

    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()
    match: frozenset[str] = frozenset()
    # computed once: the selector cache and the engine hash a CIDR peer a dozen
    # times per use, and ipaddress hashes in Python (a 100k-peer policy)
    _hash: int = field(default=0, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.cidr, self.excepts)))

    def __hash__(self) -> int:
        return self._hash

    def contains(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """Whether ``address`` is in ``cidr`` and in none of ``excepts``."""
        return (address.version == self.cidr.version and address in self.cidr
                and not any(address in e for e in self.excepts))


@dataclass(frozen=True, slots=True)
class FQDNPeer:
    """toFQDNs: exactly one of match_name / match_pattern (lower-case, no trailing dot)."""

    match_name: str | None = None
    match_pattern: str | None = None


@dataclass(frozen=True, slots=True)
class ServicePeer:
    """toServices: ``k8sService`` (``name``) or ``k8sServiceSelector``
    (``selector`` over the Service's labels); ``namespace`` None = the
    Service's namespace does not matter (Cilium: an empty namespace matches
    every namespace). The engine replaces it by the peers the matching
    Services give (``axoneme.core.policy.services``); ``path`` is where it
    was written, for errors."""

    name: str | None = None
    selector: LabelSelector | None = None
    namespace: str | None = None
    path: str = field(default="", compare=False)


Peer = EndpointPeer | EntityPeer | CIDRPeer | FQDNPeer | ServicePeer


# --- ports and L7 ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PortProtocol:
    """One ports[] item. ``port`` 0 = all ports. ``name`` set for a named port
    (then ``port`` is 0 and resolution looks the name up). ``protocol`` is
    TCP, UDP, SCTP or ANY."""

    port: int = 0
    end_port: int | None = None
    protocol: str = "ANY"
    name: str | None = None


@dataclass(frozen=True, slots=True)
class L7Spec:
    """``rules:`` of one PortRule: the ``axoneme.l7`` parser it selects and its rules.

    An empty ``rules`` tuple (e.g. ``l7: [{}]`` or ``l7: []``) allows
    everything at L7 but still redirects to the proxy."""

    parser: str
    rules: tuple[Any, ...] = ()  # the parser's rule objects


@dataclass(frozen=True, slots=True)
class PortRule:
    """toPorts[] item: the ports and optional L7 rules for them."""

    ports: tuple[PortProtocol, ...] = ()
    l7: L7Spec | None = None


@dataclass(frozen=True, slots=True)
class ICMPField:
    family: str  # "IPv4" | "IPv6"
    type: int


@dataclass(frozen=True, slots=True)
class PeerRule:
    """One item of ingress / egress / ingressDeny / egressDeny.

    ``peers`` None = any peer (identity wildcard); an empty tuple selects no
    peer. ``ports``/``icmps`` both empty = every port and protocol (L3-only);
    otherwise traffic must match one of them. ``allows_nothing`` is set for
    Cilium's empty rule ``{}``. ``path`` is where it came from, e.g.
    ``spec.ingress[0]`` (``specs[1].egressDeny[2]``) for trace output.
    """

    direction: Direction
    deny: bool = False
    peers: tuple[Peer, ...] | None = None
    ports: tuple[PortRule, ...] = ()
    icmps: tuple[ICMPField, ...] = ()
    allows_nothing: bool = False
    path: str = ""


@dataclass(frozen=True, slots=True)
class Rule:
    """One Cilium rule (a NetworkPolicy, a CNP spec, one item of specs)."""

    ref: PolicyRef
    subject: LabelSelector
    rules: tuple[PeerRule, ...] = ()
    enforce_ingress: bool = False
    enforce_egress: bool = False
    node_selector: bool = False  # subject is a nodeSelector (host firewall)
    description: str = ""
    index: int = 0  # index within specs
    origin: str = ""  # file path or "<api>"
    document: int | None = None
    audit: bool = False  # its policy is staged (MODE_ANNOTATION: audit): reported, never enforced

    def peer_rules(self, direction: Direction) -> tuple[PeerRule, ...]:
        return tuple(r for r in self.rules if r.direction == direction)

    def enforces(self, direction: Direction) -> bool:
        return self.enforce_ingress if direction is Direction.INGRESS else self.enforce_egress


@dataclass(frozen=True, slots=True)
class Policy:
    """One policy object as applied: its ref, its rules, and its source text."""

    ref: PolicyRef
    rules: tuple[Rule, ...]
    raw: dict[str, object] = field(default_factory=dict, compare=False, hash=False)
    origin: str = ""
    audit: bool = False  # staged: metadata.annotations[MODE_ANNOTATION] == "audit"
