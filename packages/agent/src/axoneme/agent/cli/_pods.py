"""``axoneme pod run|exec|delete|list|logs``: the standalone pod runtime's CLI."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import Any

from axoneme.agent.cli import UsageError
from axoneme.agent.cli._agentcmds import add_socket_flag, client, parse_label_args
from axoneme.agent.cli._output import add_list_flags, emit, joined_labels, select, table

SubParsers = argparse._SubParsersAction  # type: ignore[type-arg]


class _CommandParser(argparse.ArgumentParser):
    """Everything after the first ``--`` is the pod's command, untouched.

    (argparse.REMAINDER would swallow our own options placed before ``--``.)"""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        args = list(sys.argv[1:] if args is None else args)
        if "--" in args:
            cut = args.index("--")
            head, tail = args[:cut], args[cut + 1:]
            ns, extras = super().parse_known_args(head, namespace)
            ns.command = tail
            return ns, extras
        ns, extras = super().parse_known_args(args, namespace)
        ns.command = extras
        return ns, []


def register(groups: dict[str, SubParsers]) -> None:
    top = groups[""]
    pod = top.add_parser("pod", help="standalone pods (netns + axoneme-cni + a process)")
    parser_class = type("PodParser", (_CommandParser, type(pod)), {})
    sub = pod.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=parser_class)
    run = sub.add_parser("run", help="create a pod and start CMD in it; prints the pod IP")
    run.add_argument("name", help="the pod's name")
    run.add_argument("-n", "--namespace", default="default", help="the pod's namespace (default 'default')")
    run.add_argument("--labels", "-l", action="append", default=None,
                     help="the pod's labels: k=v,... (repeatable)")
    run.add_argument("--port", action="append", default=[], metavar="name:port/proto",
                     help="a named container port, for policies naming ports (repeatable)")
    run.add_argument("--service-account", default="default",
                     help="the pod's service account (an identity label; default 'default')")
    run.add_argument("--env", "-e", action="append", default=[], metavar="K=V",
                     help="an environment variable of CMD (repeatable)")
    add_socket_flag(run)
    run.set_defaults(handler=cmd_run)
    ex = sub.add_parser("exec", help="run CMD in the pod's network namespace")
    ex.add_argument("name", help="the pod")
    ex.add_argument("-n", "--namespace", default="default", help="the pod's namespace (default 'default')")
    add_socket_flag(ex)
    ex.set_defaults(handler=cmd_exec)
    de = sub.add_parser("delete", help="stop the pod and remove its network")
    de.add_argument("name", help="the pod")
    de.add_argument("-n", "--namespace", default="default", help="the pod's namespace (default 'default')")
    add_socket_flag(de)
    de.set_defaults(handler=cmd_delete)
    ls = sub.add_parser("list", help="pods")
    ls.add_argument("-n", "--namespace", default=None, help="only pods of this namespace")
    add_list_flags(ls, "[{name, namespace, ip, labels, status, endpoint_id, identity, pid, netns}]")
    add_socket_flag(ls)
    ls.set_defaults(handler=cmd_list)
    lg = sub.add_parser("logs", help="the pod's stdout/stderr")
    lg.add_argument("name", help="the pod")
    lg.add_argument("-n", "--namespace", default="default", help="the pod's namespace (default 'default')")
    add_socket_flag(lg)
    lg.set_defaults(handler=cmd_logs)


def _command(args: argparse.Namespace) -> list[str]:
    cmd = list(getattr(args, "command", None) or [])
    if not cmd:
        raise UsageError("a command is required after -- (pod " + args.subcommand + ")")
    return cmd


def _path(args: argparse.Namespace) -> str:
    from axoneme.agent.client import q

    return f"/v1/pods/{q(args.namespace)}/{q(args.name)}"


def cmd_run(args: argparse.Namespace) -> int:
    cmd = _command(args)
    labels = parse_label_args(args.labels)
    env: dict[str, str] = {}
    for item in args.env:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UsageError(f"invalid --env {item!r}: expected K=V")
        env[k] = v
    from axoneme.agent._errors import BadRequest
    from axoneme.agent._records import parse_port

    for p in args.port:
        try:
            parse_port(p)
        except BadRequest as e:
            raise UsageError(f"{e} (--port)") from None
    res = client(args).post("/v1/pods", {
        "name": args.name, "namespace": args.namespace, "labels": labels, "ports": args.port,
        "service_account": args.service_account, "command": cmd, "cwd": os.getcwd(), "env": env})
    sys.stdout.write(f"pod/{res['name']} created in {res['namespace']} "
                     f"(endpoint {res['endpoint_id']}, identity {res['identity']})\n")
    sys.stdout.write(f"{res['ip']}\n")
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    cmd = _command(args)
    pod = client(args).get(_path(args))
    netns = pod.get("netns")
    if not netns:
        raise UsageError(f"pod {args.namespace}/{args.name} has no network namespace")
    sys.stdout.flush()
    try:
        return subprocess.call(["ip", "netns", "exec", netns, *cmd])
    except KeyboardInterrupt:
        return 130


def cmd_delete(args: argparse.Namespace) -> int:
    client(args).delete(_path(args))
    sys.stdout.write(f"pod/{args.name} deleted\n")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    pods: list[dict[str, Any]] = select(args, client(args).get("/v1/pods", namespace=args.namespace),
                                        lambda p: p["labels"])

    def render(wide: bool) -> None:
        more = ["PID", "NETNS", "SERVICE ACCOUNT", "PORTS"] if wide else []
        table(["NAMESPACE", "NAME", "IP", "STATUS", "ENDPOINT", "IDENTITY", "LABELS", *more],
              [[p["namespace"], p["name"], p["ip"] or "", p["status"], p["endpoint_id"] or "",
                p.get("identity") or "", joined_labels(p["labels"]),
                *([p.get("pid") or "", p.get("netns") or "", p.get("service_account") or "",
                   ",".join(p.get("ports") or [])] if wide else [])]
               for p in pods])

    return emit(args, [{"name": p["name"], "namespace": p["namespace"], "ip": p["ip"],
                        "labels": p["labels"], "status": p["status"],
                        "endpoint_id": p["endpoint_id"], "identity": p.get("identity"),
                        "pid": p.get("pid"), "netns": p.get("netns")} for p in pods], render)


def cmd_logs(args: argparse.Namespace) -> int:
    text = client(args).get(_path(args) + "/logs")
    sys.stdout.write(text if isinstance(text, str) else str(text))
    return 0
