"""A recording fake broker and a client helper for proxy tests (all on loopback)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Callable
from typing import Any

from axoneme.l7.kafka import StandaloneKafkaProxy, parse_request
from kafka.protocol.metadata.metadata import MetadataResponse


def metadata_response(corr: int, version: int, topics: list[str]) -> bytes:
    R = MetadataResponse
    T = R.MetadataResponseTopic
    msg = R[version](brokers=[R.MetadataResponseBroker(node_id=1, host="127.0.0.1", port=1)],
                     cluster_id="c", controller_id=1,
                     topics=[T(error_code=0, name=t, partitions=[]) for t in topics])
    msg.with_header(correlation_id=corr)
    return bytes(msg.encode(header=True, framed=True))


class FakeBroker:
    """Records every frame it receives; answers each with its correlation id.

    ``hold`` is an asyncio.Event: while it is clear, responses to requests
    whose correlation id is in ``held`` wait (to force in-flight requests).
    """

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.held: set[int] = set()
        self.release = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.close_after: int | None = None  # close the connection after N answers
        self.unsolicited = 0  # frames to send right after accepting

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        host, port = self.server.sockets[0].getsockname()[:2]
        return host, port

    async def stop(self) -> None:
        for w in self.writers:
            with contextlib.suppress(OSError, RuntimeError):  # closed loop or socket
                w.close()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.writers.append(w)
        answered = 0
        try:
            for i in range(self.unsolicited):
                body = struct.pack(">i", 10_000 + i) + b"junk"
                w.write(struct.pack(">i", len(body)) + body)
            if self.unsolicited:
                await w.drain()
                return
            while True:
                head = await r.readexactly(4)
                (size,) = struct.unpack(">i", head)
                data = await r.readexactly(size)
                self.frames.append(data)
                _, version, corr = struct.unpack(">hhi", data[:8])
                if corr in self.held:
                    await self.release.wait()
                api_key = struct.unpack(">h", data[:2])[0]
                req = parse_request(data)
                if not req.expects_response:
                    continue  # Produce with acks=0
                if api_key == 3:
                    w.write(metadata_response(corr, version, list(req.topic_names)))
                else:
                    body = struct.pack(">i", corr) + b"upstream"
                    w.write(struct.pack(">i", len(body)) + body)
                await w.drain()
                answered += 1
                if self.close_after is not None and answered >= self.close_after:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):  # closed loop or socket
                w.close()


async def read_response(r: asyncio.StreamReader, timeout: float = 5) -> tuple[int, bytes]:
    """(correlation id, whole unframed response)."""
    head = await asyncio.wait_for(r.readexactly(4), timeout)
    (size,) = struct.unpack(">i", head)
    data = await asyncio.wait_for(r.readexactly(size), timeout)
    return struct.unpack(">i", data[:4])[0], data


class Harness:
    """A fake broker behind a StandaloneKafkaProxy, in the running loop."""

    def __init__(self, rules: Any, max_frame: int = 1 << 20,
                 frame_timeout: float | None = 30.0) -> None:
        self.rules = rules
        self.flows: list[Any] = []
        self.broker = FakeBroker()
        self.max_frame = max_frame
        self.frame_timeout = frame_timeout
        self.proxy: StandaloneKafkaProxy | None = None
        self.lookup: Callable[[], Any] = lambda: self.rules

    async def __aenter__(self) -> Harness:
        up = await self.broker.start()
        self.proxy = StandaloneKafkaProxy(("127.0.0.1", 0), up, lambda: self.lookup(),
                                          self.flows.append, max_frame=self.max_frame,
                                          frame_timeout=self.frame_timeout)
        await self.proxy.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.proxy is not None
        await self.proxy.stop()
        await self.broker.stop()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert self.proxy is not None
        return await asyncio.open_connection(*self.proxy.address)
