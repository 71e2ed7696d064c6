"""The `kubernetes` client of Kubernetes mode: credentials, the list calls the
informers follow, and the writes the agent makes (CNP/CCNP status, Events).

Credentials: ``--k8s-kubeconfig PATH`` (its server overridden by
``--k8s-api-server`` when both are given), else in-cluster: the service
account token and CA of /var/run/secrets/kubernetes.io/serviceaccount with
the server of ``--k8s-api-server`` (the token is read again every minute:
projected tokens rotate). Only the verbs of deploy/rbac.yaml's ClusterRole
are used: get/list/watch of the watched resources, patch of the CNP/CCNP
status subresources, create of Events.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from axoneme.agent._config import AgentConfig
from axoneme.agent._k8sinformer import short_error
from axoneme.core.errors import ConfigError

LOG = logging.getLogger(__name__)

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
CILIUM = ("cilium.io", "v2")
CNP_PLURAL = "ciliumnetworkpolicies"
CCNP_PLURAL = "ciliumclusterwidenetworkpolicies"
COMPONENT = "axoneme-agent"
WRITE_TIMEOUT = (5, 15)


def node_name(config: AgentConfig) -> str:
    return config.k8s_node_name or os.environ.get("NODE_NAME") or socket.gethostname()


def api_client(config: AgentConfig, sa_dir: str = SA_DIR) -> Any:
    """A configured ``kubernetes.client.ApiClient``; ConfigError naming the flag."""
    from kubernetes import client
    from kubernetes import config as k8s_loaders

    k8s_config: Any = k8s_loaders  # its loaders are untyped
    cfg = client.Configuration()
    server = config.k8s_api_server
    if server:
        parts = urlsplit(server)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(f"--k8s-api-server must be https://HOST:PORT, got {server!r}")
    if config.k8s_kubeconfig:
        try:
            k8s_config.load_kube_config(config_file=config.k8s_kubeconfig,
                                        client_configuration=cfg)
        except Exception as e:  # the loader raises ConfigException, OSError, YAML errors
            raise ConfigError(f"cannot use kubeconfig {config.k8s_kubeconfig}: {e} "
                              f"(--k8s-kubeconfig)") from e
        if server:
            cfg.host = server.rstrip("/")
    else:
        parts = urlsplit(server or "")
        loader = k8s_config.incluster_config.InClusterConfigLoader(
            token_filename=os.path.join(sa_dir, "token"),
            cert_filename=os.path.join(sa_dir, "ca.crt"), try_refresh_token=True,
            environ={"KUBERNETES_SERVICE_HOST": parts.hostname or "",
                     "KUBERNETES_SERVICE_PORT": str(parts.port or 443)})
        try:
            loader.load_and_set(cfg)
        except Exception as e:
            raise ConfigError(f"in-cluster credentials for {server}: {e} (service account "
                              f"files in {sa_dir}; or give --k8s-kubeconfig)") from e
    # six watches held open at once, plus status writes and GETs: the default
    # pool (5 per CPU) would discard connections on a small node
    cfg.connection_pool_maxsize = max(int(cfg.connection_pool_maxsize or 0), 16)
    return client.ApiClient(cfg)


@dataclass
class Listers:
    """The list calls of the watched resources (one informer each)."""

    namespaces: Callable[..., Any]
    pods: Callable[..., Any]
    nodes: Callable[..., Any]
    networkpolicies: Callable[..., Any]
    cnps: Callable[..., Any]
    ccnps: Callable[..., Any]
    services: Callable[..., Any]
    endpointslices: Callable[..., Any]


def listers(api: Any) -> Listers:
    from kubernetes import client

    core = client.CoreV1Api(api)
    net = client.NetworkingV1Api(api)
    discovery = client.DiscoveryV1Api(api)
    custom = client.CustomObjectsApi(api)

    def custom_list(plural: str) -> Callable[..., Any]:
        def call(**kwargs: Any) -> Any:
            return custom.list_cluster_custom_object(*CILIUM, plural, **kwargs)
        # Watch.stream reads the return type from the docstring: none (raw dicts)
        call.__doc__ = ":rtype: object"
        return call

    return Listers(namespaces=core.list_namespace, pods=core.list_pod_for_all_namespaces,
                   nodes=core.list_node,
                   networkpolicies=net.list_network_policy_for_all_namespaces,
                   cnps=custom_list(CNP_PLURAL), ccnps=custom_list(CCNP_PLURAL),
                   services=core.list_service_for_all_namespaces,
                   endpointslices=discovery.list_endpoint_slice_for_all_namespaces)


@dataclass
class PolicyReport:
    """What this node does with one policy, written to its status and an Event."""

    kind: str  # NetworkPolicy | CiliumNetworkPolicy | CiliumClusterwideNetworkPolicy
    namespace: str
    name: str
    uid: str
    generation: int
    ok: bool
    enforcing: bool
    error: str
    revision: int
    event: bool = True


class StatusWriter:
    """Writes policy reports from a thread of its own, so a slow or failing API
    server never holds up enforcement. Failures are logged and counted
    (``status`` shows the last one); a report is not retried (the next
    change of the policy writes again)."""

    def __init__(self, api: Any, node: str) -> None:
        self.api = api
        self.node = node
        self.queue: queue.Queue[PolicyReport | None] = queue.Queue()
        self.written = 0
        self.events = 0
        self.errors = 0
        self.last_error = ""
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="k8s-status", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.queue.put(None)

    def submit(self, report: PolicyReport) -> None:
        self.queue.put(report)

    def _run(self) -> None:
        while True:
            report = self.queue.get()
            if report is None:
                return
            try:
                self.write(report)
            except Exception as e:
                self.errors += 1
                self.last_error = f"{report.kind} {_where(report)}: {short_error(e)}"
                LOG.warning("kubernetes status: %s", self.last_error)

    def write(self, r: PolicyReport) -> None:
        from kubernetes import client

        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if r.kind != "NetworkPolicy":  # NetworkPolicy has no status subresource
            body = {"status": {
                "nodes": {self.node: {"ok": r.ok, "enforcing": r.enforcing, "error": r.error,
                                      "lastUpdated": now, "localPolicyRevision": r.revision}},
                "conditions": [{"type": "Valid", "status": "True" if r.ok else "False",
                                "reason": "PolicyEnforced" if r.ok else "PolicyRefused",
                                "message": r.error, "lastTransitionTime": now,
                                "observedGeneration": r.generation}]}}
            custom = client.CustomObjectsApi(self.api)
            merge = "application/merge-patch+json"
            if r.kind == "CiliumClusterwideNetworkPolicy":
                custom.patch_cluster_custom_object_status(
                    *CILIUM, CCNP_PLURAL, r.name, body, _content_type=merge,
                    _request_timeout=WRITE_TIMEOUT)
            else:
                custom.patch_namespaced_custom_object_status(
                    *CILIUM, r.namespace, CNP_PLURAL, r.name, body, _content_type=merge,
                    _request_timeout=WRITE_TIMEOUT)
            self.written += 1
        if r.event:
            self.event(r, now)

    def event(self, r: PolicyReport, now: str) -> None:
        from kubernetes import client

        api_version = "networking.k8s.io/v1" if r.kind == "NetworkPolicy" else "cilium.io/v2"
        # Events of a cluster-scoped object live in "default" (as kubectl shows them)
        ns = r.namespace or "default"
        if r.ok:
            reason, etype = "PolicyEnforced", "Normal"
            message = f"enforced on node {self.node} (policy revision {r.revision})"
        else:
            reason, etype = "PolicyRefused", "Warning"
            message = f"refused on node {self.node}: {r.error}"
        ev = client.CoreV1Event.from_dict({
            "metadata": {"generateName": f"{r.name}.", "namespace": ns},
            "involvedObject": {"kind": r.kind, "apiVersion": api_version, "name": r.name,
                               "namespace": r.namespace or None, "uid": r.uid or None},
            "reason": reason, "message": message[:1024], "type": etype,
            "source": {"component": COMPONENT, "host": self.node},
            "reportingComponent": COMPONENT, "reportingInstance": self.node,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1})
        assert ev is not None
        client.CoreV1Api(self.api).create_namespaced_event(ns, ev,
                                                           _request_timeout=WRITE_TIMEOUT)
        self.events += 1

    def view(self) -> dict[str, Any]:
        return {"written": self.written, "events": self.events, "errors": self.errors,
                "last_error": self.last_error}


def _where(r: PolicyReport) -> str:
    return f"{r.namespace}/{r.name}" if r.namespace else r.name

