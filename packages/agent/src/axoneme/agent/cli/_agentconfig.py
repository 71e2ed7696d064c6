"""``agent run`` configuration: the config file (``--config``), the flags
over it, and the datapath options (``--datapath-opt``, ``datapath_options``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from axoneme.agent._config import AgentConfig
from axoneme.agent._hostfw import host_firewall_here, parse_devices, parse_node_labels
from axoneme.agent._tracing import traces_url
from axoneme.agent.cli import UsageError
from axoneme.agent.client import resolve_socket
from axoneme.core import yamlsafe
from axoneme.core.errors import ConfigError, PolicyError
from axoneme.core.plugins import parse_allow_list
from axoneme.core.policy.engine import parse_cidr_match_mode

_CONFIG_KEYS = ("datapath", "iptables_mode", "state_dir", "api_socket", "policy_dir",
                "install_cni", "pod_cidr", "flow_buffer", "guard", "enforcement_mode",
                "allow_localhost", "cluster_name", "cni_bin", "dns_server", "mtu",
                "l7_proxies", "l7_http_engine", "bpffs_root", "datapath_options", "tofqdns_min_ttl",
                "dns_reject_rcode", "policy_map_max", "flow_injection",
                "policy_map_full", "drop_unparseable_policies", "plugins", "policy_audit_mode",
                "prometheus_serve_addr", "otlp_endpoint", "otlp_l7_sample_ratio",
                "k8s_kubeconfig", "k8s_api_server", "k8s_node_name", "k8s_pod_wait",
                "identity_allocation_mode", "identity_gc_interval", "identity_heartbeat_timeout",
                "identity_node_gc_grace", "identity_hash_bits", "identity_gc_leader_election",
                "leader_election_lease_duration", "leader_election_renew_deadline",
                "leader_election_retry_period",
                "cni_conf_dir", "cni_bin_dir", "policy_cidr_match_mode",
                "kube_proxy_replacement", "routing_mode", "hubble_socket_path", "hubble_listen_address",
                "hubble_tls_cert_file", "hubble_tls_key_file", "hubble_tls_client_ca_files",
                "host_firewall", "node_labels", "devices", "host_firewall_nodes")


def load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config: {e} ({path})") from e
    try:
        # the hardened loader: a hostile config must not crash the agent
        data = yamlsafe.load_one(text, path) or {}
    except yamlsafe.InputError as e:
        raise ConfigError(f"{e.message} ({path})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping ({path})")
    out: dict[str, Any] = {}
    for key, value in data.items():
        k = str(key).replace("-", "_")
        if k not in _CONFIG_KEYS:
            raise ConfigError(f"unknown config key {yamlsafe.excerpt(key)!r} ({path})")
        _check_type(k, value, path)
        out[k] = value
    if "plugins" in out:
        out["plugins"] = parse_allow_list(out["plugins"], path)
    return out


_SCALARS = {"str": (str,), "int": (int,), "bool": (bool,), "float": (int, float)}
_KINDS = {str: "a string", int: "an integer", bool: "true or false", type(None): "null",
          float: "a number"}


def _check_type(key: str, value: Any, path: str) -> None:
    """A scalar config key holds the kind of value its AgentConfig field
    declares (``flow_buffer: "x"`` is refused here, naming the key, not met
    later as a TypeError). Mappings and lists are checked where they are read."""
    annotation = str(_FIELD_TYPES.get(key, ""))
    kinds: tuple[type, ...] = ()
    for part in annotation.split("|"):
        part = part.strip()
        if part == "None":
            kinds += (type(None),)
        elif part in _SCALARS:
            kinds += _SCALARS[part]
        else:
            return  # dict/list fields
    if not kinds:
        return
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok:
        want = " or ".join(_KINDS[k] for k in kinds if not (k is int and float in kinds))
        raise ConfigError(f"config key {key}: expected {want}, got {type(value).__name__} "
                          f"{yamlsafe.excerpt(repr(value))} ({path})")


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(AgentConfig)}


def build_agent_config(args: argparse.Namespace) -> Any:
    conf = load_config(args.config)
    flags = {
        "datapath": args.datapath, "iptables_mode": args.iptables_mode,
        "state_dir": args.state_dir, "api_socket": args.api_socket_sub or args.api_socket,
        "policy_dir": args.policy_dir, "install_cni": args.install_cni,
        "pod_cidr": args.pod_cidr, "flow_buffer": args.flow_buffer,
        "enforcement_mode": args.enforcement_mode, "cluster_name": args.cluster_name,
        "bpffs_root": args.bpffs_root, "policy_map_max": args.policy_map_max,
        "tofqdns_min_ttl": args.tofqdns_min_ttl, "dns_reject_rcode": args.dns_reject_rcode,
        "policy_map_full": args.policy_map_full,
        "policy_audit_mode": getattr(args, "policy_audit_mode", None),
        "drop_unparseable_policies": args.drop_unparseable_policies,
        "k8s_kubeconfig": args.k8s_kubeconfig, "k8s_api_server": args.k8s_api_server,
        "k8s_node_name": args.k8s_node_name, "cni_conf_dir": args.cni_conf_dir,
        "cni_bin_dir": args.cni_bin_dir,
        "policy_cidr_match_mode": getattr(args, "policy_cidr_match_mode", None),
        "routing_mode": getattr(args, "routing_mode", None),
        "prometheus_serve_addr": getattr(args, "prometheus_serve_addr", None),
        "otlp_endpoint": getattr(args, "otlp_endpoint", None),
        "hubble_socket_path": getattr(args, "hubble_socket_path", None),
        "hubble_listen_address": getattr(args, "hubble_listen_address", None),
        "hubble_tls_cert_file": getattr(args, "hubble_tls_cert_file", None),
        "hubble_tls_key_file": getattr(args, "hubble_tls_key_file", None),
        "hubble_tls_client_ca_files": getattr(args, "hubble_tls_client_ca_files", None),
        "host_firewall": getattr(args, "enable_host_firewall", None),
    }
    if args.no_guard:
        flags["guard"] = False
    if args.no_l7_proxies:
        flags["l7_proxies"] = False
    conf.update({k: v for k, v in flags.items() if v is not None})
    conf["api_socket"] = resolve_socket(conf.get("api_socket"))
    conf["datapath_options"] = _datapath_options(conf.get("datapath_options"),
                                                 getattr(args, "datapath_opt", None))
    conf["node_labels"] = parse_node_labels(
        getattr(args, "node_labels", None) or conf.get("node_labels"),
        "--node-labels" if getattr(args, "node_labels", None) else "config key node_labels")
    conf["devices"] = parse_devices(
        getattr(args, "devices", None) or conf.get("devices"),
        "--devices" if getattr(args, "devices", None) else "config key devices")
    cfg = AgentConfig(**conf)
    host_firewall_here(cfg, args.config)
    if cfg.flow_buffer < 1:
        raise UsageError(f"--flow-buffer must be positive, got {cfg.flow_buffer}")
    if not isinstance(cfg.policy_map_max, int) or cfg.policy_map_max < 1:
        raise UsageError(f"--policy-map-max must be a positive integer, got {cfg.policy_map_max!r}")
    if cfg.policy_map_full not in ("fail-closed", "keep-last"):
        raise UsageError(f"--policy-map-full must be fail-closed or keep-last, "
                         f"got {cfg.policy_map_full!r}")
    try:
        parse_cidr_match_mode(cfg.policy_cidr_match_mode)
    except PolicyError as e:
        raise UsageError(f"--policy-cidr-match-mode: {e}") from None
    if cfg.routing_mode not in ("native", "tunnel"):
        raise UsageError(f"routing_mode must be native or tunnel, got {cfg.routing_mode!r}")
    check_l7_http_engine(cfg, args.config)
    if cfg.k8s_pod_wait < 0:
        raise UsageError(f"k8s_pod_wait must be 0 or more seconds, got {cfg.k8s_pod_wait!r}")
    check_identity_config(cfg, args.config)
    check_observability(cfg)
    if cfg.k8s_kubeconfig:
        cfg.k8s_kubeconfig = os.path.abspath(cfg.k8s_kubeconfig)
    cfg.state_dir = os.path.abspath(cfg.state_dir)
    cfg.api_socket = os.path.abspath(cfg.api_socket)
    if cfg.policy_dir:
        cfg.policy_dir = os.path.abspath(cfg.policy_dir)
    if cfg.hubble_socket_path:
        cfg.hubble_socket_path = os.path.abspath(cfg.hubble_socket_path)
    check_hubble(cfg)
    return cfg


def check_l7_http_engine(cfg: AgentConfig, path: str | None) -> None:
    """l7_http_engine: auto | native | python; native needs axoneme-l7-http
    (ConfigError naming the key and the file, exit 2)."""
    where = f" ({path})" if path else ""
    if cfg.l7_http_engine not in ("auto", "native", "python"):
        raise ConfigError(f"l7_http_engine must be auto, native or python, got "
                          f"{cfg.l7_http_engine!r}{where}")
    if cfg.l7_http_engine == "native" and cfg.l7_proxies:
        from axoneme.core.errors import PluginError
        from axoneme.core.plugins import l7_parser

        try:
            l7_parser("http").proxy_factory_for("native")
        except (PluginError, AttributeError):
            raise ConfigError(f"l7_http_engine: native, but the http L7 parser with a native "
                              f"engine (axoneme-l7-http) is not installed{where}") from None
        except FileNotFoundError as e:
            raise ConfigError(f"{e}{where}") from None


def check_identity_config(cfg: AgentConfig, path: str | None) -> None:
    """identity_allocation_mode, identity_gc_interval, identity_heartbeat_timeout,
    identity_node_gc_grace, identity_hash_bits, leader_election_* (config keys
    only: ConfigError naming the key and the file, exit 2)."""
    where = f" ({path})" if path else ""
    if cfg.identity_allocation_mode not in ("crd", "local"):
        raise ConfigError(f"config key identity_allocation_mode: expected crd or local, got "
                          f"{yamlsafe.excerpt(repr(cfg.identity_allocation_mode))}{where}")
    for key in ("identity_gc_interval", "identity_heartbeat_timeout", "identity_node_gc_grace"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config key {key}: expected 0 or more seconds, got "
                              f"{getattr(cfg, key)!r}{where}")
    check_leader_election(cfg, where)
    bits = cfg.identity_hash_bits
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ConfigError(f"config key identity_hash_bits: expected an integer 1-16, got "
                          f"{yamlsafe.excerpt(repr(bits))}{where}")


def check_leader_election(cfg: AgentConfig, where: str) -> None:
    """client-go's NewLeaderElector checks: every duration positive, the lease
    longer than the renew deadline, the deadline longer than 1.2 retry periods
    (its jitter), so a holder stops before its Lease can expire."""
    lease, renew, retry = (cfg.leader_election_lease_duration, cfg.leader_election_renew_deadline,
                           cfg.leader_election_retry_period)
    for key, value in (("leader_election_lease_duration", lease),
                       ("leader_election_renew_deadline", renew),
                       ("leader_election_retry_period", retry)):
        if not value > 0:
            raise ConfigError(f"config key {key}: expected more than 0 seconds, got {value!r}{where}")
    if lease != int(lease):
        raise ConfigError(f"config key leader_election_lease_duration: expected whole seconds "
                          f"(the Lease's leaseDurationSeconds), got {lease!r}{where}")
    if not lease > renew:
        raise ConfigError(f"config key leader_election_renew_deadline: expected less than "
                          f"leader_election_lease_duration ({lease:g}), got {renew!r}{where}")
    if not renew > 1.2 * retry:
        raise ConfigError(f"config key leader_election_retry_period: expected less than "
                          f"leader_election_renew_deadline / 1.2 ({renew / 1.2:g}), got "
                          f"{retry!r}{where}")


def check_hubble(cfg: AgentConfig) -> None:
    """--hubble-listen-address and its TLS files (UsageError, exit 2)."""
    from axoneme.agent._hubble import tls_listen

    try:
        tls_listen(cfg)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def check_observability(cfg: AgentConfig) -> None:
    """--prometheus-serve-addr and --otlp-endpoint are well formed (UsageError, exit 2)."""
    try:
        if cfg.prometheus_serve_addr:
            from axoneme.agent._prometheus import parse_serve_addr  # the agent extra's

            parse_serve_addr(cfg.prometheus_serve_addr)
        if cfg.otlp_endpoint:
            traces_url(cfg.otlp_endpoint)
    except ConfigError as e:
        raise UsageError(str(e)) from None
    if not 0.0 <= cfg.otlp_l7_sample_ratio <= 1.0:
        raise UsageError(f"otlp_l7_sample_ratio must be between 0 and 1, "
                         f"got {cfg.otlp_l7_sample_ratio!r}")


def _datapath_options(conf: Any, flags: Sequence[str] | None) -> dict[str, Any]:
    """The config file's ``datapath_options`` mapping, then ``--datapath-opt
    KEY=VALUE`` flags (the datapath checks names and values when it is built)."""
    if conf is None:
        conf = {}
    if not isinstance(conf, dict):
        raise ConfigError(f"datapath_options must be a mapping of option names to values, "
                          f"got {type(conf).__name__}")
    out = {str(k).replace("-", "_"): v for k, v in conf.items()}
    for item in flags or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--datapath-opt expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = value
    return out
