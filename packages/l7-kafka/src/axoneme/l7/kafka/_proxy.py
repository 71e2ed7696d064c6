"""The Kafka proxy: per-connection request filtering with in-order responses.

``handle()`` serves one client connection that is already paired with an
upstream (broker) connection:

- requests are read as length-prefixed frames (partial reads are fine, a
  frame larger than ``max_frame`` or cut short closes both sides), parsed and
  decided one by one against the rules ``policy_lookup`` returns *now* (a
  policy change applies to the next request);
- allowed requests go upstream unchanged; refused ones never reach the
  broker and get a synthetic response of their API and version carrying an
  authorization error and the same correlation id;
- Kafka clients pipeline requests and expect responses in request order, so
  responses go back through one ordered queue: a synthetic response waits
  behind the upstream responses of earlier requests;
- ApiVersions responses are clamped to the versions we parse; a Metadata
  request refused for its topics is sent upstream without topics so the
  client still learns the brokers, and the refused topics are added to the
  response with TOPIC_AUTHORIZATION_FAILED;
- every request yields an L7 flow (FORWARDED or DROPPED).

``KafkaProxy`` is the listener the agent's proxy manager runs (the
``ProxyFactory`` contract of ``axoneme.core.l7proxy``); ``StandaloneKafkaProxy``
listens on host:port and forwards to a fixed upstream (tests, demos).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import uvloop
from axoneme.core.flow import Flow, FlowEndpoint, FlowVerdict
from axoneme.core.l7 import L7Verdict
from axoneme.core.l7proxy import FlowSink, StreamProxyServer, plain_connect, take_source_identity
from axoneme.core.mapstate import Direction
from axoneme.l7.kafka._codec import KafkaDecodeError
from axoneme.l7.kafka._matcher import allowed_topics, match_request
from axoneme.l7.kafka._protocol import (
    API_VERSIONS,
    DEFAULT_MAX_FRAME,
    GROUP_APIS,
    METADATA,
    TOPIC_APIS_MAX,
    KafkaRequest,
    parse_request,
)
from axoneme.l7.kafka._responses import (
    CLUSTER_AUTHORIZATION_FAILED,
    GROUP_AUTHORIZATION_FAILED,
    TOPIC_AUTHORIZATION_FAILED,
    clamp_api_versions,
    deny_response,
    frame,
    metadata_request_for,
    metadata_rewrite,
)

LOG = logging.getLogger(__name__)

# policy_lookup() -> rules | an object with .rules (.source/.destination) | None
# (or an awaitable of it). None refuses every request (fail closed).
PolicyLookup = Callable[[], Any]

_MAX_PENDING = 1024  # in-flight requests per connection before we stop reading
# Upstream responses read ahead of the client; small, since each may be large.
_READ_AHEAD = 4
DEFAULT_FRAME_TIMEOUT = 30.0
_SIZE = struct.Struct(">i")


class FrameError(Exception):
    """A frame is oversized, negative or cut short: the connection is closed."""


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """The addresses and peers a connection's flows are reported with."""

    ip_source: str = ""
    source_port: int = 0
    ip_destination: str = ""
    destination_port: int = 0
    source: FlowEndpoint = field(default_factory=FlowEndpoint)
    destination: FlowEndpoint = field(default_factory=FlowEndpoint)
    traffic_direction: str = "EGRESS"


async def read_frame(reader: asyncio.StreamReader, max_frame: int,
                     frame_timeout: float | None = None) -> bytes | None:
    """The next frame without its size prefix; None at a clean end of stream.

    Waiting for a frame to start is unbounded (Kafka connections idle for
    minutes); once its size has arrived, the rest must follow within
    ``frame_timeout`` seconds, so a trickling peer cannot pin a connection.
    """
    try:
        head = await reader.readexactly(4)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise FrameError("truncated frame size") from None
    (size,) = _SIZE.unpack(head)
    if size < 4 or size > max_frame:
        raise FrameError(f"bad frame size {size} (limit {max_frame})")
    try:
        async with asyncio.timeout(frame_timeout):
            return await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise FrameError(f"truncated frame ({size} bytes announced)") from None
    except TimeoutError:
        raise FrameError(f"frame of {size} bytes not complete after {frame_timeout}s") from None


@dataclass(slots=True)
class _Pending:
    req: KafkaRequest
    synthetic: bytes | None = None  # ready response; None = the next upstream response
    # Metadata partly refused: keep these topics of the upstream response and
    # add the refused ones with metadata_error.
    metadata_keep: tuple[str, ...] = ()
    metadata_denied: tuple[str, ...] = ()
    metadata_error: int = 0


_UPSTREAM_CLOSED = object()


def _rules_of(policy: Any) -> tuple[Sequence[Any] | None, Any]:
    if policy is None:
        return None, None
    rules = getattr(policy, "rules", None)
    if rules is not None:
        return rules, policy
    return policy, None


def _errors(rules: Sequence[Any] | None, req: KafkaRequest) -> tuple[int, int]:
    """(error for topic entries, error for request-level fields) of a refusal."""
    topic_only = False
    if rules is not None and req.error is None and req.topics and not req.all_topics:
        topic_only = match_request(rules, _without_topics(req)).allowed
    if topic_only:
        return TOPIC_AUTHORIZATION_FAILED, TOPIC_AUTHORIZATION_FAILED
    if req.api_key in GROUP_APIS:
        return GROUP_AUTHORIZATION_FAILED, GROUP_AUTHORIZATION_FAILED
    if req.api_key in TOPIC_APIS_MAX:
        return TOPIC_AUTHORIZATION_FAILED, CLUSTER_AUTHORIZATION_FAILED
    return CLUSTER_AUTHORIZATION_FAILED, CLUSTER_AUTHORIZATION_FAILED


def _without_topics(req: KafkaRequest) -> KafkaRequest:
    return KafkaRequest(req.api_key, req.api_version, req.correlation_id, req.client_id)


def kafka_flow(req: KafkaRequest | None, verdict: FlowVerdict, conn: ConnInfo,
               error_code: int = 0, policy: Any = None, reason: str = "",
               refused: Sequence[str] = ()) -> Flow:
    """The L7 flow record of one request (Hubble's l7.kafka fields).

    Hubble has one ``topic``: the first refused topic of a refused request,
    else the first topic; all of them are in ``topics`` when there are several.
    """
    topics = req.topic_names if req is not None else ()
    kafka: dict[str, Any] = {
        "error_code": error_code,
        "api_version": req.api_version if req is not None else 0,
        "api_key": req.api_name if req is not None else "",
        "correlation_id": req.correlation_id if req is not None else 0,
        "topic": refused[0] if refused else (topics[0] if topics else ""),
    }
    if len(topics) > 1:
        kafka["topics"] = list(topics)
    if req is not None and req.client_id:
        kafka["client_id"] = req.client_id
    if reason and verdict is FlowVerdict.DROPPED:
        kafka["reason"] = reason
    src = getattr(policy, "source", None) or conn.source
    dst = getattr(policy, "destination", None) or conn.destination
    what = req.api_name if req is not None else "malformed request"
    summary = f"Kafka request {what}"
    if req is not None:
        summary += f" v{req.api_version} correlation id {req.correlation_id}"
    if topics:
        summary += " topic " + ",".join(topics[:4]) + ("..." if len(topics) > 4 else "")
    return Flow(
        time=time.time(), verdict=verdict, ip_source=conn.ip_source,
        ip_destination=conn.ip_destination, source=src, destination=dst,
        traffic_direction=conn.traffic_direction, type="L7", event_type="l7",
        l4={"TCP": {"source_port": conn.source_port, "destination_port": conn.destination_port}},
        l7={"type": "REQUEST", "kafka": kafka}, is_reply=False, summary=summary,
    )


def _conn_info(client_writer: asyncio.StreamWriter, upstream_writer: asyncio.StreamWriter,
               direction: str = "EGRESS") -> ConnInfo:
    peer = client_writer.get_extra_info("peername") or ("", 0)
    dst = upstream_writer.get_extra_info("peername") or ("", 0)
    return ConnInfo(ip_source=str(peer[0]), source_port=int(peer[1]),
                    ip_destination=str(dst[0]), destination_port=int(dst[1]),
                    traffic_direction=direction)


async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
                 upstream_reader: asyncio.StreamReader, upstream_writer: asyncio.StreamWriter,
                 policy_lookup: PolicyLookup, flow_sink: FlowSink | None = None, *,
                 conn: ConnInfo | None = None, max_frame: int = DEFAULT_MAX_FRAME,
                 frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT) -> None:
    """Proxy one client connection to its upstream until either side ends.

    ``policy_lookup()`` is called for every request and returns the Kafka
    rules to apply (a sequence of KafkaRule, empty = allow all), an object
    with ``rules``/``source``/``destination`` (``core.l7proxy.ProxyPolicy``),
    or None to refuse everything; it may be a coroutine function. Both
    writers are closed on return.
    """
    session = _Session(client_reader, client_writer, upstream_reader, upstream_writer,
                       policy_lookup, flow_sink,
                       conn or _conn_info(client_writer, upstream_writer), max_frame,
                       frame_timeout)
    await session.run()


class _Session:
    def __init__(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter,
                 ur: asyncio.StreamReader, uw: asyncio.StreamWriter,
                 policy_lookup: PolicyLookup, flow_sink: FlowSink | None,
                 conn: ConnInfo, max_frame: int, frame_timeout: float | None) -> None:
        self.cr, self.cw, self.ur, self.uw = cr, cw, ur, uw
        self.policy_lookup = policy_lookup
        self.flow_sink = flow_sink
        self.conn = conn
        self.max_frame = max_frame
        self.frame_timeout = frame_timeout
        self.pending: asyncio.Queue[Any] = asyncio.Queue(_MAX_PENDING)
        self.responses: asyncio.Queue[Any] = asyncio.Queue(_READ_AHEAD)
        self.expected = 0  # upstream responses owed for forwarded requests

    async def run(self) -> None:
        tasks = [asyncio.create_task(self._requests(), name="kafka-requests"),
                 asyncio.create_task(self._responses(), name="kafka-responses"),
                 asyncio.create_task(self._upstream(), name="kafka-upstream")]
        try:
            # The upstream reader ending is not the end: queued responses
            # still have to reach the client; the response task decides.
            await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for res in results:
                if isinstance(res, BaseException) and not isinstance(
                        res, (asyncio.CancelledError, FrameError, ConnectionError,
                              KafkaDecodeError, TimeoutError)):
                    LOG.error("kafka proxy connection failed", exc_info=res)
            for w in (self.cw, self.uw):
                with contextlib.suppress(Exception):
                    w.close()
            for w in (self.cw, self.uw):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(w.wait_closed(), 1)

    def _emit(self, flow: Flow) -> None:
        if self.flow_sink is None:
            return
        try:
            self.flow_sink(flow)
        except Exception:
            LOG.exception("kafka proxy: flow sink failed")

    async def _lookup(self) -> Any:
        got = self.policy_lookup()
        if inspect.isawaitable(got):
            got = await got
        return got

    async def _requests(self) -> None:
        while True:
            try:
                data = await read_frame(self.cr, self.max_frame, self.frame_timeout)
            except FrameError as exc:
                LOG.info("kafka proxy: closing %s:%d: %s", self.conn.ip_source,
                         self.conn.source_port, exc)
                self._emit(kafka_flow(None, FlowVerdict.DROPPED, self.conn, reason=str(exc)))
                return
            if data is None:
                return
            try:
                req = parse_request(data)
            except KafkaDecodeError as exc:
                LOG.info("kafka proxy: closing %s:%d: unreadable header: %s",
                         self.conn.ip_source, self.conn.source_port, exc)
                self._emit(kafka_flow(None, FlowVerdict.DROPPED, self.conn, reason=str(exc)))
                return
            policy = await self._lookup()
            rules, policy_obj = _rules_of(policy)
            verdict = (L7Verdict(False, None, "no kafka policy for this connection")
                       if rules is None else match_request(rules, req))
            if verdict.allowed:
                if req.expects_response:
                    self.expected += 1
                self.uw.write(_SIZE.pack(len(data)))
                self.uw.write(data)
                if req.expects_response:
                    await self.pending.put(_Pending(req))
                self._emit(kafka_flow(req, FlowVerdict.FORWARDED, self.conn, policy=policy_obj))
                await self.uw.drain()
                continue
            topic_err, api_err = _errors(rules, req)
            LOG.debug("kafka proxy: refused %s v%d corr %d: %s", req.api_name,
                      req.api_version, req.correlation_id, verdict.reason)
            keep = allowed_topics(rules, req) if rules is not None and req.error is None else ()
            refused = tuple(t for t in req.topic_names if t not in keep)
            self._emit(kafka_flow(req, FlowVerdict.DROPPED, self.conn, error_code=topic_err
                                  if req.topics else api_err, policy=policy_obj,
                                  reason=verdict.reason, refused=refused))
            if not req.expects_response:
                continue  # Produce with acks=0: the client waits for nothing
            if (req.api_key == METADATA and rules is not None and req.error is None
                    and match_request(rules, _without_topics(req)).allowed):
                # Like a broker with ACLs: refused topics get their error,
                # the allowed ones (and the brokers) come from upstream.
                denied = refused
                rewritten = metadata_request_for(req, keep)
                if rewritten is not None:
                    self.expected += 1
                    self.uw.write(rewritten)
                    await self.pending.put(_Pending(req, metadata_keep=keep,
                                                    metadata_denied=denied,
                                                    metadata_error=topic_err))
                    await self.uw.drain()
                    continue
            response = deny_response(req, topic_err, api_err)
            if response is None:
                LOG.info("kafka proxy: cannot answer refused %s v%d; closing",
                         req.api_name, req.api_version)
                return
            await self.pending.put(_Pending(req, synthetic=response))

    async def _upstream(self) -> None:
        try:
            while True:
                data = await read_frame(self.ur, self.max_frame)  # trusted side: big, slow fetches
                if data is None:
                    break
                if self.expected <= 0:
                    LOG.warning("kafka proxy: unsolicited frame from upstream; closing")
                    break
                self.expected -= 1
                await self.responses.put(data)
        except (FrameError, ConnectionError) as exc:
            LOG.info("kafka proxy: upstream failed: %s", exc)
        # Wake the response task whichever queue it is waiting on. The pending
        # marker first: if that queue is full, the response task is busy
        # draining ``responses`` and the blocking put below completes; if
        # ``responses`` is full of unsolicited frames, the marker ends it.
        with contextlib.suppress(asyncio.QueueFull):
            self.pending.put_nowait(_UPSTREAM_CLOSED)
        await self.responses.put(_UPSTREAM_CLOSED)

    async def _responses(self) -> None:
        while True:
            item = await self.pending.get()
            if item is _UPSTREAM_CLOSED:
                # Flush synthetic answers queued before the close; stop at
                # the first one that needed the upstream.
                return
            if item.synthetic is not None:
                self.cw.write(item.synthetic)
                await self.cw.drain()
                continue
            data = await self.responses.get()
            if data is _UPSTREAM_CLOSED:
                return
            req = item.req
            (corr,) = _SIZE.unpack_from(data, 0)
            if corr != req.correlation_id:
                LOG.warning("kafka proxy: upstream answered correlation id %d, expected %d",
                            corr, req.correlation_id)
                return
            if req.api_key == API_VERSIONS:
                buf = bytearray(data)
                with contextlib.suppress(KafkaDecodeError, struct.error):
                    clamp_api_versions(req, buf)
                out = frame(bytes(buf))
            elif item.metadata_error:
                try:
                    out = metadata_rewrite(req, data, item.metadata_keep, item.metadata_denied,
                                           item.metadata_error)
                except KafkaDecodeError as exc:
                    LOG.warning("kafka proxy: unexpected metadata response: %s", exc)
                    return
            else:
                self.cw.write(_SIZE.pack(len(data)))
                out = data
            self.cw.write(out)
            await self.cw.drain()


# ----------------------------------------------------------------- listeners

class KafkaProxy(StreamProxyServer):
    """A Kafka proxy on one listening socket (the ``kafka`` proxy factory).

    Signature of ``axoneme.core.l7proxy.ProxyFactory``:
    ``KafkaProxy(sock, *, direction, policy_for, flow_sink,
    connect_upstream=None, config=None)`` then ``await start()`` /
    ``await stop()``. ``policy_for(src_ip, src_port, dst_ip, dst_port,
    direction)`` is asked before every request; the upstream is the accepted
    socket's local address (TPROXY keeps the original destination) unless
    ``config.upstream`` is set.
    """

    def __init__(self, sock: socket.socket, *, direction: Direction | str = Direction.EGRESS,
                 policy_for: Callable[..., Any], flow_sink: FlowSink | None = None,
                 connect_upstream: Callable[[tuple[str, int], tuple[str, int]],
                                            Awaitable[socket.socket]] | None = None,
                 config: Any = None, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        super().__init__(sock, max_connections=getattr(config, "max_connections", 1024),
                         name="kafka proxy")
        self.direction = direction
        self.policy_for = policy_for
        self.flow_sink = flow_sink
        self.connect_upstream = connect_upstream or plain_connect
        self.config = config
        self.max_frame = max_frame
        self.stats.update({"connections": 0, "upstream_failures": 0})

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["connections"] += 1
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        client = (str(peer[0]), int(peer[1]))
        upstream = getattr(self.config, "upstream", None) or (str(local[0]), int(local[1]))
        if getattr(self.config, "upstream", None) is None and self.loops_back(upstream):
            LOG.warning("kafka proxy: direct connection from %s refused (would loop)", client)
            return
        timeout = getattr(self.config, "upstream_connect_timeout", 5.0)
        # the source identity in the connection's mark (eBPF), passed on only when there is one
        source = take_source_identity(writer.get_extra_info("socket"))
        kw = {"source_identity": source} if source else {}
        try:
            sock = await asyncio.wait_for(self.connect_upstream(
                client, upstream, **({"identity": source} if source else {})), timeout)
            up_reader, up_writer = await asyncio.open_connection(sock=sock)
        except (OSError, TimeoutError) as exc:
            self.stats["upstream_failures"] += 1
            LOG.info("kafka proxy: upstream %s unreachable: %s", upstream, exc)
            return
        direction = self.direction
        dname = direction.name if isinstance(direction, Direction) else str(direction)
        conn = ConnInfo(ip_source=client[0], source_port=client[1], ip_destination=upstream[0],
                        destination_port=upstream[1], traffic_direction=dname)

        def lookup() -> Any:
            return self.policy_for(client[0], client[1], upstream[0], upstream[1], direction, **kw)

        await handle(reader, writer, up_reader, up_writer, lookup, self.flow_sink,
                     conn=conn, max_frame=self.max_frame,
                     frame_timeout=getattr(self.config, "body_timeout", DEFAULT_FRAME_TIMEOUT))


class StandaloneKafkaProxy(StreamProxyServer):
    """Listen on ``listen`` and forward every connection to ``upstream``.

    ``policy_lookup()`` as for :func:`handle`. ``start()``/``stop()`` are
    coroutines; ``start_thread()``/``stop_thread()`` run the proxy on its own
    event loop in a daemon thread (for synchronous clients such as
    kafka-python).
    """

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int],
                 policy_lookup: PolicyLookup, flow_sink: FlowSink | None = None, *,
                 max_frame: int = DEFAULT_MAX_FRAME,
                 frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT) -> None:
        super().__init__(None, listen=listen, max_connections=1 << 16, name="kafka proxy")
        self.frame_timeout = frame_timeout
        self.upstream = upstream
        self.policy_lookup = policy_lookup
        self.flow_sink = flow_sink
        self.max_frame = max_frame
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> tuple[str, int]:  # type: ignore[override]
        await super().start()
        return self.address

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5)
        except (OSError, TimeoutError) as exc:
            LOG.info("kafka proxy: upstream %s unreachable: %s", self.upstream, exc)
            return
        sock = up_writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await handle(reader, writer, up_reader, up_writer, self.policy_lookup,
                     self.flow_sink, max_frame=self.max_frame, frame_timeout=self.frame_timeout)

    # -- threaded use ---------------------------------------------------------

    def start_thread(self) -> tuple[str, int]:
        # uvloop, as the agent's proxy loop (axoneme.agent.proxy)
        loop = uvloop.new_event_loop()
        started = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                box["address"] = loop.run_until_complete(self.start())
            except BaseException as exc:  # report to the starting thread
                box["error"] = exc
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="kafka-proxy", daemon=True)
        self._thread.start()
        started.wait(10)
        if "error" in box:
            raise box["error"]
        return box["address"]  # type: ignore[no-any-return]

    def stop_thread(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = None
        self._thread = None
