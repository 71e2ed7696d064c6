"""The "echo" line protocol: an example third-party axoneme L7 parser.

Each request is one line ``VERB arg``; the server answers one line. A
policy selects the parser with Cilium's generic L7 form::

    rules:
      l7proto: echo
      l7: [{verb: "GET"}]        # verb: a regex matched against the whole verb

A request is allowed when one rule's ``verb`` matches (no rules: all
allowed); a denied request is answered ``DENIED`` and never reaches the
server. ``axoneme policy trace ... --l7 verb=GET`` decides the same way.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Sequence
from typing import Any

from axoneme.core.flow import Flow, FlowEndpoint, FlowVerdict
from axoneme.core.l7 import L7Parser, L7Request, L7Verdict
from axoneme.core.l7proxy import ProxyConfig, StreamProxyServer, plain_connect
from axoneme.core.regex import fullmatch, regex_problem


class EchoParser(L7Parser):
    name = "echo"
    default_proxy_port = 15077
    rule_fields = frozenset({"verb"})
    trace_inputs = {"verb": "the request verb, e.g. GET", "arg": "the request argument"}

    def check_field(self, key: str, value: str) -> str | None:
        why = regex_problem(value)
        return f"invalid regular expression {value!r}: {why}" if why else None

    def match(self, rules: Sequence[Any], request: L7Request) -> L7Verdict:
        verb = str(request.fields.get("verb", ""))
        if not rules:
            return L7Verdict(True, None, "no echo rules: every request allowed")
        for i, rule in enumerate(rules):
            if fullmatch(rule.get("verb") or ".*", verb):
                return L7Verdict(True, i, f"echo rule {i} allows {verb!r}")
        return L7Verdict(False, None, f"no echo rule allows {verb!r}")

    def proxy_factory(self) -> Any:
        return EchoProxy


class EchoProxy(StreamProxyServer):
    """The proxy: one line in, the policy asked, the line forwarded or ``DENIED``."""

    def __init__(self, sock: Any, *, direction: Any, policy_for: Any, flow_sink: Any,
                 connect_upstream: Any = None, config: ProxyConfig | None = None) -> None:
        self.config = config or ProxyConfig()
        super().__init__(sock, max_connections=self.config.max_connections, name="echo proxy")
        self.direction = direction
        self.policy_for = policy_for
        self.flow_sink = flow_sink
        self.connect_upstream = connect_upstream or plain_connect
        self.parser = EchoParser()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        client = (str(peer[0]), int(peer[1]))
        upstream = self.config.upstream or (str(local[0]), int(local[1]))
        if self.config.upstream is None and self.loops_back(upstream):
            return
        sock = await asyncio.wait_for(self.connect_upstream(client, upstream),
                                      self.config.upstream_connect_timeout)
        up_reader, up_writer = await asyncio.open_connection(sock=sock)
        try:
            while line := await asyncio.wait_for(reader.readline(), self.config.idle_timeout):
                verb, _, arg = line.decode(errors="replace").strip().partition(" ")
                policy = self.policy_for(client[0], client[1], upstream[0], upstream[1], self.direction)
                if inspect.isawaitable(policy):
                    policy = await policy
                verdict = (self.parser.match(policy.rules, L7Request({"verb": verb, "arg": arg}))
                           if policy is not None else L7Verdict(False, None, "no policy"))
                self._flow(policy, client, upstream, verb, arg, verdict.allowed)
                if not verdict.allowed:
                    writer.write(b"DENIED\n")
                else:
                    up_writer.write(line)
                    await up_writer.drain()
                    writer.write(await asyncio.wait_for(up_reader.readline(),
                                                        self.config.upstream_timeout))
                await writer.drain()
        finally:
            up_writer.close()

    def _flow(self, policy: Any, client: tuple[str, int], upstream: tuple[str, int],
              verb: str, arg: str, allowed: bool) -> None:
        src = policy.source if policy is not None else FlowEndpoint()
        dst = policy.destination if policy is not None else FlowEndpoint()
        self.flow_sink(Flow(
            time.time(), FlowVerdict.FORWARDED if allowed else FlowVerdict.DROPPED,
            client[0], upstream[0], src, dst, str(self.direction), type="L7", event_type="l7",
            l4={"TCP": {"source_port": client[1], "destination_port": upstream[1]}},
            l7={"type": "REQUEST", "echo": {"verb": verb, "arg": arg}},
            is_reply=False, summary=f"echo {verb} {arg}"))
