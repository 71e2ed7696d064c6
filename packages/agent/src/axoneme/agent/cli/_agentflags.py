"""The flags of ``axoneme agent run`` (docs/cli.md "Node agent"); each one left
unset (None) falls back to the config file's key, then to the default
(cli/_agentconfig.build_agent_config)."""

from __future__ import annotations

import argparse


def add_socket_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-socket", dest="api_socket_sub", default=None, metavar="PATH",
                   help="agent API socket (default: $AXONEME_API_SOCKET or "
                        "/var/run/axoneme/axoneme.sock)")


def add_agent_run_flags(run: argparse.ArgumentParser) -> None:
    run.add_argument("--datapath", default=None, help="datapath plugin: ebpf (default), iptables, noop")
    run.add_argument("--iptables-mode", choices=["plain", "ipset"], default=None,
                     help="iptables datapath: one rule per peer IP (plain, default) or one ipset "
                          "per identity (ipset)")
    run.add_argument("--state-dir", default=None, help="default /var/lib/axoneme")
    add_socket_flag(run)
    run.add_argument("--policy-dir", default=None, help="load and follow policies from DIR")
    run.add_argument("--config", default=None, metavar="FILE", help="YAML/JSON agent config")
    run.add_argument("--install-cni", action="store_true", default=None,
                     help="install /etc/cni/net.d/05-axoneme.conflist and /opt/cni/bin/axoneme-cni")
    run.add_argument("--cni-conf-dir", default=None, metavar="DIR",
                     help="--install-cni: the conflist's directory (default /etc/cni/net.d)")
    run.add_argument("--cni-bin-dir", default=None, metavar="DIR",
                     help="--install-cni: the plugin's directory (default /opt/cni/bin)")
    run.add_argument("--k8s-kubeconfig", default=None, metavar="PATH",
                     help="Kubernetes mode: policies and pod labels from the API server of "
                          "this kubeconfig")
    run.add_argument("--k8s-api-server", default=None, metavar="https://HOST:PORT",
                     help="Kubernetes mode: this API server, with the service account's token "
                          "and CA (in a pod); overrides the kubeconfig's server")
    run.add_argument("--k8s-node-name", default=None, metavar="NAME",
                     help="this node's name in Kubernetes (default $NODE_NAME, else the "
                          "hostname)")
    run.add_argument("--pod-cidr", default=None, help="pod CIDR (default 10.244.0.0/16)")
    run.add_argument("--routing-mode", choices=["native", "tunnel"], default=None,
                     help="Kubernetes mode: reach other nodes' pods by a route per Node "
                          "podCIDR via its InternalIP (native, default) or through the VXLAN "
                          "device axon_vxlan, UDP 8472 (tunnel), as Cilium's --routing-mode")
    run.add_argument("--flow-buffer", type=int, default=None, help="flows kept (default 4095)")
    run.add_argument("--no-guard", action="store_true", default=None,
                     help="do not install the forwarding guard (unsafe)")
    run.add_argument("--bpffs-root", default=None, metavar="DIR",
                     help="where a BPF datapath pins its maps (default /sys/fs/bpf/axoneme)")
    run.add_argument("--policy-map-max", type=int, default=None, metavar="N",
                     help="policy entries per endpoint a map may hold (default 16384, "
                          "as Cilium's --bpf-policy-map-max)")
    run.add_argument("--policy-map-full", default=None, choices=["fail-closed", "keep-last"],
                     help="when an endpoint's new policy does not fit its policy map: drop all "
                          "its traffic in that direction until it fits (fail-closed, default) "
                          "or keep enforcing its previous policy (keep-last)")
    run.add_argument("--drop-unparseable-policies", action="store_true", default=None,
                     help="a persisted policy that no longer parses is dropped (loudly; kept in "
                          "STATE_DIR/dropped-policies.json, listed in status) instead of "
                          "refusing to start")
    run.add_argument("--tofqdns-min-ttl", type=int, default=None, metavar="SECONDS",
                     help="lower bound on DNS TTLs for toFQDNs (default 0: honour upstream TTLs)")
    run.add_argument("--dns-reject-rcode", default=None, choices=["REFUSED", "NXDOMAIN"],
                     help="answer to a DNS query denied by rules.dns (default REFUSED)")
    run.add_argument("--no-l7-proxies", action="store_true", default=None,
                     help="do not run the L7 proxies (L7 rules then fail closed)")
    run.add_argument("--datapath-opt", dest="datapath_opt", action="append", default=None,
                     metavar="KEY=VALUE",
                     help="an option the datapath declares (repeatable; `axoneme plugins` "
                          "lists them); wins over the config file's datapath_options")
    run.add_argument("--enforcement-mode", choices=["default", "always", "never"], default=None,
                     help="Cilium's policy enforcement mode: default (enforce in a direction once "
                          "a policy selects the endpoint there), always, never")
    run.add_argument("--policy-cidr-match-mode", default=None, metavar="MODE",
                     help="cluster addresses Cilium's toCIDR/toCIDRSet/fromCIDR/fromCIDRSet also "
                          "match: empty (default: non-cluster peers only, as Cilium), nodes, pods, "
                          "or nodes,pods (a NetworkPolicy ipBlock always matches both)")
    run.add_argument("--enable-host-firewall", dest="enable_host_firewall", action="store_true",
                     default=None,
                     help="enforce host policies (CCNP nodeSelector) on this node's own "
                          "network namespace (Cilium's flag; off by default; refused in the "
                          "machine's initial network namespace)")
    run.add_argument("--node-labels", default=None, metavar="K=V,...",
                     help="standalone mode: this node's labels, which host policies' "
                          "nodeSelector selects on (Kubernetes mode: the Node object's)")
    run.add_argument("--devices", default=None, metavar="DEV,...",
                     help="host firewall: the node's external interfaces to enforce on "
                          "(default: every interface up but lo, pod veths and axon_vxlan)")
    run.add_argument("--cluster-name", default=None,
                     help="cluster name in identities' io.cilium.k8s.policy.cluster label "
                          "(default 'default')")
    run.add_argument("--prometheus-serve-addr", default=None, metavar="HOST:PORT",
                     help="serve Prometheus metrics on HOST:PORT/metrics (Cilium's flag; :PORT "
                          "for every address; off by default), e.g. 127.0.0.1:9962")
    run.add_argument("--hubble-socket-path", default=None, metavar="PATH",
                     help="serve Hubble's Observer gRPC API (hubble observe --server "
                          "unix://PATH) here; default: hubble.sock beside the API socket; "
                          "'' turns it off")
    run.add_argument("--hubble-listen-address", default=None, metavar="HOST:PORT",
                     help="also serve Hubble's API over TCP with TLS (Cilium's flag; :PORT for "
                          "every address), e.g. 127.0.0.1:4244; needs --hubble-tls-cert-file "
                          "and --hubble-tls-key-file")
    run.add_argument("--hubble-tls-cert-file", default=None, metavar="PEM",
                     help="the server certificate (chain) for --hubble-listen-address")
    run.add_argument("--hubble-tls-key-file", default=None, metavar="PEM",
                     help="the server certificate's private key")
    run.add_argument("--hubble-tls-client-ca-files", action="append", default=None,
                     metavar="PEM", help="require client certificates signed by this CA "
                                         "(mutual TLS); repeatable")
    run.add_argument("--otlp-endpoint", default=None, metavar="URL",
                     help="export OpenTelemetry traces (policy regeneration, CNI, Kubernetes "
                          "events, sampled L7 decisions) to this OTLP/HTTP receiver, e.g. "
                          "http://127.0.0.1:4318 (off by default)")
