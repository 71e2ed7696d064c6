"""Agent commands: agent run/cleanup, status, policy apply/delete/list,
namespace, endpoint and identity (docs/cli.md "Node agent")."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from axoneme.agent._errors import BadRequest
from axoneme.agent._records import parse_labels
from axoneme.agent.cli import UsageError, add_output_flag
from axoneme.agent.cli._agentflags import add_agent_run_flags, add_socket_flag
from axoneme.agent.cli._output import add_list_flags, dump_json, emit, joined_labels, select, table
from axoneme.agent.client import AgentClient, q
from axoneme.core.errors import InvalidRule

LOG = logging.getLogger(__name__)

SubParsers = argparse._SubParsersAction  # type: ignore[type-arg]


def client(args: argparse.Namespace) -> Any:
    return AgentClient(getattr(args, "api_socket_sub", None) or getattr(args, "api_socket", None))


def register(groups: dict[str, SubParsers]) -> None:
    top = groups[""]
    # agent run / cleanup
    agent = top.add_parser("agent", help="run the node agent, or clean up after one")
    asub = agent.add_subparsers(dest="subcommand", metavar="SUBCOMMAND",
                                parser_class=type(agent))
    run = asub.add_parser("run", help="run the node agent (root)")
    add_agent_run_flags(run)
    run.set_defaults(handler=cmd_agent_run)
    cl = asub.add_parser("cleanup", help="remove every kernel object an agent made")
    cl.add_argument("--state-dir", default="/var/lib/axoneme",
                    help="the agent's state dir (default /var/lib/axoneme)")
    cl.set_defaults(handler=cmd_agent_cleanup)

    st = top.add_parser("status", help="agent health")
    st.add_argument("--brief", action="store_true",
                    help="one line: OK (exit 0) when the datapath is healthy and, in Kubernetes "
                         "mode, the API server is connected and every resource synced; else the "
                         "problems (exit 1). For readiness probes")
    add_output_flag(st, ("table", "json", "yaml"))
    add_socket_flag(st)
    st.set_defaults(handler=cmd_status)

    # policy apply/delete/list (the policy group exists)
    pol = groups["policy"]
    ap = pol.add_parser("apply", help="apply policies to the running agent")
    ap.add_argument("-f", "--filename", dest="files", action="append", nargs="+", required=True,
                    metavar="PATH", help="policy file or directory (repeatable; '-' reads stdin)")
    add_socket_flag(ap)
    add_output_flag(ap)
    ap.set_defaults(handler=cmd_policy_apply)
    de = pol.add_parser("delete", help="delete policies from the running agent")
    de.add_argument("ref", nargs="?", metavar="KIND/NAME",
                    help="the policy to delete (KIND: netpol, cnp, ccnp or the full kind name)")
    de.add_argument("-f", "--filename", dest="files", action="append", nargs="+", metavar="PATH",
                    help="delete the policies these files define (repeatable)")
    de.add_argument("-n", "--namespace", default="default",
                    help="namespace of KIND/NAME (default 'default')")
    add_socket_flag(de)
    de.set_defaults(handler=cmd_policy_delete)
    ls = pol.add_parser("list", help="policies in the running agent")
    add_list_flags(ls, "[{kind, namespace, name, revision, source, rules, labels}]")
    add_socket_flag(ls)
    ls.set_defaults(handler=cmd_policy_list)

    # namespaces
    ns = top.add_parser("namespace", aliases=["ns"], help="standalone namespaces")
    nsub = ns.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=type(ns))
    c = nsub.add_parser("create", help="create a namespace")
    c.add_argument("name", help="the namespace's name")
    c.add_argument("--labels", "-l", default=None, help="the namespace's labels: k=v,...")
    add_socket_flag(c)
    c.set_defaults(handler=cmd_ns_create)
    lb = nsub.add_parser("label", help="set (k=v) or remove (k-) namespace labels")
    lb.add_argument("name", help="the namespace")
    lb.add_argument("labels", nargs="+", metavar="k=v", help="k=v sets a label, k- removes it")
    add_socket_flag(lb)
    lb.set_defaults(handler=cmd_ns_label)
    d = nsub.add_parser("delete", help="delete an empty namespace")
    d.add_argument("name", help="the namespace")
    add_socket_flag(d)
    d.set_defaults(handler=cmd_ns_delete)
    nl = nsub.add_parser("list", help="namespaces")
    add_list_flags(nl, "[{name, labels}]")
    add_socket_flag(nl)
    nl.set_defaults(handler=cmd_ns_list)

    # endpoints, identities
    ep = top.add_parser("endpoint", aliases=["ep"], help="local endpoints")
    esub = ep.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=type(ep))
    el = esub.add_parser("list", help="endpoints (like cilium-dbg endpoint list)")
    add_list_flags(el, "[{id, identity, labels, ipv4, policy_enforcement, status, pod}]")
    add_socket_flag(el)
    el.set_defaults(handler=cmd_ep_list)
    eg = esub.add_parser("get", help="one endpoint: resolved policy and the datapath's copy")
    eg.add_argument("id", help="endpoint id (endpoint list shows them)")
    add_output_flag(eg, ("table", "json", "yaml"))
    add_socket_flag(eg)
    eg.set_defaults(handler=cmd_ep_get)
    ident = top.add_parser("identity", help="security identities")
    isub = ident.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", parser_class=type(ident))
    il = isub.add_parser("list", help="identities, reserved ones included")
    add_list_flags(il, "[{id, labels, reserved}]")
    add_socket_flag(il)
    il.set_defaults(handler=cmd_id_list)


# -- agent ------------------------------------------------------------------------------

def build_agent_config(*args: Any, **kwargs: Any) -> Any:
    """cli/_agentconfig.build_agent_config, imported when used: it loads the
    policy engine, which the client commands of this module never need."""
    from axoneme.agent.cli._agentconfig import build_agent_config as build

    return build(*args, **kwargs)


def cmd_agent_run(args: argparse.Namespace) -> int:
    # the agent's heavy dependencies (aiohttp, prometheus) load only
    # for `agent run`/`agent cleanup`, not for the offline commands
    from axoneme.agent._daemon import run_agent

    if os.geteuid() != 0:
        sys.stderr.write("error: the agent must run as root (agent run)\n")
        return 1
    cfg = build_agent_config(args)
    root = logging.getLogger()
    if not args.debug:
        root.setLevel(logging.INFO)
        logging.getLogger("aiohttp").setLevel(logging.WARNING)
    return run_agent(cfg)


def cmd_agent_cleanup(args: argparse.Namespace) -> int:
    from axoneme.agent._daemon import cleanup

    return cleanup(os.path.abspath(args.state_dir))


def not_ready(data: Mapping[str, Any]) -> list[str]:
    """Why the agent cannot enforce policy now (``status --brief``). A refused
    policy or a failed endpoint write is a fault of that object, not of the
    agent: those stay in ``Faults:`` and keep the agent ready."""
    problems = []
    dp = data.get("datapath", {})
    if not dp.get("healthy"):
        problems.append(f"datapath {dp.get('name')} unhealthy: {dp.get('detail', '')}".rstrip(": "))
    k8s = data.get("components", {}).get("kubernetes")
    if k8s:
        if not k8s.get("connected"):
            problems.append(f"kubernetes: not connected to {k8s.get('api_server', '')}: "
                            f"{k8s.get('last_error') or 'no answer yet'}")
        unsynced = sorted(n for n, r in k8s.get("resources", {}).items() if not r.get("synced"))
        if unsynced:
            problems.append("kubernetes: not synced: " + ", ".join(unsynced))
    return problems


def cmd_status(args: argparse.Namespace) -> int:
    data = client(args).get("/v1/status")
    if getattr(args, "brief", False):
        problems = not_ready(data)
        sys.stdout.write("OK\n" if not problems else "".join(f"{p}\n" for p in problems))
        return 1 if problems else 0
    if args.output in ("json", "yaml"):
        return emit(args, data, lambda wide: None)
    dp = data["datapath"]
    health = "Ok" if dp.get("healthy") else "Unhealthy"
    mode = f" ({dp['mode']})" if dp.get("mode") else ""
    sys.stdout.write(f"Datapath:         {dp.get('name')}{mode}   {health}   {dp.get('detail', '')}\n")
    sys.stdout.write(f"Endpoints:        {data['endpoints']}\n")
    sys.stdout.write(f"Identities:       {data['identities']}\n")
    sys.stdout.write(f"Policy revision:  {data['policy_revision']}\n")
    comp = data.get("components", {})
    guard = comp.get("guard", {})
    sys.stdout.write(f"Guard:            {'installed' if guard.get('installed') else 'off'} "
                     f"({guard.get('pod_cidr', '')})\n")
    flows = comp.get("flows", {})
    sys.stdout.write(f"Flows:            {flows.get('stored', 0)}/{flows.get('capacity', 0)}\n")
    sys.stdout.write(f"API:              {comp.get('api', {}).get('socket', '')}\n")
    k8s = comp.get("kubernetes")
    if k8s:
        res = k8s.get("resources", {})
        synced = ", ".join(f"{n} {r.get('count', 0)}{'' if r.get('synced') else ' (not synced)'}"
                           for n, r in res.items())
        state = "connected" if k8s.get("connected") else "DISCONNECTED"
        sys.stdout.write(f"Kubernetes:       {k8s.get('api_server', '')}   {state}   node "
                         f"{k8s.get('node', '')}\n")
        sys.stdout.write(f"  synced:         {synced}\n")
        if k8s.get("last_error"):
            sys.stdout.write(f"  last error:     {k8s['last_error']}\n")
    faults = data.get("faults") or []
    sys.stdout.write(f"Faults:           {len(faults) or 'none'}\n")
    for line in faults:
        sys.stdout.write(f"  - {line}\n")
    return 0


# -- policies ----------------------------------------------------------------------------------

def _flatten(files: Sequence[Sequence[str]] | None) -> list[str]:
    return [p for group in files or [] for p in group]


def _parse_files(paths: list[str]) -> list[Any]:
    """Documents and parsed policies of ``paths``; InvalidRule with every problem."""
    from axoneme.core.policy.parse import load_documents, parse_policy

    docs = load_documents(paths)
    problems = []
    out = []
    for d in docs:
        try:
            out.append((parse_policy(d), d))
        except InvalidRule as e:
            problems.extend(e.problems)
    if problems:
        raise InvalidRule(problems)
    return out


def cmd_policy_apply(args: argparse.Namespace) -> int:
    paths = _flatten(args.files)
    parsed = _parse_files(paths)
    if not parsed:
        raise UsageError(f"no policy found in {', '.join(paths)}")
    docs = [{"file": d.file, "index": d.index, "obj": d.obj} for _, d in parsed]
    if args.audit:  # policy apply --audit: staged, not enforced (cli/_audit.py)
        from axoneme.core.policy.api import staged_document

        docs = [{**d, "obj": staged_document(d["obj"])} for d in docs]
    res = client(args).post("/v1/policies", {"documents": docs})
    if args.output == "json":
        dump_json(res)
        return 0
    for ref in res.get("applied", []):
        where = f"{ref['namespace']}/" if ref["namespace"] else ""
        sys.stdout.write(f"{ref['kind']} {where}{ref['name']} applied\n")
    sys.stdout.write(f"revision {res['revision']}\n")
    for ep_id, error in sorted((res.get("errors") or {}).items()):
        # in force, but this endpoint's kernel state could not be written
        # (it fails closed until a retry writes it; `axoneme status` says so)
        sys.stderr.write(f"warning: endpoint {ep_id}: {error}\n")
    return 0


_KINDS = {
    "networkpolicy": "NetworkPolicy", "networkpolicies": "NetworkPolicy", "netpol": "NetworkPolicy",
    "np": "NetworkPolicy",
    "ciliumnetworkpolicy": "CiliumNetworkPolicy", "ciliumnetworkpolicies": "CiliumNetworkPolicy",
    "cnp": "CiliumNetworkPolicy",
    "ciliumclusterwidenetworkpolicy": "CiliumClusterwideNetworkPolicy",
    "ciliumclusterwidenetworkpolicies": "CiliumClusterwideNetworkPolicy",
    "ccnp": "CiliumClusterwideNetworkPolicy",
}


def cmd_policy_delete(args: argparse.Namespace) -> int:
    refs: list[dict[str, str]] = []
    paths = _flatten(args.files)
    if paths:
        for pol, _ in _parse_files(paths):
            refs.append({"kind": pol.ref.kind.value, "namespace": pol.ref.namespace,
                         "name": pol.ref.name})
    if args.ref:
        kind_s, sep, name = args.ref.partition("/")
        kind = _KINDS.get(kind_s.lower().split(".")[0])
        if not sep or not name or kind is None:
            raise UsageError(f"expected KIND/NAME with KIND one of NetworkPolicy (netpol), "
                             f"CiliumNetworkPolicy (cnp), CiliumClusterwideNetworkPolicy (ccnp), "
                             f"got {args.ref!r}")
        ns = "" if kind == "CiliumClusterwideNetworkPolicy" else args.namespace
        refs.append({"kind": kind, "namespace": ns, "name": name})
    if not refs:
        raise UsageError("policy delete needs -f PATH or KIND/NAME")
    res = client(args).post("/v1/policies/delete", {"refs": refs})
    for ref in res.get("removed", []):
        where = f"{ref['namespace']}/" if ref["namespace"] else ""
        sys.stdout.write(f"{ref['kind']} {where}{ref['name']} deleted\n")
    sys.stdout.write(f"revision {res['revision']}\n")
    return 0


def cmd_policy_list(args: argparse.Namespace) -> int:
    res = client(args).get("/v1/policies")
    return print_policies(args, select(args, res["policies"], lambda p: p.get("labels")))


def print_policies(args: argparse.Namespace, policies: list[dict[str, Any]]) -> int:
    def render(wide: bool) -> None:
        extra = ["SOURCE", "RULES", "LABELS"] if wide else []
        table(["REVISION", "KIND", "NAMESPACE", "NAME", *extra],
              [[p["revision"], p["kind"], p["namespace"] or "-", p["name"],
                *([p.get("source", ""), p.get("rules", ""), joined_labels(p.get("labels") or {})]
                  if wide else [])] for p in policies])

    return emit(args, policies, render)


# -- namespaces ------------------------------------------------------------------------------------

def parse_label_args(items: Sequence[str] | str | None) -> dict[str, str]:
    try:
        return parse_labels(items)
    except BadRequest as e:
        raise UsageError(str(e) + " (--labels)") from None


def cmd_ns_create(args: argparse.Namespace) -> int:
    labels = parse_label_args(args.labels)
    res = client(args).post("/v1/namespaces", {"name": args.name, "labels": labels})
    sys.stdout.write(f"namespace/{res['name']} created\n")
    return 0


def cmd_ns_label(args: argparse.Namespace) -> int:
    remove = [x[:-1] for x in args.labels if x.endswith("-") and "=" not in x]
    labels = parse_label_args([x for x in args.labels if not (x.endswith("-") and "=" not in x)])
    client(args).post(f"/v1/namespaces/{q(args.name)}/labels", {"labels": labels, "remove": remove})
    sys.stdout.write(f"namespace/{args.name} labeled\n")
    return 0


def cmd_ns_delete(args: argparse.Namespace) -> int:
    client(args).delete(f"/v1/namespaces/{q(args.name)}")
    sys.stdout.write(f"namespace/{args.name} deleted\n")
    return 0


def cmd_ns_list(args: argparse.Namespace) -> int:
    res = select(args, client(args).get("/v1/namespaces"), lambda n: n["labels"])
    # wide: nothing more is known of a namespace than its labels
    return emit(args, res, lambda wide: table(["NAME", "LABELS"],
                                              [[n["name"], joined_labels(n["labels"])] for n in res]))


# -- endpoints / identities -----------------------------------------------------------------------

def _enf(flag: bool) -> str:
    return "Enabled" if flag else "Disabled"


def cmd_ep_list(args: argparse.Namespace) -> int:
    res = select(args, client(args).get("/v1/endpoints"), lambda ep: ep["labels"])

    def render(wide: bool) -> None:
        headers = ["ENDPOINT", "POLICY (ingress)", "POLICY (egress)", "IDENTITY",
                   "LABELS (source:key[=value])", "IPv4", "STATUS"]
        more = ["POD", "INTERFACE", "READY (ms)"] if wide else []
        rows: list[list[Any]] = [["", "ENFORCEMENT", "ENFORCEMENT", "", "", "", "",
                                  *[""] * len(more)]]
        for ep in res:
            labels = ep["labels"] or [""]
            rows.append([ep["id"], _enf(ep["policy_enforcement"]["ingress"]),
                         _enf(ep["policy_enforcement"]["egress"]), ep["identity"], labels[0],
                         ep["ipv4"] or "", ep["status"],
                         *([ep.get("pod", ""), ep.get("host_ifname", ""), ep.get("ready_ms", "")]
                           if wide else [])])
            for extra in labels[1:]:
                rows.append(["", "", "", "", extra, "", "", *[""] * len(more)])
        table(headers + more, rows)

    return emit(args, res, render)


def cmd_ep_get(args: argparse.Namespace) -> int:
    try:
        ep_id = int(args.id)
    except ValueError:
        raise UsageError(f"invalid endpoint id {args.id!r}") from None
    res = client(args).get(f"/v1/endpoints/{ep_id}")
    if args.output in ("json", "yaml"):
        return emit(args, res, lambda wide: None)
    sys.stdout.write(f"Endpoint {res['id']}  pod {res['pod']}  identity {res['identity']}  "
                     f"{res['ipv4']}  {res['status']}\n")
    sys.stdout.write(f"Interface: {res['host_ifname']} (ifindex {res['host_ifindex']})\n")
    sys.stdout.write("Labels:\n" + "".join(f"  {lab}\n" for lab in res["labels"]))
    sys.stdout.write(f"Policy enforcement: ingress {_enf(res['policy_enforcement']['ingress'])}, "
                     f"egress {_enf(res['policy_enforcement']['egress'])}\n")
    sys.stdout.write("\nResolved policy (MapState):\n")
    for e in res.get("policy") or []:
        sys.stdout.write(f"  {e['key']:<40} {e['entry']:<16} {', '.join(e['derived_from'])}\n")
    sys.stdout.write("\nDatapath (dump):\n")
    if res.get("datapath") is None:
        sys.stdout.write(f"  unavailable: {res.get('datapath_error', '')}\n")
    else:
        for e in res["datapath"]:
            sys.stdout.write(f"  {e['key']:<40} {e['entry']}\n")
    sys.stdout.write(f"\nIn sync: {'yes' if res.get('in_sync') else 'NO'}\n")
    return 0


def cmd_id_list(args: argparse.Namespace) -> int:
    res = select(args, client(args).get("/v1/identities"), lambda i: i["labels"])

    def render(wide: bool) -> None:
        rows: list[list[Any]] = []
        for ident in res:
            labels = ident["labels"] or [""]
            more = ["yes" if ident["reserved"] else "no", ident.get("endpoints", "")] if wide else []
            rows.append([ident["id"], labels[0], *more])
            for extra in labels[1:]:
                rows.append(["", extra, *[""] * len(more)])
        table(["ID", "LABELS", *(["RESERVED", "ENDPOINTS"] if wide else [])], rows)

    return emit(args, [{"id": i["id"], "labels": i["labels"], "reserved": i["reserved"],
                        "endpoints": i.get("endpoints", 0)} for i in res], render)
