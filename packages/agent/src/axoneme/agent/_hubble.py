"""Hubble's Observer gRPC API (GetFlows, ServerStatus, GetNodes, GetNamespaces),
served by the agent on a unix socket so the real ``hubble`` CLI can observe it.

The messages are Hubble's own: Python stubs generated from the .proto files of
Cilium's Go module by ``scripts/hubble-build --protos`` (run by bootstrap) into
``_hubble_pb/`` beside this module, never edited. They import each other by
the protos' own paths (``flow``, ``observer``, ``relay``), so that directory
goes on ``sys.path`` when the server is built (never at import time).

A Flow goes on the wire as its JSON (``Flow.to_json``, Hubble's protojson
form) parsed into ``flow.Flow``; our extra JSON fields are dropped there.
Filters arrive as Hubble's FlowFilters and are matched by ``_hubblefilter``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import importlib.metadata
import logging
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from axoneme.agent._flowstore import FlowFilter, FlowStore
from axoneme.agent._hubblefilter import FilterError, compile_filters
from axoneme.core.errors import ConfigError
from axoneme.core.flow import DropReason, Flow, FlowVerdict

LOG = logging.getLogger(__name__)

__all__ = ["HubbleServer", "default_socket_path", "load_stubs"]

STUBS_DIR = Path(__file__).with_name("_hubble_pb")
SOCKET_NAME = "hubble.sock"
ALL = 1 << 63  # `hubble observe --all` asks for 2**64-1 flows: everything there is


@dataclass(frozen=True)
class TLSListen:
    """``--hubble-listen-address`` with its certificate (Cilium's --hubble-tls-* flags):
    TLS always; with client CAs, mutual TLS (a client certificate is required)."""

    address: str  # grpc form: HOST:PORT, [V6]:PORT
    cert: bytes
    key: bytes
    client_ca: bytes | None = None

    def credentials(self, grpc: Any) -> Any:
        return grpc.ssl_server_credentials([(self.key, self.cert)],
                                           root_certificates=self.client_ca,
                                           require_client_auth=self.client_ca is not None)

    def __str__(self) -> str:
        return self.address


def tls_listen(config: Any) -> TLSListen | None:
    """The TCP listener the config asks for, its files read; ConfigError naming the flag."""
    addr = getattr(config, "hubble_listen_address", None)
    cert_file = getattr(config, "hubble_tls_cert_file", None)
    key_file = getattr(config, "hubble_tls_key_file", None)
    cas = getattr(config, "hubble_tls_client_ca_files", None) or []
    if isinstance(cas, str):
        cas = [c for c in cas.split(",") if c]
    if not addr:
        if cert_file or key_file or cas:
            raise ConfigError("--hubble-tls-* flags need --hubble-listen-address")
        return None
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        raise ConfigError(f"--hubble-listen-address: expected HOST:PORT (or :PORT), got {addr!r}")
    if ":" in host and not host.startswith("["):
        raise ConfigError(f"--hubble-listen-address: write an IPv6 address as [ADDR]:PORT, "
                          f"got {addr!r}")
    if not cert_file or not key_file:
        raise ConfigError("--hubble-listen-address serves TLS only: give --hubble-tls-cert-file "
                          "and --hubble-tls-key-file")

    def read(path: str, flag: str) -> bytes:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ConfigError(f"{flag}: cannot read {path}: {e.strerror}") from e
        if b"-----BEGIN" not in data:
            raise ConfigError(f"{flag}: {path} is not PEM")
        return data

    ca = b"".join(read(c, "--hubble-tls-client-ca-files") for c in cas) if cas else None
    return TLSListen(f"{host or '[::]'}:{port}", read(cert_file, "--hubble-tls-cert-file"),
                     read(key_file, "--hubble-tls-key-file"), ca)


def default_socket_path(api_socket: str) -> str:
    """Next to the API socket, as Cilium keeps hubble.sock beside cilium.sock."""
    return os.path.join(os.path.dirname(api_socket) or ".", SOCKET_NAME)


def load_stubs() -> Any:
    """The generated modules as one namespace (flow_pb2, observer_pb2, observer_pb2_grpc,
    relay_pb2, json_format, grpc); ConfigError when they or grpcio are missing."""
    if not (STUBS_DIR / "observer" / "observer_pb2_grpc.py").exists():
        raise ConfigError(f"Hubble's gRPC stubs are missing in {STUBS_DIR}: run "
                          f"scripts/hubble-build --protos (scripts/bootstrap does)")
    if str(STUBS_DIR) not in sys.path:
        sys.path.append(str(STUBS_DIR))
    # the agent forks only to exec (pods, tools): gRPC's fork handlers are not
    # needed, and with them on every fork logs "Other threads are currently calling
    # into gRPC, skipping fork() handlers"
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    try:
        import grpc
        import grpc.aio  # noqa: F401
        from google.protobuf import json_format

        mods = {name.rsplit(".", 1)[-1]: importlib.import_module(name) for name in (
            "flow.flow_pb2", "relay.relay_pb2", "observer.observer_pb2",
            "observer.observer_pb2_grpc")}
    except ImportError as e:
        raise ConfigError(f"Hubble's API needs grpcio and protobuf (the agent extra): {e}") from e
    return type("HubbleStubs", (), {**mods, "grpc": grpc, "json_format": json_format})


class HubbleServer:
    """The Observer service over one unix socket (mode 0600, like the API socket)."""

    def __init__(self, flows: FlowStore, node_name: str, path: str, version: str,
                 tls: TLSListen | None = None) -> None:
        self.flows = flows
        self.node_name = node_name
        self.path = path  # "" : no unix socket (TCP only)
        self.tls = tls
        self.tls_port = 0
        self.version = version
        self.started = time.monotonic()
        self.pb = load_stubs()
        self._server: Any = None

    async def start(self) -> None:
        pb = self.pb
        self._server = pb.grpc.aio.server()
        servicer = type("Observer", (_Observer, pb.observer_pb2_grpc.ObserverServicer), {})
        pb.observer_pb2_grpc.add_ObserverServicer_to_server(servicer(self), self._server)
        self._server.add_generic_rpc_handlers((_health_handler(pb.grpc),))
        if self.path:
            try:
                os.makedirs(os.path.dirname(self.path) or ".", mode=0o755, exist_ok=True)
                os.unlink(self.path)  # stale socket from a killed agent
            except FileNotFoundError:
                pass
            except OSError as e:
                raise ConfigError(f"cannot listen on {self.path}: {e}") from e
        old = os.umask(0o177)
        try:
            if self.path and not self._server.add_insecure_port(f"unix://{self.path}"):
                raise ConfigError(f"cannot listen on {self.path}")
            if self.tls is not None:
                self.tls_port = self._server.add_secure_port(self.tls.address,
                                                             self.tls.credentials(pb.grpc))
                if not self.tls_port:
                    raise ConfigError(f"cannot listen on {self.tls.address} (--hubble-listen-address)")
            await self._server.start()
        except RuntimeError as e:
            raise ConfigError(f"cannot listen on {self.path or self.tls}: {e}") from e
        finally:
            os.umask(old)
        if self.path:
            LOG.warning("hubble observer API on unix://%s", self.path)
        if self.tls is not None:
            LOG.warning("hubble observer API on %s (TLS%s)", self.tls.address,
                        ", client certificates required" if self.tls.client_ca else "")

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None
        if self.path:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    # -- messages ----------------------------------------------------------------------------
    def flow_message(self, flow: Flow) -> Any:
        pb = self.pb
        d = flow.to_json()
        msg = pb.flow_pb2.Flow()
        try:
            pb.json_format.ParseDict(d, msg, ignore_unknown_fields=True)
        except pb.json_format.ParseError:  # an L7 record of a shape Hubble lacks: keep the rest
            LOG.debug("flow %s: l7 record not in Hubble's shape", flow.uuid, exc_info=True)
            msg = pb.flow_pb2.Flow()
            pb.json_format.ParseDict({k: v for k, v in d.items() if k != "l7"}, msg,
                                     ignore_unknown_fields=True)
        return msg

    def response(self, flow: Flow) -> Any:
        msg = self.flow_message(flow)
        out = self.pb.observer_pb2.GetFlowsResponse(flow=msg, node_name=flow.node_name
                                                    or self.node_name)
        out.time.CopyFrom(msg.time)
        return out

    def uptime_ns(self) -> int:
        return int((time.monotonic() - self.started) * 1e9)

    def flows_rate(self) -> float:
        """Flows per second over the last minute (Hubble's flows_rate)."""
        since = time.time() - 60
        return len(self.flows.last(None, FlowFilter(since=since))) / 60.0


def hubble_events(flow: Flow) -> list[Flow]:
    """What Hubble shows for one of our flows. Cilium reports a packet that policy
    dropped twice: a policy-verdict event (``policy-verdict:none INGRESS DENIED BY
    ...``, which ``hubble observe --print-policy-names`` names the policies in)
    and the drop itself; our datapaths report the drop once, so the API adds the
    policy-verdict event before it (its own uuid, derived from the drop's)."""
    if (flow.verdict is FlowVerdict.DROPPED and flow.event_type == "drop"
            and flow.drop_reason in (DropReason.POLICY_DENIED, DropReason.POLICY_DENY)):
        verdict_uuid = str(uuid.uuid5(uuid.NAMESPACE_OID, flow.uuid)) if flow.uuid else ""
        return [dataclasses.replace(flow, event_type="policy-verdict", uuid=verdict_uuid), flow]
    return [flow]


# DO NOT CHANGE: grpc.health.v1.HealthCheckResponse{status: SERVING (1)} on the wire
# (field 1, varint). `hubble status` checks the server's health first.
_SERVING = b"\x08\x01"


def _health_handler(grpc: Any) -> Any:
    """grpc.health.v1.Health/Check: the server answers, so it serves (any service name)."""
    async def check(request: bytes, context: Any) -> bytes:
        return _SERVING

    return grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(
            check, request_deserializer=lambda b: b, response_serializer=lambda b: b)})


class _Observer:
    """observer.Observer, mixed into the generated ObserverServicer, whose methods
    answer UNIMPLEMENTED for what is not here (agent and debug events)."""

    def __init__(self, srv: HubbleServer) -> None:
        self.srv = srv

    async def GetFlows(self, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        srv, pb = self.srv, self.srv.pb
        as_dict = pb.json_format.MessageToDict
        try:
            match = compile_filters(
                [as_dict(f, preserving_proto_field_name=True) for f in request.whitelist],
                [as_dict(f, preserving_proto_field_name=True) for f in request.blacklist])
        except FilterError as e:
            await context.abort(pb.grpc.StatusCode.INVALID_ARGUMENT, str(e))
            return
        since = request.since.ToNanoseconds() / 1e9 if request.HasField("since") else None
        until = (request.until.ToNanoseconds() / 1e9
                 if request.HasField("until") and not request.follow else None)
        flt = FlowFilter(since=since, until=until, hubble=match)
        number: int | None = int(request.number)
        if number is not None and number >= ALL:
            number = None
        elif number == 0:
            # Hubble: no number and no time range means nothing of the past when following
            number = 0 if request.follow and since is None else None
        queue = srv.flows.subscribe() if request.follow else None
        try:
            past = [e for f in srv.flows.last(None, FlowFilter(since=since, until=until))
                    for e in hubble_events(f) if match(e)]
            if number is not None:
                past = (past[:number] if request.first else past[-number:]) if number else []
            for event in past:
                yield srv.response(event)
            while queue is not None:
                flow_or_none = await queue.get()
                if flow_or_none is None:
                    break
                for event in hubble_events(flow_or_none):
                    if flt.matches(event):
                        yield srv.response(event)
        except asyncio.CancelledError:
            pass
        finally:
            if queue is not None:
                srv.flows.unsubscribe(queue)

    async def ServerStatus(self, request: Any, context: Any) -> Any:  # noqa: N802
        srv = self.srv
        return srv.pb.observer_pb2.ServerStatusResponse(
            num_flows=len(srv.flows), max_flows=srv.flows.capacity, seen_flows=srv.flows.seen,
            uptime_ns=srv.uptime_ns(), version=srv.version, flows_rate=srv.flows_rate())

    async def GetNodes(self, request: Any, context: Any) -> Any:  # noqa: N802
        srv, pb = self.srv, self.srv.pb
        node = pb.observer_pb2.Node(
            name=srv.node_name, version=srv.version, address=f"unix://{srv.path}",
            state=pb.relay_pb2.NODE_CONNECTED, uptime_ns=srv.uptime_ns(),
            num_flows=len(srv.flows), max_flows=srv.flows.capacity, seen_flows=srv.flows.seen)
        return pb.observer_pb2.GetNodesResponse(nodes=[node])

    async def GetNamespaces(self, request: Any, context: Any) -> Any:  # noqa: N802
        srv, pb = self.srv, self.srv.pb
        seen = sorted({ep.namespace for f in srv.flows.last() for ep in (f.source, f.destination)
                       if ep.namespace})
        return pb.observer_pb2.GetNamespacesResponse(
            namespaces=[pb.observer_pb2.Namespace(namespace=ns) for ns in seen])


async def start_hubble(flows: FlowStore, config: Any, node_name: str) -> HubbleServer | None:
    """The server the config asks for: ``hubble_socket_path`` None (default: beside
    the API socket; skipped with a warning when the stubs or grpcio are missing),
    "" (off), or a path (required: ConfigError when it cannot be served); plus
    the TLS listener of ``hubble_listen_address`` (required when given)."""
    path = getattr(config, "hubble_socket_path", None)
    tls = tls_listen(config)
    if path == "" and tls is None:
        return None
    explicit = path is not None or tls is not None
    try:
        srv = HubbleServer(flows, node_name,
                           default_socket_path(config.api_socket) if path is None else path,
                           _version(), tls)
        await srv.start()
    except ConfigError as e:
        if explicit:
            raise
        LOG.warning("hubble observer API not served: %s", e)
        return None
    return srv


def _version() -> str:
    try:
        return f"axoneme {importlib.metadata.version('axoneme')}"
    except importlib.metadata.PackageNotFoundError:
        return "axoneme"
