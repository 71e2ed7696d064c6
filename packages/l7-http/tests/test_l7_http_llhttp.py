"""The head parser's llhttp path (``_llhttp``) against its own line-by-line
parser: the same verdict for every head, so every request-smuggling defence
of ``_wire`` holds whichever path read the head.

1. Accepted heads: the same RequestHead (method, target, path, version,
   headers, framing and connection flags) either way.
2. Refused heads: the same status and reason either way.
3. The llhttp path is really taken for ordinary heads, and refused (None)
   wherever llhttp would read the bytes otherwise than they were received.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from axoneme.l7.http import _wire
from axoneme.l7.http._llhttp import tokenize
from axoneme.l7.http._wire import HttpError, RequestHead, parse_request_head
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent))  # the fuzz module's strategies (import-mode=importlib)
from test_l7_http_fuzz import framed_request, request  # noqa: E402

CORPUS = Path(__file__).resolve().parents[3] / "tests" / "fuzz" / "corpus" / "http"


def _verdict(block: bytes) -> RequestHead | tuple[int, str]:
    try:
        return parse_request_head(block)
    except HttpError as e:
        return e.status, e.reason


def _both(block: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object]:
    fast = _verdict(block)
    with monkeypatch.context() as m:
        m.setattr(_wire, "_llhttp_tokenize", lambda block, n: None)
        slow = _verdict(block)
    return fast, slow


def _head(stream: bytes) -> bytes:
    stream = stream.lstrip(b"\r\n")
    end = stream.find(b"\r\n\r\n")
    return stream if end < 0 else stream[:end]


SMUGGLING = [
    b"GET /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nTransfer-Encoding: chunked",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nContent-Length: 5",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 5, 5",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nContent-Length: +5",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked, identity",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: gzip, chunked",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding : chunked",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: \x85chunked",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nX: a\r\n folded: b",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nX: a\r\n\tTransfer-Encoding: chunked",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nX: a\rb",
    b"GET /a HTTP/1.1\r\nHost: svc\nX: a",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nX: \x00",
    b"GET  /a HTTP/1.1\r\nHost: svc",
    b"GET /a  HTTP/1.1\r\nHost: svc",
    b"GET\t/a HTTP/1.1\r\nHost: svc",
    b"GET /a HTTP/1.1 \r\nHost: svc",
    b"GET /a http/1.1\r\nHost: svc",
    b"GET /a HTTP/2.0\r\nHost: svc",
    b"GET /a HTTP/0.9\r\nHost: svc",
    b"get /a HTTP/1.1\r\nHost: svc",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nHost: evil",
    b"GET /a HTTP/1.1",
    b"GET /a HTTP/1.0",
    b"GET /a HTTP/1.0\r\nTransfer-Encoding: chunked",
    b"GET http://svc/a HTTP/1.1\r\nHost: evil",
    b"GET /public/..;/private HTTP/1.1\r\nHost: svc",
    b"GET /public/%2e%2e/private HTTP/1.1\r\nHost: svc",
    b"GET /public%2Fx HTTP/1.1\r\nHost: svc",
    b"GET /%c0%ae HTTP/1.1\r\nHost: svc",
    b"GET /a/./b/../c HTTP/1.1\r\nHost: svc",
    b"CONNECT svc:443 HTTP/1.1\r\nHost: svc",
    b"GET * HTTP/1.1\r\nHost: svc",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nExpect: 100-continue",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nExpect: something",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket",
    b"POST /a HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nContent-Length: 3",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nX: " + b" " * 5000,
    b"GET /a HTTP/1.1\r\nHost: svc" + b"\r\nX: y" * 101,
    b"GET /a HTTP/1.1\r\nHost: svc\r\nX-Long: " + b"x" * 70000,
]


@pytest.mark.parametrize("block", SMUGGLING, ids=lambda b: repr(b[:48]))
def test_smuggling_heads_same_verdict_on_both_paths(block: bytes, monkeypatch) -> None:
    fast, slow = _both(block, monkeypatch)
    assert fast == slow


def test_fuzz_corpus_same_verdict_on_both_paths(monkeypatch) -> None:
    files = sorted(CORPUS.iterdir())
    assert files, f"no corpus in {CORPUS}"
    for f in files:
        fast, slow = _both(_head(f.read_bytes()), monkeypatch)
        assert fast == slow, f.name


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(stream=request() | framed_request() | st.binary(max_size=200))
def test_random_heads_same_verdict_on_both_paths(stream: bytes) -> None:
    block = _head(stream)
    fast = _verdict(block)
    orig = _wire._llhttp_tokenize
    _wire._llhttp_tokenize = lambda block, n: None  # hypothesis: no function-scoped fixture
    try:
        slow = _verdict(block)
    finally:
        _wire._llhttp_tokenize = orig
    assert fast == slow, block


def test_ordinary_heads_take_the_llhttp_path(monkeypatch) -> None:
    def refuse(line: bytes) -> None:
        raise AssertionError("the line-by-line parser ran")

    monkeypatch.setattr(_wire, "_parse_request_line", refuse)
    req = parse_request_head(b"POST /api/x?q=1 HTTP/1.1\r\nHost: svc\r\nContent-Length: 3\r\n"
                             b"X-A:  padded \t")
    assert (req.method, req.path, req.content_length) == ("POST", "/api/x?q=1", 3)
    assert req.headers == [("Host", "svc"), ("Content-Length", "3"), ("X-A", "padded")]
    upgrade = parse_request_head(b"GET /ws HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\n"
                                 b"Upgrade: websocket")
    assert upgrade.upgrade


@pytest.mark.parametrize("block", [
    b"GET  /a HTTP/1.1\r\nHost: svc",  # two spaces
    b"GET /a HTTP/1.1\r\nHost: svc\r\nX: a\r\n folded",  # obs-fold
    b"GET /a HTTP/1.1\r\nHost: svc\r\nX : a",  # whitespace before the colon
    b"GET /a HTTP/2.0\r\nHost: svc",
    b"GET /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 1\r\nTransfer-Encoding: chunked",
])
def test_llhttp_refuses_or_misreads_so_the_own_parser_decides(block: bytes) -> None:
    assert tokenize(block, block.count(b"\r\n")) is None
