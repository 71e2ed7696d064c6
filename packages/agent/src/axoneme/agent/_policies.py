"""Policies: apply, upsert, delete, restore, list; where they come from.

Policy sources feed ``PolicyService.upsert`` (the API with ``source="api"``,
a policy directory with its file path, and next the Kubernetes watcher): a
source is anything with ``async start()`` (first full load, before the agent
serves) and ``async run()`` (follows changes until cancelled); see
``PolicySource``. Nothing below the sources knows which one a policy came
from, except that API policies are recorded in the state file (write-ahead:
a policy given through the API is in the state file before the kernel
enforces it) while the other sources are their own record.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from axoneme.agent import _gcpause
from axoneme.agent import _tracing as tracing
from axoneme.agent._config import AgentConfig
from axoneme.agent._errors import (
    DROPPED_POLICIES_FILE,
    NotFound,
    PersistedPolicyError,
    problem_text,
)
from axoneme.agent._regenerator import Regenerator
from axoneme.agent._state import StateStore
from axoneme.agent._statefile import (
    StateCorrupt,
    document_labels,
    pack_document,
    read_json,
    unpack_document,
    write_json_atomic,
)
from axoneme.core.errors import InvalidRule, PolicyError
from axoneme.core.policy.api import Policy, PolicyKind, PolicyRef
from axoneme.core.policy.engine import PolicyEngine
from axoneme.core.policy.parse import parse_policy_obj

LOG = logging.getLogger(__name__)

API = "api"
K8S = "k8s"  # the Kubernetes watcher's source name (_k8s.SOURCE)


def cilium_source(source: str, ref: PolicyRef) -> str:
    """Cilium's ``source`` label (pkg/source) of a change from ``source``: ``api``,
    ``k8s`` (a NetworkPolicy from the API server), ``custom-resource`` (a CNP or
    CCNP from it), ``directory`` (a --policy-dir file)."""
    if source == API:
        return "api"
    if source == K8S:
        return "k8s" if ref.kind is PolicyKind.NETWORK_POLICY else "custom-resource"
    return "directory"


def implementation_delay(change: Callable[..., tuple[str, Sequence[PolicyRef]]]) -> Any:
    """cilium_policy_implementation_delay{source} of a PolicyService change: from
    the call to the datapath holding it, once per Cilium source among the
    policies it touched (``change(self, *args)`` -> (our source, refs))."""
    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        async def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            res = await fn(self, *args, **kwargs)
            seconds = time.perf_counter() - t0
            source, refs = change(self, *args, **kwargs)
            for label in sorted({cilium_source(source, r) for r in refs}):
                self.regen.metrics.policy_implemented(seconds, label)
            return res
        return timed
    return wrap


class PolicySource(Protocol):
    """A source of policies (policy dir, Kubernetes watcher): it calls
    ``PolicyService.upsert(parsed, source=<its name>, remove_refs=...)``."""

    async def start(self) -> None:
        """Load everything once (the agent serves only after this)."""

    async def run(self) -> None:
        """Follow changes until cancelled."""


def policy_key(ref: PolicyRef) -> str:
    return f"{ref.kind.value}/{ref.namespace}/{ref.name}"


def ref_view(ref: PolicyRef) -> dict[str, str]:
    return {"kind": ref.kind.value, "namespace": ref.namespace, "name": ref.name}


class PolicyService:
    """The policies in force (engine + recorded documents)."""

    def __init__(self, config: AgentConfig, store: StateStore, engine: PolicyEngine,
                 regen: Regenerator, hooks: Any) -> None:
        self.config = config
        self.store = store
        self.engine = engine
        self.regen = regen
        self.hooks = hooks  # pluggy hook relay: axoneme_policy_changed
        # the engine counts revisions from 0 on every start; the agent's
        # revision continues from the persisted one
        self.rev_base = 0
        self.source_errors: dict[str, list[str]] = {}  # policy file -> its problems
        self.dropped: list[dict[str, Any]] = []  # --drop-unparseable-policies
        # Kubernetes mode watches Services: toServices resolves (else the parser refuses it)
        self.services_source = bool(getattr(config, "k8s_mode", False))
        store.contribute(lambda: {"policy_revision": self.revision})

    @property
    def revision(self) -> int:
        return self.rev_base + self.engine.revision

    # -- start ---------------------------------------------------------------------------
    def restore(self) -> None:
        """Put the persisted policies back in the engine.

        A policy that no longer parses (e.g. an upgrade tightened validation)
        is never dropped silently: its deny or default-deny would stop being
        enforced. The start is refused (PersistedPolicyError, exit 1) naming
        each one, unless the agent runs with ``--drop-unparseable-policies``:
        then each is dropped loudly, its document kept in
        ``dropped-policies.json`` of the state dir and listed in status.
        """
        docs = self.store.policy_docs

        def revision(kv: tuple[str, Any]) -> int:
            try:
                return int(kv[1].get("revision", 0))
            except (AttributeError, TypeError, ValueError):
                return 0

        bad: list[tuple[str, Any, str]] = []
        for key, rec in sorted(docs.items(), key=revision):
            try:
                doc = rec.get("doc", {})
                pol = parse_policy_obj(unpack_document(doc.get("obj")), doc.get("file", "<state>"),
                                       int(doc.get("index", 0)), self.services_source)
            except (PolicyError, AttributeError, TypeError, ValueError, RecursionError) as e:
                bad.append((key, rec, problem_text(e)))
                continue
            rec["doc"] = {**doc, "obj": pack_document(doc.get("obj"))}
            self.engine.upsert_policy(_sourceless(pol))
        if bad and not self.config.drop_unparseable_policies:
            raise PersistedPolicyError(self.config.state_file, [(k, why) for k, _, why in bad])
        if bad:
            saved = os.path.join(self.config.state_dir, DROPPED_POLICIES_FILE)
            try:
                kept = read_json(saved) or {}
            except StateCorrupt:
                kept = {}
            for key, rec, why in bad:
                LOG.error("persisted policy %s no longer parses: %s; DROPPED as asked "
                          "(--drop-unparseable-policies): it is no longer enforced; its "
                          "document is kept in %s", key, why, saved)
                del docs[key]
                kept[key] = {"record": rec, "problem": why, "dropped_at": time.time()}
                self.dropped.append({"policy": key, "problem": why, "saved_to": saved})
            write_json_atomic(saved, kept)
        self.rev_base = max(0, self.store.saved_revision - self.engine.revision)

    # -- changes -------------------------------------------------------------------------
    async def apply(self, docs: Sequence[Mapping[str, Any]], source: str = API,
                    json_checked: bool = False) -> dict[str, Any]:
        """Parse documents (``{"file", "index", "obj"}``) and upsert them; InvalidRule
        with every problem of every document, nothing applied. ``json_checked``:
        decoded from JSON text that ``yamlsafe.json_text_safe`` passed."""
        with _gcpause.paused():  # a 50k-peer policy: a million objects (see _gcpause)
            parsed = []
            problems = []
            for d in docs:
                try:
                    parsed.append((parse_policy_obj(d.get("obj"), str(d.get("file", "<api>")),
                                                    int(d.get("index", 0)), self.services_source,
                                                    json_checked),
                                   d))
                except InvalidRule as e:
                    problems.extend(e.problems)
            if problems:
                raise InvalidRule(problems)
            return await self.upsert(parsed, source)

    @tracing.traced("policy.apply", lambda self, parsed, source, remove_refs=(): {
        "policy": ", ".join(policy_key(p.ref) for p, _ in parsed), "source": source},
        lambda res: {"revision": res["revision"]})
    @implementation_delay(lambda self, parsed, source, remove_refs=(): (
        source, [*remove_refs, *(p.ref for p, _ in parsed)]))
    async def upsert(self, parsed: Sequence[tuple[Policy, Mapping[str, Any]]], source: str,
                     remove_refs: Sequence[PolicyRef] = ()) -> dict[str, Any]:
        """Add or replace ``parsed`` and remove ``remove_refs``, as one change."""
        with _gcpause.paused():
            return await self._upsert(parsed, source, remove_refs)

    async def _upsert(self, parsed: Sequence[tuple[Policy, Mapping[str, Any]]], source: str,
                      remove_refs: Sequence[PolicyRef]) -> dict[str, Any]:
        applied: list[PolicyRef] = []
        removed: list[PolicyRef] = []
        store = self.store
        async with store.lock:
            undo = _PolicyUndo(self, [*remove_refs, *(pol.ref for pol, _ in parsed)])
            try:
                for ref in remove_refs:
                    key = policy_key(ref)
                    if key in store.policy_docs:
                        self.engine.delete_policy(ref)
                        del store.policy_docs[key]
                        removed.append(ref)
                for pol, doc in parsed:
                    rev = self.engine.upsert_policy(_sourceless(pol)) + self.rev_base
                    store.policy_docs[policy_key(pol.ref)] = {
                        "doc": {"file": str(doc.get("file", "<api>")),
                                "index": int(doc.get("index", 0)),
                                "obj": pack_document(doc.get("obj"))},
                        "source": source, "revision": rev}
                    applied.append(pol.ref)
                # write-ahead: a policy given through the API is in the state
                # file (its journal: O(this change)) before the kernel
                # enforces it (a restart must not lose a deny); policy-dir
                # files are their own record
                await store.persist_policies([policy_key(r) for r in (*removed, *applied)],
                                             self.revision, strict=undo.persisted())
            except BaseException:
                undo.rollback()
                raise
            try:
                errors = await self.regen.regenerate()
            finally:
                await store.flush_journal()  # durable before the caller hears of it
        self._changed(applied, removed)
        return {"revision": self.revision,
                "applied": [ref_view(r) for r in applied],
                "removed": [ref_view(r) for r in removed],
                "errors": {str(k): v for k, v in errors.items()}}

    @tracing.traced("policy.delete",
                    lambda self, refs: {"policy": ", ".join(policy_key(r) for r in refs)},
                    lambda res: {"revision": res["revision"]})
    @implementation_delay(lambda self, refs: (API, refs))
    async def delete(self, refs: Sequence[PolicyRef]) -> dict[str, Any]:
        with _gcpause.paused():
            return await self._delete(refs)

    async def _delete(self, refs: Sequence[PolicyRef]) -> dict[str, Any]:
        store = self.store
        async with store.lock:
            unknown = [r for r in refs if policy_key(r) not in store.policy_docs]
            if unknown:
                raise NotFound("policy not found: " + ", ".join(str(r) for r in unknown))
            undo = _PolicyUndo(self, refs)
            try:
                for ref in refs:
                    self.engine.delete_policy(ref)
                    del store.policy_docs[policy_key(ref)]
                await store.persist_policies([policy_key(r) for r in refs], self.revision,
                                             strict=undo.persisted())
            except BaseException:
                undo.rollback()
                raise
            try:
                await self.regen.regenerate()
            finally:
                await store.flush_journal()
        self._changed([], list(refs))
        return {"revision": self.revision, "removed": [ref_view(r) for r in refs]}

    def _changed(self, added: list[PolicyRef], removed: list[PolicyRef]) -> None:
        try:
            self.hooks.axoneme_policy_changed(revision=self.revision, added=added,
                                              removed=removed)
        except Exception:
            LOG.warning("axoneme_policy_changed hook failed", exc_info=True)

    # -- views ---------------------------------------------------------------------------
    def listing(self, documents: bool = False) -> list[dict[str, Any]]:
        """The policies in force; ``documents``: with each one's document as it was given
        (``policy get -o yaml`` prints it: applying that gives the same policy)."""
        out = []
        for pol in self.engine.policies():
            rec = self.store.policy_docs.get(policy_key(pol.ref), {})
            obj = (rec.get("doc") or {}).get("obj")
            view = {**ref_view(pol.ref), "revision": rec.get("revision", 0),
                    "source": rec.get("source", API), "rules": len(pol.rules),
                    "mode": "audit" if pol.audit else "enforce",
                    "labels": document_labels(obj) or {}}
            if documents:  # a packed document is decoded only here (policy get -o yaml)
                view["document"] = unpack_document(obj)
            out.append(view)
        out.sort(key=lambda p: (p["namespace"], p["kind"], p["name"]))
        return out

    def view(self) -> dict[str, Any]:
        return {"count": self.engine.policy_count(), "policy_dir": self.config.policy_dir,
                "errors": self.source_errors, "dropped_at_start": self.dropped}

    def faults(self) -> list[str]:
        return [f"policy file {path}: {problems[0] if problems else 'error'}"
                for path, problems in sorted(self.source_errors.items())]


def _sourceless(pol: Policy) -> Policy:
    """``pol`` without its copy of the document (``Policy.raw``): the agent
    keeps each document in its store (``policy_docs``, packed when big), and
    nothing in the agent reads the engine's copy (issue 17: the two shared a
    100k-peer list, ~7 MB)."""
    return dataclasses.replace(pol, raw={}) if pol.raw else pol


class _PolicyUndo:
    """What a policy change replaces, to put back if it cannot be recorded."""

    def __init__(self, service: PolicyService, refs: Sequence[PolicyRef]) -> None:
        self.service = service
        self.docs = dict(service.store.policy_docs)
        self.policies = {policy_key(r): (r, service.engine.get_policy(r)) for r in refs}

    def persisted(self) -> bool:
        """Whether the change touches what the state file records (API policies)."""
        keys = self.policies.keys()
        return any(d.get("source") == API
                   for docs in (self.docs, self.service.store.policy_docs)
                   for k, d in docs.items() if k in keys)

    def rollback(self) -> None:
        engine = self.service.engine
        for ref, old in self.policies.values():
            if old is not None:
                engine.upsert_policy(old)
            elif engine.get_policy(ref) is not None:
                engine.delete_policy(ref)
        self.service.store.policy_docs = self.docs
