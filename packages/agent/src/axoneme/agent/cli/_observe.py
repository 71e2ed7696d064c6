"""``axoneme observe``: flows from the agent's flow store, like ``hubble observe``."""

from __future__ import annotations

import argparse
import sys

from axoneme.agent.cli import UsageError
from axoneme.agent.cli._agentcmds import add_socket_flag, client

SubParsers = argparse._SubParsersAction  # type: ignore[type-arg]


def register(groups: dict[str, SubParsers]) -> None:
    p = groups[""].add_parser("observe", help="observe flows (like hubble observe)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new flows as they come")
    p.add_argument("--last", type=int, default=None, metavar="N",
                   help="the last N stored flows (default 20; with -f: 0)")
    p.add_argument("--verdict", type=str.upper,
                   choices=["FORWARDED", "DROPPED", "REDIRECTED", "AUDIT", "ERROR", "TRACED"],
                   help="only flows with this verdict")
    p.add_argument("--namespace", default=None, help="only flows from or to pods of this namespace")
    p.add_argument("--pod", default=None, metavar="NS/NAME", help="only flows from or to this pod")
    p.add_argument("--from-pod", default=None, metavar="NS/NAME", help="only flows from this pod")
    p.add_argument("--to-pod", default=None, metavar="NS/NAME", help="only flows to this pod")
    p.add_argument("--label", action="append", default=[], metavar="k=v",
                   help="only flows whose source or destination has this label (repeatable)")
    p.add_argument("--protocol", type=str.lower,
                   choices=["tcp", "udp", "sctp", "icmp", "icmpv4", "icmpv6", "http", "kafka", "dns"],
                   help="only flows of this L4 or L7 protocol")
    p.add_argument("--port", type=int, default=None, help="only flows from or to this port")
    p.add_argument("--type", choices=["l7", "policy-verdict", "drop", "trace"], default=None,
                   help="only flows of this event type")
    p.add_argument("-o", "--output", choices=["compact", "json", "jsonpb"], default="compact",
                   help="compact lines like hubble observe (default), json (one flow a line), or "
                        "jsonpb (Hubble's GetFlowsResponse shape)")
    add_socket_flag(p)
    p.set_defaults(handler=cmd_observe)


def _pod(value: str | None, flag: str) -> str | None:
    if value is None:
        return None
    if "/" not in value:
        return f"default/{value}"
    ns, _, name = value.partition("/")
    if not ns or not name:
        raise UsageError(f"expected NS/NAME, got {value!r} ({flag})")
    return value


def cmd_observe(args: argparse.Namespace) -> int:
    if args.last is not None and args.last < 0:
        raise UsageError("--last must be >= 0 (--last)")
    query = {
        "format": args.output, "last": args.last, "follow": "1" if args.follow else None,
        "verdict": args.verdict, "namespace": args.namespace,
        "pod": _pod(args.pod, "--pod"), "from_pod": _pod(args.from_pod, "--from-pod"),
        "to_pod": _pod(args.to_pod, "--to-pod"), "label": args.label or None,
        "protocol": args.protocol, "port": args.port, "type": args.type,
    }
    c = client(args)
    c.timeout = None
    try:
        for line in c.stream_lines("/v1/flows", query):
            if line:
                sys.stdout.write(line + "\n")
                if args.follow:
                    sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    return 0
