"""What the web UI shows, computed from the agent's views: pure functions, no I/O.

- the service map: one node per workload, i.e. per security identity (the
  pods sharing it are listed on the node), plus the peers of flows that are
  not local pods (world, host, an address); one edge per (source identity,
  destination identity) with the flows' verdict counts;
- the flows of one edge, each with the policies that decided it (Hubble's
  ``*_allowed_by``/``*_denied_by``);
- validation of an edited YAML text, with the core parser's problems at their
  field paths.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from axoneme.core import yamlsafe
from axoneme.core.errors import InvalidRule
from axoneme.core.policy.api import Policy
from axoneme.core.policy.parse import parse_policy_obj

# verdicts as Hubble spells them; an edge's colour is its worst verdict
VERDICTS = ("FORWARDED", "REDIRECTED", "AUDIT", "DROPPED")
EDITOR_FILE = "editor"


def _side(flow: Mapping[str, Any], which: str) -> Mapping[str, Any]:
    side = flow.get(which)
    return side if isinstance(side, Mapping) else {}


def _ip(flow: Mapping[str, Any], which: str) -> str:
    ip = flow.get("IP")
    return str(ip.get(which) or "") if isinstance(ip, Mapping) else ""


def node_id(flow: Mapping[str, Any], which: str) -> str:
    """The map node of one side of a flow: its identity, else its address."""
    side = _side(flow, which)
    ident = side.get("identity")
    if ident:
        return f"id:{ident}"
    return f"ip:{_ip(flow, which)}"


def dest_port(flow: Mapping[str, Any]) -> tuple[str, int | None]:
    l4 = flow.get("l4")
    if isinstance(l4, Mapping):
        for proto in ("TCP", "UDP", "SCTP"):
            if isinstance(l4.get(proto), Mapping):
                return proto, l4[proto].get("destination_port")
        for proto in ("ICMPv4", "ICMPv6"):
            if isinstance(l4.get(proto), Mapping):
                return proto, None
    return "", None


def deciding_policies(flow: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The policies that decided the flow in its direction (AUDIT: those that would drop it)."""
    direction = "ingress" if flow.get("traffic_direction") == "INGRESS" else "egress"
    verdict = flow.get("verdict")
    field = f"{direction}_denied_by" if verdict in ("DROPPED", "AUDIT") else f"{direction}_allowed_by"
    out: list[dict[str, Any]] = []
    for p in flow.get(field) or []:
        if not isinstance(p, Mapping):
            continue
        labels = [str(x) for x in p.get("labels") or []]
        out.append({"kind": p.get("kind", ""), "namespace": p.get("namespace", ""),
                    "name": p.get("name", ""),
                    "default_deny": any(x.endswith("default-deny=true") for x in labels)})
    return out


def policy_text(flow: Mapping[str, Any]) -> str:
    """One line: which policy decided, as a person reads it."""
    pols = deciding_policies(flow)
    verdict = flow.get("verdict")
    if not pols:
        if verdict == "DROPPED":
            return str(flow.get("drop_reason_desc") or "dropped")
        direction = str(flow.get("traffic_direction") or "").lower() or "this direction"
        return f"allowed: no policy selects the endpoint for {direction}"
    names = ", ".join(f"{p['kind']} {p['namespace'] + '/' if p['namespace'] else ''}{p['name']}"
                      for p in pols)
    if verdict == "AUDIT":
        return f"would be dropped by {names}"
    if verdict == "DROPPED":
        default = all(p["default_deny"] for p in pols)
        return f"{'default deny of' if default else 'denied by'} {names}"
    return f"allowed by {names}"


@dataclass
class _Node:
    id: str
    label: str
    namespace: str
    identity: int | None
    kind: str  # workload | reserved | address
    labels: list[str]
    pods: set[str]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "namespace": self.namespace,
                "identity": self.identity, "kind": self.kind, "labels": self.labels,
                "pods": sorted(self.pods)}


_HIDDEN_LABEL_PREFIXES = ("k8s:io.kubernetes.pod.namespace", "k8s:io.cilium.k8s.namespace.labels.",
                          "k8s:io.cilium.k8s.policy.", "k8s:io.kubernetes.pod.", )


def _workload_label(labels: Sequence[str], fallback: str) -> str:
    """A short name for a workload: its app-like label, else the fallback."""
    own = {}
    for text in labels:
        source, _, rest = text.partition(":")
        key, _, value = rest.partition("=")
        if source == "k8s" and not text.startswith(_HIDDEN_LABEL_PREFIXES):
            own[key] = value
    for key in ("app.kubernetes.io/name", "app", "k8s-app", "name"):
        if own.get(key):
            return own[key]
    return fallback


def _is_reply(flow: Mapping[str, Any]) -> bool:
    return flow.get("is_reply") is True


def service_map(endpoints: Iterable[Mapping[str, Any]], identities: Iterable[Mapping[str, Any]],
                flows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Nodes (workloads by identity) and edges (from non-reply flows, counted by verdict)."""
    reserved = {int(i["id"]): [str(x) for x in i.get("labels") or []]
                for i in identities if i.get("reserved")}
    nodes: dict[str, _Node] = {}
    for ep in endpoints:
        ident = ep.get("identity")
        if ident is None:
            continue
        nid = f"id:{ident}"
        labels = [str(x) for x in ep.get("labels") or []]
        ns, _, pod = str(ep.get("pod") or "").partition("/")
        node = nodes.get(nid)
        if node is None:
            node = nodes[nid] = _Node(nid, _workload_label(labels, pod or str(ident)), ns,
                                      int(ident), "workload",
                                      [x for x in labels if not x.startswith(_HIDDEN_LABEL_PREFIXES)],
                                      set())
        if pod:
            node.pods.add(f"{ns}/{pod}")
    edges: dict[tuple[str, str], dict[str, Any]] = {}
    for flow in flows:
        if _is_reply(flow) or flow.get("verdict") not in VERDICTS:
            continue
        ends = []
        for which in ("source", "destination"):
            nid = node_id(flow, which)
            if nid not in nodes:
                side = _side(flow, which)
                ident = side.get("identity")
                ident_i = int(ident) if ident else None
                if ident_i is not None and ident_i in reserved:
                    label = ",".join(x.split(":", 1)[-1] for x in reserved[ident_i]) or str(ident_i)
                    nodes[nid] = _Node(nid, label, "", ident_i, "reserved", reserved[ident_i], set())
                else:
                    pod = str(side.get("pod_name") or "")
                    label = f"{side.get('namespace')}/{pod}" if pod else _ip(flow, which) or nid
                    nodes[nid] = _Node(nid, label, str(side.get("namespace") or ""), ident_i,
                                       "address" if not pod else "workload",
                                       [str(x) for x in side.get("labels") or []], set())
            ends.append(nid)
        key = (ends[0], ends[1])
        edge = edges.get(key)
        if edge is None:
            edge = edges[key] = {"id": f"{ends[0]}>{ends[1]}", "source": ends[0], "target": ends[1],
                                 "counts": dict.fromkeys(VERDICTS, 0), "ports": set(), "last": ""}
        edge["counts"][flow["verdict"]] += 1
        proto, port = dest_port(flow)
        if proto:
            edge["ports"].add(f"{port}/{proto}" if port is not None else proto)
        edge["last"] = max(edge["last"], str(flow.get("time") or ""))
    out_edges = []
    for edge in edges.values():
        counts = edge["counts"]
        edge["verdict"] = next(v for v in reversed(VERDICTS) if counts[v]) if any(
            counts.values()) else "FORWARDED"
        edge["ports"] = sorted(edge["ports"])
        out_edges.append(edge)
    out_edges.sort(key=lambda e: e["id"])
    return {"nodes": [n.to_json() for n in sorted(nodes.values(), key=lambda n: n.id)],
            "edges": out_edges}


def edge_flows(flows: Iterable[Mapping[str, Any]], source: str, target: str,
               limit: int = 200) -> list[dict[str, Any]]:
    """The non-reply flows from node ``source`` to node ``target``, newest first."""
    out: list[dict[str, Any]] = []
    for flow in flows:
        if _is_reply(flow) or node_id(flow, "source") != source or \
                node_id(flow, "destination") != target:
            continue
        proto, port = dest_port(flow)
        src, dst = _side(flow, "source"), _side(flow, "destination")
        out.append({
            "time": flow.get("time"), "verdict": flow.get("verdict"),
            "direction": flow.get("traffic_direction"),
            "source": f"{src.get('namespace')}/{src.get('pod_name')}" if src.get("pod_name")
            else _ip(flow, "source"),
            "destination": f"{dst.get('namespace')}/{dst.get('pod_name')}" if dst.get("pod_name")
            else _ip(flow, "destination"),
            "protocol": proto, "port": port, "summary": flow.get("Summary", ""),
            "drop_reason": flow.get("drop_reason_desc", ""),
            "policies": deciding_policies(flow), "policy": policy_text(flow)})
    out.sort(key=lambda f: str(f["time"] or ""), reverse=True)
    return out[:limit]


@dataclass
class Checked:
    """An edited text, parsed: its documents, the policies and every problem."""

    documents: list[Any]
    policies: list[Policy]
    problems: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        return {"valid": not self.problems, "problems": self.problems,
                "policies": [{"kind": p.ref.kind.value, "namespace": p.ref.namespace,
                              "name": p.ref.name} for p in self.policies]}


def _problem(document: int | None, field: str, message: str) -> dict[str, Any]:
    return {"document": document, "field": field, "message": message}


def check_text(text: str) -> Checked:
    """Parse the editor's YAML (one or more documents, or a List) with the core parser."""
    docs: list[Any] = []
    problems: list[dict[str, Any]] = []
    try:
        for obj in yamlsafe.iter_load_all(text, EDITOR_FILE):
            if obj is None:
                continue
            if isinstance(obj, Mapping) and obj.get("kind") == "List" and \
                    isinstance(obj.get("items"), list):
                docs.extend(obj["items"])
            else:
                docs.append(obj)
    except yamlsafe.InputError as e:
        return Checked([], [], [_problem(e.document, "", e.message)])
    if not docs:
        problems.append(_problem(None, "", "no policy in the editor"))
    policies: list[Policy] = []
    for i, obj in enumerate(docs):
        try:
            policies.append(parse_policy_obj(obj, EDITOR_FILE, i))
        except InvalidRule as e:
            problems.extend(_problem(p.document, p.field, p.message) for p in e.problems)
    return Checked(docs, policies, problems)


__all__ = ["EDITOR_FILE", "VERDICTS", "Checked", "check_text", "deciding_policies", "edge_flows",
           "node_id", "policy_text", "service_map"]
