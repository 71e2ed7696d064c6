"""The agent's configuration (flags and config file keys, docs/cli.md)."""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from axoneme.agent._flowstore import DEFAULT_FLOW_BUFFER
from axoneme.agent._routing import VXLAN_OVERHEAD
from axoneme.agent.client import DEFAULT_SOCKET

DEFAULT_STATE_DIR = "/var/lib/axoneme"
STATE_FILE = "state.json"
LOCK_FILE = "agent.lock"  # flock held by the agent serving the state dir
DNS_SERVER = "198.51.100.53"  # a test-net address: pods never use the host's resolver

# agent flags that predate --datapath-opt, and the datapath option each sets
# (given to a datapath that declares an option of that name)
LEGACY_DATAPATH_OPTIONS = {"iptables_mode": "mode", "bpffs_root": "bpffs_root",
                           "policy_map_max": "policy_map_max"}


@dataclass
class AgentConfig:
    datapath: str = "ebpf"
    iptables_mode: str = "plain"
    state_dir: str = DEFAULT_STATE_DIR
    api_socket: str = DEFAULT_SOCKET
    policy_dir: str | None = None
    install_cni: bool = False
    pod_cidr: str = "10.244.0.0/16"
    flow_buffer: int = DEFAULT_FLOW_BUFFER
    guard: bool = True
    enforcement_mode: str = "default"
    allow_localhost: str = "auto"
    # cluster addresses Cilium's CIDR fields also match: "", nodes, pods, nodes,pods
    # (Cilium's policy-cidr-match-mode; a NetworkPolicy ipBlock matches both always)
    policy_cidr_match_mode: str = ""
    # Cilium's --policy-audit-mode: every would-be policy drop is forwarded and
    # reported with verdict AUDIT (per endpoint: `axoneme endpoint config`)
    policy_audit_mode: bool = False
    cluster_name: str = "default"
    # the host firewall (Cilium's --enable-host-firewall): host policies (CCNP
    # nodeSelector) enforced on this node's own endpoint; off by default and
    # refused in the machine's initial network namespace (_hostfw)
    host_firewall: bool = False
    # the node's labels host policies select on (standalone mode; Kubernetes
    # mode reads this node's Node object): --node-labels k=v,...
    node_labels: dict[str, str] = field(default_factory=dict)
    # where the host firewall enforces (Cilium's --devices); [] = every interface up
    # but loopback, pod veths and our VXLAN device
    devices: list[str] = field(default_factory=list)
    # Kubernetes mode: the nodes (names) whose agent turns host_firewall on; [] =
    # every node. One DaemonSet config serves every node: a node that is the
    # machine itself (scripts/cluster's node 1) is left out here.
    host_firewall_nodes: list[str] = field(default_factory=list)
    cni_bin: str | None = None
    dns_server: str = DNS_SERVER
    mtu: int = 1500
    l7_proxies: bool = True  # run the installed axoneme.l7 proxies for L7 rules
    # the HTTP proxy's engine: native (axoneme-l7-http, Go), python, or auto
    # (native when scripts/l7-build built it); Kafka and DNS stay in Python
    l7_http_engine: str = "auto"
    tofqdns_min_ttl: int = 0  # lower bound on DNS TTLs for toFQDNs (Cilium --tofqdns-min-ttl)
    dns_reject_rcode: str = "REFUSED"  # answer to a denied DNS query: REFUSED or NXDOMAIN
    bpffs_root: str = "/sys/fs/bpf/axoneme"  # where a BPF datapath pins its maps
    policy_map_max: int = 16384  # policy entries per endpoint (Cilium --bpf-policy-map-max)
    # a persisted policy that no longer parses: refuse to start (False) or drop it loudly
    drop_unparseable_policies: bool = False
    # a policy that does not fit an endpoint's policy map: fail-closed | keep-last
    policy_map_full: str = "fail-closed"
    # --datapath-opt KEY=VALUE: checked against the options the datapath declares
    datapath_options: dict[str, Any] = field(default_factory=dict)
    # allow-list of plugins (NAME or KIND:NAME); None: every installed plugin
    plugins: list[str] | None = None
    # POST /v1/flows: add flow records by hand. Off: any client of the socket
    # could forge the audit trail. Only tests of `observe` turn it on (config
    # file key, no flag).
    flow_injection: bool = False
    # Kubernetes mode (docs/kubernetes.md "The agent in Kubernetes mode"): set
    # either and the API server is the source of policies and pod metadata
    k8s_kubeconfig: str | None = None  # --k8s-kubeconfig PATH
    k8s_api_server: str | None = None  # --k8s-api-server https://HOST:PORT (in-cluster auth)
    k8s_node_name: str | None = None  # default: $NODE_NAME, else the hostname
    k8s_pod_wait: float = 10.0  # CNI ADD of a pod not (yet) in the cache: wait this long
    # Kubernetes mode: identities as CiliumIdentity objects shared by every node
    # (crd, Cilium's default) or per node (local); config keys only
    # (docs/kubernetes.md "Identities"). The collector: every interval seconds
    # (0: off), an identity unused for heartbeat_timeout seconds is deleted
    identity_allocation_mode: str = "crd"
    identity_gc_interval: float = 60.0
    identity_heartbeat_timeout: float = 900.0
    # a Node's delete: the identities only its pods held are deleted after this
    # grace instead (_identitynodegc; 0: they wait for the collector's timeout)
    identity_node_gc_grace: float = 2.0
    # the periodic collector only on the agent holding the Lease axoneme-identity-gc
    # (_identitylease, client-go's leader election; false: every agent collects);
    # the durations are the Cilium operator's leader-election-* (seconds)
    identity_gc_leader_election: bool = True
    leader_election_lease_duration: float = 15.0
    leader_election_renew_deadline: float = 10.0
    leader_election_retry_period: float = 2.0
    # test knob: the first-choice number is this many bits of the label hash
    # (16: the whole 256-65535 space); fewer force collisions (issue 20's tests)
    identity_hash_bits: int = 16
    # Kubernetes mode: translate Service ClusterIPs in each pod's namespace
    # (Cilium's kube-proxy replacement; no kube-proxy needed). Config key only.
    kube_proxy_replacement: bool = True
    # Kubernetes mode: how pods reach other nodes' pods (Cilium's --routing-mode):
    # native (a route per Node spec.podCIDR via its InternalIP) or tunnel (VXLAN)
    routing_mode: str = "native"  # --routing-mode native|tunnel (_routing)
    cni_conf_dir: str = "/etc/cni/net.d"  # --install-cni: where the conflist goes
    cni_bin_dir: str = "/opt/cni/bin"  # --install-cni: where the plugin goes
    # observability (docs/cli.md "Metrics", "Traces"): off unless set
    prometheus_serve_addr: str | None = None  # --prometheus-serve-addr HOST:PORT
    otlp_endpoint: str | None = None  # --otlp-endpoint http://HOST:PORT (OTLP/HTTP)
    otlp_l7_sample_ratio: float = 0.1  # share of L7 proxy decisions traced
    # Hubble's Observer gRPC API: None = hubble.sock beside the API socket, "" = off
    hubble_socket_path: str | None = None  # --hubble-socket-path PATH
    hubble_listen_address: str | None = None  # --hubble-listen-address HOST:PORT (TLS)
    hubble_tls_cert_file: str | None = None  # --hubble-tls-cert-file PEM
    hubble_tls_key_file: str | None = None  # --hubble-tls-key-file PEM
    hubble_tls_client_ca_files: list[str] | None = None  # --hubble-tls-client-ca-files: mTLS

    @property
    def pod_mtu(self) -> int:
        """The pods' MTU: ``mtu``, less the VXLAN overhead in tunnel routing
        (as Cilium's route MTU), so an encapsulated packet fits the link."""
        if self.k8s_mode and self.routing_mode == "tunnel":
            return self.mtu - VXLAN_OVERHEAD
        return self.mtu

    @property
    def k8s_mode(self) -> bool:
        return bool(self.k8s_kubeconfig or self.k8s_api_server)

    @property
    def state_file(self) -> str:
        return os.path.join(self.state_dir, STATE_FILE)

    def datapath_option_values(self, declared: Collection[str]) -> dict[str, Any]:
        """The options for the datapath, which declares the option names
        ``declared``: the legacy flags (``--iptables-mode``, ``--bpffs-root``,
        ``--policy-map-max``) where it declares their option, then
        ``datapath_options`` (``--datapath-opt``), which win and are checked.

        A datapath that declares no options at all (one written before they
        were declared) gets the legacy values it always got."""
        out = {opt: getattr(self, key) for key, opt in LEGACY_DATAPATH_OPTIONS.items()
               if opt in declared or not declared}
        out.update(self.datapath_options)
        return out
