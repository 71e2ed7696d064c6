"""Tokenising a request head with llhttp (``httptools``), the parser of
Node.js and uvicorn, in C.

``tokenize(block)`` returns (method, request-target, version, headers) of a
request head (request line + header lines, without the final CRLFCRLF) when
llhttp accepts it AND the result is exactly the bytes received, else None:
then ``_wire`` runs its own line-by-line parser, which says precisely what
is wrong (or accepts what llhttp refuses, as before: what is forwarded is
checked against llhttp by the differential test, not here).

"Exactly the bytes received" (llhttp has lenient corners, and the proxy's
refusals must not depend on them):

1. the request line is ``METHOD SP target SP HTTP/1.x`` byte for byte as
   llhttp reports its parts: no extra or other whitespace;
2. llhttp reports as many headers as there are header lines: no obs-fold
   or other merging, no line dropped;
3. the caller still checks the whole header section with one regex pass
   (token names, ``:`` without whitespace before it, no control characters
   in values) and the sizes; values are trimmed of SP/HTAB only.

Every semantic check (methods, target normalisation, Host, framing,
Expect, Upgrade) stays in ``_wire`` and runs on this result as on its own.
"""

from __future__ import annotations

import httptools

_VERSIONS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}


class _Head:
    __slots__ = ("url", "headers", "complete")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete = True


def tokenize(block: bytes, n_lines: int) -> tuple[bytes, bytes, str, list[tuple[bytes, bytes]]] | None:
    """(method, target, version, raw header pairs) as llhttp reads ``block``
    (``n_lines`` header lines), or None when llhttp refuses it or reads it
    otherwise than rules 1-2 of the module docstring."""
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(block + b"\r\n\r\n")
    except httptools.HttpParserUpgrade:
        pass  # the head was read in full; whether to tunnel is _wire's decision
    except httptools.HttpParserError:
        return None
    if not head.complete or len(head.headers) != n_lines:
        return None
    method = parser.get_method()
    version = _VERSIONS.get(parser.get_http_version())
    if version is None:
        return None
    line_end = block.find(b"\r\n")
    line = block if line_end < 0 else block[:line_end]
    if line != b"%s %s %s" % (method, head.url, version.encode("ascii")):
        return None
    return method, head.url, version, head.headers


__all__ = ["tokenize"]
