"""The strict HTTP/1.1 head parser (no sockets)."""

from __future__ import annotations

import pytest
from axoneme.l7.http._wire import (
    HttpError,
    parse_chunk_size,
    parse_request_head,
    parse_response_head,
    parse_target,
)


def test_origin_form_kept_byte_for_byte() -> None:
    req = parse_request_head(b"GET /a/b;c?x=%2F..&y HTTP/1.1\r\nHost: h:8080\r\nX-A:  v  ")
    assert (req.method, req.path, req.target, req.host) == ("GET", "/a/b;c?x=%2F..&y",
                                                             "/a/b;c?x=%2F..&y", "h:8080")
    assert req.headers == [("Host", "h:8080"), ("X-A", "v")]
    assert req.keep_alive and not req.has_body


@pytest.mark.parametrize("target,path,authority", [
    ("http://svc/x?y", "/x?y", "svc"),
    ("HTTP://svc:81", "/", "svc:81"),
    ("http://svc?q", "/?q", "svc"),
])
def test_absolute_form(target: str, path: str, authority: str) -> None:
    assert parse_target(target) == (path, authority)


@pytest.mark.parametrize("target", [
    "/a/../b", "/a/./b", "/a/..", "/..;/b", "/a/%2e%2E/b", "/a%2fb", "/a%5cb", "/a%00", "/a%zz",
    "/a%c0%ae%c0%ae/b", "/a b", "/a\\b", "/a#frag", "https://svc/x", "http://user@svc/x", "*", "svc:80", "",
    "/caf\u00e9",
])
def test_bad_targets(target: str) -> None:
    with pytest.raises(HttpError) as e:
        parse_target(target)
    assert e.value.status == 400


@pytest.mark.parametrize("target", ["/a/.../b", "/.well-known/x", "/a/.b", "/a/b.", "/..a", "/a;b/c"])
def test_dotted_names_are_not_dot_segments(target: str) -> None:
    assert parse_target(target) == (target, None)


def test_query_may_hold_anything_encoded() -> None:
    assert parse_target("/p?next=/../%2F%2e")[0] == "/p?next=/../%2F%2e"


def test_http10_defaults() -> None:
    req = parse_request_head(b"GET / HTTP/1.0")
    assert req.host == "" and not req.keep_alive


def test_connection_close_and_expect() -> None:
    req = parse_request_head(b"POST / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
                             b"Content-Length: 3\r\nExpect: 100-continue")
    assert not req.keep_alive and req.expect_continue and req.content_length == 3
    with pytest.raises(HttpError) as e:
        parse_request_head(b"GET / HTTP/1.1\r\nHost: h\r\nExpect: magic")
    assert e.value.status == 417


def test_absolute_form_without_host_gets_one() -> None:
    req = parse_request_head(b"GET http://svc/p HTTP/1.1")
    assert req.host == "svc" and ("Host", "svc") in req.headers
    assert req.serialize().startswith(b"GET /p HTTP/1.1\r\n")


@pytest.mark.parametrize("line,size", [(b"0", 0), (b"a", 10), (b"FF;x=y", 255),
                                       (b"10 ;ext", 16), (b"000000000000001", 1)])
def test_chunk_sizes(line: bytes, size: int) -> None:
    assert parse_chunk_size(line) == size


@pytest.mark.parametrize("line", [b"", b"-1", b"+1", b"0x1", b" 1", b"1 ", b"g",
                                  b"1" * 16, b"ffffffffffffffffffffffff", b"1;\r"])
def test_bad_chunk_sizes(line: bytes) -> None:
    with pytest.raises(HttpError):
        parse_chunk_size(line)


def test_response_framing() -> None:
    r = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert (r.status, r.content_length, r.chunked, r.close) == (200, 5, False, False)
    r = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert r.chunked
    r = parse_response_head(b"HTTP/1.0 200 OK\r\n\r\n")
    assert r.close and r.content_length is None
    r = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n")
    assert r.content_length == 5  # identical repeats are tolerated from upstreams
    for bad in (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"HTTP/1.1 2000 OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"):
        with pytest.raises(HttpError) as e:
            parse_response_head(bad)
        assert e.value.status == 502
