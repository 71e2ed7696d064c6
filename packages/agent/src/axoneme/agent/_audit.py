"""Staged policies and audit mode in the running agent (docs/cli.md "Audit").

- ``policy promote``: a staged policy (``policy.axoneme.io/mode: audit``)
  becomes enforced: its recorded document loses the annotation and is
  applied again as one change (``PolicyService.upsert``: the engine swaps the
  policy in one step, so no packet sees a state between the two).
- ``endpoint config ID policy-audit-mode=enabled|disabled``: Cilium's
  per-endpoint ``PolicyAuditMode``, kept in the endpoint's record (it
  survives an agent restart).
- ``axoneme_policy_audit_total{policy,direction}``: AUDIT flows per policy
  that would have dropped them (the flow's ``*_denied_by``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

from axoneme.agent._errors import BadRequest, Conflict, NotFound
from axoneme.agent._policies import API, PolicyService, policy_key, ref_view
from axoneme.agent._statefile import unpack_document
from axoneme.core.flow import Flow, FlowVerdict
from axoneme.core.policy.api import MODE_ANNOTATION, PolicyRef
from axoneme.core.policy.parse import parse_policy_obj

LOG = logging.getLogger(__name__)

AUDIT_OPTION = "policy-audit-mode"
_ON, _OFF = ("enabled", "true", "on"), ("disabled", "false", "off")


def set_mode(obj: Any, audit: bool) -> bool:
    """Set (``audit``) or remove the staging annotation of a policy document
    in place; returns whether the document changed."""
    if not isinstance(obj, dict):
        return False
    meta = obj.setdefault("metadata", {})
    if not isinstance(meta, dict):
        return False
    notes = meta.get("annotations")
    if audit:
        if not isinstance(notes, dict):
            notes = meta["annotations"] = {}
        changed = notes.get(MODE_ANNOTATION) != "audit"
        notes[MODE_ANNOTATION] = "audit"
        return changed
    if not isinstance(notes, dict) or MODE_ANNOTATION not in notes:
        return False
    del notes[MODE_ANNOTATION]
    if not notes:
        del meta["annotations"]
    return True


async def promote(service: PolicyService, refs: Sequence[PolicyRef]) -> dict[str, Any]:
    """Enforce staged policies; the ones already enforced are listed as such."""
    parsed = []
    already = []
    for ref in refs:
        rec = service.store.policy_docs.get(policy_key(ref))
        if rec is None:
            raise NotFound(f"policy not found: {ref}")
        if rec.get("source", API) != API:
            raise Conflict(f"{ref} comes from {rec.get('source')}: remove its "
                           f"{MODE_ANNOTATION} annotation there to enforce it")
        doc = rec.get("doc") or {}
        obj = copy.deepcopy(unpack_document(doc.get("obj")))
        if not set_mode(obj, audit=False):
            already.append(ref)
            continue
        pol = parse_policy_obj(obj, str(doc.get("file", "<api>")), int(doc.get("index", 0)),
                               service.services_source)
        parsed.append((pol, {**doc, "obj": obj}))
    res: dict[str, Any] = {"revision": service.revision, "applied": [], "errors": {}}
    if parsed:
        res = await service.upsert(parsed, API)
        LOG.info("promoted %s", ", ".join(policy_key(p.ref) for p, _ in parsed))
    return {"revision": res["revision"], "promoted": res["applied"],
            "already_enforced": [ref_view(r) for r in already], "errors": res.get("errors", {})}


def parse_option(key: str, value: str) -> bool:
    """``policy-audit-mode=enabled|disabled`` -> bool; BadRequest naming the option."""
    if key.lower() != AUDIT_OPTION:
        raise BadRequest(f"unknown endpoint option {key!r} (known: {AUDIT_OPTION})")
    v = str(value).lower()
    if v not in _ON + _OFF:
        raise BadRequest(f"{AUDIT_OPTION}: expected enabled or disabled, got {value!r}")
    return v in _ON


def endpoint_config_view(agent: Any, ep_id: int) -> dict[str, Any]:
    """The endpoint's own setting, and the agent-wide one (either puts it in audit mode)."""
    rec = _record(agent, ep_id)
    return {"id": ep_id, AUDIT_OPTION: "enabled" if rec.policy_audit_mode else "disabled",
            "agent_policy_audit_mode": bool(agent.config.policy_audit_mode)}


def _record(agent: Any, ep_id: int) -> Any:
    rec = agent.store.endpoint_record(ep_id)
    if rec is None or ep_id not in agent.store.endpoint_objs:
        raise NotFound(f"no endpoint {ep_id}")
    return rec


async def endpoint_config(agent: Any, ep_id: int, options: dict[str, Any]) -> dict[str, Any]:
    """Set endpoint options (``{"policy-audit-mode": "enabled"}``) and write
    the endpoint's new policy to the datapath."""
    rec = _record(agent, ep_id)
    if not options:
        raise BadRequest(f"no option given (known: {AUDIT_OPTION})")
    enabled = None
    for key, value in options.items():
        enabled = parse_option(str(key), value)
    assert enabled is not None
    store = agent.store
    errors: dict[int, str] = {}
    async with store.lock:
        old = rec.policy_audit_mode
        rec.policy_audit_mode = enabled
        try:
            await store.persist()
        except BaseException:
            rec.policy_audit_mode = old
            raise
        if agent.engine.set_audit_mode(ep_id, enabled):
            errors = await agent.regenerator.regenerate()
    out = endpoint_config_view(agent, ep_id)
    out["errors"] = {str(k): v for k, v in errors.items()}
    return out


class AuditCounter:
    """``axoneme_policy_audit_total{policy,direction}``: AUDIT flows per policy
    that would have dropped them (one count per policy named)."""

    def __init__(self, metrics: Any) -> None:
        self.counter = metrics.counter(
            "axoneme_policy_audit", "Flows forwarded with verdict AUDIT, per policy that would "
            "have dropped them (a staged policy, or in audit mode an enforced one)",
            ["policy", "direction"])

    def observe(self, flow: Flow) -> None:
        if flow.verdict is not FlowVerdict.AUDIT or flow.is_reply:
            return
        ingress = flow.traffic_direction == "INGRESS"
        would = flow.ingress_denied_by if ingress else flow.egress_denied_by
        direction = flow.traffic_direction or "UNKNOWN"
        names = {(f"{p.kind} {p.namespace}/{p.name}" if p.namespace else f"{p.kind} {p.name}")
                 for p in would} or {"default deny"}
        for name in sorted(names):
            self.counter.labels(policy=name, direction=direction).inc()


__all__ = ["AUDIT_OPTION", "AuditCounter", "endpoint_config", "endpoint_config_view",
           "parse_option", "promote", "set_mode"]
