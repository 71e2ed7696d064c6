"""Observed flows as the what-if tools read them (``policy diff``, ``policy recommend``).

The input is Hubble-shaped flow JSON, as ``axoneme observe -o json`` prints it
(one object per line) or the agent's ``GET /v1/flows`` answers: only the
fields the tools need are read, and a record they cannot use (an L7 record
without a connection, a drop that no policy made, a reply) is kept out of the
connections with the reason counted, never guessed at.

A *connection* is what one non-reply L3/L4 verdict says: source, destination,
protocol and destination port (ICMP: the type), and whether it was let
through. The egress and ingress verdicts of one connection collapse into one
``Connection`` with a count. A *request* is an L7 proxy's record of one HTTP,
Kafka or DNS request (``Request``): its fields are ``policy trace``'s L7
inputs, so a candidate's L7 rules can decide it.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from axoneme.core.errors import PolicyError
from axoneme.core.mapstate import Protocol

__all__ = ["Connection", "FlowInputError", "Observed", "PeerInfo", "Request", "load_flow_lines",
           "observe"]

# Verdicts of traffic that went through (AUDIT: a staged policy would have
# dropped it, but nothing did).
PASSED = frozenset({"FORWARDED", "REDIRECTED", "AUDIT"})
# Drops a policy made (others, e.g. a full CT map, say nothing about policy).
POLICY_DROPS = frozenset({"POLICY_DENIED", "POLICY_DENY", "133", "181"})
_L4_NAMES = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP,
             "ICMPv4": Protocol.ICMP, "ICMPv6": Protocol.ICMPV6}


class FlowInputError(PolicyError):
    """A flow file that cannot be read (exit 2)."""


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """One side of a flow: a pod (``ns/name``) or an address, with what the flow knew."""

    ip: str
    pod: str = ""  # ns/name, "" when not a pod
    namespace: str = ""
    identity: int = 0
    labels: tuple[str, ...] = ()  # source:key=value, as flows carry them

    @property
    def name(self) -> str:
        return self.pod or self.ip

    def k8s_labels(self) -> dict[str, str]:
        """The pod's own labels (``k8s:`` source), identity bookkeeping labels included."""
        out: dict[str, str] = {}
        for text in self.labels:
            source, sep, rest = text.partition(":")
            if not sep or source != "k8s":
                continue
            key, _, value = rest.partition("=")
            out[key] = value
        return out


@dataclass(frozen=True, slots=True)
class Connection:
    """A non-reply L3/L4 verdict: who talked to whom on what, and whether it passed."""

    source: PeerInfo
    destination: PeerInfo
    protocol: Protocol
    port: int  # destination port; ICMP type
    passed: bool
    verdict: str  # the observed verdict (FORWARDED, DROPPED, ...)
    count: int = 1
    last_seen: float = 0.0

    @property
    def key(self) -> tuple[str, str, Protocol, int, bool]:
        return (self.source.name, self.destination.name, self.protocol, self.port, self.passed)

    def what(self) -> str:
        if self.protocol in (Protocol.ICMP, Protocol.ICMPV6):
            return f"{self.protocol} type {self.port}"
        return f"{self.port}/{self.protocol}"


@dataclass(frozen=True, slots=True)
class Request:
    """An L7 request the agent's proxy decided (HTTP, Kafka, DNS): what ``policy trace``
    takes as ``--l7`` inputs, and whether it passed."""

    source: PeerInfo
    destination: PeerInfo
    protocol: Protocol
    port: int
    parser: str  # http | kafka | dns
    fields: tuple[tuple[str, Any], ...]  # trace inputs; a list value for a repeated key
    passed: bool
    verdict: str
    count: int = 1
    last_seen: float = 0.0

    @property
    def key(self) -> tuple[Any, ...]:
        return (self.source.name, self.destination.name, self.protocol, self.port, self.parser,
                self.fields, self.passed)

    def what(self) -> str:
        shown = " ".join(f"{k}={v}" for k, v in self.fields if k != "header")
        return f"{self.port}/{self.protocol} {self.parser} {shown}"


@dataclass
class Observed:
    """The connections of a flow set, DNS answers seen, and what was left out and why."""

    connections: list[Connection] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    # name -> IPs, from DNS responses (the proxy's l7.dns.ips) and Hubble's destination_names
    dns: dict[str, set[str]] = field(default_factory=dict)
    # client pod -> IP -> names it resolved (egress to FQDNs is per client)
    names_by_client: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    # clients whose DNS went through the DNS proxy (their toFQDNs need a DNS rule)
    dns_proxied: set[str] = field(default_factory=set)
    skipped: dict[str, int] = field(default_factory=dict)
    records: int = 0

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def names_for(self, client: str, ip: str) -> set[str]:
        return set(self.names_by_client.get(client, {}).get(ip, set()))


def flow_time(value: Any) -> float:
    """A flow's ``time`` (epoch seconds, or RFC 3339 with any fraction digits) ->
    epoch seconds; 0.0 when absent or unreadable."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value:
        try:
            return _dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return 0.0


def _peer(side: Any, ip: str) -> PeerInfo:
    d = side if isinstance(side, Mapping) else {}
    ns = str(d.get("namespace") or "")
    name = str(d.get("pod_name") or "")
    labels = d.get("labels") or ()
    try:
        identity = int(d.get("identity") or 0)
    except (TypeError, ValueError):
        identity = 0
    return PeerInfo(ip=ip, pod=f"{ns}/{name}" if name else "", namespace=ns, identity=identity,
                    labels=tuple(str(x) for x in labels) if isinstance(labels, (list, tuple)) else ())


def _canonical_ip(value: Any) -> str | None:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        return None


def _l4(l4: Any) -> tuple[Protocol, int] | None:
    if not isinstance(l4, Mapping):
        return None
    for name, proto in _L4_NAMES.items():
        rec = l4.get(name)
        if not isinstance(rec, Mapping):
            continue
        value = rec.get("type") if proto in (Protocol.ICMP, Protocol.ICMPV6) else rec.get("destination_port")
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535:
            return proto, value
        return None
    return None


def _drop_name(d: Mapping[str, Any]) -> str:
    return str(d.get("drop_reason_desc") or d.get("drop_reason") or "")


def _is_l7(d: Mapping[str, Any]) -> bool:
    return d.get("Type") == "L7" or (isinstance(d.get("l7"), Mapping) and bool(d.get("l7")))


def observe(flows: Iterable[Mapping[str, Any]], since: float | None = None) -> Observed:
    """Connections (merged, counted) and DNS answers of ``flows``; ``since``: epoch seconds."""
    out = Observed()
    merged: dict[tuple[str, str, Protocol, int, bool], Connection] = {}
    requests: dict[tuple[Any, ...], Request] = {}
    for d in flows:
        out.records += 1
        if "flow" in d and isinstance(d["flow"], Mapping):  # observe -o jsonpb
            d = d["flow"]
        when = flow_time(d.get("time"))
        if since is not None and when and when < since:
            out.skip("older than --since")
            continue
        if _is_l7(d):
            _learn_dns(out, d)
            request = _request(d, when)
            if request is None:
                out.skip("L7 record without a request to decide (a response, or unknown)")
                continue
            prev_r = requests.get(request.key)
            requests[request.key] = request if prev_r is None else Request(
                prev_r.source, prev_r.destination, prev_r.protocol, prev_r.port, prev_r.parser,
                prev_r.fields, prev_r.passed, prev_r.verdict, prev_r.count + 1,
                max(prev_r.last_seen, when))
            continue
        if d.get("is_reply") is True:
            out.skip("reply")
            continue
        ip_rec = d.get("IP")
        ip: Mapping[str, Any] = ip_rec if isinstance(ip_rec, Mapping) else {}
        src_ip, dst_ip = _canonical_ip(ip.get("source")), _canonical_ip(ip.get("destination"))
        l4 = _l4(d.get("l4"))
        if src_ip is None or dst_ip is None or l4 is None:
            out.skip("no addresses or ports")
            continue
        verdict = str(d.get("verdict") or "").upper()
        if verdict in PASSED:
            passed = True
        elif verdict == "DROPPED" and _drop_name(d) in POLICY_DROPS:
            passed = False
        else:
            out.skip("not a policy verdict")
            continue
        src, dst = _peer(d.get("source"), src_ip), _peer(d.get("destination"), dst_ip)
        names = d.get("destination_names")
        if isinstance(names, list) and src.pod:
            for n in names:
                _remember(out, src.pod, str(n), [dst_ip])
        conn = Connection(src, dst, l4[0], l4[1], passed, verdict, 1, when)
        prev = merged.get(conn.key)
        if prev is None:
            merged[conn.key] = conn
        else:
            merged[conn.key] = Connection(prev.source, prev.destination, prev.protocol, prev.port,
                                          passed, prev.verdict, prev.count + 1,
                                          max(prev.last_seen, when))
    out.requests = sorted(requests.values(), key=lambda r: (r.source.name, r.destination.name,
                                                             int(r.protocol), r.port, repr(r.fields)))
    out.connections = sorted(merged.values(), key=lambda c: (c.source.name, c.destination.name,
                                                              int(c.protocol), c.port, c.passed))
    return out


def _l7_fields(l7: Mapping[str, Any]) -> tuple[str, tuple[tuple[str, Any], ...]] | None:
    """(parser, trace inputs) of an L7 request record; None when it names no request."""
    http, kafka, dns = l7.get("http"), l7.get("kafka"), l7.get("dns")
    if isinstance(http, Mapping) and http.get("method"):
        url = urlsplit(str(http.get("url") or ""))
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        fields: list[tuple[str, Any]] = [("method", str(http["method"])), ("path", path)]
        if url.netloc:
            fields.append(("host", url.netloc))
        headers = [f"{h.get('key')}: {h.get('value')}" for h in http.get("headers") or []
                   if isinstance(h, Mapping) and h.get("value") != "HUBBLE_REDACTED"]
        if headers:
            fields.append(("header", tuple(headers)))
        return "http", tuple(fields)
    if isinstance(kafka, Mapping) and kafka.get("api_key"):
        fields = [("api_key", str(kafka["api_key"]))]
        if kafka.get("api_version") is not None:
            fields.append(("api_version", str(kafka["api_version"])))
        topics = kafka.get("topics") or ([kafka["topic"]] if kafka.get("topic") else [])
        if topics:
            fields.append(("topic", tuple(str(t) for t in topics)))
        if kafka.get("client_id"):
            fields.append(("client_id", str(kafka["client_id"])))
        return "kafka", tuple(fields)
    if isinstance(dns, Mapping) and isinstance(dns.get("query"), str):
        return "dns", (("query", dns["query"]),)
    return None


def _request(d: Mapping[str, Any], when: float) -> Request | None:
    l7 = d.get("l7")
    if not isinstance(l7, Mapping) or str(l7.get("type") or "").upper() != "REQUEST":
        return None
    parsed = _l7_fields(l7)
    ip_rec = d.get("IP")
    ip: Mapping[str, Any] = ip_rec if isinstance(ip_rec, Mapping) else {}
    src_ip, dst_ip = _canonical_ip(ip.get("source")), _canonical_ip(ip.get("destination"))
    l4 = _l4(d.get("l4"))
    verdict = str(d.get("verdict") or "").upper()
    if parsed is None or src_ip is None or dst_ip is None or l4 is None or \
            verdict not in (*PASSED, "DROPPED"):
        return None
    return Request(_peer(d.get("source"), src_ip), _peer(d.get("destination"), dst_ip), l4[0], l4[1],
                   parsed[0], parsed[1], verdict in PASSED, verdict, 1, when)


def _remember(out: Observed, client: str, name: str, ips: Sequence[Any]) -> None:
    name = name.lower().rstrip(".")
    if not name:
        return
    for raw in ips:
        ip = _canonical_ip(raw)
        if ip is None:
            continue
        out.dns.setdefault(name, set()).add(ip)
        if client:
            out.names_by_client.setdefault(client, {}).setdefault(ip, set()).add(name)


def _learn_dns(out: Observed, d: Mapping[str, Any]) -> None:
    l7 = d.get("l7")
    dns = l7.get("dns") if isinstance(l7, Mapping) else None
    if not isinstance(dns, Mapping):
        return
    # a response travels server -> client: the client is the destination
    response = str(l7.get("type") or "").upper() == "RESPONSE" if isinstance(l7, Mapping) else False
    client = _peer(d.get("destination" if response else "source"), "")
    if client.pod:
        out.dns_proxied.add(client.pod)
    ips = dns.get("ips")
    if isinstance(ips, list) and isinstance(dns.get("query"), str):
        _remember(out, client.pod, dns["query"], ips)


def load_flow_lines(path: str) -> list[dict[str, Any]]:
    """``observe -o json`` output: one JSON object per line (blank lines ignored)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise FlowInputError(f"cannot read {path}: {e.strerror} (--flows)") from None
    out: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FlowInputError(f"{path} line {n}: not JSON ({e.msg}) (--flows)") from None
        if not isinstance(obj, dict):
            raise FlowInputError(f"{path} line {n}: expected a flow object (--flows)")
        out.append(obj)
    return out
