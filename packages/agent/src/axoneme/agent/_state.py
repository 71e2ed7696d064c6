"""The state store: what the agent knows, its state file, its indexes.

Every mutation runs on the agent's asyncio loop under ``StateStore.lock``
and ends with an atomic write of the state file (``persist``), so a SIGKILL
at any moment leaves either the state before or after the operation. Write-
ahead: a change that must survive a restart (an endpoint being created, an
API policy) is written before the kernel is touched; when the write fails
the change is refused (StateWriteError) or, where the caller says so
(``strict=False``), retried by the agent's tick until it lands.

A policy change writes only itself (``persist_policies``): one record
appended to ``<state file>.journal``, so its cost follows the change, not
the size of every policy and identity in the file. The record is written
before the kernel is touched (it survives the agent being killed) and
fdatasync'ed (``flush_journal``) before the API answers: the kernel's own
state does not survive a power cut either, so enforcement never outlives
its record, and the kernel update does not wait for the disk. Records
carry a sequence number; the state file says up to which one it holds
(``journal_seq``), ``load`` replays the newer ones, and every full write
empties the journal (after ``JOURNAL_MAX_RECORDS`` records a policy change
is a full write).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from axoneme.agent._config import AgentConfig
from axoneme.agent._errors import StateWriteError
from axoneme.agent._metrics import AgentMetrics
from axoneme.agent._records import EndpointRecord, PodRecord
from axoneme.agent._statefile import (
    JournalFile,
    StateCorrupt,
    json_default,
    read_agent_state,
    read_journal,
    write_json_atomic,
)
from axoneme.core.endpoint import Endpoint
from axoneme.core.failpoints import failpoint

LOG = logging.getLogger(__name__)

STATE_VERSION = 1
JOURNAL_MAX_RECORDS = 256
INLINE_SYNC_S = 0.001  # a journal fdatasync this fast runs on the loop (flush_journal)


# a journal record's JSON (json.dumps builds an encoder per call)
_RECORD = json.JSONEncoder(separators=(",", ":"), sort_keys=True, default=json_default).encode


def _timed_sync(journal: JournalFile) -> float:
    """``journal.sync()``; the seconds it took."""
    t0 = time.perf_counter()
    journal.sync()
    return time.perf_counter() - t0


def apply_journal(data: dict[str, Any], records: list[dict[str, Any]], path: str) -> int:
    """Apply journal ``records`` newer than ``data``'s ``journal_seq`` to the
    state ``data``; returns the last sequence number seen."""
    try:
        seq = last = int(data.get("journal_seq", 0))
        policies = data.setdefault("policies", {})
        for rec in records:
            last = max(last, int(rec["seq"]))
            if int(rec["seq"]) <= seq:
                continue
            for key, doc in dict(rec["policies"]).items():
                if doc is None:
                    policies.pop(key, None)
                else:
                    policies[str(key)] = dict(doc)
            data["policy_revision"] = int(rec["policy_revision"])
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise StateCorrupt(path, f"unexpected record: {e}") from e
    return last


def read_persisted(state_file: str) -> dict[str, Any] | None:
    """What a restart loads: the state file with its journal applied (None: no state)."""
    data = read_agent_state(state_file)
    if data is not None:
        path = state_file + ".journal"
        apply_journal(data, read_journal(path), path)
    return data


class StateStore:
    """Namespaces, pods, endpoints and policy documents, persisted atomically.

    Other services add their own fields to the file through ``contribute``
    (identities, policy revision, datapath settings)."""

    def __init__(self, config: AgentConfig, metrics: AgentMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.lock = asyncio.Lock()
        self.namespaces: dict[str, dict[str, str]] = {"default": {}}
        self.pods: dict[str, PodRecord] = {}
        self.endpoints: dict[str, EndpointRecord] = {}  # container id -> record
        self.endpoint_objs: dict[int, Endpoint] = {}  # endpoint id -> what the engine has
        self.next_endpoint_id = 1
        # policy ref key -> {"doc": {...}, "source": "api"|path, "revision": n}
        self.policy_docs: dict[str, dict[str, Any]] = {}
        # what the last load found, for the services that restore from it
        self.saved_identities: dict[int, list[str]] = {}
        self.saved_revision = 0
        self.recorded_datapath: str | None = None
        self.error = ""  # the last state write failure, until a write works
        self._ip_index: dict[str, EndpointRecord] = {}
        self._contributors: list[Callable[[], Mapping[str, Any]]] = []
        self._journal_seq = 0  # the last journal record written (or replayed)
        self._journal_records = 0  # records in the journal file now
        self._full_written = False  # a full write landed in this run: journal records may follow it
        self._unsynced = False  # journal records written, not yet fdatasync'ed
        self._sync_cost = float("inf")  # how long the last journal fdatasync took
        self._journal = JournalFile(self.journal_file)  # kept open between records

    @property
    def journal_file(self) -> str:
        return self.config.state_file + ".journal"

    def contribute(self, fields: Callable[[], Mapping[str, Any]]) -> None:
        """Add ``fields()`` to every state file written from now on."""
        self._contributors.append(fields)

    # -- indexes -------------------------------------------------------------------
    def reindex(self) -> None:
        self._ip_index = {r.ipv4: r for r in self.endpoints.values() if r.ipv4}

    def endpoint_by_ip(self, ip: str) -> EndpointRecord | None:
        return self._ip_index.get(ip)

    def endpoint_record(self, ep_id: int) -> EndpointRecord | None:
        return next((r for r in self.endpoints.values() if r.id == ep_id), None)

    def new_endpoint_id(self) -> int:
        ep_id = self.next_endpoint_id
        self.next_endpoint_id += 1
        return ep_id

    # -- the file --------------------------------------------------------------------
    def load(self, trusted: bool = False) -> dict[str, Any] | None:
        """Read the state file; StateCorrupt (exit 2) if it cannot be used.
        ``trusted``: its bytes are what this agent wrote (``read_json``)."""
        path = self.config.state_file
        # shape checked: StateCorrupt naming the field
        data = read_agent_state(path, trusted=trusted)
        if data is None:
            return None
        self._replay_journal(data)
        try:
            version = int(data.get("version", 0))
            if version != STATE_VERSION:
                raise StateCorrupt(path, f"unknown state version {version}")
            namespaces: dict[str, dict[str, str]] = {
                str(k): dict(v) for k, v in data.get("namespaces", {}).items()}
            pods = {k: PodRecord(**v) for k, v in data.get("pods", {}).items()}
            endpoints = {k: EndpointRecord(**v) for k, v in data.get("endpoints", {}).items()}
            identities = {int(k): list(v) for k, v in data.get("identities", {}).items()}
            policies = dict(data.get("policies", {}))
            next_id = int(data.get("next_endpoint_id", 1))
            self.saved_revision = int(data.get("policy_revision", 0))
        except StateCorrupt:
            raise
        except (TypeError, ValueError, AttributeError) as e:
            raise StateCorrupt(path, f"unexpected content: {e}") from e
        self.namespaces = namespaces or {"default": {}}
        self.pods = pods
        self.endpoints = endpoints
        self.next_endpoint_id = max([next_id, *[e.id + 1 for e in endpoints.values()]])
        self.saved_identities = identities
        self.policy_docs = policies
        self.recorded_datapath = data.get("datapath")
        return data

    def _replay_journal(self, data: dict[str, Any]) -> None:
        """Apply the journal's records newer than the state file to ``data``."""
        records = read_journal(self.journal_file)
        self._journal_seq = apply_journal(data, records, self.journal_file)
        self._journal_records = len(records)

    def state_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": STATE_VERSION,
            "datapath": self.config.datapath,
            "pod_cidr": self.config.pod_cidr,
            "api_socket": self.config.api_socket,
            "guard": self.config.guard,
            "next_endpoint_id": self.next_endpoint_id,
            "namespaces": self.namespaces,
            "pods": {k: dataclasses.asdict(v) for k, v in self.pods.items()},
            "endpoints": {k: dataclasses.asdict(v) for k, v in self.endpoints.items()},
            "policies": {k: v for k, v in self.policy_docs.items() if v.get("source") == "api"},
            "journal_seq": self._journal_seq,
        }
        for fields in self._contributors:
            data.update(fields())
        return data

    async def persist(self, strict: bool = True) -> None:
        """Write the state file. A failure is remembered (status names it, the
        periodic tick writes again) and raised as StateWriteError, unless
        ``strict`` is false: then the caller goes on and the tick retries."""
        data = self.state_dict()
        try:
            failpoint("state.write", OSError)
            await asyncio.to_thread(write_json_atomic, self.config.state_file, data)
        except OSError as e:
            self._write_failed(self.config.state_file, e, strict)
            return
        self._full_written = True
        if self._journal_records:
            # the state file holds every record now (journal_seq): a crash
            # before the unlink only replays nothing newer
            self._journal.close()
            try:
                os.unlink(self.journal_file)
            except FileNotFoundError:
                pass
            except OSError as e:
                LOG.warning("cannot empty %s: %s", self.journal_file, e)
            else:
                self._journal_records = 0
        if self.error:
            LOG.warning("state file written again after: %s", self.error)
            self.error = ""

    async def persist_policies(self, keys: Iterable[str], revision: int,
                               strict: bool = True) -> None:
        """Write-ahead for a policy change: the records of ``keys`` (API
        policies; others as removed, the state file keeps API policies only)
        and the policy revision, appended to the journal. Falls back to a full
        ``persist`` before the first full write, after a failed write (which
        must land whole) and when the journal is long."""
        if (not self._full_written or self.error
                or self._journal_records >= JOURNAL_MAX_RECORDS):
            await self.persist(strict)
            return
        policies = {}
        for key in keys:
            rec = self.policy_docs.get(key)
            policies[key] = rec if rec is not None and rec.get("source") == "api" else None
        seq = self._journal_seq + 1
        line = _RECORD({"seq": seq, "policy_revision": revision, "policies": policies}
                       ).encode() + b"\n"
        if self._journal.path != self.journal_file:  # the config names another file now
            self._journal.close()
            self._journal = JournalFile(self.journal_file)
        try:
            failpoint("state.write", OSError)
            self._journal.append(line)
        except OSError as e:
            self._write_failed(self.journal_file, e, strict)
            return
        self._journal_seq = seq
        self._journal_records += 1
        self._unsynced = True

    async def flush_journal(self) -> None:
        """fdatasync what ``persist_policies`` wrote (before the API answers).
        A failure is a state error: the full write of the agent's tick retries.

        On the loop while the disk is fast (the last fdatasync took under
        ``INLINE_SYNC_S``: a worker thread's hand-off costs more than that,
        ~0.3 ms on a loaded machine), else in a worker thread; either way the
        record is on disk before the caller hears of the change."""
        if not self._unsynced:
            return
        self._unsynced = False
        try:
            if self._sync_cost < INLINE_SYNC_S:
                self._sync_cost = _timed_sync(self._journal)
            else:
                self._sync_cost = await asyncio.to_thread(_timed_sync, self._journal)
        except OSError as e:
            self._sync_cost = float("inf")
            self._write_failed(self.journal_file, e, strict=False)

    def _write_failed(self, path: str, e: OSError, strict: bool) -> None:
        first = not self.error
        self.error = f"cannot write {path}: {e}"
        self.metrics.errors.labels(op="state_write").inc()
        if first:
            LOG.error("%s (written again every second until it works)", self.error)
        if strict:
            raise StateWriteError(self.error) from e

    async def retry_persist(self) -> None:
        """Write again after a failure (the agent's tick)."""
        if self.error:
            async with self.lock:
                await self.persist(strict=False)
