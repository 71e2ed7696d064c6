"""``axoneme policy get [NAME|KIND/NAME]``: policies in the running agent, with their documents.

``-o yaml``/``-o json`` print each policy's document as it was given (the
agent records every document it enforces), so applying that output gives the
same policy: one policy prints as its document, several as a ``kind: List``
(what ``policy apply`` takes too). The table forms are ``policy list``'s.
"""

from __future__ import annotations

import argparse
from typing import Any

from axoneme.agent.cli import UsageError
from axoneme.agent.cli._agentcmds import _KINDS, add_socket_flag, client, print_policies
from axoneme.agent.cli._output import add_list_flags, emit, select

CLUSTERWIDE = "CiliumClusterwideNetworkPolicy"


def register(groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]]) -> None:
    g = groups["policy"].add_parser(
        "get", help="policies in the running agent; -o yaml|json prints their documents as applied")
    g.add_argument("name", nargs="?", metavar="NAME|KIND/NAME",
                   help="one policy (KIND: netpol, cnp, ccnp or the full kind name); "
                        "default: every policy")
    g.add_argument("-n", "--namespace", default=None,
                   help="the policy's namespace (with NAME: default 'default'; CCNPs have none); "
                        "without NAME: only policies of this namespace")
    add_list_flags(g, "yaml/json: the documents as applied (one, or a kind: List)")
    add_socket_flag(g)
    g.set_defaults(handler=cmd_policy_get)


def _wanted(args: argparse.Namespace, command: str = "policy get") -> tuple[str | None, str | None]:
    """(kind or None for any, name or None for every policy); ``command`` for the error."""
    if not args.name:
        return None, None
    kind_s, sep, name = args.name.partition("/")
    if not sep:
        return None, args.name
    kind = _KINDS.get(kind_s.lower().split(".")[0])
    if kind is None or not name:
        raise UsageError(f"expected NAME or KIND/NAME with KIND one of NetworkPolicy (netpol), "
                         f"CiliumNetworkPolicy (cnp), CiliumClusterwideNetworkPolicy (ccnp), "
                         f"got {args.name!r} ({command})")
    return kind, name


def _matches(p: dict[str, Any], kind: str | None, name: str | None, namespace: str | None) -> bool:
    if kind is not None and p["kind"] != kind:
        return False
    if name is None:
        return namespace is None or p["namespace"] == namespace
    return bool(p["name"] == name
                and (p["kind"] == CLUSTERWIDE or p["namespace"] == (namespace or "default")))


def _where(p: dict[str, Any]) -> str:
    return f"{p['kind']} {p['namespace'] + '/' if p['namespace'] else ''}{p['name']}"


def check_one(args: argparse.Namespace, found: list[dict[str, Any]], kind: str | None, name: str,
              command: str) -> None:
    """NAME or KIND/NAME must name exactly one of ``found`` (else exit 2)."""
    if not found:
        ns = "" if kind == CLUSTERWIDE else f" in namespace {args.namespace or 'default'}"
        raise UsageError(f"policy {args.name!r} not found{ns} ({command})")
    if len(found) > 1:
        raise UsageError(f"{name!r} names {len(found)} policies: "
                         f"{', '.join(_where(p) for p in found)}; give KIND/NAME ({command})")


def cmd_policy_get(args: argparse.Namespace) -> int:
    kind, name = _wanted(args)
    res = client(args).get("/v1/policies", documents="1")
    found = [p for p in res["policies"] if _matches(p, kind, name, args.namespace)]
    found = select(args, found, lambda p: p.get("labels"))
    if name is not None:
        check_one(args, found, kind, name, "policy get")
    if args.output not in ("json", "yaml"):
        return print_policies(args, found)
    docs = [p.get("document") for p in found]
    document = docs[0] if name is not None else {"apiVersion": "v1", "kind": "List", "items": docs}
    return emit(args, document, lambda wide: None)
