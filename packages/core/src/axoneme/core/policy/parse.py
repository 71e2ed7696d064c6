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
- ``toServices`` is parsed into ``ServicePeer`` where a Service source
  will resolve it (``services=True``: the agent in Kubernetes mode, offline
  commands given Service objects; ``axoneme.core.policy.services``) and
  refused everywhere else ("no Service source"): a field is enforced or
  refused, never accepted and ignored. It may be combined with ``toPorts``
  (current Cilium: the ports apply to the Services' peers); it is refused in
  deny rules (Cilium translates it in allow rules only).
- A NetworkPolicy ``ipBlock`` matches pod and node addresses too, per
  address (upstream Kubernetes; Cilium matches non-cluster peers only);
  Cilium's CIDR fields keep Cilium's meaning unless the engine's
  ``cidr_match_mode`` (``--policy-cidr-match-mode``) says otherwise.
- A port may be omitted (= all ports), as with Cilium's extended protocols.
- ``fromRequires``/``toRequires`` (deprecated in Cilium 1.17), node/group
  peers, TLS interception, listeners and ``authentication`` are rejected as
  not supported.

L7 rules (``toPorts[].rules``) are parsed by the ``axoneme.l7`` parser they
select: Cilium's ``http``/``kafka``/``dns`` fields or ``l7proto`` + ``l7``
(``_parse_cilium``). Modules: ``_documents`` (files -> documents),
``_parse_base`` (selectors, ports, CIDRs), ``_parse_k8s`` (NetworkPolicy),
``_parse_cilium`` (Cilium kinds), ``fqdn`` (toFQDNs selectors).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from axoneme.core import yamlsafe
from axoneme.core.errors import InvalidRule, Problem
from axoneme.core.labels import valid_label_key, valid_label_value
from axoneme.core.policy._documents import (
    MAX_FILE_BYTES,
    POLICY_EXTENSIONS,
    Document,
    in_input_order,
    load_documents,
    load_paths,
)
from axoneme.core.policy._parse_cilium import ICMP_TYPES, _CiliumParser
from axoneme.core.policy._parse_k8s import _NetworkPolicyParser
from axoneme.core.policy.api import MODE_ANNOTATION, MODES, Policy, PolicyKind, PolicyRef
from axoneme.core.policy.walk import Walker, join, make_problem, type_name

# User values in problem messages are shown as a short excerpt: a value may be
# huge (or aliased thousands of times) and every message would copy it.
_q = yamlsafe.excerpt

__all__ = [
    "Document", "ICMP_TYPES", "MAX_FILE_BYTES", "POLICY_EXTENSIONS", "check_paths", "load_documents",
    "parse_policies", "parse_policy", "parse_policy_obj",
]

DEFAULT_NAMESPACE = "default"

_API_VERSIONS = {
    PolicyKind.NETWORK_POLICY: "networking.k8s.io/v1",
    PolicyKind.CILIUM_NETWORK_POLICY: "cilium.io/v2",
    PolicyKind.CILIUM_CLUSTERWIDE_NETWORK_POLICY: "cilium.io/v2",
}

# RFC 1123 names as Kubernetes checks them.
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

_METADATA_FIELDS = (
    "name", "namespace", "labels", "annotations", "uid", "resourceVersion",
    "generation", "creationTimestamp", "managedFields", "generateName",
    "selfLink", "finalizers", "ownerReferences", "deletionTimestamp",
    "deletionGracePeriodSeconds",
)


def parse_policy(doc: Document, services: bool = False, json_checked: bool = False) -> Policy:
    """Parse one document; raises ``InvalidRule`` listing all its problems.

    ``services``: a Service source will resolve ``toServices`` (the agent in
    Kubernetes mode, an offline command given Services); without one it is
    refused. ``json_checked``: the document was decoded from JSON text that
    ``yamlsafe.json_text_safe`` passed, so the JSON round-trip check below
    cannot find a problem and is skipped."""
    w = Walker(doc.file, doc.index)
    parser = _Parser(w)
    parser.services = services
    policy = parser.document(doc.obj)
    if w.problems or policy is None:
        raise InvalidRule(w.all_problems() or [make_problem(doc.file, doc.index, "", "invalid policy")])
    # The parser only reads the fields it knows; the whole document is kept
    # (Policy.raw), sent as JSON and persisted, so it must also survive a
    # JSON round trip and the state file's bounds (e.g. `status` holding a
    # huge integer or NaN would be accepted, then refused at the next start).
    bad = None if json_checked else yamlsafe.json_problem(doc.obj)
    if bad is not None:
        raise InvalidRule([make_problem(doc.file, doc.index, bad[0], bad[1])])
    return policy


def parse_policy_obj(obj: Any, file: str = "<api>", index: int = 0,
                     services: bool = False, json_checked: bool = False) -> Policy:
    """Parse an already-decoded object (e.g. from the API); ``json_checked``:
    see ``parse_policy``."""
    return parse_policy(Document(file, index, obj), services, json_checked)


def parse_policies(paths: Sequence[str], services: bool = False) -> list[Policy]:
    """Parse every document of ``paths``; raises ``InvalidRule`` with every
    problem of every document (including unreadable files)."""
    policies, problems, _, _ = check_paths(paths, services)
    if problems:
        raise InvalidRule(problems)
    return policies


def check_paths(paths: Sequence[str], services: bool = False
                ) -> tuple[list[Policy], list[Problem], list[str], list[Document]]:
    """(policies, problems, files, documents): validation without raising."""
    files, docs, problems = load_paths(paths)
    policies: list[Policy] = []
    for doc in docs:
        try:
            policies.append(parse_policy(doc, services))
        except InvalidRule as e:
            problems.extend(e.problems)
    return policies, in_input_order(problems, paths, files), files, docs


class _Parser(_NetworkPolicyParser, _CiliumParser):
    """One document: kind, apiVersion and metadata here, the spec in the kind's parser."""

    audit = False  # metadata.annotations[MODE_ANNOTATION] == "audit" (set by ``metadata``)

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
        if self.audit:
            rules = [dataclasses.replace(r, audit=True) for r in rules]
        return Policy(ref=ref, rules=tuple(rules), raw=dict(m), origin=w.file, audit=self.audit)

    def metadata(self, value: object) -> str | None:
        w = self.w
        self.audit = False
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
            mode = (w.string_map(m["annotations"], "metadata.annotations") or {}).get(MODE_ANNOTATION)
            if mode is not None and mode not in MODES:
                w.problem(join("metadata.annotations", MODE_ANNOTATION),
                          f"unknown policy mode \"{_q(mode)}\" (one of {', '.join(MODES)})")
            self.audit = mode == "audit"
        # A clusterwide policy has no namespace; kubectl ignores one if given.
        self.namespace = namespace if self.kind.namespaced else ""
        return name
