"""Hubble's flow filters (``flow.FlowFilter``) over our Flow records.

One filter is a mapping in protojson's form (proto field names) of Hubble's
``FlowFilter`` message. Hubble's semantics (cilium pkg/hubble/filters):

1. within one filter every field that is set must match (AND);
2. within one field any of its values may match (OR);
3. a flow passes when it matches any whitelist filter (or there is none)
   and no blacklist filter.

A field that is set but not supported here is an error (FilterError), never
ignored. The same code serves ``axoneme observe`` and the Observer gRPC API.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from axoneme.core.flow import Flow, FlowEndpoint
from axoneme.core.identity import ReservedIdentity

__all__ = ["FilterError", "FlowPredicate", "compile_filter", "compile_filters", "fqdn_pattern",
           "parse_identity"]

FlowPredicate = Callable[[Flow], bool]


class FilterError(ValueError):
    """A filter that cannot be built (bad value or unsupported field)."""


_STATUS_FULL = re.compile(r"^[1-5][0-9]{2}$")
_STATUS_PREFIX = re.compile(r"^[1-5][0-9]?\+$")
_FQDN_RUNE = re.compile(r"[-0-9_a-z]")
_PROTOCOLS = {"tcp": "TCP", "udp": "UDP", "sctp": "SCTP", "icmpv4": "ICMPv4", "icmp": "ICMPv4",
              "icmpv6": "ICMPv6"}


def fqdn_pattern(patterns: Iterable[str]) -> re.Pattern[str]:
    """Hubble's FQDN patterns: ``*`` matches any run of name characters (dots too);
    lower-cased, one trailing dot ignored; anchored."""
    alts = []
    for raw in patterns:
        p = raw.strip().lower()
        p = p[:-1] if p.endswith(".") else p
        if not p:
            raise FilterError(f"empty FQDN pattern {raw!r}")
        if p.endswith("."):
            raise FilterError(f"multiple trailing dots in FQDN pattern {raw!r}")
        out = []
        for ch in p:
            if ch == ".":
                out.append(r"\.")
            elif ch == "*":
                out.append(r"[-.0-9a-z]*")
            elif _FQDN_RUNE.fullmatch(ch):
                out.append(ch)
            else:
                raise FilterError(f"invalid character {ch!r} in FQDN pattern {raw!r}")
        alts.append("".join(out))
    return re.compile("^(?:" + "|".join(alts) + ")$")


def parse_identity(text: str) -> int:
    """A numeric identity or a reserved identity's name (``host``, ``world``, ``reserved:host``)."""
    t = text.strip()
    if t.isdigit():
        return int(t)
    name = t.removeprefix("reserved:").upper().replace("-", "_")
    try:
        return int(ReservedIdentity[name])
    except KeyError:
        raise FilterError(f"invalid identity {text!r} (a number or a reserved name)") from None


def _ips(values: Sequence[str]) -> Callable[[str], bool]:
    exact: set[str] = set()
    nets = []
    for v in values:
        try:
            if "/" in v:
                nets.append(ipaddress.ip_network(v, strict=False))
            else:
                exact.add(str(ipaddress.ip_address(v)))
        except ValueError:
            raise FilterError(f"invalid IP address or prefix {v!r}") from None

    def match(ip: str) -> bool:
        if not ip:
            return False
        if ip in exact:
            return True
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr.version == n.version and addr in n for n in nets)
    return match


def _names(values: Sequence[str]) -> Callable[[FlowEndpoint], bool]:
    """``ns/prefix``, ``ns/`` or ``prefix``: Hubble's namespaced-name filter."""
    parsed = []
    for v in values:
        if not v:
            raise FilterError("invalid filter, name must not be empty")
        ns, _, prefix = v.rpartition("/")
        parsed.append((ns, prefix))

    def match(ep: FlowEndpoint) -> bool:
        if not ep.namespace and not ep.pod_name:
            return False
        return any((not p or ep.pod_name.startswith(p)) and (not ns or ns == ep.namespace)
                   for ns, p in parsed)
    return match


def _label_requirement(text: str) -> Callable[[dict[str, set[str]]], bool]:
    """``k=v``, ``k==v``, ``k!=v``, ``k``, ``!k``; ``k`` may carry a source (``k8s:app``)."""
    t = text.strip()
    neg = t.startswith("!")
    if neg:
        t = t[1:].strip()
    for op in ("!=", "==", "="):
        if op in t:
            key, _, val = t.partition(op)
            key, val = key.strip(), val.strip()
            if not key:
                raise FilterError(f"invalid label selector {text!r}")
            if op == "!=":
                return lambda labels: val not in labels.get(key, set())
            return lambda labels: val in labels.get(key, set())
    if not t:
        raise FilterError(f"invalid label selector {text!r}")
    return (lambda labels: t not in labels) if neg else (lambda labels: t in labels)


def _labels(values: Sequence[str]) -> Callable[[FlowEndpoint], bool]:
    selectors = [[_label_requirement(r) for r in _split_selector(v)] for v in values]

    def match(ep: FlowEndpoint) -> bool:
        labels: dict[str, set[str]] = {}
        for lab in ep.labels:
            key, _, val = lab.partition("=")
            labels.setdefault(key, set()).add(val)
            if ":" in key:  # a requirement without a source matches any source
                labels.setdefault(key.split(":", 1)[1], set()).add(val)
        return any(all(req(labels) for req in sel) for sel in selectors)
    return match


def _split_selector(text: str) -> list[str]:
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise FilterError(f"invalid label selector {text!r}")
    return parts


def _status(values: Sequence[str]) -> Callable[[Flow], bool]:
    full, prefixes = set(), []
    for v in values:
        if _STATUS_FULL.match(v):
            full.add(v)
        elif _STATUS_PREFIX.match(v):
            prefixes.append(v[:-1])
        else:
            raise FilterError(f"invalid http status code filter: {v!r} (e.g. 200, 4+, 50+)")

    def match(f: Flow) -> bool:
        code = int(_http(f).get("code") or 0)
        if not code:
            return False
        s = f"{code:03d}"
        return s in full or any(s.startswith(p) for p in prefixes)
    return match


def _regexes(values: Sequence[str], what: str) -> list[re.Pattern[str]]:
    out = []
    for v in values:
        try:
            out.append(re.compile(v))
        except re.error as e:
            raise FilterError(f"invalid {what} filter {v!r}: {e}") from None
    return out


def _http(f: Flow) -> Mapping[str, Any]:
    http = (f.l7 or {}).get("http")
    return http if isinstance(http, Mapping) else {}


def _url_path(url: str) -> str | None:
    try:
        return urlsplit(url).path if url else None
    except ValueError:
        return None


def _port_match(values: Sequence[str], which: int) -> Callable[[Flow], bool]:
    ports = set()
    for v in values:
        if not str(v).isdigit() or not 0 <= int(v) <= 65535:
            raise FilterError(f"invalid port {v!r}")
        ports.add(int(v))
    return lambda f: f.ports()[which] in ports


def _protocol(values: Sequence[str]) -> Callable[[Flow], bool]:
    wanted = [v.lower() for v in values]

    def match(f: Flow) -> bool:
        for w in wanted:
            if w in _PROTOCOLS and _PROTOCOLS[w] in f.l4:
                return True
            if f.l7 and isinstance(f.l7.get(w), Mapping):
                return True
        return False
    return match


def _event_types(values: Sequence[Mapping[str, Any]]) -> Callable[[Flow], bool]:
    def match(f: Flow) -> bool:
        et = f.hubble_event_type()
        for tf in values:
            t = int(tf.get("type") or 0)
            if t and t != et["type"]:
                continue
            if tf.get("match_sub_type") and int(tf.get("sub_type") or 0) != et.get("sub_type", 0):
                continue
            return True
        return False
    return match


def _tcp_flags(values: Sequence[Mapping[str, Any]]) -> Callable[[Flow], bool]:
    def match(f: Flow) -> bool:
        flags = (f.l4.get("TCP") or {}).get("flags") or {}
        return any(all(flags.get(k) for k, v in want.items() if v) for want in values)
    return match


# field -> builder(values) -> predicate; the proto's repeated fields are lists
_BUILDERS: dict[str, Callable[[Any], Callable[[Flow], bool]]] = {
    "uuid": lambda v: lambda f: f.uuid in set(v),
    "source_ip": lambda v: (lambda m: lambda f: m(f.ip_source))(_ips(v)),
    "destination_ip": lambda v: (lambda m: lambda f: m(f.ip_destination))(_ips(v)),
    "source_pod": lambda v: (lambda m: lambda f: m(f.source))(_names(v)),
    "destination_pod": lambda v: (lambda m: lambda f: m(f.destination))(_names(v)),
    "source_fqdn": lambda v: (lambda r: lambda f: any(r.match(n) for n in f.source_names))(
        fqdn_pattern(v)),
    "destination_fqdn": lambda v: (lambda r: lambda f: any(
        r.match(n) for n in f.destination_names))(fqdn_pattern(v)),
    "source_label": lambda v: (lambda m: lambda f: m(f.source))(_labels(v)),
    "destination_label": lambda v: (lambda m: lambda f: m(f.destination))(_labels(v)),
    "source_identity": lambda v: lambda f: f.source.identity in {int(x) for x in v},
    "destination_identity": lambda v: lambda f: f.destination.identity in {int(x) for x in v},
    "verdict": lambda v: lambda f: f.verdict.value in {str(x).upper() for x in v},
    "drop_reason_desc": lambda v: lambda f: (f.drop_reason is not None
                                             and f.drop_reason.name in {str(x) for x in v}),
    "event_type": _event_types,
    "http_status_code": _status,
    "http_method": lambda v: lambda f: str(_http(f).get("method") or "").upper() in {
        str(x).upper() for x in v} and bool(_http(f).get("method")),
    "http_path": lambda v: (lambda rs: lambda f: (lambda p: p is not None and any(
        r.search(p) for r in rs))(_url_path(str(_http(f).get("url") or ""))))(
        _regexes(v, "http path")),
    "http_url": lambda v: (lambda rs: lambda f: bool(_http(f).get("url")) and any(
        r.search(str(_http(f)["url"])) for r in rs))(_regexes(v, "http url")),
    "dns_query": lambda v: (lambda rs: lambda f: isinstance((f.l7 or {}).get("dns"), Mapping)
                            and any(r.search(str(f.l7["dns"].get("query", ""))) for r in rs))(
        _regexes(v, "dns query")),
    "traffic_direction": lambda v: lambda f: f.traffic_direction in {str(x).upper() for x in v},
    "reply": lambda v: lambda f: bool(f.is_reply) in {bool(x) for x in v},
    "protocol": _protocol,
    "source_port": lambda v: _port_match(v, 0),
    "destination_port": lambda v: _port_match(v, 1),
    "ip_version": lambda v: lambda f: f.ip_version in {str(x) for x in v},
    "node_name": lambda v: (lambda r: lambda f: bool(r.match(f.node_name)))(
        re.compile("^(?:" + "|".join(re.escape(x).replace(r"\*", ".*") for x in v) + ")$")),
    "tcp_flags": _tcp_flags,
    "interface": lambda v: lambda f: f.interface is not None and any(
        (not i.get("index") or int(i["index"]) == f.interface[0])
        and (not i.get("name") or i["name"] == f.interface[1]) for i in v),
    "http_header": lambda v: lambda f: any(
        {"key": h.get("key"), "value": h.get("value")} in list(_http(f).get("headers") or ())
        for h in v),
}


def compile_filter(ff: Mapping[str, Any]) -> FlowPredicate:
    """One Hubble FlowFilter (protojson mapping) -> predicate; FilterError when bad."""
    preds: list[Callable[[Flow], bool]] = []
    for name, value in ff.items():
        if value in (None, [], {}, "", False):
            continue
        builder = _BUILDERS.get(name)
        if builder is None:
            raise FilterError(f"unsupported flow filter field {name!r} "
                              f"(supported: {', '.join(sorted(_BUILDERS))})")
        values = value if isinstance(value, list) else [value]
        preds.append(builder(values))
    return lambda f: all(p(f) for p in preds)


def compile_filters(whitelist: Sequence[Mapping[str, Any]] = (),
                    blacklist: Sequence[Mapping[str, Any]] = ()) -> FlowPredicate:
    white = [compile_filter(ff) for ff in whitelist]
    black = [compile_filter(ff) for ff in blacklist]

    def match(f: Flow) -> bool:
        if white and not any(p(f) for p in white):
            return False
        return not any(p(f) for p in black)
    return match

