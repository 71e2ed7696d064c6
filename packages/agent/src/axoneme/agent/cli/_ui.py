"""``axoneme ui``: serve the web UI (a process of its own, a client of the agent's API)."""

from __future__ import annotations

import argparse
import ipaddress
import sys
import textwrap

from axoneme.agent.cli import EXIT_RUNTIME, UsageError, fail
from axoneme.agent.cli._agentcmds import add_socket_flag

DEFAULT_LISTEN = "127.0.0.1:12000"

EPILOG = """\
Read-only by default: the map, flows, validation, what-if and recommendations.
--allow-apply also lets the page apply policies to the agent.

examples:
  axoneme ui                                  # http://127.0.0.1:12000/
  axoneme ui --listen 127.0.0.1:8080 --allow-apply
  axoneme ui --listen 0.0.0.0:12000           # every address: warned, read-only
"""


def register(groups: dict[str, argparse._SubParsersAction]) -> None:  # type: ignore[type-arg]
    p = groups[""].add_parser(
        "ui", help="web UI: live service map, policy editor, what-if delta, recommendations",
        description=textwrap.fill(
            "Serve the web UI of the agent at --listen: a service map of the workloads by "
            "identity with edges from flows (click one for its flows and the deciding policy), "
            "a policy editor with validation at the field, the what-if delta of the edited "
            "policy against live policies and flows, and recommendations as drafts.", 78),
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"address to serve on (default {DEFAULT_LISTEN}; port 0: any free port); "
                        "an address other than loopback must be given here and is warned about")
    p.add_argument("--allow-apply", action="store_true",
                   help="let the page apply policies to the agent (default: read-only)")
    add_socket_flag(p)
    p.set_defaults(handler=run_ui)


def parse_listen(text: str) -> tuple[str, int, bool]:
    """(host, port, loopback) of ``HOST:PORT`` (``[V6]:PORT`` for IPv6); UsageError if bad."""
    host, sep, port_s = text.rpartition(":")
    if not sep or not host:
        raise UsageError(f"expected HOST:PORT, got {text!r} (--listen)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_s)
    except ValueError:
        raise UsageError(f"port must be a number, got {port_s!r} (--listen)") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"port must be 0-65535, got {port} (--listen)")
    if host == "localhost":
        return host, port, True
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise UsageError(f"HOST must be an IP address or localhost, got {host!r} (--listen)") from None
    return str(addr), port, addr.is_loopback


def run_ui(args: argparse.Namespace) -> int:
    host, port, loopback = parse_listen(args.listen)
    from axoneme.agent.ui import bundle_problem

    problem = bundle_problem()
    if problem is not None:
        return fail(problem, "axoneme ui", EXIT_RUNTIME)
    import asyncio

    from axoneme.agent.ui._server import UIServer, serve

    server = UIServer(getattr(args, "api_socket_sub", None) or getattr(args, "api_socket", None),
                      allow_apply=args.allow_apply)
    if not loopback:
        sys.stderr.write(f"warning: serving the UI on {host}, not loopback: whoever reaches this "
                         f"address sees the agent's pods, policies and flows"
                         f"{' and can apply policies' if args.allow_apply else ''} (--listen)\n")

    def started(h: str, p: int) -> None:
        shown = f"[{h}]" if ":" in h else h
        mode = "policies can be applied" if args.allow_apply else "read-only"
        sys.stdout.write(f"axoneme ui: serving http://{shown}:{p}/ ({mode}; agent "
                         f"{server.socket_path})\n")
        sys.stdout.flush()

    try:
        asyncio.run(serve(server, host, port, started))
    except OSError as e:
        return fail(f"cannot listen on {host}:{port}: {e.strerror or e}", "--listen", EXIT_RUNTIME)
    return 0


__all__ = ["DEFAULT_LISTEN", "parse_listen", "register", "run_ui"]
