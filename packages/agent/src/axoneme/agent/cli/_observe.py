"""``axoneme observe``: flows from the agent's flow store, like ``hubble observe``.

Hubble's filter flags build Hubble's FlowFilters the way the hubble CLI does
(hubble/cmd/observe/flows_filter.go): a filter that names a side (``--from-ip``)
goes into every filter; one that names either side (``--identity``,
``-n``) makes a pair, the source form OR the destination form; ``--not``
sends the next filter flag to the blacklist. The agent matches them
(``_hubblefilter``); the older flags (``--pod``, ``--label``, ``--port``, ...)
keep their meaning and are ANDed with them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import sys
import time
from typing import Any

from axoneme.agent._flowstore import flow_from_json
from axoneme.agent._hubblefilter import FilterError, compile_filters, fqdn_pattern, parse_identity
from axoneme.agent.cli import UsageError
from axoneme.agent.cli._agentcmds import add_socket_flag, client

SubParsers = argparse._SubParsersAction  # type: ignore[type-arg]

VERDICTS = ["FORWARDED", "DROPPED", "REDIRECTED", "AUDIT", "ERROR", "TRACED"]
# Hubble's conflicting flags (flows_filter.go newFlowFilter, the ones we have)
CONFLICTS = (("from-fqdn", "from-ip", "namespace"), ("to-fqdn", "to-ip", "namespace"))
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class _Not(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        if getattr(ns, "_negate", False):
            raise UsageError("consecutive --not statements (--not)")
        ns._negate = True


class _Filter(argparse.Action):
    """Records (flag, value, negated) in order, so ``--not`` negates the next filter."""

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        negated = getattr(ns, "_negate", False)
        ns._negate = False
        items = list(getattr(ns, "hubble_filters", None) or [])
        items.append((self.dest.replace("_", "-"), values, negated))
        ns.hubble_filters = items


def register(groups: dict[str, SubParsers]) -> None:
    p = groups[""].add_parser(
        "observe", help="observe flows (like hubble observe)",
        description="Flows from the agent's flow store, with Hubble's filters and outputs.",
        epilog="examples:\n"
               "  axoneme observe --verdict DROPPED -n prod -o json\n"
               "  axoneme observe --since 5m --to-fqdn '*.example.com'\n"
               "  axoneme observe --http-status 5+ --http-path '^/api/' -f\n"
               "  axoneme observe --not --from-ip 10.244.0.0/24 --traffic-direction ingress",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new flows")
    p.add_argument("--last", type=int, default=None, metavar="N",
                   help="the last N matching flows (default 20 without --since/--until)")
    p.add_argument("--first", type=int, default=None, metavar="N",
                   help="the first (oldest) N matching flows in the buffer")
    p.add_argument("--since", default=None, metavar="T",
                   help="flows at or after T: RFC 3339 time (2026-12-04T15:00:00Z) or a "
                        "duration back from now (5m, 1h30m)")
    p.add_argument("--until", default=None, metavar="T",
                   help="flows at or before T (same forms as --since)")
    f = {"action": _Filter, "default": None}
    p.add_argument("--verdict", type=str.upper, choices=VERDICTS, **f,
                   help="only this verdict; repeatable (any of them)")
    p.add_argument("-n", "--namespace", **f, metavar="NS",
                   help="flows from or to namespace NS; repeatable")
    p.add_argument("--from-ip", **f, metavar="IP",
                   help="source IP or CIDR (10.244.0.0/16); repeatable")
    p.add_argument("--to-ip", **f, metavar="IP", help="destination IP or CIDR; repeatable")
    p.add_argument("--from-fqdn", **f, metavar="NAME",
                   help="source DNS name, * as wildcard (*.example.com); repeatable")
    p.add_argument("--to-fqdn", **f, metavar="NAME",
                   help="destination DNS name, * as wildcard; repeatable")
    p.add_argument("--identity", **f, metavar="ID",
                   help="source or destination security identity (number or reserved "
                        "name: host, world, ...); repeatable")
    p.add_argument("--http-status", **f, metavar="CODE",
                   help="HTTP response status: 200, or a prefix 5+ / 40+; repeatable")
    p.add_argument("--http-method", **f, metavar="M", help="HTTP method (GET); repeatable")
    p.add_argument("--http-path", **f, metavar="RE",
                   help="regular expression on the HTTP path (^/api/); repeatable")
    p.add_argument("--traffic-direction", type=str.lower, choices=["ingress", "egress"], **f,
                   help="traffic direction of the verdict")
    p.add_argument("--not", action=_Not, nargs=0, dest="_negate",
                   help="negate the next filter flag (--not --from-ip 10.0.0.1)")
    p.add_argument("--pod", default=None, metavar="NS/NAME", help="flows from or to this pod")
    p.add_argument("--from-pod", default=None, metavar="NS/NAME", help="flows from this pod")
    p.add_argument("--to-pod", default=None, metavar="NS/NAME", help="flows to this pod")
    p.add_argument("--label", action="append", default=[], metavar="k=v",
                   help="either side has label k=v (k8s: source unless given); repeatable, all must match")
    p.add_argument("--protocol", type=str.lower,
                   choices=["tcp", "udp", "sctp", "icmp", "icmpv4", "icmpv6", "http", "kafka", "dns"],
                   help="L4 or L7 protocol")
    p.add_argument("--port", type=int, default=None, help="source or destination port")
    p.add_argument("--type", choices=["l7", "policy-verdict", "drop", "trace"], default=None,
                   help="event type")
    p.add_argument("-o", "--output", choices=["compact", "json", "jsonpb", "dict", "table"],
                   default="compact",
                   help="compact lines (default), json (one flow a line), jsonpb (Hubble's "
                        "GetFlowsResponse), dict (one block a flow) or table")
    add_socket_flag(p)
    p.set_defaults(handler=cmd_observe, hubble_filters=[], _negate=False)


def _pod(value: str | None, flag: str) -> str | None:
    if value is None:
        return None
    if "/" not in value:
        return f"default/{value}"
    ns, _, name = value.partition("/")
    if not ns or not name:
        raise UsageError(f"expected NS/NAME, got {value!r} ({flag})")
    return value


def parse_time(value: str, flag: str, now: float | None = None) -> float:
    """Hubble's --since/--until: an RFC 3339 time (date only, or without zone:
    local time) or a Go duration back from now (``90s``, ``1h30m``)."""
    now = time.time() if now is None else now
    text = value.strip()
    if _DURATION.match(text):
        secs = sum(float(n) * _UNIT[u] for n, u in _DURATION_PART.findall(text))
        return now - secs
    try:
        ts = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(f"invalid time {value!r}: an RFC 3339 time or a duration such as "
                         f"5m ({flag})") from None
    return ts.timestamp()


class _Tracker:
    """Hubble's filterTracker: ``left`` OR ``right``; namespaces applied at the end."""

    def __init__(self) -> None:
        self.left: dict[str, list[Any]] = {}
        self.right: dict[str, list[Any]] = {}
        self.ns: list[str] = []
        self.changed: list[str] = []

    def both(self, key: str, value: Any) -> None:
        self.left.setdefault(key, []).append(value)
        self.right.setdefault(key, []).append(value)

    def sides(self, src_key: str, dst_key: str, value: Any) -> None:
        self.left.setdefault(src_key, []).append(value)
        self.right.setdefault(dst_key, []).append(value)

    def filters(self) -> list[dict[str, list[Any]]]:
        if not self.left and not self.right and not self.ns:
            return []
        left, right = dict(self.left), dict(self.right)
        if self.ns:
            left["source_pod"] = _with_ns(left.get("source_pod") or [""], self.ns)
            right["destination_pod"] = _with_ns(right.get("destination_pod") or [""], self.ns)
        return [left] if left == right else [left, right]


def _with_ns(names: list[str], namespaces: list[str]) -> list[str]:
    return [n if "/" in n else f"{ns}/{n}" for n in names for ns in namespaces]


def hubble_filters(items: list[tuple[str, Any, bool]]) -> dict[str, list[dict[str, Any]]]:
    """(flag, value, negated) in command-line order -> {"whitelist", "blacklist"}."""
    trackers = {False: _Tracker(), True: _Tracker()}
    for flag, value, negated in items:
        t = trackers[negated]
        if flag not in t.changed:
            t.changed.append(flag)
        for group in CONFLICTS:
            used = [g for g in group if g in t.changed]
            if len(used) > 1:
                raise UsageError(f"filters --{used[0]} and --{used[1]} cannot be combined "
                                 f"(--{flag})")
        try:
            _apply(t, flag, value)
        except FilterError as e:
            raise UsageError(f"{e} (--{flag})") from None
    out = {"whitelist": trackers[False].filters(), "blacklist": trackers[True].filters()}
    try:
        compile_filters(out["whitelist"], out["blacklist"])  # bad values: exit 2 here
    except FilterError as e:
        raise UsageError(str(e)) from None
    return out


def _apply(t: _Tracker, flag: str, value: str) -> None:
    if flag == "verdict":
        t.both("verdict", value)
    elif flag == "namespace":
        if not value:
            raise FilterError("empty namespace")
        t.ns.append(value)
    elif flag in ("from-ip", "to-ip"):
        compile_filters([{"source_ip": [value]}])
        t.both("source_ip" if flag == "from-ip" else "destination_ip", value)
    elif flag in ("from-fqdn", "to-fqdn"):
        fqdn_pattern([value])
        t.both("source_fqdn" if flag == "from-fqdn" else "destination_fqdn", value)
    elif flag == "identity":
        t.sides("source_identity", "destination_identity", parse_identity(value))
    elif flag == "http-status":
        t.both("http_status_code", value)
    elif flag == "http-method":
        t.both("http_method", value)
    elif flag == "http-path":
        t.both("http_path", value)
    elif flag == "traffic-direction":
        t.both("traffic_direction", value.upper())
    else:  # pragma: no cover - every _Filter flag is handled above
        raise FilterError(f"unknown filter --{flag}")


def cmd_observe(args: argparse.Namespace) -> int:
    for flag in ("last", "first"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0 (--{flag})")
    if args.last is not None and args.first is not None:
        raise UsageError("--first and --last cannot be combined (--first)")
    if args.first is not None and args.follow:
        raise UsageError("--first cannot be combined with --follow (--first)")
    if args._negate:
        raise UsageError("--not must be followed by a filter flag (--not)")
    since = parse_time(args.since, "--since") if args.since else None
    until = parse_time(args.until, "--until") if args.until else None
    filters = hubble_filters(args.hubble_filters)
    local = args.output in ("dict", "table")
    query = {
        "format": "json" if local else args.output, "last": args.last, "first": args.first,
        "follow": "1" if args.follow else None,
        "since": f"{since:.6f}" if since is not None else None,
        "until": f"{until:.6f}" if until is not None else None,
        "filters": json.dumps(filters) if filters["whitelist"] or filters["blacklist"] else None,
        "pod": _pod(args.pod, "--pod"), "from_pod": _pod(args.from_pod, "--from-pod"),
        "to_pod": _pod(args.to_pod, "--to-pod"), "label": args.label or None,
        "protocol": args.protocol, "port": args.port, "type": args.type,
    }
    c = client(args)
    c.timeout = None
    printer = _Printer(args.output, aligned=not args.follow)
    try:
        for line in c.stream_lines("/v1/flows", query):
            if line:
                sys.stdout.write(printer.render(line) if local else line + "\n")
                if args.follow:
                    sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    finally:
        sys.stdout.write(printer.finish())
    return 0


class _Printer:
    """Hubble's dict and table outputs, from the agent's JSON lines. A table is
    aligned when all of it is known (not following), else tab-separated."""

    COLUMNS = ("TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")
    KEYS = ("  TIMESTAMP", "     SOURCE", "DESTINATION", "       TYPE", "    VERDICT",
            "    SUMMARY")

    def __init__(self, output: str, aligned: bool = True) -> None:
        self.output = output
        self.aligned = aligned
        self.rows: list[tuple[str, ...]] = []
        self.lines = 0

    def render(self, line: str) -> str:
        flow = flow_from_json(json.loads(line))
        src, dst = flow.hosts()
        ts = _dt.datetime.fromtimestamp(flow.time).strftime("%b %e %H:%M:%S.%f")[:-3]
        row = (ts, src, dst, flow.type_text(), flow.verdict_text(),
               flow.summary or flow.default_summary())
        first, self.lines = self.lines == 0, self.lines + 1
        if self.output == "table":
            if self.aligned:
                self.rows.append(row)
                return ""
            head = "\t".join(self.COLUMNS) + "\n" if first else ""
            return head + "\t".join(row) + "\n"
        sep = "" if first else "------------\n"
        return sep + "".join(f"{k}: {v}\n" for k, v in zip(self.KEYS, row, strict=True))

    def finish(self) -> str:
        if not self.rows:
            return ""
        rows = [self.COLUMNS, *self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.COLUMNS) - 1)]
        return "".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "   "
                       + r[-1] + "\n" for r in rows)
