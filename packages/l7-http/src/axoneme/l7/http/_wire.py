"""Strict HTTP/1.1 message-head parsing for the proxy (RFC 9110/9112).

The proxy only forwards what it can frame unambiguously; everything that has
been used for request smuggling or for a gap between what the policy matched
and what the upstream interprets is refused with 400 (and the connection is
closed):

1. Request line ``METHOD SP request-target SP HTTP/1.x`` (single spaces,
   METHOD one of ``METHODS``, else 501),
   at most ``MAX_REQUEST_LINE`` bytes; lines end in CRLF; a bare CR or LF,
   NUL or another control character anywhere in the head is refused.
2. Header lines ``token ":" OWS value OWS``: whitespace before the colon and
   obs-fold (a line starting with SP/HT) are refused; at most
   ``MAX_HEADERS`` lines and ``MAX_HEAD_BYTES`` bytes. OWS is SP and HTAB
   only: never ``str.strip()``, which would also take NEL (``\x85``), so that
   ``Transfer-Encoding: \x85chunked`` is not ``chunked`` here while a
   Unicode-minded upstream could think it is.
3. Framing (RFC 9112 §6): Content-Length and Transfer-Encoding together, more
   than one Content-Length (even equal), a non-decimal Content-Length, a
   Transfer-Encoding whose final coding is not ``chunked`` (or that applies
   ``chunked`` twice, or has an empty element) are refused with 400; a
   Transfer-Encoding with another coding before ``chunked`` with 501; any
   Transfer-Encoding in an HTTP/1.0 request with 400.
4. request-target: origin-form (``/path?query``) or absolute-form
   (``http://authority/path?query``, whose authority must equal the Host
   header); asterisk- and authority-form (CONNECT) are refused. The path is
   normalised as Envoy's ``normalize_path`` does (RFC 3986 §6.2.2) before
   the rules see it, and the normalised form is what is forwarded, so the
   upstream can only see what the policy matched (``_target.normalize_path``):

   a. characters outside RFC 3986 (space, backslash, ``#``, non-ASCII...)
      and malformed escapes (``%zz``) are refused;
   b. escapes of unreserved characters are decoded (``%7E`` -> ``~``,
      ``%2e`` -> ``.``), the others keep their encoding with upper-case hex;
      decoding happens ONCE: ``%252e%252e`` stays the literal segment
      ``%252e%252e`` (an upstream decodes it to ``%2e%2e``, a name, not a
      dot-segment);
   c. encoded ``/`` or ``\\`` (``%2F``, ``%5C``: Envoy's
      ``path_with_escaped_slashes_action: REJECT_REQUEST``) and encoded
      control characters (``%00``-``%1F``, ``%7F``) are refused;
   d. the path once fully percent-decoded must be valid UTF-8: overlong
      forms such as ``%c0%ae`` or ``%e0%80%ae`` (a ``.`` to a lenient
      decoder), surrogates and stray continuation bytes are refused;
   e. dot-segments are removed (RFC 3986 §5.2.4): ``/a/./b/../c`` -> ``/a/c``;
      ``//`` is kept (no ``merge_slashes``);
   f. a segment that decodes to ``.;...`` or ``..;...`` is refused: Envoy
      takes ``;`` as an ordinary character, but Tomcat/Spring strip path
      parameters and treat ``/..;/`` as ``/../``, which would let
      ``/public/..;/admin`` out of ``/public``.

   The query is forwarded as received (only malformed escapes are refused).
5. HTTP/1.1 requires exactly one Host header; HTTP/1.0 allows none.
6. Responses (``parse_response_head``, 502): framed as a client's llhttp
   frames them; a Transfer-Encoding with an HTAB or an empty element
   (``chunked<HTAB>``, ``chunked,``: not chunked to llhttp) is refused.

Every regex below runs on attacker bytes, so each is linear: no lazy
quantifier is followed by something its own class can also match (such a
``[ \t]*?`` then ``[ \t]*\r\n`` pair is quadratic in a line of blanks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from axoneme.l7.http._errors import HttpError
from axoneme.l7.http._llhttp import tokenize as _llhttp_tokenize
from axoneme.l7.http._target import _HOST, normalize_path, parse_target

MAX_REQUEST_LINE = 8 * 1024
MAX_HEAD_BYTES = 64 * 1024  # header lines, request line excluded
MAX_HEADERS = 100
MAX_CHUNK_LINE = 4 * 1024
MAX_CHUNK_SIZE_DIGITS = 15  # < 2**60: no overflow games
# Denied requests with a body up to this size are drained so the connection
# stays usable; bigger (or chunked) bodies close the connection instead.
MAX_DRAIN = 64 * 1024

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Methods of the IANA registry that llhttp (Node, uvicorn...) also parses,
# plus its common extensions. Methods are case-sensitive: "get" is not GET,
# and an upstream parser that does not know a method refuses the request or,
# worse, guesses; so anything else is 501 here (CONNECT is refused below).
METHODS = frozenset({
    "GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "TRACE", "PATCH", "QUERY", "ACL", "BIND",
    "CHECKOUT", "COPY", "LINK", "LOCK", "MERGE", "MKACTIVITY", "MKCALENDAR", "MKCOL", "MOVE",
    "PROPFIND", "PROPPATCH", "REBIND", "REPORT", "SEARCH", "UNBIND", "UNLINK", "UNLOCK",
    "M-SEARCH", "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE", "PURGE", "SOURCE", "CONNECT",
})
_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_VERSION = re.compile(rb"HTTP/1\.[01]")
# str.isdigit() is Unicode-aware ("\xb3" is a digit to it, not to int()):
# Content-Length is checked against ASCII digits only.
_LENGTH = re.compile(r"[0-9]{1,18}")
_TOKEN_CHARS = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
# The whole header section in one C-level pass: valid lines only.
_HEADER_SECTION = re.compile(rb"(?:" + _TOKEN_CHARS + rb"+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
# Greedy value, trimmed afterwards: a lazy value followed by [ \t]*\r\n is
# quadratic in a line of blanks (64 KiB of them took seconds).
_HEADER_LINE = re.compile(rb"(" + _TOKEN_CHARS + rb"+):([\t\x20-\x7e\x80-\xff]*)\r\n")
_FRAMING = re.compile(rb"\r\n(content-length|transfer-encoding|connection):([^\r]*)(?=\r\n)")
_OWS = b" \t"
_STATUS = re.compile(rb"HTTP/1\.[01] ([1-9][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?")


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str  # the request-target as received
    path: str  # origin-form target: what rules match and what is forwarded
    version: str  # HTTP/1.1 | HTTP/1.0
    headers: list[tuple[str, str]]
    host: str = ""
    content_length: int | None = None
    chunked: bool = False
    keep_alive: bool = True
    expect_continue: bool = False
    upgrade: bool = False
    absolute: bool = False
    raw: bytes = b""  # the validated head as received (CRLFCRLF included)
    strip_upgrade: bool = False  # a non-websocket Upgrade: forwarded without it

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def serialize(self, headers: list[tuple[str, str]] | None = None) -> bytes:
        """The head to forward: the validated bytes as received when nothing
        changes (origin-form already normal, headers untouched), else rebuilt."""
        if headers is None and self.raw and not self.absolute and self.path == self.target:
            return self.raw
        hs = self.headers if headers is None else headers
        lines = [f"{self.method} {self.path} {self.version}"]
        lines.extend(f"{n}: {v}" for n, v in hs)
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(slots=True)
class ResponseHead:
    status: int
    version: str
    raw: bytes  # the head as received, CRLFCRLF included: forwarded unchanged
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_length: int | None = None
    chunked: bool = False
    close: bool = False


def _split_lines(block: bytes) -> list[bytes]:
    n = block.count(b"\r\n")
    if block.count(b"\r") != n or block.count(b"\n") != n:
        raise HttpError(400, "bare CR or LF in message head")
    return block.split(b"\r\n")


def _fast_headers(section: bytes, count: int) -> list[tuple[str, str]] | None:
    """Headers of a CRLF-terminated section if all lines are valid, else None."""
    if count > MAX_HEADERS or len(section) > MAX_HEAD_BYTES:
        return None
    if _HEADER_SECTION.fullmatch(section) is None:
        return None
    return [(n.decode("ascii"), v.strip(_OWS).decode("latin-1"))
            for n, v in _HEADER_LINE.findall(section)]


def parse_header_lines(lines: list[bytes], what: str = "header") -> list[tuple[str, str]]:
    """Validate header (or trailer) lines; returns (name, value) pairs."""
    if len(lines) > MAX_HEADERS:
        raise HttpError(431, f"too many {what} lines")
    if sum(len(x) + 2 for x in lines) > MAX_HEAD_BYTES:
        raise HttpError(431, f"{what} section too large")
    out: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise HttpError(400, "obsolete line folding")
        name, sep, value = line.partition(b":")
        if not sep or _TOKEN.fullmatch(name) is None:
            raise HttpError(400, f"malformed {what} line")
        value = value.strip(_OWS)
        if _VALUE.fullmatch(value) is None:
            raise HttpError(400, f"invalid character in {what} value")
        out.append((name.decode("ascii"), value.decode("latin-1")))
    return out


def _list(values: list[str]) -> list[str]:
    """The elements of a comma-separated header list, lower-case, without
    empty elements. Trims OWS (SP/HTAB) only: ``str.strip()`` would also eat
    NEL (U+0085) and friends."""
    return [t.strip(" \t").lower() for v in values for t in v.split(",") if t.strip(" \t")]


def _codings(values: list[str]) -> list[str]:
    """Transfer-Encoding elements, "" for an empty one (refused: ambiguous)."""
    return [t.strip(" \t").lower() for v in values for t in v.split(",")]


def _parse_request_line(line: bytes) -> tuple[bytes, bytes, str]:
    """Rule 1 of the module docstring, parsed here."""
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[1]:
        raise HttpError(400, "malformed request line")
    method_b, target_b, version_b = parts
    if _TOKEN.fullmatch(method_b) is None:
        raise HttpError(400, "invalid method")
    if _VERSION.fullmatch(version_b) is None:
        if version_b.startswith(b"HTTP/") and len(version_b) == 8:
            raise HttpError(505, "HTTP version not supported")
        raise HttpError(400, "malformed HTTP version")
    return method_b, target_b, version_b.decode("ascii")


def _parse_headers(block: bytes, eol: int, n_crlf: int) -> list[tuple[str, str]]:
    """Rule 2 of the module docstring, parsed here."""
    headers: list[tuple[str, str]] | None = []
    if eol > 0:
        headers = _fast_headers(block[eol + 2:] + b"\r\n", n_crlf)
    if headers is None:  # the slow path says precisely what is wrong
        headers = parse_header_lines(block.split(b"\r\n")[1:])
    return headers


def parse_request_head(block: bytes) -> RequestHead:
    """Parse a request head (request line + header lines, without the final CRLFCRLF)."""
    eol = block.find(b"\r\n")
    line = block if eol < 0 else block[:eol]
    if len(line) > MAX_REQUEST_LINE:
        raise HttpError(414, "request line too long")
    n_crlf = block.count(b"\r\n")
    if block.count(b"\r") != n_crlf or block.count(b"\n") != n_crlf:
        raise HttpError(400, "bare CR or LF in message head")
    tokens = _llhttp_tokenize(block, n_crlf) if eol != 0 else None
    headers: list[tuple[str, str]] | None = None
    if tokens is not None:
        # llhttp read the head as received (``_llhttp``); the whole header
        # section still passes the one-regex validity check and the limits.
        method_b, target_b, version, raw_headers = tokens
        section = block[eol + 2:] + b"\r\n"
        if n_crlf <= MAX_HEADERS and len(section) <= MAX_HEAD_BYTES and \
                _HEADER_SECTION.fullmatch(section) is not None:
            headers = [(n.decode("ascii"), v.strip(_OWS).decode("latin-1")) for n, v in raw_headers]
    if headers is None:
        # The hand-written parser: says precisely what is wrong, and reads
        # what llhttp refuses but the rules here accept (as before).
        method_b, target_b, version = _parse_request_line(line)
    if _TOKEN.fullmatch(method_b) is None:
        raise HttpError(400, "invalid method")
    try:
        target = target_b.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "non-ASCII request-target") from None
    method = method_b.decode("ascii")
    if method == "CONNECT":
        raise HttpError(400, "CONNECT (authority-form) is not proxied")
    if method not in METHODS:
        raise HttpError(501, "unknown method")
    if headers is None:
        headers = _parse_headers(block, eol, n_crlf)
    path, authority = parse_target(target)

    by: dict[str, list[str]] = {}
    for n, v in headers:
        by.setdefault(n.lower(), []).append(v)
    req = RequestHead(method, target, path, version, headers, absolute=authority is not None,
                      raw=block + b"\r\n\r\n")

    hosts = by.get("host", [])
    if len(hosts) > 1:
        raise HttpError(400, "more than one Host header")
    if hosts:
        if _HOST.fullmatch(hosts[0]) is None:
            raise HttpError(400, "invalid Host header")
        req.host = hosts[0]
    elif version == "HTTP/1.1" and authority is None:
        raise HttpError(400, "missing Host header")
    if authority is not None:
        if hosts and hosts[0].lower() != authority.lower():
            raise HttpError(400, "Host header differs from the absolute-form authority")
        if not hosts:
            req.host = authority
            req.headers.append(("Host", authority))

    cls = by.get("content-length", [])
    tes = by.get("transfer-encoding", [])
    if cls and tes:
        raise HttpError(400, "both Content-Length and Transfer-Encoding")
    if len(cls) > 1:
        raise HttpError(400, "more than one Content-Length")
    if cls:
        v = cls[0]
        if _LENGTH.fullmatch(v) is None:
            raise HttpError(400, "invalid Content-Length")
        req.content_length = int(v)
    if tes:
        if version == "HTTP/1.0":
            raise HttpError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = _codings(tes)
        if codings != ["chunked"]:
            # RFC 9112 §6.1/§6.3: chunked not last (or twice, or an empty
            # element) leaves the length undetermined: 400; a coding we do
            # not implement in front of chunked: 501.
            if codings[-1] != "chunked" or codings.count("chunked") > 1 or "" in codings:
                raise HttpError(400, "Transfer-Encoding does not end in exactly one chunked")
            raise HttpError(501, "unsupported Transfer-Encoding")
        req.chunked = True

    conn = _list(by.get("connection", []))
    if version == "HTTP/1.0":
        req.keep_alive = False  # 1.0 keep-alive is not worth the ambiguity
    else:
        req.keep_alive = "close" not in conn
    expect = _list(by.get("expect", []))
    if expect:
        if expect != ["100-continue"]:
            raise HttpError(417, "unsupported Expect")
        req.expect_continue = True
    if "upgrade" in by:
        # Only websocket may turn the connection into a tunnel: an h2c (or
        # any other) upgrade would carry later requests past the rules, so
        # those headers are dropped and the request is forwarded as plain.
        if "upgrade" in conn and _list(by["upgrade"]) == ["websocket"]:
            if req.has_body:
                # A websocket handshake has no content (RFC 6455: GET). With
                # one, llhttp-style upstreams start the tunnel right after the
                # head while we would frame a body: two readings of the bytes.
                raise HttpError(400, "Upgrade request with a body")
            req.upgrade = True
        else:
            req.strip_upgrade = True
    return req


_UPGRADE_HEADERS = {"upgrade", "http2-settings"}


def without_upgrade(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers minus Upgrade/HTTP2-Settings and their Connection tokens."""
    out: list[tuple[str, str]] = []
    for n, v in headers:
        ln = n.lower()
        if ln in _UPGRADE_HEADERS:
            continue
        if ln == "connection":
            toks = [t.strip(" \t") for t in v.split(",")
                    if t.strip(" \t").lower() not in _UPGRADE_HEADERS and t.strip(" \t")]
            if not toks:
                continue
            v = ", ".join(toks)
        out.append((n, v))
    return out


def parse_response_head(raw: bytes) -> ResponseHead:
    """Parse a response head (``raw`` ends with CRLFCRLF). Raises HttpError(502)."""
    try:
        eol = raw.find(b"\r\n")
        m = _STATUS.fullmatch(raw[:eol])
        if m is None:
            raise HttpError(502, "malformed status line")
        section = raw[eol + 2:-2]
        if len(section) > MAX_HEAD_BYTES or section.count(b"\n") > MAX_HEADERS or \
                _HEADER_SECTION.fullmatch(section) is None:
            parse_header_lines(_split_lines(raw[:-4])[1:])  # raises the precise error
    except HttpError as e:
        raise HttpError(502, f"bad upstream response: {e.reason}") from None
    # Only the framing headers matter; the head is forwarded as received.
    resp = ResponseHead(int(m.group(1)), raw[:8].decode("ascii"), raw)
    cls: list[str] = []
    tes: list[str] = []
    conn: list[str] = []
    for n, raw_v in _FRAMING.findall(b"\r\n" + section.lower()):
        v = raw_v.strip(_OWS)
        if n == b"content-length":
            cls.append(v.decode("latin-1"))
        elif n == b"transfer-encoding":
            if b"\t" in raw_v:
                # llhttp (Node's client, httptools) reads ``chunked<HTAB>``
                # as not chunked, to the end of the connection: framed as
                # chunked here, the next response would be read from its body.
                raise HttpError(502, "bad upstream response: HTAB in Transfer-Encoding")
            tes.append(v.decode("latin-1"))
        else:
            conn.append(v.decode("latin-1"))
    if tes:
        if cls:
            raise HttpError(502, "bad upstream response: both Content-Length and Transfer-Encoding")
        codings = _codings(tes)
        if "" in codings:
            # ``chunked,``: an empty element, which llhttp reads as the end
            # of the list being something other than chunked (see above).
            raise HttpError(502, "bad upstream response: empty Transfer-Encoding element")
        if codings[-1:] != ["chunked"]:
            # Not chunked: the body runs to the end of the connection.
            resp.close = True
        else:
            if codings != ["chunked"]:
                raise HttpError(502, "bad upstream response: unsupported Transfer-Encoding")
            resp.chunked = True
    elif cls:
        vals = set(_list(cls))
        if len(vals) != 1 or _LENGTH.fullmatch(next(iter(vals))) is None:
            raise HttpError(502, "bad upstream response: invalid Content-Length")
        resp.content_length = int(next(iter(vals)))
    if "close" in _list(conn) or (resp.version == "HTTP/1.0" and "keep-alive" not in _list(conn)):
        resp.close = True
    return resp


# RFC 9110 §6.5.1: fields a sender must not put in trailers and a recipient
# must not merge into the header section: framing, routing, request
# modifiers, authentication, response control and content metadata. A
# trailer carrying them (Content-Length, Transfer-Encoding, Host...) is
# dropped rather than handed to an upstream that might merge it.
FORBIDDEN_TRAILERS = frozenset({
    "transfer-encoding", "content-length", "host", "connection", "keep-alive", "upgrade",
    "proxy-connection", "te", "trailer", "expect", "max-forwards", "range", "if-match",
    "if-none-match", "if-modified-since", "if-unmodified-since", "if-range", "cache-control",
    "pragma", "authorization", "proxy-authorization", "www-authenticate", "proxy-authenticate",
    "cookie", "set-cookie", "content-encoding", "content-type", "content-range", "age", "date",
    "expires", "location", "retry-after", "vary", "warning", "http2-settings",
})


def filter_trailers(trailers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The trailer fields that may be forwarded (``FORBIDDEN_TRAILERS`` dropped)."""
    return [(n, v) for n, v in trailers if n.lower() not in FORBIDDEN_TRAILERS]


def parse_chunk_size(line: bytes) -> int:
    """The size of a chunk-size line (without CRLF); extensions are dropped."""
    if len(line) > MAX_CHUNK_LINE:
        raise HttpError(400, "chunk-size line too long")
    size, _, ext = line.partition(b";")
    if ext:
        size = size.rstrip(b" \t")
        if b"\r" in ext or b"\n" in ext or b"\x00" in ext:
            raise HttpError(400, "invalid chunk extension")
    if not size or len(size) > MAX_CHUNK_SIZE_DIGITS or \
            size.strip(b"0123456789abcdefABCDEF"):
        raise HttpError(400, "invalid chunk size")
    return int(size, 16)


def error_response(status: int, reason: str, body: bytes, close: bool) -> bytes:
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\n")
    if close:
        head += "Connection: close\r\n"
    return head.encode("ascii") + b"\r\n" + body


STATUS_TEXT = {400: "Bad Request", 403: "Forbidden", 414: "URI Too Long", 417: "Expectation Failed",
               431: "Request Header Fields Too Large", 501: "Not Implemented",
               502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
               505: "HTTP Version Not Supported"}

ACCESS_DENIED = b"Access denied"


def denied_response(close: bool) -> bytes:
    return error_response(403, "Forbidden", ACCESS_DENIED, close)


__all__ = ["HttpError", "RequestHead", "ResponseHead", "parse_request_head", "parse_response_head",
           "parse_chunk_size", "parse_target", "normalize_path", "parse_header_lines",
           "filter_trailers", "FORBIDDEN_TRAILERS", "error_response",
           "denied_response", "without_upgrade", "ACCESS_DENIED", "STATUS_TEXT", "MAX_REQUEST_LINE",
           "MAX_HEAD_BYTES", "MAX_HEADERS", "MAX_DRAIN"]
