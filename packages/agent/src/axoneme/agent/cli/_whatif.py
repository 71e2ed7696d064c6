"""``axoneme policy diff`` and ``axoneme policy recommend``: what-if and recommendations.

Both compute offline with the engine of ``policy trace``/``policy matrix``
(``axoneme.core.policy.diff``/``recommend``); the policies, pods and flows
come from the live agent over its API, or from files (``--cluster``,
``--old``, ``--flows``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from axoneme.agent.cli import EXIT_OK, UsageError, add_output_flag
from axoneme.agent.cli._agentcmds import _KINDS, add_socket_flag, client
from axoneme.agent.cli._observe import parse_time
from axoneme.core.cluster import Cluster
from axoneme.core.errors import AxonemeError, InvalidRule, PolicyError
from axoneme.core.labels import (
    CLUSTER_LABEL,
    NAMESPACE_LABELS_PREFIX,
    POD_NAMESPACE_LABEL,
    SERVICE_ACCOUNT_LABEL,
)
from axoneme.core.mapstate import Protocol
from axoneme.core.policy.api import Policy, PolicyKind, PolicyRef
from axoneme.core.policy.diff import DiffResult, FlowFlip, ProbeFlip, compose, diff
from axoneme.core.policy.engine import EngineOptions
from axoneme.core.policy.observed import Observed, load_flow_lines, observe
from axoneme.core.policy.parse import load_documents, parse_policies, parse_policy, parse_policy_obj
from axoneme.core.policy.recommend import CNP, NP, recommend
from axoneme.core.policy.trace import SideResult, TraceInputError, TraceResult, parse_port

EXIT_FLIPS = 1
# probe flips the table shows (a default deny over a big cluster flips thousands)
TABLE_FLIPS = 200
# every flow the agent keeps (its ring holds a few thousand)
_ALL_FLOWS = 1_000_000


def register(groups: dict[str, argparse._SubParsersAction]) -> None:  # type: ignore[type-arg]
    policy = groups["policy"]
    d = policy.add_parser(
        "diff", help="what-if: the truth-table delta of candidate policies against those in force",
        description="Exit 0 when nothing flips, 1 when something does, 2 on bad input.")
    d.add_argument("-f", "--filename", dest="files", action="extend", nargs="+", default=[],
                   metavar="PATH", help="candidate policy file or directory (repeatable); a policy "
                                        "replaces the one in force of the same kind, namespace, name")
    d.add_argument("--against", choices=["live"], default=None,
                   help="compare with the live agent's policies, pods and flows (the default "
                        "without --cluster)")
    d.add_argument("--cluster", dest="cluster", action="append", default=None, metavar="PATH",
                   help="offline: cluster description (v1 Namespace and v1 Pod objects; the "
                        "policies it holds, e.g. a kubectl dump's, are in force)")
    d.add_argument("--old", dest="old", action="extend", nargs="+", default=[], metavar="PATH",
                   help="with --cluster: policies in force too (repeatable; one of the same "
                        "kind, namespace and name replaces the cluster file's)")
    d.add_argument("--replace", action="store_true",
                   help="the candidate is the -f policies alone (everything in force is replaced)")
    d.add_argument("--remove", action="append", default=[], metavar="KIND/[NS/]NAME",
                   help="drop this policy from the candidate (repeatable; NS default: default)")
    d.add_argument("--promote", action="append", default=[], metavar="KIND/[NS/]NAME",
                   help="a staged policy in force (policy.axoneme.io/mode: audit), as if promoted "
                        "(repeatable)")
    d.add_argument("--port", dest="ports", action="append", default=[], metavar="PORT[/PROTO]",
                   help="also probe this port (repeatable)")
    d.add_argument("--since", default=None, metavar="T",
                   help="decide the flows since T with the candidate: a duration back from now "
                        "or an RFC 3339 time, as observe --since (live default 10m, 0: no flows; "
                        "--flows FILE: all of them unless given)")
    d.add_argument("--flows", default=None, metavar="FILE",
                   help="flows to decide with the candidate: `observe -o json` lines")
    d.add_argument("--only-observed", action="store_true",
                   help="the exit code counts observed flows only (the truth table is still shown)")
    d.add_argument("--policy-cidr-match-mode", default="", metavar="MODE",
                   help="as `agent run --policy-cidr-match-mode`")
    add_output_flag(d)
    add_socket_flag(d)
    d.set_defaults(handler=run_diff)

    r = policy.add_parser(
        "recommend", help="least-privilege policies from observed flows (YAML on stdout)")
    r.add_argument("--namespace", "-n", dest="namespaces", action="append", default=None,
                   metavar="NS", help="only workloads of this namespace (repeatable)")
    r.add_argument("--since", default="1h", metavar="T",
                   help="flows since T: a duration back from now (default 1h; 0: all) or an "
                        "RFC 3339 time, as observe --since")
    r.add_argument("--kind", choices=[NP, CNP], default=NP,
                   help="np: NetworkPolicy (default), cnp: CiliumNetworkPolicy (toFQDNs, entities, ICMP)")
    r.add_argument("--flows", default=None, metavar="FILE",
                   help="offline: `observe -o json` lines instead of the agent's flow store")
    add_output_flag(r, ("yaml", "json"))
    add_socket_flag(r)
    r.set_defaults(handler=run_recommend)


# -- inputs ----------------------------------------------------------------------------

def _since(text: str | None, default: str) -> float | None:
    """Epoch seconds of the window's start (``observe --since``'s forms); None: ``0``."""
    value = text if text is not None else default
    return None if value.strip() == "0" else parse_time(value, "--since")


def _agent_flows(args: argparse.Namespace) -> list[dict[str, Any]]:
    # NDJSON read line by line (one flow alone would otherwise be decoded as one object)
    lines = client(args).stream_lines("/v1/flows", {"last": _ALL_FLOWS, "format": "json"})
    return [json.loads(line) for line in lines if line.strip()]


@dataclass
class _IdentityLabels:
    """What a pod's identity labels say: its own labels, service account, namespace labels, cluster."""

    own: dict[str, str] = field(default_factory=dict)
    service_account: str = "default"
    namespace: dict[str, str] = field(default_factory=dict)
    cluster: str = ""

    @classmethod
    def split(cls, identity_labels: Sequence[str]) -> _IdentityLabels:
        out = cls()
        for text in identity_labels:
            source, _, rest = text.partition(":")
            key, _, value = rest.partition("=")
            if source != "k8s" or key == POD_NAMESPACE_LABEL:
                continue
            if key == CLUSTER_LABEL:
                out.cluster = value
            elif key == SERVICE_ACCOUNT_LABEL:
                out.service_account = value
            elif key.startswith(NAMESPACE_LABELS_PREFIX):
                out.namespace[key[len(NAMESPACE_LABELS_PREFIX):]] = value
            else:
                out.own[key] = value
        return out


def live_cluster(args: argparse.Namespace) -> tuple[Cluster, str]:
    """The agent's namespaces and endpoints as a cluster description, and the cluster name
    its identities carry ("" if none says)."""
    c = client(args)
    objs: list[dict[str, Any]] = []
    for ns in c.get("/v1/namespaces") or []:
        objs.append({"kind": "Namespace", "metadata": {"name": ns["name"], "labels": dict(ns.get("labels") or {})}})
    declared = {o["metadata"]["name"] for o in objs}
    cluster_name = ""
    for ep in c.get("/v1/endpoints") or []:
        ns, _, name = str(ep.get("pod") or "").partition("/")
        if not name or not ep.get("ipv4"):
            continue
        labels = _IdentityLabels.split(ep.get("labels") or [])
        cluster_name = cluster_name or labels.cluster
        if ns not in declared:  # Kubernetes mode: namespaces come with the pods' labels
            declared.add(ns)
            objs.append({"kind": "Namespace", "metadata": {"name": ns, "labels": labels.namespace}})
        ports = [{"name": p["name"], "containerPort": p["port"], "protocol": p["protocol"]}
                 for p in ep.get("named_ports") or []]
        objs.append({"kind": "Pod", "metadata": {"name": name, "namespace": ns, "labels": labels.own},
                     "spec": {"serviceAccountName": labels.service_account,
                              "containers": [{"name": "c", "ports": ports}]},
                     "status": {"podIP": ep["ipv4"]}})
    return Cluster.from_objects(objs, file="<agent>"), cluster_name


def live_policies(args: argparse.Namespace) -> list[Policy]:
    """The agent's policies in force, parsed again from the documents it was given."""
    res = client(args).get("/v1/policies", documents="1")
    out: list[Policy] = []
    for i, view in enumerate(res.get("policies") or []):
        doc = view.get("document")
        if not isinstance(doc, dict):
            where = f"{view.get('namespace')}/" if view.get("namespace") else ""
            raise AxonemeError(f"the agent does not give the document of {view.get('kind')} "
                               f"{where}{view.get('name')}: use --cluster with --old (--against)")
        out.append(parse_policy_obj(doc, "<agent>", i))
    return out


def cluster_policies(paths: Sequence[str]) -> list[Policy]:
    """The policies a cluster description holds: a Kubernetes dump (`kubectl get
    ns,pods,netpol,cnp,ccnp -A -o yaml`) lists them with the pods, and they are what is
    in force (Cluster.load skips them). InvalidRule naming file and field for a bad one."""
    kinds = {k.value for k in PolicyKind}
    out: list[Policy] = []
    problems = []
    for doc in load_documents(paths):
        if isinstance(doc.obj, dict) and doc.obj.get("kind") in kinds:
            try:
                out.append(parse_policy(doc))
            except InvalidRule as e:
                problems.extend(e.problems)
    if problems:
        raise InvalidRule(problems)
    return out


def _ref(text: str, flag: str) -> PolicyRef:
    kind_s, sep, rest = text.partition("/")
    kind = _KINDS.get(kind_s.lower().split(".")[0])
    if not sep or not rest or kind is None:
        raise UsageError(f"expected KIND/[NS/]NAME with KIND netpol, cnp or ccnp, got {text!r} ({flag})")
    k = PolicyKind(kind)
    ns, _, name = rest.rpartition("/")
    return PolicyRef(k, (ns or "default") if k.namespaced else "", name)


# -- policy diff -----------------------------------------------------------------------

def run_diff(args: argparse.Namespace) -> int:
    if not (args.files or args.remove or args.replace or args.promote):
        raise UsageError("policy diff needs candidate policies: -f PATH (or --remove/--promote/"
                         "--replace) (-f)")
    if args.cluster and args.against:
        raise UsageError("give --against live or --cluster, not both (--against)")
    if args.old and not args.cluster:
        raise UsageError("--old needs --cluster (live: the agent's policies are in force) (--old)")
    try:
        EngineOptions(cidr_match_mode=args.policy_cidr_match_mode)
    except PolicyError as e:
        raise TraceInputError(f"{e} (--policy-cidr-match-mode)") from None
    extra: list[tuple[Protocol, int]] = []
    for text in args.ports:
        spec = parse_port(text)
        if spec.name is not None:
            raise TraceInputError(f"--port takes a number here, got {text!r} (--port)")
        extra.append((spec.protocol, spec.port))
    new = parse_policies(args.files) if args.files else []
    flows: list[dict[str, Any]] | None = load_flow_lines(args.flows) if args.flows else None
    # the window: --since; else 10m of the live agent's flows; a --flows file: all of it
    live_window = not args.cluster and not args.flows
    since = _since(args.since, "10m") if args.since is not None or live_window else None
    cluster_name = ""
    if args.cluster:
        cluster = Cluster.load(args.cluster)
        in_force = compose(cluster_policies(args.cluster),
                           parse_policies(args.old) if args.old else []).policies
    else:
        cluster, cluster_name = live_cluster(args)
        in_force = live_policies(args)
        if flows is None and since is not None:
            flows = _agent_flows(args)
    candidate = compose(in_force, new, args.replace, [_ref(r, "--remove") for r in args.remove],
                        [_ref(r, "--promote") for r in args.promote])
    observed = observe(flows, since) if flows is not None else None
    options = EngineOptions(cidr_match_mode=args.policy_cidr_match_mode)
    if cluster_name:  # the agent's, as its identities carry it
        options = dataclasses.replace(options, cluster_name=cluster_name)
    result = diff(cluster, in_force, candidate, options, observed, extra)
    if args.output == "json":
        json.dump(result.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_diff(result, (args.since or "10m") if since is not None else None,
                                     args.only_observed))
    flipped = bool(result.flow_flips) if args.only_observed else result.flipped
    return EXIT_FLIPS if flipped else EXIT_OK


def _why(side: SideResult) -> str:
    rules = f": {', '.join(side.rules)}" if side.rules else ""
    return f"{side.verdict} ({side.reason}{rules})"


def _trace_lines(label: str, r: TraceResult) -> list[str]:
    return [f"      {label}: egress {_why(r.egress)}; ingress {_why(r.ingress)}"]


def _probe_line(f: ProbeFlip) -> list[str]:
    port = f"{f.port}/{f.protocol}" + (" (any other port)" if f.any_other_port else "")
    before = "ALLOWED" if f.before.verdict != "denied" else "DENIED"
    after = "ALLOWED" if f.after.verdict != "denied" else "DENIED"
    return [f"  {f.src} -> {f.dst} {port}: {before} -> {after}",
            *_trace_lines("before", f.before), *_trace_lines("after ", f.after)]


def _flow_line(f: FlowFlip) -> list[str]:
    c = f.connection
    seen = _dt.datetime.fromtimestamp(c.last_seen).strftime("%H:%M:%S") if c.last_seen else "?"
    after = "DENIED" if f.after.verdict == "denied" else "ALLOWED"
    return [f"  {c.source.name} -> {c.destination.name} {c.what()}: {c.verdict} -> {after} "
            f"({f.change}; {c.count} flow{'s' if c.count != 1 else ''}, last {seen})",
            *_trace_lines("after", f.after)]


def _window(since: str) -> str:
    """``--since`` in words: a duration (10m) or a time (2026-12-04T15:00:00Z), as given."""
    if since.strip() == "0":
        return "(all flows)"
    return f"since {since}" + ("" if "-" in since or ":" in since else " ago")


def render_diff(r: DiffResult, since: str | None, only_observed: bool = False) -> str:
    cand = r.candidate
    out = [f"Candidate: {len(cand.added)} added, {len(cand.replaced)} replaced, "
           f"{len(cand.removed)} removed" + (f", {len(cand.promoted)} promoted" if cand.promoted else "")
           + f" ({len(cand.policies)} policies)"]
    ports = ", ".join(f"{s.port}/{s.protocol}" + ("*" if s in r.others else "") for s in r.ports)
    down = sum(1 for f in r.flips if f.after.verdict == "denied")
    out.append(f"Truth table: {len(r.flips)} of {r.probes} probes flip ({down} allowed -> denied, "
               f"{len(r.flips) - down} denied -> allowed); ports {ports or 'none'}"
               + (" (* any other port)" if r.others else ""))
    for f in r.flips[:TABLE_FLIPS]:
        out += _probe_line(f)
    if len(r.flips) > TABLE_FLIPS:
        out.append(f"  ... and {len(r.flips) - TABLE_FLIPS} more (-o json lists every one)")
    if r.flows_considered:
        window = f" {_window(since)}" if since else ""
        skipped = sum(r.flows_skipped.values())
        out.append(f"Observed flows{window}: {r.connections} connections, {len(r.flow_flips)} flip"
                   + (f" ({skipped} records not decided: "
                      + ", ".join(f"{n} {why}" for why, n in sorted(r.flows_skipped.items())) + ")"
                      if skipped else ""))
        for ff in r.flow_flips:
            out += _flow_line(ff)
    if only_observed:
        out.append("Result: " + ("an observed flow flips" if r.flow_flips else "no observed flow flips"))
    else:
        out.append("Result: " + ("something flips" if r.flipped else "nothing flips"))
    return "\n".join(out) + "\n"


# -- policy recommend ------------------------------------------------------------------

def _live_pod_labels(args: argparse.Namespace) -> dict[str, Mapping[str, str]]:
    out: dict[str, Mapping[str, str]] = {}
    for ep in client(args).get("/v1/endpoints") or []:
        if ep.get("pod"):
            out[str(ep["pod"])] = _IdentityLabels.split(ep.get("labels") or []).own
    return out


def run_recommend(args: argparse.Namespace) -> int:
    import yaml

    since = _since(args.since, "1h")
    if args.flows:
        flows = load_flow_lines(args.flows)
        pod_labels: dict[str, Mapping[str, str]] = {}
    else:
        flows = _agent_flows(args)
        pod_labels = _live_pod_labels(args)
    observed: Observed = observe(flows, since)
    rec = recommend(observed, args.kind, args.namespaces, pod_labels)
    if not rec.documents:
        sys.stderr.write(f"warning: no forwarded connection of a labelled pod"
                         f"{' in ' + ', '.join(args.namespaces) if args.namespaces else ''} "
                         f"observed {_window(args.since)}: nothing to recommend\n")
    if args.output == "json":
        for note in rec.notes:
            sys.stderr.write(f"note: {note}\n")
        json.dump({"apiVersion": "v1", "kind": "List", "items": rec.documents}, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return EXIT_OK
    head = [f"# axoneme policy recommend: {rec.connections} forwarded connections "
            f"{_window(args.since)}"]
    head += [f"# note: {n}" for n in rec.notes]
    sys.stdout.write("\n".join(head) + "\n")
    if rec.documents:
        sys.stdout.write(yaml.safe_dump_all(rec.documents, sort_keys=False, explicit_start=True))
    return EXIT_OK


__all__ = ["cluster_policies", "live_cluster", "live_policies", "register", "render_diff", "run_diff", "run_recommend"]
