"""The DNS proxy: per-query ``rules.dns`` enforcement and toFQDNs learning.

One asyncio UDP + TCP listener on one port. For each query:

1. ``policy_for(src_ip, dst_ip, dst_port)`` (sync or async, evaluated per
   query so policy changes apply to the next query) gives the ``rules.dns``
   of the entry that redirected the query: a sequence of ``DNSRule`` (empty
   = allow every name), a core ``ProxyPolicy`` (its ``rules``, plus the
   endpoints for flows) or None (no DNS policy covers this client/resolver:
   the query is refused, fail closed). ``dns_proxy_factory`` adapts the
   core ``axoneme.core.l7proxy`` contract (5-argument ``policy_for``) to it.
2. A denied query is answered by the proxy itself with REFUSED (or the
   configured rcode, e.g. NXDOMAIN like Cilium's
   ``--tofqdns-dns-reject-response-code=nameError``); it never reaches the
   upstream. An L7 flow with verdict DROPPED is emitted.
3. An allowed query is forwarded to the resolver the pod asked (transparent
   mode: the original destination; otherwise ``config.upstream``). The
   answer must match the query (ID and question) or it is ignored.
4. Before the answer is relayed, its names/IPs/TTL go into the FQDN cache
   and ``on_answer(name, ips, ttl)`` is awaited for every name of the CNAME
   chain (at most ``response_max_delay`` seconds, Cilium's
   ``--tofqdns-proxy-response-max-delay``), so the agent can put the IPs into
   the datapath before the pod can connect to them. Then the upstream's
   bytes are relayed unchanged and a RESPONSE flow is emitted.
5. Upstream failures (timeout, unreachable, garbage) are answered with
   SERVFAIL (flow verdict ERROR). Malformed client packets are dropped
   silently. At most ``max_inflight`` queries are processed at once; extra
   ones are dropped (the client retries), as with Cilium's
   ``--dnsproxy-concurrency-limit``.

The parts: ``_proxyconfig`` (settings, counters, the hooks' shapes),
``_hooks`` (policy_for and on_answer: steps 1 and 4), ``_upstream`` (the
exchange with the resolver: steps 3 and 5), ``_flows`` (the L7 flows); the
wire format and the name matching are ``_wire``'s and ``_match``'s. Here:
the listeners and the per-query sequence.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any

from axoneme.core.flow import FlowEndpoint, FlowVerdict
from axoneme.core.l7proxy import (
    Addr,
    ConnectUpstream,
    ProxyConfig,
    is_transparent,
    make_listener,
    make_udp_listener,
    recv_datagram,
    send_from,
)
from axoneme.core.l7proxy import PolicyFor as CorePolicyFor
from axoneme.core.mapstate import Direction
from axoneme.l7.dns._cache import FQDNCache
from axoneme.l7.dns._flows import dns_flow
from axoneme.l7.dns._hooks import learn_answer, policy_verdict
from axoneme.l7.dns._match import match_query
from axoneme.l7.dns._proxyconfig import (
    DnsProxyConfig,
    DnsProxyStats,
    EndpointFor,
    FlowSink,
    OnAnswer,
    PolicyFor,
)
from axoneme.l7.dns._upstream import tcp_exchange, udp_exchange
from axoneme.l7.dns._wire import (
    RCODE_SERVFAIL,
    DnsAnswer,
    DnsQuery,
    MalformedMessage,
    parse_query,
    rcode_value,
    reject_reply,
)

LOG = logging.getLogger(__name__)

__all__ = ["DnsProxy", "DnsProxyConfig", "DnsProxyStats", "PolicyFor", "OnAnswer", "FlowSink",
           "dns_proxy_factory"]


class DnsProxy:
    """An asyncio DNS proxy; ``await start()``, ``await stop()`` or ``async with``."""

    def __init__(self, config: DnsProxyConfig, *, policy_for: PolicyFor | None = None,
                 core_policy_for: CorePolicyFor | None = None,
                 cache: FQDNCache | None = None, on_answer: OnAnswer | None = None,
                 flow_sink: FlowSink | None = None, endpoint_for: EndpointFor | None = None,
                 parser: Any = None, udp_sock: socket.socket | None = None,
                 tcp_sock: socket.socket | None = None,
                 connect_upstream: ConnectUpstream | None = None,
                 connect_upstream_udp: ConnectUpstream | None = None,
                 direction: Direction = Direction.EGRESS) -> None:
        if not config.transparent and config.upstream is None:
            raise ValueError("a non-transparent DNS proxy needs config.upstream")
        if (policy_for is None) == (core_policy_for is None):
            raise ValueError("give exactly one of policy_for and core_policy_for")
        if not (config.udp or config.tcp):
            raise ValueError("a DNS proxy needs UDP or TCP")
        self.config = config
        self.policy_for = policy_for
        self.core_policy_for = core_policy_for
        self.cache = cache
        self.on_answer = on_answer
        self.flow_sink = flow_sink
        self.endpoint_for = endpoint_for
        self.match = parser.match if parser is not None else match_query
        self.connect_upstream = connect_upstream
        self.connect_upstream_udp = connect_upstream_udp
        self.direction = direction
        self._given_udp = udp_sock
        self._given_tcp = tcp_sock
        self.reject_rcode = rcode_value(config.reject_rcode)
        self.stats = DnsProxyStats()
        self._udp: socket.socket | None = None
        self._tcp_server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._inflight = 0
        self._tcp_clients = 0
        self._port = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle ----------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (UDP and TCP)."""
        return self._port

    @property
    def address(self) -> Addr:
        return self.config.listen_host, self._port

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        cfg = self.config
        tcp_sock: socket.socket | None = None
        if self._given_udp is not None or self._given_tcp is not None:
            self._adopt_sockets()
            tcp_sock = self._given_tcp
        for attempt in range(0 if self._port else 20):
            try:
                self._udp = (make_udp_listener(cfg.listen_host, cfg.listen_port,
                                               transparent=cfg.transparent)
                             if cfg.udp else None)
                port = self._udp.getsockname()[1] if self._udp else cfg.listen_port
                tcp_sock = (make_listener(port, cfg.listen_host,
                                              transparent=cfg.transparent)
                            if cfg.tcp else None)
                if tcp_sock is not None:
                    port = tcp_sock.getsockname()[1]
                self._port = port
                break
            except OSError:
                # port 0: UDP got a port whose TCP twin is taken; try another
                if self._udp is not None:
                    self._udp.close()
                    self._udp = None
                if cfg.listen_port or attempt == 19:
                    raise
        if self._udp is not None:
            self._loop.add_reader(self._udp.fileno(), self._on_udp_readable)
        if tcp_sock is not None:
            self._tcp_server = await asyncio.start_server(self._on_tcp_client, sock=tcp_sock)
        LOG.info("dns proxy listening on %s:%d (transparent=%s)", cfg.listen_host,
                 self._port, cfg.transparent)

    def _adopt_sockets(self) -> None:
        """Use the listener(s) the agent made; open the missing twin on the
        same address and port (DNS needs UDP and TCP)."""
        cfg = self.config
        given = self._given_udp or self._given_tcp
        assert given is not None
        host, port = given.getsockname()[:2]
        if self._given_udp is not None:
            self._given_udp.setblocking(False)
            self._udp = self._given_udp
        elif cfg.udp:
            self._udp = make_udp_listener(host, port, transparent=cfg.transparent)
        if self._given_tcp is None and cfg.tcp:
            self._given_tcp = make_listener(port, host, transparent=cfg.transparent)
        elif self._given_tcp is not None:
            self._given_tcp.setblocking(False)
        self._port = port

    async def stop(self) -> None:
        if self._udp is not None and self._loop is not None:
            self._loop.remove_reader(self._udp.fileno())
            self._udp.close()
            self._udp = None
        if self._tcp_server is not None:
            self._tcp_server.close()
            self._tcp_server = None
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> DnsProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- UDP ----------------------------------------------------------------

    def _on_udp_readable(self) -> None:
        sock = self._udp
        if sock is None:
            return
        for _ in range(64):  # bounded so TCP and tasks get their turn
            try:
                data, client, orig = recv_datagram(sock)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP errors queued on the socket
                LOG.debug("dns proxy udp recv: %s", exc)
                continue
            if self._inflight >= self.config.max_inflight:
                self.stats.overloaded += 1
                continue
            self._inflight += 1
            self._spawn(self._udp_query(data, client, orig))

    async def _udp_query(self, data: bytes, client: Addr, orig: Addr | None) -> None:
        try:
            server = self._server_for(orig)
            reply = await self._handle(data, client, server, "UDP")
            if reply is None:
                return
            self._udp_reply(reply, client, orig)
        except Exception:
            LOG.exception("dns proxy: udp query from %s failed", client)
        finally:
            self._inflight -= 1

    def _udp_reply(self, reply: bytes, client: Addr, orig: Addr | None) -> None:
        try:
            if self.config.transparent and orig is not None and orig != self._own_addr(orig):
                send_from(reply, orig, client, mark=self.config.reply_mark)
            elif self._udp is not None:
                self._udp.sendto(reply, client)
        except OSError as exc:
            LOG.debug("dns proxy: reply to %s failed: %s", client, exc)

    def _own_addr(self, orig: Addr) -> Addr:
        return (orig[0], self._port)

    def _server_for(self, orig: Addr | None) -> Addr | None:
        if self.config.transparent and orig is not None and orig[1] != self._port:
            return orig
        return self.config.upstream

    # --- TCP ----------------------------------------------------------------

    async def _on_tcp_client(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if self._tcp_clients >= self.config.max_tcp_connections:
            self.stats.overloaded += 1
            writer.close()
            return
        self._tcp_clients += 1
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        client: Addr = (peer[0], peer[1])
        orig: Addr | None = (local[0], local[1]) if self.config.transparent else None
        server = self._server_for(orig)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2),
                                                  self.config.tcp_idle_timeout)
                    (length,) = struct.unpack("!H", head)
                    data = await asyncio.wait_for(reader.readexactly(length),
                                                  self.config.upstream_timeout)
                except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                    return
                if self._inflight >= self.config.max_inflight:
                    self.stats.overloaded += 1
                    return
                self._inflight += 1
                try:
                    reply = await self._handle(data, client, server, "TCP")
                finally:
                    self._inflight -= 1
                if reply is None:
                    return  # malformed: close the stream, like a UDP drop
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (ConnectionError, OSError) as exc:
            LOG.debug("dns proxy: tcp client %s: %s", client, exc)
        except Exception:
            LOG.exception("dns proxy: tcp client %s failed", client)
        finally:
            self._tcp_clients -= 1
            writer.close()
            try:
                await writer.wait_closed()
            except Exception:
                pass

    # --- the query ----------------------------------------------------------

    async def _handle(self, data: bytes, client: Addr, server: Addr | None,
                      proto: str) -> bytes | None:
        """Decide, forward and learn one query; returns the bytes for the client."""
        try:
            query = parse_query(data)
        except MalformedMessage as exc:
            self.stats.malformed += 1
            LOG.debug("dns proxy: dropping malformed query from %s: %s", client, exc)
            return None
        self.stats.queries += 1
        if server is None:
            self.stats.upstream_errors += 1
            LOG.warning("dns proxy: no upstream for query %s from %s", query.qname, client)
            return reject_reply(data, RCODE_SERVFAIL, query)
        verdict, eps = await policy_verdict(
            query, client, server, policy_for=self.policy_for,
            core_policy_for=self.core_policy_for, direction=self.direction, match=self.match)
        if not verdict.allowed:
            self.stats.refused += 1
            self._emit(FlowVerdict.DROPPED, "REQUEST", query, client, server, proto, eps,
                       rcode=self.reject_rcode, reason=verdict.reason)
            return reject_reply(data, self.reject_rcode, query)
        self.stats.allowed += 1
        self._emit(FlowVerdict.FORWARDED, "REQUEST", query, client, server, proto, eps)
        t0 = time.perf_counter_ns()
        try:
            if proto == "TCP":
                resp, answer = await tcp_exchange(
                    data, client, server, query, timeout=self.config.upstream_timeout,
                    mark=self.config.upstream_mark, connect=self.connect_upstream)
            else:
                resp, answer = await udp_exchange(
                    data, client, server, query, timeout=self.config.upstream_timeout,
                    mark=self.config.upstream_mark, connect=self.connect_upstream_udp)
        except (TimeoutError, OSError, MalformedMessage, asyncio.IncompleteReadError) as exc:
            self.stats.upstream_errors += 1
            LOG.info("dns proxy: upstream %s:%d failed for %s: %s", server[0], server[1],
                     query.qname, exc or type(exc).__name__)
            self._emit(FlowVerdict.ERROR, "RESPONSE", query, client, server, proto, eps,
                       rcode=RCODE_SERVFAIL)
            return reject_reply(data, RCODE_SERVFAIL, query)
        latency = time.perf_counter_ns() - t0
        self.stats.latency_ns.append(latency)
        if len(self.stats.latency_ns) > 1024:
            del self.stats.latency_ns[:512]
        await learn_answer(answer, cache=self.cache, on_answer=self.on_answer, stats=self.stats,
                           max_delay=self.config.response_max_delay)
        self._emit(FlowVerdict.FORWARDED, "RESPONSE", query, client, server, proto, eps,
                   rcode=answer.rcode, answer=answer, latency_ns=latency)
        return resp

    # --- flows --------------------------------------------------------------

    def _emit(self, verdict: FlowVerdict, kind: str, query: DnsQuery, client: Addr,
              server: Addr, proto: str, eps: tuple[FlowEndpoint, FlowEndpoint] | None, *,
              rcode: int = 0, answer: DnsAnswer | None = None,
              latency_ns: int = 0, reason: str = "") -> None:
        if self.flow_sink is None:
            return
        flow = dns_flow(verdict, kind, query, client, server, proto, eps,
                        direction=self.direction, endpoint_for=self.endpoint_for, rcode=rcode,
                        answer=answer, latency_ns=latency_ns, reason=reason)
        try:
            self.flow_sink(flow)
        except Exception:
            LOG.exception("dns proxy: flow sink failed")


def dns_proxy_factory(sock: socket.socket, *, direction: Direction,
                      policy_for: CorePolicyFor, flow_sink: FlowSink,
                      connect_upstream: ConnectUpstream | None = None,
                      config: ProxyConfig | None = None, cache: FQDNCache | None = None,
                      on_answer: OnAnswer | None = None,
                      dns_config: DnsProxyConfig | None = None,
                      connect_upstream_udp: ConnectUpstream | None = None) -> DnsProxy:
    """``axoneme.core.l7proxy.ProxyFactory`` for DNS (what ``proxy_factory()`` returns).

    ``sock`` is the agent's listener (TCP or UDP, bound to the proxy port,
    IP_TRANSPARENT when redirected by TPROXY); the proxy opens the other
    protocol's listener on the same address and port. ``policy_for`` is the
    core 5-argument form ``(src_ip, src_port, dst_ip, dst_port, direction)
    -> ProxyPolicy | None``. ``cache`` and ``on_answer`` are the toFQDNs
    hooks (see ``DnsProxy``). ``connect_upstream`` (TCP) and
    ``connect_upstream_udp(client, server) -> connected non-blocking UDP
    socket`` let the agent choose the upstream source address and mark;
    without them the proxy's own address and ``upstream_mark`` are used.
    ``config.upstream`` (tests) replaces the
    original destination; ``dns_config`` sets the DNS-specific knobs
    (reject rcode, timeouts, in-flight cap, response hold time).
    """
    base = dns_config or DnsProxyConfig()
    host, port = sock.getsockname()[:2]
    upstream = config.upstream if config is not None and config.upstream else base.upstream
    transparent = is_transparent(sock) and upstream is None
    if config is not None:
        base = replace(base, max_inflight=min(base.max_inflight, config.max_connections))
    cfg = replace(base, listen_host=host, listen_port=port, transparent=transparent,
                  upstream=upstream)
    if cache is None:
        cache = FQDNCache()  # still learn; the agent reads it back as proxy.cache
    is_udp = sock.type == socket.SOCK_DGRAM
    return DnsProxy(cfg, core_policy_for=policy_for, cache=cache, on_answer=on_answer,
                    flow_sink=flow_sink, udp_sock=sock if is_udp else None,
                    tcp_sock=None if is_udp else sock, connect_upstream=connect_upstream,
                    connect_upstream_udp=connect_upstream_udp,
                    direction=direction)
