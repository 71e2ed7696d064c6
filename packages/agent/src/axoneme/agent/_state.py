"""The state store: what the agent knows, its state file, its indexes.

Every mutation runs on the agent's asyncio loop under ``StateStore.lock``
and ends with an atomic write of the state file (``persist``), so a SIGKILL
at any moment leaves either the state before or after the operation. Write-
ahead: a change that must survive a restart (an endpoint being created, an
API policy) is written before the kernel is touched; when the write fails
the change is refused (StateWriteError) or, where the caller says so
(``strict=False``), retried by the agent's tick until it lands.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from axoneme.agent._config import AgentConfig
from axoneme.agent._errors import StateWriteError
from axoneme.agent._metrics import AgentMetrics
from axoneme.agent._records import EndpointRecord, PodRecord
from axoneme.agent._statefile import StateCorrupt, read_agent_state, write_json_atomic
from axoneme.core.endpoint import Endpoint
from axoneme.core.failpoints import failpoint

LOG = logging.getLogger(__name__)

STATE_VERSION = 1


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
    def load(self) -> dict[str, Any] | None:
        """Read the state file; StateCorrupt (exit 2) if it cannot be used."""
        path = self.config.state_file
        data = read_agent_state(path)  # shape checked: StateCorrupt naming the field
        if data is None:
            return None
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
            first = not self.error
            self.error = f"cannot write {self.config.state_file}: {e}"
            self.metrics.errors.labels(op="state_write").inc()
            if first:
                LOG.error("%s (written again every second until it works)", self.error)
            if strict:
                raise StateWriteError(self.error) from e
            return
        if self.error:
            LOG.warning("state file written again after: %s", self.error)
            self.error = ""

    async def retry_persist(self) -> None:
        """Write again after a failure (the agent's tick)."""
        if self.error:
            async with self.lock:
                await self.persist(strict=False)
