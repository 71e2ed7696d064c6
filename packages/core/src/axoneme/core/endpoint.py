"""Endpoint: one pod's network presence as the datapath and policy see it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from axoneme.core.labels import Label, Labels

#: The node's own endpoint (the host firewall, Cilium's host endpoint): the
#: node's network namespace, identity 1 (reserved:host), selected by the
#: nodeSelector of CiliumClusterwideNetworkPolicies. Pod endpoint ids count up
#: from 1 and never reach it.
HOST_ENDPOINT_ID = 1 << 30


@dataclass(frozen=True, slots=True)
class NamedPort:
    name: str
    port: int
    protocol: str = "TCP"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A local endpoint.

    ``host_ifname``/``host_ifindex`` name the host side of the pod's veth,
    where datapaths enforce. ``identity`` is the numeric security identity.
    The host endpoint (``HOST_ENDPOINT_ID``) has no veth: ``devices`` names the
    node's external interfaces its programs attach to (eBPF).
    """

    id: int
    identity: int
    labels: Labels
    ipv4: str | None = None
    ipv6: str | None = None
    host_ifname: str = ""
    host_ifindex: int = 0
    host_mac: str = ""
    pod_mac: str = ""
    netns: str = ""
    namespace: str = ""
    pod_name: str = ""
    named_ports: tuple[NamedPort, ...] = ()
    container_id: str = field(default="", compare=False)
    devices: tuple[str, ...] = ()

    @property
    def is_host(self) -> bool:
        return self.id == HOST_ENDPOINT_ID

    @property
    def pod(self) -> str:
        if self.id == HOST_ENDPOINT_ID:
            return "host"
        return f"{self.namespace}/{self.pod_name}" if self.pod_name else ""


def host_endpoint(node_labels: Mapping[str, str], devices: Sequence[str] = ()) -> Endpoint:
    """The host endpoint of a node with ``node_labels``: identity host (1),
    labels ``reserved:host`` and ``k8s:<key>=<value>`` per node label (what a
    CCNP nodeSelector matches, with or without the ``k8s:`` source)."""
    labels = Labels([Label("reserved", "host"),
                     *(Label("k8s", k, v) for k, v in sorted(node_labels.items()))])
    return Endpoint(HOST_ENDPOINT_ID, 1, labels, devices=tuple(devices))
