"""Parse and validate policy documents into the normalized model (``api.py``).

Input is Kubernetes YAML/JSON: one or more documents per file, or a
``kind: List``. Supported kinds: ``networking.k8s.io/v1 NetworkPolicy``,
``cilium.io/v2 CiliumNetworkPolicy`` (``spec`` and/or ``specs``) and
``cilium.io/v2 CiliumClusterwideNetworkPolicy``.

Validation never stops at the first problem: every problem of every
document is collected, each with its file, document index and field path,
and raised together as one ``InvalidRule``.

Where axoneme differs from Cilium on purpose:
- Several L3 peer kinds in one rule (e.g. ``toEndpoints`` and ``toCIDR``)
  are accepted and OR-ed; Cilium rejects the combination ("not supported
  yet"). ``toFQDNs`` mixed with other L3 fields is rejected as in Cilium.
- ``icmps`` together with ``toPorts`` is accepted (traffic must match one
  of them); Cilium rejects it.
- ``toServices`` is parsed and validated but selects no peer (axoneme has no
  Services); a rule with only ``toServices`` therefore allows nothing.
- A port may be omitted (= all ports), as with Cilium's extended protocols.
- ``fromRequires``/``toRequires`` (deprecated in Cilium 1.17), node/group
  peers, TLS interception, listeners, ``authentication`` and generic
  ``l7proto`` rules are rejected as not supported.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from axoneme.core import yamlsafe
from axoneme.core.errors import InvalidRule, Problem
from axoneme.core.labels import (
    NAMESPACE_LABELS_PREFIX,
    POD_NAMESPACE_LABEL,
    valid_label_key,
    valid_label_value,
)
from axoneme.core.mapstate import Direction
from axoneme.core.policy._walk import Walker, item, join, make_problem, type_name
from axoneme.core.policy.api import (
    ENTITIES,
    CIDRPeer,
    DNSRule,
    EndpointPeer,
    EntityPeer,
    FQDNPeer,
    HeaderMatch,
    HTTPRule,
    ICMPField,
    IPNetwork,
    KafkaRule,
    L7Rule,
    L7Spec,
    PeerRule,
    Policy,
    PolicyKind,
    PolicyRef,
    PortProtocol,
    PortRule,
    Rule,
)
from axoneme.core.regex import regex_problem
from axoneme.core.selectors import LabelSelector, Operator, Requirement, split_selector_key

LOG = logging.getLogger(__name__)

# User values in problem messages are shown as a short excerpt: a value may be
# huge (or aliased thousands of times) and every message would copy it.
_q = yamlsafe.excerpt

__all__ = [
    "Document", "ICMP_TYPES", "KAFKA_API_KEYS", "check_paths", "load_documents", "parse_policies",
    "parse_policy", "parse_policy_obj",
]

POLICY_EXTENSIONS = (".yaml", ".yml", ".json")
# Kubernetes refuses objects over ~1.5 MiB; a policy file is never near this.
MAX_FILE_BYTES = 32 * 1024 * 1024
DEFAULT_NAMESPACE = "default"

_API_VERSIONS = {
    PolicyKind.NETWORK_POLICY: "networking.k8s.io/v1",
    PolicyKind.CILIUM_NETWORK_POLICY: "cilium.io/v2",
    PolicyKind.CILIUM_CLUSTERWIDE_NETWORK_POLICY: "cilium.io/v2",
}

# Cilium's pkg/policy/api/icmp.go name tables (type names are CamelCase).
ICMP_TYPES: dict[str, dict[str, int]] = {
    "IPv4": {
        "EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8,
        "EchoRequest": 8, "RouterAdvertisement": 9, "RouterSelection": 10,
        "RouterSolicitation": 10, "TimeExceeded": 11, "ParameterProblem": 12,
        "Timestamp": 13, "TimestampReply": 14, "Photuris": 40,
        "ExtendedEchoRequest": 42, "ExtendedEchoReply": 43,
    },
    "IPv6": {
        "DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3,
        "ParameterProblem": 4, "EchoRequest": 128, "EchoReply": 129,
        "MulticastListenerQuery": 130, "MulticastListenerReport": 131,
        "MulticastListenerDone": 132, "RouterSolicitation": 133,
        "RouterAdvertisement": 134, "NeighborSolicitation": 135,
        "NeighborAdvertisement": 136, "RedirectMessage": 137,
        "RouterRenumbering": 138, "ICMPNodeInformationQuery": 139,
        "ICMPNodeInformationResponse": 140,
        "InverseNeighborDiscoverySolicitation": 141,
        "InverseNeighborDiscoveryAdvertisement": 142,
        "HomeAgentAddressDiscoveryRequest": 144,
        "HomeAgentAddressDiscoveryReply": 145, "MobilePrefixSolicitation": 146,
        "MobilePrefixAdvertisement": 147,
        "DuplicateAddressRequestCodeSuffix": 157,
        "DuplicateAddressConfirmationCodeSuffix": 158,
        "ExtendedEchoRequest": 160, "ExtendedEchoReply": 161,
    },
}

# Kafka API key names Cilium accepts in ``apiKey`` (case-insensitive).
KAFKA_API_KEYS = frozenset({
    "produce", "fetch", "offsets", "metadata", "leaderandisr", "stopreplica",
    "updatemetadata", "controlledshutdown", "offsetcommit", "offsetfetch",
    "findcoordinator", "joingroup", "heartbeat", "leavegroup", "syncgroup",
    "describegroups", "listgroups", "saslhandshake", "apiversions",
    "createtopics", "deletetopics", "deleterecords", "initproducerid",
    "offsetforleaderepoch", "addpartitionstotxn", "addoffsetstotxn", "endtxn",
    "writetxnmarkers", "txnoffsetcommit", "describeacls", "createacls",
    "deleteacls", "describeconfigs", "alterconfigs",
})

_PORT_PROTOCOLS = ("TCP", "UDP", "SCTP", "ANY")
_NP_PROTOCOLS = ("TCP", "UDP", "SCTP")
_MISMATCH_ACTIONS = ("", "LOG", "ADD", "DELETE", "REPLACE")

# RFC 1123 names as Kubernetes checks them.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# IANA service names (RFC 6335 5.1): 1-15 chars, letters/digits/hyphens, at
# least one letter, no leading/trailing or double hyphen.
_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9]|-(?=[a-z0-9]))*$")
_FQDN_NAME = re.compile(r"^[-a-zA-Z0-9_.]+$")
_FQDN_PATTERN = re.compile(r"^[-a-zA-Z0-9_.*]+$")
_KAFKA_TOPIC = re.compile(r"^[a-zA-Z0-9._-]+$")

_METADATA_FIELDS = (
    "name", "namespace", "labels", "annotations", "uid", "resourceVersion",
    "generation", "creationTimestamp", "managedFields", "generateName",
    "selfLink", "finalizers", "ownerReferences", "deletionTimestamp",
    "deletionGracePeriodSeconds",
)


# --- documents -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Document:
    """One YAML document, or one item of a ``kind: List``."""

    file: str
    index: int
    obj: Any


def _expand(paths: Sequence[str], problems: list[Problem]) -> list[str]:
    """Files to read: files as given, directories as their sorted policy files."""
    files: list[str] = []
    for path in paths:
        if path == "-":
            files.append(path)
        elif os.path.isdir(path):
            try:
                names = sorted(os.listdir(path))
            except OSError as e:
                problems.append(make_problem(path, None, "", f"cannot read directory: {e.strerror or e}"))
                continue
            files.extend(
                os.path.join(path, n) for n in names
                if n.endswith(POLICY_EXTENSIONS) and os.path.isfile(os.path.join(path, n))
            )
        elif os.path.exists(path):
            files.append(path)
        else:
            problems.append(make_problem(path, None, "", "no such file or directory"))
    return files


def _read(path: str, problems: list[Problem]) -> bytes | None:
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_FILE_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        problems.append(make_problem(path, None, "", f"cannot read file: {e.strerror or e}"))
        return None
    if len(data) > MAX_FILE_BYTES:
        # read no further: /dev/zero or a runaway generator never ends
        problems.append(make_problem("<stdin>" if path == "-" else path, None, "",
                                     f"file too large (more than {MAX_FILE_BYTES // (1024 * 1024)} MiB)"))
        return None
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key \"{_q(k)}\"")
        out[k] = v
    return out


def _is_list(obj: object) -> bool:
    """``kind: List`` (kubectl) or ``kind: <Kind>List`` (the API's list kinds)."""
    if not isinstance(obj, Mapping):
        return False
    kind = obj.get("kind")
    return kind == "List" or (isinstance(kind, str) and kind.endswith("List") and "items" in obj)


def _parse_file(file: str, data: bytes, problems: list[Problem]) -> list[Any]:
    """The top-level objects of one file (``None`` for empty documents).

    Read with the hardened loader (``axoneme.core.yamlsafe``): nesting,
    alias expansion and integer literals are bounded before anything
    recurses or converts.
    """
    file_name = "<stdin>" if file == "-" else file
    objs: list[Any] = []
    try:
        if file.endswith(".json"):
            objs.append(yamlsafe.load_json(data, file_name, object_pairs_hook=_no_duplicates))
        else:
            for obj in yamlsafe.iter_load_all(data, file_name):
                objs.append(obj)
    except yamlsafe.InputError as e:
        problems.append(make_problem(file_name, e.document, "", e.message))
    return objs


def _load(paths: Sequence[str]) -> tuple[list[str], list[Document], list[Problem]]:
    """(files read, documents, problems) for ``paths``."""
    problems: list[Problem] = []
    files = _expand(paths, problems)
    docs: list[Document] = []
    for file in files:
        data = _read(file, problems)
        if data is None:
            continue
        file_name = "<stdin>" if file == "-" else file
        index = 0
        for obj in _parse_file(file, data, problems):
            if obj is None:
                continue  # empty document (e.g. a trailing ---), as kubectl skips it
            if _is_list(obj):
                items = obj.get("items")
                if items is None:
                    items = []
                if not isinstance(items, list):
                    problems.append(make_problem(file_name, index, "items", f"expected a list, got {type_name(items)}"))
                    index += 1
                    continue
                for it in items:
                    docs.append(Document(file_name, index, it))
                    index += 1
                continue
            docs.append(Document(file_name, index, obj))
            index += 1
    return files, docs, problems


def load_documents(paths: Sequence[str]) -> list[Document]:
    """Every document (or List item) of ``paths`` (files or directories).

    Performs no kind filtering. Raises ``InvalidRule`` naming the file (and
    line) for missing files and malformed YAML/JSON, after reading all.
    """
    _, docs, problems = _load(paths)
    if problems:
        raise InvalidRule(problems)
    return docs


def parse_policy(doc: Document) -> Policy:
    """Parse one document; raises ``InvalidRule`` listing all its problems."""
    w = Walker(doc.file, doc.index)
    policy = _Parser(w).document(doc.obj)
    if w.problems or policy is None:
        raise InvalidRule(w.all_problems() or [make_problem(doc.file, doc.index, "", "invalid policy")])
    # The parser only reads the fields it knows; the whole document is kept
    # (Policy.raw), sent as JSON and persisted, so it must also survive a
    # JSON round trip and the state file's bounds (e.g. `status` holding a
    # huge integer or NaN would be accepted, then refused at the next start).
    bad = yamlsafe.json_problem(doc.obj)
    if bad is not None:
        raise InvalidRule([make_problem(doc.file, doc.index, bad[0], bad[1])])
    return policy


def parse_policy_obj(obj: Any, file: str = "<api>", index: int = 0) -> Policy:
    """Parse an already-decoded object (e.g. from the API)."""
    return parse_policy(Document(file, index, obj))


def parse_policies(paths: Sequence[str]) -> list[Policy]:
    """Parse every document of ``paths``; raises ``InvalidRule`` with every
    problem of every document (including unreadable files)."""
    policies, problems, _, _ = check_paths(paths)
    if problems:
        raise InvalidRule(problems)
    return policies


def check_paths(paths: Sequence[str]) -> tuple[list[Policy], list[Problem], list[str], list[Document]]:
    """(policies, problems, files, documents): validation without raising."""
    files, docs, problems = _load(paths)
    policies: list[Policy] = []
    for doc in docs:
        try:
            policies.append(parse_policy(doc))
        except InvalidRule as e:
            problems.extend(e.problems)
    return policies, _in_input_order(problems, paths, files), files, docs


def _in_input_order(problems: list[Problem], paths: Sequence[str], files: list[str]) -> list[Problem]:
    """Problems grouped by file in the order the files were given, then by document."""
    file_rank = {("<stdin>" if f == "-" else f): i for i, f in enumerate(files)}

    def arg_rank(file: str) -> int:
        for i, p in enumerate(paths):
            if file == p or (p == "-" and file == "<stdin>") or file.startswith(os.path.join(p, "")):
                return i
        return len(paths)

    def key(p: Problem) -> tuple[int, int, int]:
        return (arg_rank(p.file), file_rank.get(p.file, -1), -1 if p.document is None else p.document)

    return sorted(problems, key=key)


# --- selectors -------------------------------------------------------------------

def _valid_selector_key(key: str) -> bool:
    _, name = split_selector_key(key)
    if valid_label_key(name):
        return True
    # Namespace-label keys embed a whole label key (which may carry a prefix).
    return name.startswith(NAMESPACE_LABELS_PREFIX) and valid_label_key(name[len(NAMESPACE_LABELS_PREFIX):])


class _Parser:
    def __init__(self, w: Walker) -> None:
        self.w = w
        self.kind: PolicyKind = PolicyKind.CILIUM_NETWORK_POLICY
        self.namespace = ""

    # --- label selectors ---------------------------------------------------------

    def selector(
        self, value: object, path: str, rename: Callable[[str], str] = lambda k: k,
        check_key: Callable[[str], bool] = _valid_selector_key,
    ) -> LabelSelector | None:
        w = self.w
        m = w.mapping(value, path, ("matchLabels", "matchExpressions"))
        if m is None:
            return None
        ok = True
        labels: dict[str, str] = {}
        if m.get("matchLabels") is not None:
            lp = join(path, "matchLabels")
            raw = w.mapping(m["matchLabels"], lp)
            if raw is None:
                ok = False
            else:
                for k, v in raw.items():
                    kp = join(lp, k)
                    if not check_key(k):
                        w.problem(kp, f"invalid label key \"{_q(k)}\"")
                        ok = False
                    if v is None:
                        v = ""
                    if isinstance(v, bool) or not isinstance(v, str):
                        w.problem(kp, f"expected a string label value, got {type_name(v)} (quote the value)")
                        ok = False
                        continue
                    if not valid_label_value(v):
                        w.problem(kp, f"invalid label value \"{_q(v)}\"")
                        ok = False
                    labels[rename(k)] = v
        reqs: list[Requirement] = []
        for i, expr in enumerate(w.list(m.get("matchExpressions"), join(path, "matchExpressions"))):
            ep = item(join(path, "matchExpressions"), i)
            req = self.requirement(expr, ep, rename, check_key)
            if req is None:
                ok = False
            else:
                reqs.append(req)
        if not ok:
            return None
        return LabelSelector.build(labels, reqs)

    def requirement(
        self, value: object, path: str, rename: Callable[[str], str], check_key: Callable[[str], bool],
    ) -> Requirement | None:
        w = self.w
        m = w.mapping(value, path, ("key", "operator", "values"))
        if m is None:
            return None
        ok = True
        key = None
        if "key" not in m:
            w.problem(join(path, "key"), "missing required field \"key\"")
            ok = False
        else:
            key = w.string(m["key"], join(path, "key"))
            if key is not None and not check_key(key):
                w.problem(join(path, "key"), f"invalid label key \"{_q(key)}\"")
                ok = False
        op: Operator | None = None
        if "operator" not in m:
            w.problem(join(path, "operator"), "missing required field \"operator\"")
            ok = False
        else:
            op_text = w.string(m["operator"], join(path, "operator"))
            if op_text is not None:
                try:
                    op = Operator(op_text)
                except ValueError:
                    w.problem(join(path, "operator"),
                              f"invalid operator \"{_q(op_text)}\" (expected In, NotIn, Exists or DoesNotExist)")
        values: list[str] = []
        vp = join(path, "values")
        for i, v in enumerate(w.list(m.get("values"), vp)):
            if isinstance(v, bool) or not isinstance(v, str):
                w.problem(item(vp, i), f"expected a string, got {type_name(v)} (quote the value)")
                ok = False
            elif not valid_label_value(v):
                w.problem(item(vp, i), f"invalid label value \"{_q(v)}\"")
                ok = False
            else:
                values.append(v)
        if op in (Operator.IN, Operator.NOT_IN) and not m.get("values"):
            w.problem(vp, f"operator {op.value} requires at least one value")
            ok = False
        if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and m.get("values"):
            w.problem(vp, f"operator {op.value} must not have values")
            ok = False
        if not ok or key is None or op is None:
            return None
        return Requirement(rename(key), op, frozenset(values))

    # --- documents -----------------------------------------------------------------

    def document(self, obj: object) -> Policy | None:
        w = self.w
        if not isinstance(obj, Mapping):
            w.problem("", f"expected a Kubernetes object (a mapping), got {type_name(obj)}")
            return None
        kind_value = obj.get("kind")
        if kind_value is None:
            w.problem("kind", "missing required field \"kind\"")
            return None
        if not isinstance(kind_value, str):
            w.wrong_type("kind", "a string", kind_value)
            return None
        try:
            kind = PolicyKind(kind_value)
        except ValueError:
            w.problem("kind", f"unsupported kind \"{_q(kind_value)}\" (expected NetworkPolicy, "
                              "CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy)")
            return None
        self.kind = kind
        top = ["apiVersion", "kind", "metadata", "spec", "status"]
        if kind is not PolicyKind.NETWORK_POLICY:
            top.append("specs")
        m = w.mapping(obj, "", top)
        assert m is not None
        api_version = m.get("apiVersion")
        if api_version is None:
            w.problem("apiVersion", "missing required field \"apiVersion\"")
        elif api_version != _API_VERSIONS[kind]:
            if isinstance(api_version, str):
                w.problem("apiVersion", f"unsupported apiVersion \"{_q(api_version)}\" for {kind.value} "
                                        f"(expected {_API_VERSIONS[kind]})")
            else:
                w.wrong_type("apiVersion", "a string", api_version)
        name = self.metadata(m.get("metadata"))
        ref = PolicyRef(kind, self.namespace, name or "")
        if kind is PolicyKind.NETWORK_POLICY:
            rules = self.network_policy(m, ref)
        else:
            rules = self.cilium_policy(m, ref)
        if w.problems:
            return None
        return Policy(ref=ref, rules=tuple(rules), raw=dict(m), origin=w.file)

    def metadata(self, value: object) -> str | None:
        w = self.w
        if value is None:
            w.problem("metadata.name", "missing required field \"metadata.name\"")
            self.namespace = DEFAULT_NAMESPACE if self.kind.namespaced else ""
            return None
        m = w.mapping(value, "metadata", _METADATA_FIELDS)
        if m is None:
            self.namespace = DEFAULT_NAMESPACE if self.kind.namespaced else ""
            return None
        name = None
        if m.get("name") is None:
            w.problem("metadata.name", "missing required field \"metadata.name\"")
        else:
            name = w.string(m["name"], "metadata.name")
            if name is not None and (len(name) > 253 or not _DNS_SUBDOMAIN.match(name)):
                w.problem("metadata.name", f"invalid name \"{_q(name)}\": must be a lower-case RFC 1123 "
                                           "subdomain (a-z, 0-9, '-', '.'; at most 253 characters)")
                name = None
        namespace = DEFAULT_NAMESPACE
        if m.get("namespace") is not None:
            ns = w.string(m["namespace"], "metadata.namespace")
            if ns is not None and ns != "":
                if len(ns) > 63 or not _DNS_LABEL.match(ns):
                    w.problem("metadata.namespace", f"invalid namespace \"{_q(ns)}\": must be a lower-case "
                                                    "RFC 1123 label (a-z, 0-9, '-'; at most 63 characters)")
                else:
                    namespace = ns
        if m.get("labels") is not None:
            for k, v in (w.string_map(m["labels"], "metadata.labels") or {}).items():
                if not valid_label_key(k):
                    w.problem(join("metadata.labels", k), f"invalid label key \"{_q(k)}\"")
                elif not valid_label_value(v):
                    w.problem(join("metadata.labels", k), f"invalid label value \"{_q(v)}\"")
        if m.get("annotations") is not None:
            w.string_map(m["annotations"], "metadata.annotations")
        # A clusterwide policy has no namespace; kubectl ignores one if given.
        self.namespace = namespace if self.kind.namespaced else ""
        return name

    # --- Kubernetes NetworkPolicy ----------------------------------------------------

    def network_policy(self, m: Mapping[str, Any], ref: PolicyRef) -> list[Rule]:
        w = self.w
        if "specs" in m:
            w.problem("specs", "unknown field \"specs\"")
        if m.get("spec") is None:
            w.problem("spec", "missing required field \"spec\"")
            return []
        spec = w.mapping(m["spec"], "spec", ("podSelector", "ingress", "egress", "policyTypes"))
        if spec is None:
            return []
        ns = self.namespace
        pod_key: Callable[[str], str] = lambda k: f"k8s:{k}"  # noqa: E731
        subject = self.selector(spec.get("podSelector"), "spec.podSelector", pod_key, valid_label_key)
        if subject is not None:
            subject = subject.with_requirement(Requirement(f"k8s:{POD_NAMESPACE_LABEL}", Operator.IN, frozenset({ns})))
        types: list[str] = []
        if spec.get("policyTypes") is not None:
            for i, t in enumerate(w.list(spec["policyTypes"], "spec.policyTypes")):
                if t not in ("Ingress", "Egress"):
                    w.problem(item("spec.policyTypes", i),
                              f"invalid policy type \"{_q(t)}\" (expected Ingress or Egress)")
                elif t not in types:
                    types.append(t)
        else:
            # Kubernetes defaulting: Ingress always, Egress when egress rules exist.
            types.append("Ingress")
            eg = spec.get("egress")
            if isinstance(eg, list) and eg:
                types.append("Egress")
        peer_rules: list[PeerRule] = []
        for direction, field, peer_field in (
            (Direction.INGRESS, "ingress", "from"), (Direction.EGRESS, "egress", "to"),
        ):
            fp = join("spec", field)
            for i, r in enumerate(w.list(spec.get(field), fp)):
                pr = self.np_rule(r, item(fp, i), direction, peer_field)
                # Rules of a direction not in policyTypes are ignored (Kubernetes).
                if pr is not None and direction.name.capitalize() in types:
                    peer_rules.append(pr)
        if subject is None:
            return []
        return [Rule(
            ref=ref, subject=subject, rules=tuple(peer_rules),
            enforce_ingress="Ingress" in types, enforce_egress="Egress" in types,
            origin=w.file, document=w.index,
        )]

    def np_rule(self, value: object, path: str, direction: Direction, peer_field: str) -> PeerRule | None:
        w = self.w
        m = w.mapping(value, path, (peer_field, "ports"))
        if m is None:
            return None
        ok = True
        peers: list[Any] = []
        pp = join(path, peer_field)
        for i, p in enumerate(w.list(m.get(peer_field), pp)):
            got = self.np_peer(p, item(pp, i))
            if got is None:
                ok = False
            else:
                peers.append(got)
        ports: list[PortProtocol] = []
        portsp = join(path, "ports")
        for i, p in enumerate(w.list(m.get("ports"), portsp)):
            got_port = self.np_port(p, item(portsp, i))
            if got_port is None:
                ok = False
            else:
                ports.append(got_port)
        if not ok:
            return None
        return PeerRule(
            direction=direction,
            peers=tuple(peers) if peers else None,
            ports=(PortRule(ports=tuple(ports)),) if ports else (),
            path=path,
        )

    def np_peer(self, value: object, path: str) -> EndpointPeer | CIDRPeer | None:
        w = self.w
        m = w.mapping(value, path, ("podSelector", "namespaceSelector", "ipBlock"))
        if m is None:
            return None
        has_pod = m.get("podSelector") is not None
        has_ns = m.get("namespaceSelector") is not None
        has_ip = m.get("ipBlock") is not None
        if has_ip and (has_pod or has_ns):
            w.problem(path, "ipBlock may not be combined with podSelector or namespaceSelector")
            return None
        if not (has_ip or has_pod or has_ns):
            w.problem(path, "a peer must have podSelector, namespaceSelector or ipBlock")
            return None
        if has_ip:
            ip = w.mapping(m["ipBlock"], join(path, "ipBlock"), ("cidr", "except"))
            if ip is None:
                return None
            return self.cidr_set(ip, join(path, "ipBlock"), except_field="except")
        reqs: set[Requirement] = set()
        ok = True
        if has_pod:
            sel = self.selector(m["podSelector"], join(path, "podSelector"), lambda k: f"k8s:{k}", valid_label_key)
            if sel is None:
                ok = False
            else:
                reqs |= sel.requirements
        if has_ns:
            sel = self.selector(m["namespaceSelector"], join(path, "namespaceSelector"),
                                lambda k: f"k8s:{NAMESPACE_LABELS_PREFIX}{k}", valid_label_key)
            if sel is None:
                ok = False
            elif sel.is_wildcard:
                # Any namespace, but only pods (Cilium: Exists on the namespace label).
                reqs.add(Requirement(f"k8s:{POD_NAMESPACE_LABEL}", Operator.EXISTS))
            else:
                reqs |= sel.requirements
        if not ok:
            return None
        if not has_ns:
            reqs.add(Requirement(f"k8s:{POD_NAMESPACE_LABEL}", Operator.IN, frozenset({self.namespace})))
        return EndpointPeer(LabelSelector(frozenset(reqs)))

    def np_port(self, value: object, path: str) -> PortProtocol | None:
        w = self.w
        m = w.mapping(value, path, ("protocol", "port", "endPort"))
        if m is None:
            return None
        ok = True
        protocol = "TCP"
        if m.get("protocol") is not None:
            proto = w.string(m["protocol"], join(path, "protocol"))
            if proto is None:
                ok = False
            elif proto not in _NP_PROTOCOLS:
                w.problem(join(path, "protocol"), f"invalid protocol \"{_q(proto)}\" (expected TCP, UDP or SCTP)")
                ok = False
            else:
                protocol = proto
        port, name = 0, None
        if m.get("port") is not None:
            got = self.port_value(m["port"], join(path, "port"))
            if got is None:
                ok = False
            else:
                port, name = got
        end = self.end_port(m, path, port, name)
        if end is False:
            ok = False
        if not ok:
            return None
        return PortProtocol(port=port, end_port=end or None, protocol=protocol, name=name)

    # --- ports -------------------------------------------------------------------

    def port_value(self, value: object, path: str) -> tuple[int, str | None] | None:
        """(number, None) or (0, name) for a port given as a number or string."""
        w = self.w
        if isinstance(value, bool) or not isinstance(value, int | str):
            w.wrong_type(path, "a port number or name", value)
            return None
        if isinstance(value, int):
            if not 0 <= value <= 65535:
                w.problem(path, f"port {value} out of range 0-65535")
                return None
            return value, None
        text = value.strip()
        if text == "":
            return 0, None
        if text.isascii() and text.isdigit():
            # length first: int() of a long digit string is slow, then raises
            number = int(text) if len(text) <= 6 else 65536
            if number > 65535:
                w.problem(path, f"port {_q(text)} out of range 0-65535")
                return None
            return number, None
        lowered = text.lower()
        if (len(lowered) <= 15 and _SVC_NAME.match(lowered) and any(c.isalpha() for c in lowered)):
            return 0, lowered
        w.problem(path, f"invalid port \"{_q(value)}\": not a number (0-65535) or a valid port name "
                        "(IANA service name: at most 15 letters, digits and '-', with a letter)")
        return None

    def end_port(self, m: Mapping[str, Any], path: str, port: int, name: str | None) -> int | None | bool:
        """endPort, None if absent, False after a problem."""
        w = self.w
        if m.get("endPort") is None:
            return None
        ep = join(path, "endPort")
        end = w.integer(m["endPort"], ep)
        if end is None:
            return False
        if not 0 <= end <= 65535:
            w.problem(ep, f"endPort {end} out of range 0-65535")
            return False
        if name is not None:
            w.problem(ep, "endPort cannot be used with a named port")
            return False
        if port == 0:
            w.problem(ep, "endPort requires a port")
            return False
        if end < port:
            w.problem(ep, f"endPort {end} is less than port {port}")
            return False
        return end if end > port else None

    # --- CIDRs -------------------------------------------------------------------

    def network(self, value: object, path: str, *, allow_address: bool) -> IPNetwork | None:
        w = self.w
        text = w.string(value, path)
        if text is None:
            return None
        try:
            if "/" not in text:
                if not allow_address:
                    raise ValueError("a prefix length is required")
                return ipaddress.ip_network(text)
            return ipaddress.ip_network(text, strict=False)
        except ValueError as e:
            w.problem(path, f"invalid CIDR \"{_q(text)}\": {_q(str(e))}")
            return None

    def cidr_set(self, m: Mapping[str, Any], path: str, except_field: str) -> CIDRPeer | None:
        w = self.w
        if m.get("cidr") is None:
            w.problem(join(path, "cidr"), "missing required field \"cidr\"")
            return None
        net = self.network(m["cidr"], join(path, "cidr"), allow_address=False)
        excepts: list[IPNetwork] = []
        ok = net is not None
        xp = join(path, except_field)
        for i, x in enumerate(w.list(m.get(except_field), xp)):
            ex = self.network(x, item(xp, i), allow_address=False)
            if ex is None:
                ok = False
                continue
            if net is not None and (ex.version != net.version or not ex.subnet_of(net)):  # type: ignore[arg-type]
                w.problem(item(xp, i), f"except {ex} is not inside cidr {net}")
                ok = False
                continue
            excepts.append(ex)
        if not ok or net is None:
            return None
        return CIDRPeer(net, tuple(excepts))

    # --- Cilium policies ---------------------------------------------------------------

    def cilium_policy(self, m: Mapping[str, Any], ref: PolicyRef) -> list[Rule]:
        w = self.w
        specs: list[tuple[str, object]] = []
        if m.get("spec") is not None:
            specs.append(("spec", m["spec"]))
        if m.get("specs") is not None:
            for i, s in enumerate(w.list(m["specs"], "specs")):
                specs.append((item("specs", i), s))
        if m.get("spec") is None and m.get("specs") is None:
            w.problem("spec", "missing required field: one of \"spec\" or \"specs\"")
        rules: list[Rule] = []
        for index, (path, spec) in enumerate(specs):
            rule = self.cilium_rule(spec, path, ref, index)
            if rule is not None:
                rules.append(rule)
        return rules

    def cilium_rule(self, value: object, path: str, ref: PolicyRef, index: int) -> Rule | None:
        w = self.w
        m = w.mapping(value, path, (
            "endpointSelector", "nodeSelector", "ingress", "ingressDeny", "egress",
            "egressDeny", "labels", "description", "enableDefaultDeny",
        ))
        if m is None:
            return None
        clusterwide = self.kind is PolicyKind.CILIUM_CLUSTERWIDE_NETWORK_POLICY
        has_es = m.get("endpointSelector") is not None
        has_ns = m.get("nodeSelector") is not None
        subject: LabelSelector | None = None
        if has_ns and not clusterwide:
            w.problem(join(path, "nodeSelector"),
                      "nodeSelector is only allowed in a CiliumClusterwideNetworkPolicy")
        elif has_es and has_ns:
            w.problem(path, "rule cannot have both endpointSelector and nodeSelector")
        elif not has_es and not has_ns:
            w.problem(join(path, "endpointSelector"),
                      "missing required field: one of \"endpointSelector\" or \"nodeSelector\"")
        elif has_es:
            subject = self.selector(m["endpointSelector"], join(path, "endpointSelector"))
            if subject is not None and not clusterwide:
                subject = subject.with_requirement(
                    Requirement(f"k8s:{POD_NAMESPACE_LABEL}", Operator.IN, frozenset({self.namespace})))
        else:
            subject = self.selector(m["nodeSelector"], join(path, "nodeSelector"))
        host = has_ns and not has_es
        description = ""
        if m.get("description") is not None:
            description = w.string(m["description"], join(path, "description")) or ""
        if m.get("labels") is not None:
            self.rule_labels(m["labels"], join(path, "labels"))
        default_deny: dict[str, bool] = {}
        if m.get("enableDefaultDeny") is not None:
            dp = join(path, "enableDefaultDeny")
            dd = w.mapping(m["enableDefaultDeny"], dp, ("ingress", "egress"))
            for k, v in (dd or {}).items():
                if v is None:
                    continue
                b = w.boolean(v, join(dp, k))
                if b is not None:
                    default_deny[k] = b
        peer_rules: list[PeerRule] = []
        has_rules = {"ingress": False, "egress": False}
        for field, direction, deny in (
            ("ingress", Direction.INGRESS, False), ("ingressDeny", Direction.INGRESS, True),
            ("egress", Direction.EGRESS, False), ("egressDeny", Direction.EGRESS, True),
        ):
            fp = join(path, field)
            items = w.list(m.get(field), fp)
            if items:
                has_rules[direction.name.lower()] = True
            for i, r in enumerate(items):
                pr = self.cilium_peer_rule(r, item(fp, i), direction, deny, host)
                if pr is not None:
                    peer_rules.append(pr)
        if subject is None:
            return None
        # Default deny per direction: on when the rule has (allow or deny)
        # rules there, unless enableDefaultDeny says otherwise (Cilium).
        return Rule(
            ref=ref, subject=subject, rules=tuple(peer_rules),
            enforce_ingress=default_deny.get("ingress", has_rules["ingress"]),
            enforce_egress=default_deny.get("egress", has_rules["egress"]),
            node_selector=host, description=description, index=index,
            origin=w.file, document=w.index,
        )

    def rule_labels(self, value: object, path: str) -> None:
        w = self.w
        for i, lab in enumerate(w.list(value, path)):
            lp = item(path, i)
            lm = w.mapping(lab, lp, ("key", "value", "source"))
            if lm is None:
                continue
            if lm.get("key") is None:
                w.problem(join(lp, "key"), "missing required field \"key\"")
            for k in ("key", "value", "source"):
                if lm.get(k) is not None:
                    w.string(lm[k], join(lp, k))

    def cilium_peer_rule(
        self, value: object, path: str, direction: Direction, deny: bool, host: bool,
    ) -> PeerRule | None:
        w = self.w
        ingress = direction is Direction.INGRESS
        pre = "from" if ingress else "to"
        allowed = [f"{pre}Endpoints", f"{pre}Entities", f"{pre}CIDR", f"{pre}CIDRSet", "toPorts", "icmps"]
        if not ingress:
            allowed += ["toServices", "toFQDNs"]
        unsupported = {
            f"{pre}Requires": f"{pre}Requires is not supported (deprecated in Cilium 1.17)",
            f"{pre}Nodes": f"{pre}Nodes is not supported",
            f"{pre}Groups": f"{pre}Groups is not supported",
            "authentication": "authentication (mutual auth) is not supported",
        }
        if deny and not ingress:
            unsupported["toFQDNs"] = "toFQDNs is not allowed in deny rules"
        m = w.mapping(value, path, allowed, unsupported)
        if m is None:
            return None
        n_problems = len(w.problems)
        peers: list[Any] = []
        l3_fields: list[str] = []

        def present(field: str) -> list[Any]:
            items = w.list(m.get(field), join(path, field))
            if items:
                l3_fields.append(field)
            return items

        fp = f"{pre}Endpoints"
        for i, sel in enumerate(present(fp)):
            got = self.peer_selector(sel, item(join(path, fp), i))
            if got is not None:
                peers.append(got)
        fp = f"{pre}Entities"
        for i, ent in enumerate(present(fp)):
            ep = item(join(path, fp), i)
            name = w.string(ent, ep)
            if name is None:
                continue
            if name not in ENTITIES:
                w.problem(ep, f"unknown entity \"{_q(name)}\" (expected one of {', '.join(sorted(ENTITIES))})")
                continue
            peers.append(EntityPeer(name))
        fp = f"{pre}CIDR"
        for i, c in enumerate(present(fp)):
            net = self.network(c, item(join(path, fp), i), allow_address=True)
            if net is not None:
                peers.append(CIDRPeer(net))
        fp = f"{pre}CIDRSet"
        for i, c in enumerate(present(fp)):
            cp = item(join(path, fp), i)
            cm = w.mapping(c, cp, ("cidr", "except"), {
                "cidrGroupRef": "cidrGroupRef is not supported",
                "cidrGroupSelector": "cidrGroupSelector is not supported",
            })
            if cm is not None and not (isinstance(c, dict) and any(k in c for k in ("cidrGroupRef", "cidrGroupSelector"))):
                got_cidr = self.cidr_set(cm, cp, except_field="except")
                if got_cidr is not None:
                    peers.append(got_cidr)
        services = False
        if not ingress:
            for i, s in enumerate(present("toServices")):
                self.to_service(s, item(join(path, "toServices"), i))
                services = True
            for i, f in enumerate(present("toFQDNs")):
                got_fqdn = self.fqdn(f, item(join(path, "toFQDNs"), i))
                if got_fqdn is not None:
                    peers.append(FQDNPeer(got_fqdn[0], got_fqdn[1]))
            if "toFQDNs" in l3_fields and len(l3_fields) > 1:
                others = ", ".join(f for f in l3_fields if f != "toFQDNs")
                w.problem(join(path, "toFQDNs"), f"toFQDNs cannot be combined with {others} in one rule")

        port_items = w.list(m.get("toPorts"), join(path, "toPorts"))
        if services and port_items:
            w.problem(join(path, "toServices"), "toServices cannot be combined with toPorts")
        port_rules: list[PortRule] = []
        for i, pr in enumerate(port_items):
            got_pr = self.port_rule(pr, item(join(path, "toPorts"), i), direction, deny, host)
            if got_pr is not None:
                port_rules.append(got_pr)
        icmps: list[ICMPField] = []
        ip = join(path, "icmps")
        icmp_items = w.list(m.get("icmps"), ip)
        for i, ic in enumerate(icmp_items):
            icmps.extend(self.icmp_rule(ic, item(ip, i)))
        if len(w.problems) != n_problems:
            return None
        empty = not l3_fields and not port_items and not icmp_items
        return PeerRule(
            direction=direction, deny=deny,
            peers=tuple(peers) if l3_fields else None,
            ports=tuple(port_rules), icmps=tuple(icmps),
            allows_nothing=empty, path=path,
        )

    def peer_selector(self, value: object, path: str) -> EndpointPeer | None:
        sel = self.selector(value, path)
        if sel is None:
            return None
        # Policies on initializing endpoints (no labels yet) select reserved:init.
        matches_init = any(r.key == "reserved:init" for r in sel.requirements)
        if self.kind is PolicyKind.CILIUM_CLUSTERWIDE_NETWORK_POLICY:
            if sel.is_wildcard:
                sel = sel.with_requirement(Requirement(f"k8s:{POD_NAMESPACE_LABEL}", Operator.EXISTS))
        elif not (matches_init or sel.mentions_key(POD_NAMESPACE_LABEL)
                  or sel.mentions_key_prefix(NAMESPACE_LABELS_PREFIX)):
            sel = sel.with_requirement(
                Requirement(f"k8s:{POD_NAMESPACE_LABEL}", Operator.IN, frozenset({self.namespace})))
        return EndpointPeer(sel)

    def to_service(self, value: object, path: str) -> None:
        w = self.w
        m = w.mapping(value, path, ("k8sService", "k8sServiceSelector"))
        if m is None:
            return
        present = [k for k in ("k8sService", "k8sServiceSelector") if m.get(k) is not None]
        if len(present) != 1:
            w.problem(path, "exactly one of k8sService or k8sServiceSelector is required")
            return
        sp = join(path, present[0])
        if present[0] == "k8sService":
            sm = w.mapping(m["k8sService"], sp, ("serviceName", "namespace"))
            if sm is not None:
                if sm.get("serviceName") is None:
                    w.problem(join(sp, "serviceName"), "missing required field \"serviceName\"")
                else:
                    w.string(sm["serviceName"], join(sp, "serviceName"), allow_empty=False)
                w.opt_string(sm, "namespace", sp)
        else:
            sm = w.mapping(m["k8sServiceSelector"], sp, ("selector", "namespace"))
            if sm is not None:
                if sm.get("selector") is None:
                    w.problem(join(sp, "selector"), "missing required field \"selector\"")
                else:
                    self.selector(sm["selector"], join(sp, "selector"))
                w.opt_string(sm, "namespace", sp)

    def fqdn(self, value: object, path: str) -> tuple[str | None, str | None] | None:
        """(matchName, matchPattern), normalized, for toFQDNs and rules.dns items."""
        w = self.w
        m = w.mapping(value, path, ("matchName", "matchPattern"))
        if m is None:
            return None
        name = w.opt_string(m, "matchName", path)
        pattern = w.opt_string(m, "matchPattern", path)
        if "matchName" in m and m["matchName"] is not None and name is None:
            return None
        if "matchPattern" in m and m["matchPattern"] is not None and pattern is None:
            return None
        if name and pattern:
            w.problem(path, "only one of matchName and matchPattern may be set")
            return None
        if not name and not pattern:
            w.problem(path, "one of matchName or matchPattern is required")
            return None
        if name:
            norm = name.lower().rstrip(".")
            if not norm or not _FQDN_NAME.match(norm):
                w.problem(join(path, "matchName"), f"invalid matchName \"{_q(name)}\" (allowed: a-z, 0-9, '-', '_', '.')")
                return None
            return norm, None
        assert pattern
        norm = pattern.lower()
        if norm != "*":
            norm = norm.rstrip(".")
        if not norm or not _FQDN_PATTERN.match(norm):
            w.problem(join(path, "matchPattern"),
                      f"invalid matchPattern \"{_q(pattern)}\" (allowed: a-z, 0-9, '-', '_', '.', '*')")
            return None
        return None, norm

    def port_rule(
        self, value: object, path: str, direction: Direction, deny: bool, host: bool,
    ) -> PortRule | None:
        w = self.w
        allowed = ["ports"] if deny else ["ports", "rules"]
        unsupported = {k: f"{k} is not supported" for k in
                       ("serverNames", "terminatingTLS", "originatingTLS", "listener")}
        if deny:
            unsupported["rules"] = "L7 rules are not allowed in deny rules"
        m = w.mapping(value, path, allowed, unsupported)
        if m is None:
            return None
        n_problems = len(w.problems)
        ports: list[PortProtocol] = []
        pp = join(path, "ports")
        port_items = w.list(m.get("ports"), pp)
        for i, p in enumerate(port_items):
            got = self.cilium_port(p, item(pp, i))
            if got is not None:
                ports.append(got)
        l7 = None
        if m.get("rules") is not None:
            l7 = self.l7_rules(m["rules"], join(path, "rules"), direction, host, ports, len(port_items))
        if len(w.problems) != n_problems:
            return None
        return PortRule(ports=tuple(ports), l7=l7)

    def cilium_port(self, value: object, path: str) -> PortProtocol | None:
        w = self.w
        m = w.mapping(value, path, ("port", "endPort", "protocol"))
        if m is None:
            return None
        ok = True
        protocol = "ANY"
        if m.get("protocol") is not None:
            proto = w.string(m["protocol"], join(path, "protocol"))
            if proto is None:
                ok = False
            elif proto.upper() not in _PORT_PROTOCOLS and proto != "":
                hint = " (ICMP goes in icmps)" if proto.upper().startswith("ICMP") else ""
                w.problem(join(path, "protocol"),
                          f"invalid protocol \"{_q(proto)}\" (expected TCP, UDP, SCTP or ANY){hint}")
                ok = False
            elif proto:
                protocol = proto.upper()
        port, name = 0, None
        if m.get("port") is not None:
            got = self.port_value(m["port"], join(path, "port"))
            if got is None:
                ok = False
            else:
                port, name = got
        end = self.end_port(m, path, port, name)
        if end is False:
            ok = False
        if not ok:
            return None
        return PortProtocol(port=port, end_port=end or None, protocol=protocol, name=name)

    def l7_rules(
        self, value: object, path: str, direction: Direction, host: bool,
        ports: list[PortProtocol], n_port_items: int,
    ) -> L7Spec | None:
        w = self.w
        m = w.mapping(value, path, ("http", "kafka", "dns"), {
            "l7proto": "generic L7 rules (l7proto) are not supported",
            "l7": "generic L7 rules (l7) are not supported",
        })
        if m is None:
            return None
        kinds = [k for k in ("http", "kafka", "dns") if m.get(k) is not None]
        if not kinds:
            return None
        if len(kinds) > 1:
            w.problem(path, f"more than one L7 rule type in one rules block ({', '.join(kinds)})")
            return None
        parser = kinds[0]
        port_path = join(path.rsplit(".", 1)[0], "ports")
        if host:
            w.problem(join(path, parser), "L7 rules are not supported in host (nodeSelector) policies")
        if parser == "dns" and direction is Direction.INGRESS:
            w.problem(join(path, parser), "DNS rules are not allowed on ingress")
        if parser == "dns" and n_port_items == 0:
            w.problem(port_path, "port 53 must be specified for DNS rules")
        for i, p in enumerate(ports):
            where = item(port_path, i)
            if parser == "dns":
                if p.protocol not in ("TCP", "UDP", "ANY"):
                    w.problem(join(where, "protocol"), f"DNS rules apply to TCP, UDP or ANY (not {p.protocol})")
            elif p.protocol != "TCP":
                w.problem(join(where, "protocol"),
                          f"L7 rules can only apply to TCP (not {p.protocol}) except for DNS rules")
            if p.port == 0 and p.name is None:
                w.problem(join(where, "port"), "L7 rules cannot be used when the port is 0 (all ports)")
            if p.end_port is not None:
                w.problem(join(where, "endPort"), "L7 rules do not support port ranges")
        rp = join(path, parser)
        rules: list[L7Rule] = []
        for i, r in enumerate(w.list(m[parser], rp)):
            got: L7Rule | None
            if parser == "http":
                got = self.http_rule(r, item(rp, i))
            elif parser == "kafka":
                got = self.kafka_rule(r, item(rp, i))
            else:
                pair = self.fqdn(r, item(rp, i))
                got = DNSRule(pair[0], pair[1]) if pair is not None else None
            if got is not None:
                rules.append(got)
        if any(r == _EMPTY_RULES[parser] for r in rules):
            # An empty rule allows everything at L7, so the whole spec does.
            rules = []
        return L7Spec(parser=parser, rules=tuple(rules))

    def http_rule(self, value: object, path: str) -> HTTPRule | None:
        w = self.w
        m = w.mapping(value, path, ("method", "path", "host", "headers", "headerMatches"))
        if m is None:
            return None
        n = len(w.problems)
        regexes: dict[str, str | None] = {}
        for k in ("method", "path", "host"):
            text = w.opt_string(m, k, path)
            if text:
                # Matched with RE2 on the packet path (linear time): refuse here
                # what RE2 cannot express, so no rule fails only at match time.
                why = regex_problem(text)
                if why is not None:
                    shown = text if len(text) <= 200 else text[:200] + "..."
                    w.problem(join(path, k), f"invalid regular expression \"{shown}\" "
                              f"(RE2 syntax: no backreferences or lookaround): {why}")
            regexes[k] = text or None
        headers: list[str] = []
        hp = join(path, "headers")
        for i, h in enumerate(w.list(m.get("headers"), hp)):
            text = w.string(h, item(hp, i), allow_empty=False)
            if text is not None:
                headers.append(text)
        matches: list[HeaderMatch] = []
        hmp = join(path, "headerMatches")
        for i, h in enumerate(w.list(m.get("headerMatches"), hmp)):
            ip = item(hmp, i)
            hm = w.mapping(h, ip, ("name", "value", "mismatch"), {"secret": "secret is not supported"})
            if hm is None:
                continue
            name = None
            if hm.get("name") is None:
                w.problem(join(ip, "name"), "missing required field \"name\"")
            else:
                name = w.string(hm["name"], join(ip, "name"), allow_empty=False)
            hv = w.opt_string(hm, "value", ip)
            mismatch = w.opt_string(hm, "mismatch", ip) or ""
            if mismatch not in _MISMATCH_ACTIONS:
                w.problem(join(ip, "mismatch"),
                          f"invalid mismatch action \"{_q(mismatch)}\" (expected LOG, ADD, DELETE or REPLACE)")
            if name is not None:
                matches.append(HeaderMatch(name, hv, mismatch))
        if len(w.problems) != n:
            return None
        return HTTPRule(method=regexes["method"], path=regexes["path"], host=regexes["host"],
                        headers=tuple(headers), header_matches=tuple(matches))

    def kafka_rule(self, value: object, path: str) -> KafkaRule | None:
        w = self.w
        m = w.mapping(value, path, ("role", "apiKey", "apiVersion", "clientID", "topic"))
        if m is None:
            return None
        n = len(w.problems)
        role = w.opt_string(m, "role", path) or None
        api_key = w.opt_string(m, "apiKey", path) or None
        api_version = m.get("apiVersion")
        if isinstance(api_version, int) and not isinstance(api_version, bool):
            api_version = str(api_version)
        elif api_version is not None:
            api_version = w.string(api_version, join(path, "apiVersion")) or None
        client_id = w.opt_string(m, "clientID", path) or None
        topic = w.opt_string(m, "topic", path) or None
        if role is not None:
            role = role.lower()
            if role not in ("produce", "consume"):
                w.problem(join(path, "role"), f"invalid role \"{_q(role)}\" (expected produce or consume)")
            if api_key is not None:
                w.problem(join(path, "apiKey"), "role and apiKey cannot both be set")
        if api_key is not None:
            api_key = api_key.lower()
            if api_key not in KAFKA_API_KEYS:
                w.problem(join(path, "apiKey"), f"unknown Kafka apiKey \"{_q(api_key)}\"")
        if api_version is not None and not (
                api_version.isascii() and api_version.isdigit() and len(api_version) <= 5
                and int(api_version) <= 32767):
            w.problem(join(path, "apiVersion"), f"invalid apiVersion \"{_q(api_version)}\" (expected a number)")
        if topic is not None and (len(topic) > 255 or not _KAFKA_TOPIC.match(topic)):
            w.problem(join(path, "topic"),
                      f"invalid topic \"{_q(topic)}\" (at most 255 characters of a-z, A-Z, 0-9, '.', '_', '-')")
        if len(w.problems) != n:
            return None
        return KafkaRule(role=role, api_key=api_key, api_version=api_version, client_id=client_id, topic=topic)

    def icmp_rule(self, value: object, path: str) -> list[ICMPField]:
        w = self.w
        m = w.mapping(value, path, ("fields",))
        if m is None:
            return []
        out: list[ICMPField] = []
        fp = join(path, "fields")
        for i, f in enumerate(w.list(m.get("fields"), fp)):
            ip = item(fp, i)
            fm = w.mapping(f, ip, ("family", "type"))
            if fm is None:
                continue
            family = "IPv4"
            if fm.get("family") is not None:
                fam = w.string(fm["family"], join(ip, "family"))
                if fam is None:
                    continue
                if fam not in ("IPv4", "IPv6", ""):
                    w.problem(join(ip, "family"), f"invalid family \"{_q(fam)}\" (expected IPv4 or IPv6)")
                    continue
                family = fam or "IPv4"
            tp = join(ip, "type")
            if fm.get("type") is None:
                w.problem(tp, "missing required field \"type\"")
                continue
            t = fm["type"]
            number: int | None = None
            if isinstance(t, bool) or not isinstance(t, int | str):
                w.wrong_type(tp, "an ICMP type number or name", t)
                continue
            if isinstance(t, int) or (t.isascii() and t.isdigit()):
                # length first: int() of a long digit string is slow, then raises
                number = t if isinstance(t, int) else int(t) if len(t) <= 4 else 256
                if not 0 <= number <= 255:
                    w.problem(tp, f"ICMP type {_q(t)} out of range 0-255")
                    continue
            else:
                number = ICMP_TYPES[family].get(t)
                if number is None:
                    w.problem(tp, f"unknown {family} ICMP type \"{_q(t)}\" (expected 0-255 or one of "
                                  f"{', '.join(sorted(set(ICMP_TYPES[family])))})")
                    continue
            out.append(ICMPField(family, number))
        return out


_EMPTY_RULES: dict[str, L7Rule] = {"http": HTTPRule(), "kafka": KafkaRule(), "dns": DNSRule()}
