"""Staged policies and audit mode (docs/cli.md "Audit and staged policies"):
``policy promote``, ``endpoint config``, and ``policy apply --audit``'s
document edit."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from axoneme.agent.cli import UsageError, add_output_flag
from axoneme.agent.cli._agentcmds import add_socket_flag, client
from axoneme.agent.cli._output import dump_json
from axoneme.agent.cli._policyget import _matches, _wanted, _where, check_one
from axoneme.core.policy.api import staged_document

AUDIT_OPTION = "policy-audit-mode"

PROMOTE_EPILOG = """examples:
  axoneme policy apply --audit -f default-deny.yaml   # staged: reported, not enforced
  axoneme observe --verdict AUDIT                       # what it would drop
  axoneme policy promote default-deny -n shop           # enforce it
  kubectl annotate cnp default-deny -n shop policy.axoneme.io/mode-   # Kubernetes mode
"""

CONFIG_EPILOG = """examples:
  axoneme endpoint config 12                                   # show its options
  axoneme endpoint config 12 policy-audit-mode=enabled         # forward would-be drops as AUDIT
  axoneme endpoint config 12 policy-audit-mode=disabled
"""


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The subcommands of ``parser`` (a group another module registered)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise KeyError(parser.prog)


def _sub(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    return _subparsers(parser).choices[name]


def register(groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]]) -> None:
    # flags of commands that cli/_agentcmds registers
    _sub(groups[""].choices["agent"], "run").add_argument(
        "--policy-audit-mode", action="store_true", default=None,
        help="Cilium's audit mode: a packet policy would drop is forwarded and reported with "
             "verdict AUDIT (observe --verdict AUDIT), on every endpoint; per endpoint: "
             "endpoint config ID policy-audit-mode=enabled")
    groups["policy"].choices["apply"].add_argument(
        "--audit", action="store_true",
        help="stage the policies (annotation policy.axoneme.io/mode: audit): computed as if "
             "enforced, what they would drop is forwarded and reported as AUDIT; `policy "
             "promote NAME` enforces one")
    p = groups["policy"].add_parser(
        "promote", help="enforce a staged policy (remove its policy.axoneme.io/mode: audit)",
        epilog=PROMOTE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME|KIND/NAME",
                   help="the staged policy (KIND: netpol, cnp, ccnp or the full kind name)")
    p.add_argument("-n", "--namespace", default=None,
                   help="the policy's namespace (default 'default'; CCNPs have none)")
    add_output_flag(p)
    add_socket_flag(p)
    p.set_defaults(handler=cmd_policy_promote)
    c = _subparsers(groups[""].choices["endpoint"]).add_parser(
        "config", help="show or set an endpoint's options (policy-audit-mode=enabled|disabled)",
        epilog=CONFIG_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("id", help="endpoint id (endpoint list shows them)")
    c.add_argument("options", nargs="*", metavar="OPTION=VALUE",
                   help=f"{AUDIT_OPTION}=enabled|disabled (Cilium's PolicyAuditMode)")
    add_output_flag(c)
    add_socket_flag(c)
    c.set_defaults(handler=cmd_endpoint_config)


def stage_documents(docs: list[dict[str, Any]]) -> None:
    """``policy apply --audit``: annotate every document ``policy.axoneme.io/mode: audit``."""
    for d in docs:
        d["obj"] = staged_document(d["obj"])


def cmd_policy_promote(args: argparse.Namespace) -> int:
    kind, name = _wanted(args, "policy promote")
    api = client(args)
    found = [p for p in api.get("/v1/policies")["policies"] if _matches(p, kind, name, args.namespace)]
    assert name is not None  # a required argument
    check_one(args, found, kind, name, "policy promote")
    ref = {k: found[0][k] for k in ("kind", "namespace", "name")}
    res = api.post("/v1/policies/promote", {"refs": [ref]})
    if args.output == "json":
        dump_json(res)
        return 0
    for r in res.get("promoted", []):
        sys.stdout.write(f"{_where(r)} promoted: enforced\n")
    for r in res.get("already_enforced", []):
        sys.stdout.write(f"{_where(r)} is not staged: already enforced\n")
    sys.stdout.write(f"revision {res['revision']}\n")
    for ep_id, error in sorted((res.get("errors") or {}).items()):
        sys.stderr.write(f"warning: endpoint {ep_id}: {error}\n")
    return 0


def cmd_endpoint_config(args: argparse.Namespace) -> int:
    options: dict[str, str] = {}
    for item in args.options:
        key, sep, value = item.partition("=")
        if not sep or key.lower() != AUDIT_OPTION or value.lower() not in ("enabled", "disabled"):
            raise UsageError(f"expected {AUDIT_OPTION}=enabled|disabled, got {item!r} "
                             f"(endpoint config)")
        options[AUDIT_OPTION] = value.lower()
    api = client(args)
    path = f"/v1/endpoints/{args.id}/config"
    res = api.post(path, options) if options else api.get(path)
    if args.output == "json":
        dump_json(res)
        return 0
    mode = res[AUDIT_OPTION]
    if res.get("agent_policy_audit_mode") and mode == "disabled":
        mode += " (the agent runs with --policy-audit-mode: audit mode anyway)"
    sys.stdout.write(f"Endpoint {res['id']}\n  {AUDIT_OPTION}: {mode}\n")
    for ep_id, error in sorted((res.get("errors") or {}).items()):
        sys.stderr.write(f"warning: endpoint {ep_id}: {error}\n")
    return 0
