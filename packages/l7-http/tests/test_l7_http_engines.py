"""The native engine (axoneme-l7-http) is the Python proxy: the same bytes
in give the same bytes out, over real sockets.

Each case is sent on one connection to each engine (then the write side is
shut, so the connection ends when the proxy is done with it), both in front
of the same kind of recording upstream. Compared, engine against engine:

1. every byte the client receives (statuses, reasons, 403s, relayed responses);
2. every byte the upstream receives (what was forwarded, normalised,
   re-chunked, trailers filtered: nothing more on either side);
3. the flow records, whole (Flow.to_json: headers, redaction, endpoints,
   summary), but their time, latency and the client's port.

Cases: the head-parser smuggling corpus (``test_l7_http_llhttp.SMUGGLING``),
the refused-request streams of ``test_l7_http_proxy``, the fuzz corpus
(tests/fuzz/corpus/http), rule variants (headers, headerMatches actions,
hosts) and random hostile streams (the differential test's strategy).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httptools
import pytest
from axoneme.l7.http import HeaderMatch, HTTPRule
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))  # the corpora (import-mode=importlib)
from test_l7_http_differential import stream  # noqa: E402
from test_l7_http_fuzz import framed_request, request  # noqa: E402
from test_l7_http_llhttp import CORPUS, SMUGGLING  # noqa: E402

RULES = (HTTPRule(method="GET", path="/public(/.*)?"), HTTPRule(path="/up(/.*)?"),
         HTTPRule(method="POST", path="/upload"), HTTPRule(host="svc", path="/a(/.*)?"))


class Recorder:
    """Records every byte per connection; answers each request llhttp
    completes with 200 and its URL (an Upgrade too: no tunnel), and keeps
    the connection (a close between requests is a race in either engine)."""

    def __init__(self) -> None:
        self.conns: list[bytearray] = []
        self.open = 0
        self.server: Any = None
        self.port = 0

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        raw = bytearray()
        self.conns.append(raw)
        self.open += 1
        url = bytearray()

        class Answer:
            def on_url(self, u: bytes) -> None:
                url.extend(u)

            def on_message_complete(self) -> None:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(url), url))
                url.clear()

        parser = httptools.HttpRequestParser(Answer())
        try:
            while data := await r.read(65536):
                raw += data
                while data:
                    try:
                        parser.feed_data(data)
                        data = b""
                    except httptools.HttpParserUpgrade as e:
                        # no upgrade here (answered 200): the next request follows
                        data = data[e.args[0]:]
                        parser = httptools.HttpRequestParser(Answer())
                await w.drain()
        except (httptools.HttpParserError, ConnectionError):
            raw += b"<llhttp error>"
        finally:
            self.open -= 1
            w.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]


def _harness() -> Any:
    """This directory's conftest as a module (its make_env builds either engine)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("l7_http_harness", Path(__file__).parent / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def envs() -> Iterator[dict[str, Any]]:
    conftest = _harness()
    out: dict[str, Any] = {}
    try:
        for engine in ("python", "native"):
            out[engine] = conftest.make_env(RULES, engine=engine, upstream=Recorder())
        yield out
    finally:
        for engine in ("python", "native"):
            if engine in out:
                conftest.close_env(out[engine])


def run(env: Any, data: bytes, rules: Any = RULES) -> tuple[bytes, bytes, list[Any]]:
    """(client bytes, upstream bytes, flow summaries) of one connection carrying ``data``."""
    if env.policy["rules"] != rules:
        env.set_rules(rules)
    up: Recorder = env.upstream
    n_conns, n_flows = len(up.conns), len(env.flows)
    s = socket.create_connection(("127.0.0.1", env.port), timeout=5)
    client_port = s.getsockname()[1]
    out = b""
    try:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the proxy closed first: what it answered is still read
        while True:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            out += chunk
    finally:
        s.close()
    deadline = time.monotonic() + 5
    while up.open and time.monotonic() < deadline:
        time.sleep(0.005)
    flows = [_comparable(f, client_port, up.port) for f in env.flows[n_flows:]]
    return out, b"|".join(bytes(c) for c in up.conns[n_conns:]), flows


def _comparable(flow: Any, client_port: int, upstream_port: int) -> dict[str, Any]:
    """A flow's whole JSON but what differs between the two engines' runs:
    time, latency (also in a response's summary), the ports."""
    d = json.loads(json.dumps(flow.to_json()))  # a copy: the flow's own l7 stays
    del d["time"]
    d["l7"]["latency_ns"] = 0
    d["l4"] = {proto: {k: {client_port: "client", upstream_port: "upstream"}.get(v, v)
                       for k, v in ports.items()}
               for proto, ports in d["l4"].items()}
    d["Summary"] = re.sub(r" \d+ms \(", " Nms (", d["Summary"])
    return d


def same(envs: dict[str, Any], data: bytes, rules: Any = RULES) -> tuple[bytes, bytes, list[Any]]:
    py = run(envs["python"], data, rules)
    native = run(envs["native"], data, rules)
    assert native[0] == py[0], f"client bytes differ for {data[:200]!r}"
    assert native[1] == py[1], f"upstream bytes differ for {data[:200]!r}"
    assert native[2] == py[2], f"flows differ for {data[:200]!r}"
    return py


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: svc\r\n{extra}\r\n".encode()


@pytest.mark.parametrize("head", SMUGGLING, ids=lambda b: repr(b[:40]))
def test_smuggling_heads_same_on_both_engines(envs, head: bytes) -> None:
    out = same(envs, head + b"\r\n\r\n" + get("/public/after"))
    assert out[0]  # every head gets an answer


def test_refused_streams_same_on_both_engines(envs) -> None:
    import test_l7_http_proxy as module

    cases = next(m for m in module.test_smuggling_and_malformed_requests_refused.pytestmark
                 if m.name == "parametrize").args[1]
    assert len(cases) > 30
    for raw, status in cases:
        client, _, _ = same(envs, raw + get("/private") + get("/public"))
        assert client.startswith(b"HTTP/1.1 %d" % status), raw[:100]


def test_fuzz_corpus_same_on_both_engines(envs) -> None:
    files = sorted(CORPUS.iterdir())
    assert files, f"no corpus in {CORPUS}"
    forwarded = 0
    for f in files:
        forwarded += bool(same(envs, f.read_bytes())[1])
    assert forwarded  # the corpus exercises the upstream, not only refusals


@pytest.mark.parametrize("rules,data", [
    ((), get("/anything") + get("/else")),
    ((HTTPRule(headers=("X-Token: s3cret",)),), get("/a", "X-Token: s3cret\r\n") + get("/a")),
    ((HTTPRule(headers=("X-Present",)),), get("/a", "x-present: 1\r\n") + get("/b")),
    ((HTTPRule(header_matches=(HeaderMatch("X-Id", "fixed", "REPLACE"),
                               HeaderMatch("X-Drop", "never", "DELETE"),
                               HeaderMatch("X-New", "v", "ADD"),
                               HeaderMatch("X-Log", "l", "LOG"))),),
     get("/", "X-Id: evil\r\nX-Drop: 1\r\nX-Log: other\r\n") + get("/")),
    ((HTTPRule(header_matches=(HeaderMatch("X-Must", "yes"),)),),
     get("/", "X-Must: yes\r\n") + get("/", "X-Must: no\r\n")),
    ((HTTPRule(host="svc(:[0-9]+)?"),), get("/") + b"GET / HTTP/1.1\r\nHost: other\r\n\r\n"),
    ((HTTPRule(path="/caf\u00e9"), HTTPRule(path="(")), get("/caf%C3%A9") + get("/x")),
    ((HTTPRule(path="/public(/.*)?"),),
     b"GET http://svc/public/./a/../b?x=%2F HTTP/1.1\r\nHost: svc\r\nX-A: \tv \r\n\r\n"
     b"POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"2;e=1\r\nhi\r\n0\r\nX-T: 1\r\nContent-Length: 7\r\nHost: evil\r\n\r\n"
     b"GET /public HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\n"
     b"Upgrade: h2c\r\nHTTP2-Settings: x\r\n\r\n"
     b"POST /public HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nhi"
     b"PUT /public/p HTTP/1.0\r\nContent-Length: 3\r\n\r\nabc"),
    ((HTTPRule(method="POST"),), b"POST /x HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\n\r\nhello"
     b"GET /y HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n\r\nabc" + get("/z")),
], ids=["allow-all", "headers-value", "headers-present", "header-actions", "header-match-deny",
        "host", "unicode-and-bad-regex", "normalised-chunked-upgrade-expect", "denied-body-drained"])
def test_rule_variants_same_on_both_engines(envs, rules: Any, data: bytes) -> None:
    same(envs, data, rules)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=stream())
def test_random_streams_same_on_both_engines(envs, data: bytes) -> None:
    same(envs, data)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.lists(request() | framed_request(), min_size=1, max_size=3).map(b"".join)
       | st.binary(max_size=200))
def test_fuzz_streams_same_on_both_engines(envs, data: bytes) -> None:
    same(envs, data)


# -- the response side: fixed upstream answers ------------------------------------

class _Served:
    """``_serve``'s listener: closed only once its accepting thread is done (a
    socket closed under a thread's accept() lets that call land on the next
    socket given the same fd: the next case's listener, answered with this
    case's reply)."""

    def __init__(self, ls: socket.socket, thread: Any) -> None:
        self.ls, self.thread = ls, thread

    def getsockname(self) -> Any:
        return self.ls.getsockname()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.ls.shutdown(socket.SHUT_RDWR)  # wakes the accept() with an error
        self.thread.join(5)
        self.ls.close()


def _serve(reply: bytes) -> _Served:
    """An upstream answering every request head with ``reply``; it closes the
    connection after answering when ``reply`` is not framed for keep-alive
    (no close between requests otherwise: whether the proxy has seen such a
    close by the next request is a race in either engine; the native one
    checks the socket, the Python one what its loop read so far)."""
    import threading

    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    keep = reply.startswith(b"HTTP/1.1 ") and (b"\r\nContent-Length: " in reply or
                                               b"Transfer-Encoding: chunked" in reply)

    def answer(c: socket.socket) -> None:
        with c:
            buf = b""
            try:
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = c.recv(65536)
                        if not data:
                            return
                        buf += data
                    buf = buf.partition(b"\r\n\r\n")[2]
                    c.sendall(reply)
                    if not keep:
                        return
            except OSError:
                return

    def serve() -> None:
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(c,), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return _Served(ls, t)


@pytest.mark.parametrize("reply", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;x=y\r\nok\r\n0\r\nX-T: 1\r\nSet-Cookie: a\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
    b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
    b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\nshort",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nraw to the end",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 \xe9t\xe9\r\nX-L: \xff\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 099 Low\r\n\r\n", b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", b"",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\ntunnelled",
    # the framing headers in any case, list forms and bad lengths (resp.go reads them by hand)
    b"HTTP/1.1 200 OK\r\ncontent-LENGTH: 2\r\nCONNECTION: Close\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2,,2 \r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length:\t2\t\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1234567890123456789\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 000000000000000002\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length-X: 2\r\nContent-Lengt: 3\r\n\r\nraw",
    b"HTTP/1.1 200 OK\r\nTRANSFER-ENCODING: CHUNKED\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nConnection: keep-alive, CLOSE\r\nContent-Length: 2\r\n\r\nok",
    # llhttp reads these as not chunked (to the end of the connection): 502 (fuzz find)
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\t\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding:\tchunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked,\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: \r\n\r\n0\r\n\r\n",
], ids=lambda b: repr(b[:30]))
@pytest.mark.parametrize("method", [b"GET", b"HEAD"])
def test_upstream_answers_same_on_both_engines(reply: bytes, method: bytes) -> None:
    conftest = _harness()
    ls = _serve(reply)
    outs = []
    try:
        for engine in ("python", "native"):
            env = conftest.make_env((), engine=engine, upstream=Recorder(),
                                    upstream_addr=ls.getsockname())
            try:
                outs.append(run(env, method + b" /x HTTP/1.1\r\nHost: svc\r\n\r\n" + get("/y"), ())[::2])
            finally:
                conftest.close_env(env)
    finally:
        ls.close()
    assert outs[1] == outs[0]
