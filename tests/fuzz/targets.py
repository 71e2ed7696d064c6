"""Fuzz targets: one function per parser, shared by atheris and the corpus replay.

Each target takes the raw bytes an attacker controls and returns None. The
parser's own refusal (PolicyError problems, HttpError, KafkaDecodeError,
MalformedMessage, ValueError from the pattern validator) is a normal
outcome; any other exception, including a failed ``assert`` of an
invariant, is a crash. Hangs and memory blow-ups are crashes too: atheris
runs with ``-timeout`` and ``-rss_limit_mb``, the replay test bounds the
time and (for crashers, in a child process) the address space.

Input formats, kept simple so corpus files stay readable:

- ``policy``: a policy file; validated as ``x.yaml`` and as ``x.json``
  through ``check_paths``, the entry point of ``axoneme policy validate``.
- ``http``: the bytes a client sends (head, then body); a stream starting
  with ``HTTP/`` is an upstream response instead.
- ``kafka``: one request frame without its 4-byte size prefix.
- ``dns``: a DNS message (as a query, then as an answer); ``P:pattern\\n
  name\\n...`` exercises the matchPattern validator and matcher instead.
"""

from __future__ import annotations

import atexit
import ipaddress
import os
import shutil
import struct
import tempfile
from collections.abc import Callable

from axoneme.core.errors import Problem
from axoneme.core.l7 import L7Request, L7Verdict
from axoneme.core.policy.parse import check_paths
from axoneme.l7.dns import DNSRule
from axoneme.l7.dns._match import match_pattern, normalize_name, validate_name, validate_pattern
from axoneme.l7.dns._parser import DnsParser
from axoneme.l7.dns._wire import MalformedMessage, parse_answer, parse_query, reject_reply
from axoneme.l7.http import HeaderMatch, HTTPRule
from axoneme.l7.http._parser import HttpParser, apply_actions
from axoneme.l7.http._wire import (
    HttpError,
    RequestHead,
    parse_chunk_size,
    parse_header_lines,
    parse_request_head,
    parse_response_head,
    without_upgrade,
)
from axoneme.l7.kafka import KafkaRule
from axoneme.l7.kafka._codec import KafkaDecodeError
from axoneme.l7.kafka._matcher import allowed_topics, match_request
from axoneme.l7.kafka._protocol import METADATA, KafkaRequest, parse_request
from axoneme.l7.kafka._responses import deny_response, metadata_request_for

# --- policy ---------------------------------------------------------------------

_tmpdir: str | None = None


def _scratch() -> str:
    """A private directory for the file ``check_paths`` reads (tmpfs when there is one)."""
    global _tmpdir
    if _tmpdir is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        _tmpdir = tempfile.mkdtemp(prefix="axoneme-fuzz-", dir=base)
        atexit.register(shutil.rmtree, _tmpdir, True)
    return _tmpdir


def fuzz_policy(data: bytes) -> None:
    # The file is the input, exactly as `axoneme policy validate -f` reads it:
    # the suffix picks the YAML or the JSON path, so both see every input.
    for name in ("policy.yaml", "policy.json"):
        path = os.path.join(_scratch(), name)
        with open(path, "wb") as f:
            f.write(data)
        policies, problems, files, docs = check_paths([path])
        assert files == [path], files
        for p in problems:
            assert isinstance(p, Problem), p
            assert p.file == path, p
            assert isinstance(p.message, str) and p.message, p
            str(p)  # what the CLI prints must format
        if not problems:
            assert len(policies) == len(docs), (len(policies), len(docs))


# --- http -----------------------------------------------------------------------

# Rules exercising every matcher feature. The path rule is the ReDoS pattern
# of issue 13: with a backtracking engine a 40-byte path takes minutes.
HTTP_RULES = (
    HTTPRule(method="GET", path="/public/.*"),
    HTTPRule(method="POST|PUT", path="/api/v[0-9]+/items(/[0-9]+)?(\\?.*)?",
             host="api\\.example\\.com(:[0-9]+)?"),
    HTTPRule(path="/files/([a-z0-9]+/?)+\\.txt"),
    HTTPRule(headers=("X-Token", "X-Mode: strict"),
             header_matches=(HeaderMatch("X-Env", "prod", "REPLACE"),
                             HeaderMatch("X-Debug", None, "DELETE"),
                             HeaderMatch("X-Trace", "1", "ADD"),
                             HeaderMatch("X-Log", "on", "LOG"))),
)
_HTTP = HttpParser()
_STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH"})
_MAX_CHUNKS = 64


def _same_request(a: RequestHead, b: RequestHead, what: str) -> None:
    for attr in ("method", "path", "version", "host", "content_length", "chunked"):
        assert getattr(a, attr) == getattr(b, attr), (what, attr, getattr(a, attr), getattr(b, attr))


def _verdict(req: RequestHead, headers: list[tuple[str, str]] | None = None) -> L7Verdict:
    return _HTTP.match(HTTP_RULES, L7Request({
        "method": req.method, "path": req.path, "host": req.host,
        "headers": req.headers if headers is None else headers}))


def _chunked_body(rest: bytes) -> tuple[bytes, bytes] | None:
    """(data, re-encoded body) of a chunked body as the proxy relays it, or None
    when the proxy would refuse it or it is incomplete."""
    data = b""
    out = b""
    pos = 0
    for _ in range(_MAX_CHUNKS):
        eol = rest.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = parse_chunk_size(rest[pos:eol])
        except HttpError as e:
            assert 400 <= e.status < 600, e
            return None
        assert 0 <= size < 2 ** 60, size
        pos = eol + 2
        if size == 0:
            end = rest.find(b"\r\n\r\n", pos - 2)
            if end < 0:
                return None
            lines = rest[pos:end].split(b"\r\n") if end > pos else []
            try:
                parse_header_lines(lines, "trailer")
            except HttpError as e:
                assert 400 <= e.status < 600, e
                return None
            return data, out + b"0\r\n\r\n"
        chunk = rest[pos:pos + size]
        if len(chunk) < size or rest[pos + size:pos + size + 2] != b"\r\n":
            return None
        data += chunk
        out += b"%x\r\n" % size + chunk + b"\r\n"
        pos += size + 2
    return None


def _llhttp(wire: bytes) -> dict[str, object]:
    """What llhttp (httptools), a strict independent parser, makes of ``wire``."""
    import httptools

    got: dict[str, object] = {"url": b"", "headers": [], "body": b"", "complete": 0,
                              "upgrade": False}

    class Cb:
        def on_url(self, url: bytes) -> None:
            got["url"] = got["url"] + url  # type: ignore[operator]

        def on_header(self, name: bytes, value: bytes) -> None:
            # llhttp hands over trailing OWS, which is not part of the value
            # (RFC 9110 5.5); servers strip it as we do.
            got["headers"].append((name, value.rstrip(b" \t")))  # type: ignore[attr-defined]

        def on_body(self, body: bytes) -> None:
            got["body"] = got["body"] + body  # type: ignore[operator]

        def on_message_complete(self) -> None:
            got["complete"] = got["complete"] + 1  # type: ignore[operator]

    p = httptools.HttpRequestParser(Cb())
    try:
        p.feed_data(wire)
    except httptools.HttpParserUpgrade:
        got["upgrade"] = True
    got["method"] = p.get_method()
    return got


def _differential(req: RequestHead, head: bytes, body: bytes, wire_body: bytes,
                  headers: list[tuple[str, str]]) -> None:
    """The forwarded bytes mean the same request to llhttp: method, target,
    headers, body, and one message ending exactly where ours ends."""
    import httptools

    if req.method not in _STANDARD_METHODS:
        # llhttp knows only registered methods; an upstream refusing an
        # extension method cannot read it as another request.
        return
    try:
        got = _llhttp(head + wire_body)
    except httptools.HttpParserError as e:
        raise AssertionError(f"llhttp refuses what the proxy forwards: {e}: {head!r}") from e
    assert got["method"] == req.method.encode(), (got["method"], req.method)
    assert got["url"] == req.path.encode(), (got["url"], req.path)
    want = [(n.encode("ascii"), v.encode("latin-1")) for n, v in headers]
    assert got["headers"] == want, (got["headers"], want)
    if got["upgrade"]:
        assert req.upgrade, head
        return
    assert got["complete"] == 1, (got["complete"], head)
    assert got["body"] == body, (got["body"], body)


def _fuzz_request(stream: bytes) -> None:
    # What _read_head hands the parser: CRLFs between requests are skipped,
    # the head ends at the first CRLFCRLF (excluded).
    stream = stream.lstrip(b"\r\n")
    end = stream.find(b"\r\n\r\n")
    block, rest = (stream, b"") if end < 0 else (stream[:end], stream[end + 4:])
    try:
        req = parse_request_head(block)
    except HttpError as e:
        assert 400 <= e.status < 600 and e.reason, e
        return
    assert isinstance(req, RequestHead)
    assert not (req.chunked and req.content_length is not None), req
    assert req.path.startswith("/"), req.path

    # The rebuilt head (what the proxy sends after any header change) parses
    # back to the same request.
    rebuilt = req.serialize(list(req.headers))
    assert rebuilt.endswith(b"\r\n\r\n")
    again = parse_request_head(rebuilt[:-4])
    _same_request(req, again, "rebuilt")
    assert (again.keep_alive, again.expect_continue, again.upgrade, again.strip_upgrade) == \
        (req.keep_alive, req.expect_continue, req.upgrade, req.strip_upgrade)
    verdict = _verdict(req)
    assert _verdict(again).allowed == verdict.allowed

    # The head as the proxy forwards an allowed request (_handle).
    headers: list[tuple[str, str]] | None = None
    if verdict.allowed and verdict.actions:  # type: ignore[attr-defined]
        headers = apply_actions(req.headers, verdict.actions)  # type: ignore[attr-defined]
    if req.strip_upgrade:
        headers = without_upgrade(headers or req.headers)
    if req.expect_continue:
        headers = [(n, v) for n, v in (headers or req.headers) if n.lower() != "expect"]
    head = req.serialize(headers)
    fwd = parse_request_head(head[:-4])
    _same_request(req, fwd, "forwarded")
    sent = list(req.headers) if headers is None else headers
    assert fwd.headers == sent, (fwd.headers, sent)

    if req.chunked:
        relayed = _chunked_body(rest)
        if relayed is None:
            return
        body, wire_body = relayed
    else:
        body = b"x" * (req.content_length or 0) if (req.content_length or 0) <= 4096 else None
        if body is None:
            return
        wire_body = body
    _differential(fwd, head, body, wire_body, sent)


def _fuzz_response(stream: bytes) -> None:
    end = stream.find(b"\r\n\r\n")
    if end < 0:
        return
    try:
        resp = parse_response_head(stream[:end + 4])
    except HttpError as e:
        assert e.status == 502 and e.reason, e
        return
    assert 100 <= resp.status <= 999, resp.status
    assert not (resp.chunked and resp.content_length is not None), resp
    assert resp.raw == stream[:end + 4]
    # Differential on framing (_relay_response, answering a GET): where we
    # think the response ends is where the client's parser thinks it ends,
    # or the next response would be read from this one's body.
    if resp.status < 200 or resp.status in (204, 304):
        return
    if resp.chunked:
        body, wire_body = b"", b"0\r\n\r\n"
    elif resp.content_length is not None and resp.content_length <= 4096:
        body = wire_body = b"y" * resp.content_length
    else:
        return  # delimited by the end of the connection, or too big to bother
    import httptools

    got: dict[str, object] = {"body": b"", "complete": 0}

    class Cb:
        def on_body(self, b: bytes) -> None:
            got["body"] = got["body"] + b  # type: ignore[operator]

        def on_message_complete(self) -> None:
            got["complete"] = got["complete"] + 1  # type: ignore[operator]

    try:
        httptools.HttpResponseParser(Cb()).feed_data(resp.raw + wire_body)
    except httptools.HttpParserError:
        # A stricter client refusing what the upstream sent (identical
        # repeated Content-Length, allowed by RFC 9110) closes the
        # connection: no desync.
        return
    assert got == {"body": body, "complete": 1}, (got, resp.raw)


def fuzz_http(data: bytes) -> None:
    if data.startswith(b"HTTP/"):
        _fuzz_response(data)
    else:
        _fuzz_request(data)


# --- kafka ----------------------------------------------------------------------

KAFKA_RULESETS: tuple[tuple[KafkaRule, ...], ...] = (
    (),
    (KafkaRule(role="consume", topic="orders"), KafkaRule(role="produce", topic="logs")),
    (KafkaRule(api_key="metadata"), KafkaRule(api_key="fetch", api_version="12",
                                                client_id="c1", topic="orders")),
)


def fuzz_kafka(data: bytes) -> None:
    try:
        req = parse_request(data)
    except KafkaDecodeError:
        return
    assert isinstance(req, KafkaRequest)
    assert 0 <= req.body_offset <= len(data), (req.body_offset, len(data))
    assert req.api_version >= 0
    for name, parts in req.topics:
        assert isinstance(name, str) and all(isinstance(p, int) for p in parts)
    for rules in KAFKA_RULESETS:
        verdict = match_request(rules, req)
        assert isinstance(verdict, L7Verdict)
        if req.error is not None:
            assert not verdict.allowed, verdict  # unparsable is always refused
            continue
        keep = allowed_topics(rules, req)
        assert set(keep) <= set(req.topic_names)
        if verdict.allowed and req.topics and not req.all_topics:
            assert keep == req.topic_names, (keep, req.topic_names)
        if req.api_key == METADATA:
            # The rewritten Metadata request asks the broker exactly `keep`.
            m = metadata_request_for(req, keep)
            if m is not None:
                assert struct.unpack(">i", m[:4])[0] == len(m) - 4
                again = parse_request(m[4:])
                assert again.error is None, again.error
                assert (again.api_key, again.api_version, again.correlation_id,
                        again.client_id, again.allow_auto_create) == \
                    (req.api_key, req.api_version, req.correlation_id, req.client_id,
                     req.allow_auto_create)
                assert again.topic_names == tuple(dict.fromkeys(keep)), (again.topic_names, keep)
    resp = deny_response(req, 29, 30)
    if resp is not None:
        assert struct.unpack(">i", resp[:4])[0] == len(resp) - 4
        assert struct.unpack(">i", resp[4:8])[0] == req.correlation_id


# --- dns ------------------------------------------------------------------------

DNS_PATTERNS = ("*", "*.example.com", "**.example.com", "api-*.example.com",
                "example.com", "*.*.cilium.io", "a*b*c.test")
_DNS = DnsParser()
_DNS_CHARS = frozenset("-abcdefghijklmnopqrstuvwxyz0123456789_")


def reference_match(pattern: str, name: str) -> bool:
    """matchPattern without regexes (the _match docstring, rule by rule),
    to check the compiled regex against; ``name`` is normalised."""
    p = pattern.strip().lower()
    if p == "*":
        return True
    p = normalize_name(p)
    if p.startswith("**."):
        rest = p[3:]
        labels = name.split(".")
        # one or more whole labels, each non-empty and of DNS characters
        for k in range(1, len(labels)):
            head = labels[:k]
            if all(lab and set(lab) <= _DNS_CHARS for lab in head) and \
                    _glob(rest, ".".join(labels[k:])):
                return True
        return False
    return _glob(p, name)


def _glob(p: str, s: str) -> bool:
    # reachable[j]: p[:i] can match s[:j]
    reachable = [True] + [False] * len(s)
    for c in p:
        nxt = [False] * (len(s) + 1)
        for j in range(len(s) + 1):
            if not reachable[j]:
                continue
            if c == "*":
                nxt[j] = True
                k = j
                while k < len(s) and s[k] in _DNS_CHARS:
                    k += 1
                    nxt[k] = True
            elif j < len(s) and s[j] == c:
                nxt[j + 1] = True
        reachable = nxt
    return reachable[len(s)]


def _check_name(name: str) -> None:
    assert name.endswith("."), name
    want = []
    for pattern in DNS_PATTERNS:
        ref = reference_match(pattern, name)
        assert match_pattern(pattern, name) == ref, (pattern, name)
        want.append(ref)
    # the proxy's decision: the first rule that matches, or none
    rules = [DNSRule(match_pattern=p) for p in DNS_PATTERNS[1:]]
    verdict = _DNS.match(rules, L7Request({"qname": name}))
    first = next((i for i, ok in enumerate(want[1:]) if ok), None)
    assert (verdict.allowed, verdict.rule) == (first is not None, first), (verdict, name)


def _fuzz_patterns(text: str) -> None:
    pattern, _, names = text.partition("\n")
    for name in names.split("\n")[:16]:
        try:
            validate_name(name)
        except ValueError:
            pass
    try:
        norm = validate_pattern(pattern)
    except ValueError as e:
        assert str(e), pattern
        return
    for name in names.split("\n")[:16]:
        n = normalize_name(name)
        assert match_pattern(norm, n) == reference_match(norm, n), (norm, n)
        assert match_pattern(pattern, name) == match_pattern(norm, n), (pattern, name)


def fuzz_dns(data: bytes) -> None:
    if data.startswith(b"P:"):
        _fuzz_patterns(data[2:].decode("latin-1"))
        return
    query = None
    try:
        query = parse_query(data)
    except MalformedMessage as e:
        assert str(e), data
    if query is not None:
        _check_name(query.qname)
        for rcode in (1, 2, 3, 5):
            reply = reject_reply(data, rcode, query)
            assert reply is not None and len(reply) >= 12
            ident, flags = struct.unpack("!HH", reply[:4])
            assert ident == query.id and flags & 0x8000 and flags & 0xF == rcode, reply
    else:
        reply = reject_reply(data, 2)
        assert reply is None or (len(reply) >= 12 and reply[:2] == data[:2]), reply
    try:
        answer = parse_answer(data)
    except MalformedMessage as e:
        assert str(e), data
        return
    assert answer.names and answer.names[0] == answer.qname
    for n in answer.names:
        _check_name(n)
    for ip in answer.ips:
        ipaddress.ip_address(ip)
    assert 0 <= answer.ttl < 2 ** 32, answer.ttl


TARGETS: dict[str, Callable[[bytes], None]] = {
    "policy": fuzz_policy,
    "http": fuzz_http,
    "kafka": fuzz_kafka,
    "dns": fuzz_dns,
}
