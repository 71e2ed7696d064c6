"""A cluster description: namespaces and pods, from ordinary Kubernetes YAML.

Used by the offline tools (``axoneme policy trace`` / ``policy matrix``) and
tests: ``v1 Namespace`` and ``v1 Pod`` documents (also inside ``kind: List``)
become :class:`Namespace` / :class:`Pod`. Other kinds are skipped so a
directory may mix cluster objects and policies.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from axoneme.core import yamlsafe
from axoneme.core.endpoint import NamedPort
from axoneme.core.errors import InvalidRule, Problem
from axoneme.core.labels import (
    CLUSTER_LABEL,
    NAMESPACE_LABELS_PREFIX,
    POD_NAMESPACE_LABEL,
    SERVICE_ACCOUNT_LABEL,
    SOURCE_K8S,
    Label,
    Labels,
    valid_label_key,
    valid_label_value,
)
from axoneme.core.policy._documents import load_paths

LOG = logging.getLogger(__name__)

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
POD_CIDR = ipaddress.ip_network("10.244.0.0/16")
_PROTOCOLS = ("TCP", "UDP", "SCTP")


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class Pod:
    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    ips: tuple[str, ...] = ()
    ports: tuple[NamedPort, ...] = ()
    service_account: str = "default"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ipv4(self) -> str | None:
        return next((ip for ip in self.ips if ipaddress.ip_address(ip).version == 4), None)

    @property
    def ipv6(self) -> str | None:
        return next((ip for ip in self.ips if ipaddress.ip_address(ip).version == 6), None)


def namespace_labels(name: str, labels: Mapping[str, str] | None = None) -> dict[str, str]:
    out = dict(labels or {})
    out[NAMESPACE_NAME_LABEL] = name
    return out


def pod_identity_labels(pod: Pod, ns: Namespace, cluster_name: str = "default") -> Labels:
    """The identity-relevant labels Cilium derives for a pod."""
    labels = [Label(SOURCE_K8S, k, v) for k, v in pod.labels.items()]
    labels.append(Label(SOURCE_K8S, POD_NAMESPACE_LABEL, pod.namespace))
    for k, v in namespace_labels(ns.name, ns.labels).items():
        labels.append(Label(SOURCE_K8S, NAMESPACE_LABELS_PREFIX + k, v))
    labels.append(Label(SOURCE_K8S, SERVICE_ACCOUNT_LABEL, pod.service_account))
    labels.append(Label(SOURCE_K8S, CLUSTER_LABEL, cluster_name))
    return Labels(labels)


class Cluster:
    """Namespaces and pods (pods keyed ``ns/name``)."""

    def __init__(self, namespaces: Mapping[str, Namespace] | None = None,
                 pods: Mapping[str, Pod] | None = None) -> None:
        self.namespaces: dict[str, Namespace] = dict(namespaces or {})
        self.pods: dict[str, Pod] = dict(pods or {})

    def namespace_of(self, pod: Pod) -> Namespace:
        return self.namespaces.get(pod.namespace) or Namespace(
            pod.namespace, namespace_labels(pod.namespace))

    def identity_labels(self, pod: Pod, cluster_name: str = "default") -> Labels:
        return pod_identity_labels(pod, self.namespace_of(pod), cluster_name)

    def pod_by_ip(self, ip: str) -> Pod | None:
        addr = ipaddress.ip_address(ip)
        for pod in self.pods.values():
            if any(ipaddress.ip_address(p) == addr for p in pod.ips):
                return pod
        return None

    @classmethod
    def from_objects(cls, objs: Sequence[Any], file: str = "<api>") -> Cluster:
        loader = _Loader()
        for index, obj in enumerate(objs):
            loader.add(file, index, obj)
        return loader.finish()

    @classmethod
    def load(cls, paths: Sequence[str]) -> Cluster:
        """Load files or directories (``*.yaml``, ``*.yml``, ``*.json``, sorted):
        the policy files' reader (hardened loader, ``kind: List`` items)."""
        loader = _Loader()
        _, docs, problems = load_paths(paths)
        loader.problems.extend(problems)
        for doc in docs:
            loader.add(doc.file, doc.index, doc.obj)
        return loader.finish()


class _Loader:
    def __init__(self) -> None:
        self.problems: list[Problem] = []
        self.namespaces: dict[str, Namespace] = {}
        self.pods: dict[str, Pod] = {}
        self._pending_ip: list[str] = []  # pod keys that need an allocated IP

    def _bad(self, file: str, index: int, fld: str, msg: str) -> None:
        self.problems.append(Problem(file, index, fld, msg))

    def _labels(self, file: str, index: int, obj: Any, fld: str) -> dict[str, str] | None:
        if obj is None:
            return {}
        if not isinstance(obj, dict):
            self._bad(file, index, fld, "must be a mapping of label keys to values")
            return None
        out: dict[str, str] = {}
        ok = True
        for k, v in obj.items():
            if not isinstance(k, str) or not valid_label_key(k):
                self._bad(file, index, f"{fld}.{yamlsafe.excerpt(k)}", "invalid label key")
                ok = False
            elif not isinstance(v, str) or not valid_label_value(v):
                self._bad(file, index, f"{fld}.{k}", f"invalid label value {yamlsafe.excerpt(v)!r} (must be a string)")
                ok = False
            else:
                out[k] = v
        return out if ok else None

    def add(self, file: str, index: int, obj: Any) -> None:
        if not isinstance(obj, dict):
            self._bad(file, index, "", "document must be a mapping (a Kubernetes object)")
            return
        kind = obj.get("kind")
        if kind not in ("Namespace", "Pod"):
            if not isinstance(kind, str):
                self._bad(file, index, "kind", "missing kind")
            else:
                LOG.debug("skipping %s in %s document %d", kind, file, index)
            return
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            self._bad(file, index, "metadata", "missing metadata")
            return
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            self._bad(file, index, "metadata.name", "missing name")
            return
        labels = self._labels(file, index, meta.get("labels"), "metadata.labels")
        if labels is None:
            return
        if kind == "Namespace":
            if name in self.namespaces:
                self._bad(file, index, "metadata.name", f"namespace {name} declared twice")
                return
            self.namespaces[name] = Namespace(name, namespace_labels(name, labels))
            return
        self._add_pod(file, index, obj, name, labels)

    def _add_pod(self, file: str, index: int, obj: dict[str, Any], name: str,
                 labels: dict[str, str]) -> None:
        ns = obj["metadata"].get("namespace") or "default"
        if not isinstance(ns, str):
            self._bad(file, index, "metadata.namespace", "must be a string")
            return
        key = f"{ns}/{name}"
        if key in self.pods:
            self._bad(file, index, "metadata.name", f"pod {key} declared twice")
            return
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        if not isinstance(spec, dict) or not isinstance(status, dict):
            self._bad(file, index, "spec", "spec and status must be mappings")
            return
        sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        ports: list[NamedPort] = []
        containers = spec.get("containers") or []
        if not isinstance(containers, list):
            self._bad(file, index, "spec.containers", "must be a list")
            return
        for ci, c in enumerate(containers):
            for pi, p in enumerate((c or {}).get("ports") or [] if isinstance(c, dict) else []):
                fld = f"spec.containers[{ci}].ports[{pi}]"
                if not isinstance(p, dict):
                    self._bad(file, index, fld, "must be a mapping")
                    continue
                number = p.get("containerPort")
                proto = str(p.get("protocol") or "TCP").upper()
                if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 65535:
                    self._bad(file, index, f"{fld}.containerPort", "must be a port number 1-65535")
                    continue
                if proto not in _PROTOCOLS:
                    self._bad(file, index, f"{fld}.protocol", "must be TCP, UDP or SCTP")
                    continue
                if p.get("name"):
                    ports.append(NamedPort(str(p["name"]), number, proto))
        ips: list[str] = []
        raw_ips = [x.get("ip") for x in status.get("podIPs") or [] if isinstance(x, dict)]
        if status.get("podIP"):
            raw_ips.insert(0, status["podIP"])
        for ip in raw_ips:
            try:
                text = str(ipaddress.ip_address(str(ip)))
            except ValueError:
                self._bad(file, index, "status.podIP", f"invalid IP address {yamlsafe.excerpt(ip)!r}")
                return
            if text not in ips:
                ips.append(text)
        self.pods[key] = Pod(name, ns, labels, tuple(ips), tuple(ports), str(sa))
        if not ips:
            self._pending_ip.append(key)

    def finish(self) -> Cluster:
        if self.problems:
            raise InvalidRule(self.problems)
        used: set[object] = {ipaddress.ip_address(ip) for p in self.pods.values() for ip in p.ips}
        hosts = POD_CIDR.hosts()
        for key in self._pending_ip:
            addr = next(hosts)
            while addr in used:
                addr = next(hosts)
            used.add(addr)
            pod = self.pods[key]
            self.pods[key] = Pod(pod.name, pod.namespace, pod.labels, (str(addr),), pod.ports,
                                 pod.service_account)
        for pod in self.pods.values():
            if pod.namespace not in self.namespaces:
                self.namespaces[pod.namespace] = Namespace(pod.namespace, namespace_labels(pod.namespace))
        return Cluster(self.namespaces, self.pods)


__all__ = ["Cluster", "Namespace", "Pod", "pod_identity_labels", "namespace_labels",
           "NAMESPACE_NAME_LABEL"]
