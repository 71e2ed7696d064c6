"""``axoneme policy trace`` and ``axoneme policy matrix``: offline, no agent, no root."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from axoneme.agent.cli import EXIT_OK, EXIT_RUNTIME, add_output_flag
from axoneme.core.cluster import Cluster
from axoneme.core.errors import PolicyError
from axoneme.core.mapstate import Direction, Protocol
from axoneme.core.policy.engine import EngineOptions
from axoneme.core.policy.parse import parse_policies
from axoneme.core.policy.services import ServiceCatalog
from axoneme.core.policy.trace import (
    ALLOWED,
    DENIED,
    OfflineCluster,
    Peer,
    PortSpec,
    Probe,
    SideResult,
    TraceInputError,
    TraceResult,
    matrix,
    parse_icmp_type,
    parse_port,
    resolve_peer,
    trace,
)
from axoneme.core.yamlsafe import excerpt


def register(groups: dict[str, argparse._SubParsersAction]) -> None:  # type: ignore[type-arg]
    policy = groups["policy"]
    t = policy.add_parser("trace", help="offline verdict for one flow, with the deciding rules")
    _common(t)
    t.add_argument("--from", dest="src", required=True, metavar="SRC",
                   help="ns/pod, an IP address, or entity:world / entity:host")
    t.add_argument("--to", dest="dst", required=True, metavar="DST", help="like --from")
    t.add_argument("--node-labels", default=None, metavar="K=V,...",
                   help="entity:host is a node with these labels: host policies (CCNP "
                        "nodeSelector) that select it decide its side, as the agent's host "
                        "firewall (without it they are not evaluated)")
    t.add_argument("--port", default=None, metavar="PORT[/PROTO]",
                   help="destination port (number or named port), protocol TCP (default), UDP or SCTP")
    t.add_argument("--icmp-type", default=None, metavar="T", help="ICMP type (number or name) instead of --port")
    t.add_argument("--icmp-family", default="IPv4", metavar="F", help="IPv4 (default) or IPv6")
    t.add_argument("--http-method", default=None, metavar="M",
                   help="HTTP request method for L7 rules (shorthand of --l7 method=M)")
    t.add_argument("--http-path", default=None, metavar="P",
                   help="HTTP request path, normalised as the HTTP proxy does")
    t.add_argument("--http-host", default=None, metavar="H", help="HTTP Host header")
    t.add_argument("--http-header", dest="http_headers", action="append", default=None,
                   metavar="'K: V'", help="an HTTP request header (repeatable)")
    t.add_argument("--kafka-role", default=None, metavar="R", help="Kafka role: produce or consume")
    t.add_argument("--kafka-topic", default=None, metavar="T", help="Kafka topic")
    t.add_argument("--kafka-api-key", default=None, metavar="K",
                   help="Kafka API key (a name such as produce, fetch, or a number)")
    t.add_argument("--kafka-api-version", default=None, metavar="V", help="Kafka API version")
    t.add_argument("--kafka-client-id", default=None, metavar="ID", help="Kafka client id")
    t.add_argument("--l7", dest="l7", action="append", default=[], metavar="KEY=VALUE",
                   help="an L7 request field for the parser that decides (repeatable; e.g. "
                        "verb=GET, method=GET, path=/x, role=produce, topic=t, query=a.example.com)")
    t.add_argument("--dns-answer", dest="dns_answers", action="append", default=[],
                   metavar="NAME=IP[,IP...]",
                   help="a DNS answer the node has seen, for toFQDNs rules (repeatable)")
    add_output_flag(t)
    t.add_argument("--exit-code", action="store_true",
                   help="exit 1 when the verdict is DENIED (0 otherwise; 2 stays bad input)")
    t.set_defaults(handler=run_trace)

    m = policy.add_parser("matrix", help="offline truth table of every pod to every pod")
    _common(m)
    m.add_argument("--port", dest="ports", action="append", required=True, metavar="PORT[/PROTO]",
                   help="port to probe (repeatable; a number or a named port)")
    add_output_flag(m)
    m.set_defaults(handler=run_matrix)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", dest="cluster", action="append", required=True, metavar="PATH",
                   help="cluster description: v1 Namespace and v1 Pod objects (file or directory); "
                        "v1 Service and discovery.k8s.io/v1 EndpointSlice objects resolve toServices")
    p.add_argument("-f", "--filename", dest="files", action="extend", nargs="+", default=[],
                   metavar="PATH", help="policy file or directory (repeatable)")
    p.add_argument("--policy-cidr-match-mode", default="", metavar="MODE",
                   help="as `agent run --policy-cidr-match-mode`: cluster addresses Cilium's CIDR "
                        "fields also match (empty, nodes, pods, nodes,pods)")


def _load(args: argparse.Namespace) -> OfflineCluster:
    try:
        options = EngineOptions(cidr_match_mode=args.policy_cidr_match_mode)
    except PolicyError as e:
        raise TraceInputError(f"{e} (--policy-cidr-match-mode)") from None
    cluster = Cluster.load(args.cluster)
    # Services in the cluster description are a Service source: toServices resolves
    catalog = ServiceCatalog.load(args.cluster)
    policies = parse_policies(args.files, services=catalog.has_services) if args.files else []
    node_labels = None
    if getattr(args, "node_labels", None) is not None:
        from axoneme.agent._hostfw import parse_node_labels

        node_labels = parse_node_labels(args.node_labels)
    return OfflineCluster.build(cluster, policies, options, catalog.services(), node_labels)


_L7_FLAGS = ("http_method", "http_path", "http_host", "http_headers", "kafka_role", "kafka_topic",
             "kafka_api_key", "kafka_api_version", "kafka_client_id")


def run_trace(args: argparse.Namespace) -> int:
    if (args.port is None) == (args.icmp_type is None):
        raise TraceInputError("give exactly one of --port and --icmp-type (--port)")
    if args.icmp_type is not None:
        number = parse_icmp_type(args.icmp_type, args.icmp_family)
        spec: PortSpec | None = None
        protocol = Protocol.ICMPV6 if args.icmp_family.lower() == "ipv6" else Protocol.ICMP
    else:
        spec = parse_port(args.port)
    version = args.kafka_api_version
    if version is not None and not (version.isascii() and version.isdigit() and len(version) <= 5):
        # int() would refuse '²' (isdigit) or take long to refuse 5000 digits
        raise TraceInputError(f"bad Kafka API version {excerpt(version)!r}: a number 0-32767 "
                              f"(--kafka-api-version)")
    answers = parse_dns_answers(args.dns_answers)
    env = _load(args)
    if answers:
        env.learn_dns(answers)  # before the peers: an IP's identity depends on it
    src = resolve_peer(env, args.src, "--from")
    dst = resolve_peer(env, args.dst, "--to")
    if spec is not None:
        target = spec.resolve(env.cluster.pods.get(dst.name))
        if target is None:
            raise TraceInputError(f"{dst.name} has no port named {spec.name!r} (--port)")
        protocol, number = target
    request = parse_l7_inputs(args.l7)
    request.update({k: getattr(args, k) for k in _L7_FLAGS if getattr(args, k) is not None})
    result = trace(env, src, dst, protocol, number, request or None)
    if args.output == "json":
        json.dump(trace_json(env, result), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(_render_trace(result))
    if args.exit_code and result.verdict == DENIED:
        return EXIT_RUNTIME
    return EXIT_OK


def _rule_refs(env: OfflineCluster) -> dict[str, dict[str, Any]]:
    """Each rule's text as trace shows it (``Kind ns/name path``) -> its structured reference."""
    out: dict[str, dict[str, Any]] = {}
    for pol in env.engine.policies():
        for rule in pol.rules:
            for pr in rule.rules:
                out[f"{rule.ref} {pr.path}"] = {
                    "kind": rule.ref.kind.value, "namespace": rule.ref.namespace,
                    "name": rule.ref.name, "path": pr.path, "deny": pr.deny}
    return out


def _peer_json(peer: Peer) -> dict[str, Any]:
    ep = peer.endpoint
    return {"name": peer.name, "identity": peer.identity, "address": peer.address,
            "pod": f"{ep.namespace}/{ep.pod_name}" if ep is not None else None,
            "labels": ep.labels.sorted_strings() if ep is not None else []}


def _default_deny_by(env: OfflineCluster, peer: Peer, direction: Direction) -> list[dict[str, str]]:
    """The policies that put ``peer``'s pod in default deny in ``direction`` (they select it
    and enable enforcement there)."""
    if peer.endpoint is None:
        return []
    refs = {(r.ref.kind.value, r.ref.namespace, r.ref.name)
            for r in env.engine.selecting_rules(peer.endpoint.id) if r.enforces(direction)}
    return [{"kind": k, "namespace": ns, "name": n} for k, ns, n in sorted(refs)]


def trace_json(env: OfflineCluster, r: TraceResult) -> dict[str, Any]:
    """``policy trace -o json``: the documented shape (verdict, egress, ingress, l7) plus
    everything the table shows: source/destination (name, identity, address, labels),
    port/protocol, each side's reason, structured rule references, and for a default deny
    the policies that enabled it."""
    refs = _rule_refs(env)
    out = r.to_json()
    out["source"] = _peer_json(r.source)
    out["destination"] = _peer_json(r.destination)
    icmp = r.protocol in (Protocol.ICMP, Protocol.ICMPV6)
    out["protocol"] = str(r.protocol)
    out["port"] = None if icmp else r.port
    out["icmp_type"] = r.port if icmp else None
    for name, side, peer, direction in (("egress", r.egress, r.source, Direction.EGRESS),
                                        ("ingress", r.ingress, r.destination, Direction.INGRESS)):
        out[name]["reason"] = side.reason
        out[name]["rule_refs"] = [refs.get(text, {"text": text}) for text in side.rules]
        out[name]["default_deny_by"] = (_default_deny_by(env, peer, direction)
                                        if side.verdict == DENIED and not side.rules else [])
    if r.l7 is not None and out["l7"] is not None:
        out["l7"]["reason"] = r.l7.reason
    return out


def parse_l7_inputs(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items -> {key: value}; a repeated key gives a list of its values."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not key.replace("_", "").replace("-", "").isalnum():
            raise TraceInputError(f"invalid L7 input {excerpt(item)!r}: expected KEY=VALUE (--l7)")
        if key in out:
            prev = out[key]
            out[key] = [*prev, value] if isinstance(prev, list) else [prev, value]
        else:
            out[key] = value
    return out


def parse_dns_answers(items: list[str]) -> dict[str, set[str]]:
    """``name=IP[,IP...]`` items -> name -> IPs (TraceInputError naming a bad one)."""
    import ipaddress

    out: dict[str, set[str]] = {}
    for item in items:
        name, sep, ips = item.partition("=")
        name = name.strip().lower().rstrip(".")
        if not sep or not name or not ips.strip():
            raise TraceInputError(f"invalid DNS answer {item!r}: expected NAME=IP[,IP...] "
                                  f"(--dns-answer)")
        for ip in ips.split(","):
            try:
                addr = ipaddress.ip_address(ip.strip())
            except ValueError:
                raise TraceInputError(f"invalid IP {ip.strip()!r} in DNS answer {item!r} "
                                      f"(--dns-answer)") from None
            out.setdefault(name, set()).add(str(addr))
    return out


def _render_side(title: str, side: SideResult) -> list[str]:
    lines = [f"{title}: {side.verdict}"]
    if side.rules:
        lines.append(f"  {side.reason}:")
        lines.extend(f"    {r}" for r in side.rules)
    elif side.reason:
        lines.append(f"  {side.reason}")
    if side.audited_by:
        lines.append("  audit: would be DENIED by (staged):")
        lines.extend(f"    {r}" for r in side.audited_by)
    return lines


def _render_trace(r: TraceResult) -> str:
    if r.protocol in (Protocol.ICMP, Protocol.ICMPV6):
        what = f"{r.protocol} type {r.port}"
    else:
        what = f"{r.port}/{r.protocol}"
    lines = [f"{r.source.name} (identity {r.source.identity}) -> {r.destination.name} "
             f"(identity {r.destination.identity}) {what}"]
    lines += _render_side(f"egress from {r.source.name}", r.egress)
    lines += _render_side(f"ingress to {r.destination.name}", r.ingress)
    if r.l7 is not None:
        lines.append(f"L7: {r.l7.verdict}")
        if r.l7.reason:
            lines.append(f"  {r.l7.reason}")
        for rule in r.l7.rules:
            body = " ".join(f"{k}={v}" for k, v in rule.items() if k != "parser")
            lines.append(f"    {rule['parser']}: {body or '(any request)'}")
    audit = f" (audit: would be DENIED by {', '.join(r.audited_by)})" if r.audited_by else ""
    lines.append(f"verdict: {r.verdict.upper()}{audit}")
    return "\n".join(lines) + "\n"


def run_matrix(args: argparse.Namespace) -> int:
    specs = [parse_port(p) for p in args.ports]
    env = _load(args)
    probes = matrix(env, specs)
    if args.output == "json":
        json.dump({"probes": [p.to_json() for p in probes]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(_render_matrix(sorted(env.endpoints), specs, probes))
    return EXIT_OK


def _render_matrix(pods: Sequence[str], specs: Sequence[PortSpec], probes: Sequence[Probe]) -> str:
    """One truth table per port, like the Kubernetes netpol e2e suite prints."""
    out: list[str] = []
    for spec in specs:
        cells: dict[tuple[str, str], str] = {
            (p.src, p.dst): ("A" if p.audited_by else ".") if p.verdict == ALLOWED else "X"
            for p in probes if p.spec == spec}
        allowed = sum(1 for v in cells.values() if v in ".A")
        audited = ", 'A' allowed but a staged policy would deny" if "A" in cells.values() else ""
        out.append(f"Port {spec}: {allowed} of {len(cells)} allowed ('.' allowed{audited}, 'X' denied"
                   + (", '-' no such named port)" if spec.name else ")"))
        width = max(len(p) for p in pods) if pods else 1
        out.append("\t".join(["-".ljust(width), *pods]))
        for s in pods:
            row = [cells.get((s, d), "-") for d in pods]
            out.append("\t".join([s.ljust(width), *row]))
        out.append("")
    return "\n".join(out)
