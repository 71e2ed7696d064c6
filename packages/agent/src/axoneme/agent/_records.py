"""What the agent records about pods and endpoints (persisted as JSON), and
the checks of names, labels and ports that API input goes through."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from axoneme.agent._errors import BadRequest
from axoneme.core.endpoint import NamedPort
from axoneme.core.labels import valid_label_key, valid_label_value
from axoneme.core.names import dns_label_problem, dns_subdomain_problem


@dataclass
class PodRecord:
    name: str
    namespace: str
    labels: dict[str, str]
    ports: list[str] = field(default_factory=list)  # name:port/proto
    service_account: str = "default"
    container_id: str = ""
    netns: str = ""
    command: list[str] = field(default_factory=list)
    cwd: str = "/"
    pid: int = 0
    pid_start: int = 0
    log: str = ""
    status: str = "Creating"
    exit_code: int | None = None
    created: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def named_ports(self) -> tuple[NamedPort, ...]:
        return tuple(parse_port(p) for p in self.ports)


@dataclass
class EndpointRecord:
    id: int
    container_id: str
    ifname: str
    netns_path: str
    namespace: str
    pod_name: str
    ipv4: str
    network: str = ""
    host_ifname: str = ""
    host_ifindex: int = 0
    host_mac: str = ""
    pod_mac: str = ""
    identity: int = 0
    status: str = "ready"
    created: float = 0.0
    ready_ms: float = 0.0  # CNI ADD received -> policy in force in the datapath
    policy_audit_mode: bool = False  # `endpoint config ID policy-audit-mode=enabled`


def parse_labels(items: Sequence[str] | str | None) -> dict[str, str]:
    """``k=v,...`` (or a list of ``k=v``) into a dict; BadRequest naming a bad label."""
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    out: dict[str, str] = {}
    for chunk in items:
        for text in chunk.split(","):
            text = text.strip()
            if not text:
                continue
            key, sep, value = text.partition("=")
            if not sep or not valid_label_key(key) or not valid_label_value(value):
                raise BadRequest(f"invalid label {text!r}: expected key=value with a Kubernetes "
                                 f"label key and value")
            out[key] = value
    return out


def check_labels(labels: Mapping[str, str]) -> dict[str, str]:
    for key, value in labels.items():
        if not isinstance(key, str) or not isinstance(value, str) or not valid_label_key(key) \
                or not valid_label_value(value):
            raise BadRequest(f"invalid label {key}={value!r}")
    return dict(labels)


def parse_port(text: str) -> NamedPort:
    """``name:port[/proto]`` (``port[/proto]`` without a name)."""
    name, sep, rest = text.rpartition(":")
    if not sep:
        name, rest = "", text
    port_s, _, proto = rest.partition("/")
    proto = (proto or "TCP").upper()
    try:
        port = int(port_s)
    except ValueError:
        raise BadRequest(f"invalid port {text!r}: expected name:port/proto") from None
    if not 0 < port < 65536 or proto not in ("TCP", "UDP", "SCTP"):
        raise BadRequest(f"invalid port {text!r}: expected name:port/proto (TCP, UDP or SCTP)")
    return NamedPort(name, port, proto)


def check_name(name: str, what: str) -> None:
    """Namespaces are RFC 1123 labels and pods RFC 1123 subdomains, as in Kubernetes."""
    problem = (dns_label_problem if what == "namespace" else dns_subdomain_problem)(name)
    if problem:
        raise BadRequest(f"invalid {what} name: {problem}")


def netns_name(namespace: str, pod: str) -> str:
    short = f"{namespace[:8]}-{pod[:20]}".replace("/", "-")
    return f"axon-{short}-{secrets.token_hex(3)}"
