"""Staged policies (policy.axoneme.io/mode: audit) and audit mode in the engine."""

from __future__ import annotations

import pytest
from axoneme.core.endpoint import Endpoint
from axoneme.core.errors import InvalidRule, PolicyError
from axoneme.core.labels import Labels
from axoneme.core.mapstate import Direction, Entry, Key, MapState, Protocol, Verdict
from axoneme.core.policy.api import MODE_ANNOTATION
from axoneme.core.policy.audit import policy_names, relax, stage
from axoneme.core.policy.engine import EngineOptions, PolicyEngine
from axoneme.core.policy.parse import parse_policy_obj

IN, EG = Direction.INGRESS, Direction.EGRESS
TCP = Protocol.TCP


def cnp(name: str, spec: dict, mode: str | None = None) -> dict:
    meta: dict = {"name": name, "namespace": "default"}
    if mode is not None:
        meta["annotations"] = {MODE_ANNOTATION: mode}
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy", "metadata": meta, "spec": spec}


DEFAULT_DENY = {"endpointSelector": {}, "ingress": [{}]}
ALLOW_A_TO_B = {"endpointSelector": {"matchLabels": {"app": "b"}},
                "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "a"}}],
                             "toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]}


@pytest.fixture
def world() -> tuple[PolicyEngine, dict[str, int]]:
    engine = PolicyEngine(options=EngineOptions())
    ids = {}
    for n, app in enumerate("abc", 1):
        ident = engine.allocator.allocate(Labels.from_strings(
            [f"k8s:app={app}", "k8s:io.kubernetes.pod.namespace=default"]))
        engine.upsert_endpoint(Endpoint(n, ident.id, ident.labels, ipv4=f"10.244.0.{n}",
                                        pod_name=app, namespace="default"))
        ids[app] = ident.id
    return engine, ids


def test_annotation_parses_and_bad_mode_names_the_field() -> None:
    pol = parse_policy_obj(cnp("dd", DEFAULT_DENY, "audit"))
    assert pol.audit and all(r.audit for r in pol.rules)
    assert not parse_policy_obj(cnp("dd", DEFAULT_DENY, "enforce")).audit
    assert not parse_policy_obj(cnp("dd", DEFAULT_DENY)).audit
    with pytest.raises(InvalidRule) as err:
        parse_policy_obj(cnp("dd", DEFAULT_DENY, "dry-run"), file="p.yaml")
    assert f"metadata.annotations.{MODE_ANNOTATION}" in str(err.value)
    assert "p.yaml" in str(err.value) and "dry-run" in str(err.value)
    np = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": "np", "annotations": {MODE_ANNOTATION: "audit"}},
          "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}
    assert parse_policy_obj(np).audit


def test_staged_default_deny_drops_nothing_and_names_itself(world) -> None:
    engine, ids = world
    engine.upsert_policy(parse_policy_obj(cnp("default-deny", DEFAULT_DENY, "audit")))
    for ep in (1, 2, 3):
        assert engine.enforcement(ep) == (False, False)  # staging puts nobody into default deny
        dec = engine.explain(ep, IN, ids["a"], TCP, 80)
        assert dec.allowed and dec.entry is not None and dec.entry.audit
        assert dec.entry.audited_by == {"CiliumNetworkPolicy default/default-deny"}
        assert not engine.explain(ep, EG, ids["a"], TCP, 80).entry.audit  # egress not staged
    # an enforced allow for a->b:80 makes that flow "allowed by both": no audit there
    engine.upsert_policy(parse_policy_obj(cnp("allow-ab", ALLOW_A_TO_B)))
    assert engine.explain(2, IN, ids["a"], TCP, 80).verdict is Verdict.ALLOWED
    assert not engine.explain(2, IN, ids["a"], TCP, 80).entry.audit
    assert engine.explain(2, IN, ids["c"], TCP, 80).verdict is Verdict.DENIED  # enforced default deny
    assert engine.explain(1, IN, ids["c"], TCP, 80).entry.audit  # a: still only staged


def test_staged_deny_is_audited_and_promote_enforces(world) -> None:
    engine, ids = world
    # a deny-only policy would put b into default deny too (Cilium): allow the rest
    deny = {"endpointSelector": {"matchLabels": {"app": "b"}},
            "ingress": [{"fromEntities": ["all"]}],
            "ingressDeny": [{"fromEndpoints": [{"matchLabels": {"app": "c"}}]}]}
    engine.upsert_policy(parse_policy_obj(cnp("no-c", deny, "audit")))
    dec = engine.explain(2, IN, ids["c"], TCP, 443)
    assert dec.allowed and dec.entry.audit
    assert policy_names(dec.entry.audited_by) == {"CiliumNetworkPolicy default/no-c"}
    assert dec.entry.audited_by == {"CiliumNetworkPolicy default/no-c spec.ingressDeny[0]"}
    assert not engine.explain(2, IN, ids["a"], TCP, 443).entry.audit
    engine.pending_changes()
    # promote: the same object without the annotation, one upsert
    engine.upsert_policy(parse_policy_obj(cnp("no-c", deny)))
    assert engine.explain(2, IN, ids["c"], TCP, 443).verdict is Verdict.DENIED_BY_RULE
    assert engine.explain(2, IN, ids["a"], TCP, 443).allowed
    changes = engine.pending_changes()
    assert set(changes) == {2}
    # and staging it again gives back the audited map
    engine.upsert_policy(parse_policy_obj(cnp("no-c", deny, "audit")))
    assert engine.explain(2, IN, ids["c"], TCP, 443).entry.audit


def test_endpoint_audit_mode(world) -> None:
    engine, ids = world
    engine.upsert_policy(parse_policy_obj(cnp("allow-ab", ALLOW_A_TO_B)))
    assert engine.explain(2, IN, ids["c"], TCP, 80).verdict is Verdict.DENIED
    assert engine.set_audit_mode(2, True) and not engine.set_audit_mode(2, True)
    assert engine.audit_mode(2) and not engine.audit_mode(1)
    dec = engine.explain(2, IN, ids["c"], TCP, 80)
    assert dec.allowed and dec.entry.audit
    assert dec.entry.audited_by == {"CiliumNetworkPolicy default/allow-ab"}
    assert not engine.explain(2, IN, ids["a"], TCP, 80).entry.audit
    assert engine.set_audit_mode(2, False)
    assert engine.explain(2, IN, ids["c"], TCP, 80).verdict is Verdict.DENIED
    with pytest.raises(PolicyError):
        engine.set_audit_mode(99, True)


def test_agent_wide_audit_mode() -> None:
    engine = PolicyEngine(options=EngineOptions(policy_audit_mode=True))
    ident = engine.allocator.allocate(Labels.from_strings(["k8s:app=a", "k8s:io.kubernetes.pod.namespace=default"]))
    engine.upsert_endpoint(Endpoint(1, ident.id, ident.labels, ipv4="10.244.0.1"))
    engine.upsert_policy(parse_policy_obj(cnp("default-deny", DEFAULT_DENY)))
    dec = engine.explain(1, IN, 12345, TCP, 22)
    assert dec.allowed and dec.entry.audit
    assert engine.enforcement(1) == (True, False)


def test_stage_keeps_a_wildcard_deny_and_refines_per_identity() -> None:
    # enforced: allow all ingress, deny 22 from anyone; combined: also an
    # allow-only policy for identity 300 on 80 (so 300 is in default deny)
    w_any, w22 = Key(0, IN), Key(0, IN, TCP, 22, 16)
    enforced = MapState({w_any: Entry(), w22: Entry(deny=True), Key(0, EG): Entry()})
    combined = MapState({w22: Entry(deny=True, derived_from=frozenset({"CiliumNetworkPolicy ns/x spec.ingressDeny[0]"})),
                         Key(300, IN, TCP, 80, 16): Entry(), Key(0, EG): Entry()})
    out = stage(enforced, combined, {IN: frozenset({"CiliumNetworkPolicy ns/y"})})
    assert out.lookup(300, IN, TCP, 22).verdict is Verdict.DENIED_BY_RULE
    assert not out.lookup(300, IN, TCP, 80).entry.audit
    assert out.lookup(300, IN, TCP, 81).entry.audited_by == {"CiliumNetworkPolicy ns/y"}
    assert out.lookup(7, IN, TCP, 81).entry.audit  # any other peer too
    assert not out.lookup(7, EG, TCP, 81).entry.audit
    assert stage(enforced, enforced, {}) is enforced
    assert relax(enforced) == MapState({w_any: Entry(), Key(0, EG): Entry()})
    assert policy_names(["CiliumNetworkPolicy ns/x spec.ingressDeny[0]", "allow-localhost"]) == {
        "CiliumNetworkPolicy ns/x"}


def test_staging_over_many_identities_costs_their_own_keys_only() -> None:
    engine = PolicyEngine()
    ident = engine.allocator.allocate(Labels.from_strings(["k8s:app=a", "k8s:io.kubernetes.pod.namespace=default"]))
    engine.upsert_endpoint(Endpoint(1, ident.id, ident.labels, ipv4="10.244.0.1"))
    spec = {"endpointSelector": {}, "egress": [{"toCIDR": [f"198.51.{i}.0/24" for i in range(100)],
                                                "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}]}]}
    engine.upsert_policy(parse_policy_obj(cnp("few-peers", spec, "audit")))
    staged = engine.resolve(1)
    engine.upsert_policy(parse_policy_obj(cnp("few-peers", spec)))
    enforced = engine.resolve(1)
    # the enforced form plus the audited wildcard allow of the (still unenforced) egress
    assert len(staged) == len(enforced) + 1
    assert [k for k, v in staged.items() if v.audit] == [Key(0, EG)]
