"""The request-target: origin- or absolute-form, the path normalised as
Envoy's ``normalize_path`` (rule 4 of ``_wire``'s docstring, a-f), what the
rules match and the upstream receives. Every regex here is linear."""

from __future__ import annotations

import re

from axoneme.l7.http._errors import HttpError

_PCHARS = r"A-Za-z0-9\-._~!$&'()*+,;=:@%"
_ORIGIN = re.compile(r"(/[" + _PCHARS + r"/]*)(\?[" + _PCHARS + r"/?]*)?")
_ABSOLUTE = re.compile(r"[hH][tT][tT][pP]://([^/?#@\s]+)(/[" + _PCHARS + r"/]*)?(\?[" + _PCHARS + r"/?]*)?")
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(:[0-9]*)?")
_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# encoded "/" "\\" (the path structure would change in a decoding upstream) and
# control characters (NUL, CR/LF splitting in upstreams that decode and re-emit)
_REFUSED_OCTETS = frozenset([*range(0x20), 0x7F, 0x2F, 0x5C])


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 for an absolute path (starts with "/")."""
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == ".":
            if last:
                out.append("")
        elif seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def normalize_path(path: str) -> str:
    """The path (no query) as the rules see it and the upstream receives it.

    Rules 4a-f of ``_wire``'s docstring; raises HttpError(400) for what is
    refused. Idempotent: ``normalize_path(normalize_path(p)) == normalize_path(p)``.
    """
    if "%" not in path and "/." not in path and path.isascii():
        # Nothing to decode, no dot-segment (each one starts after a "/"),
        # so nothing below would change or refuse it: the common case.
        return path
    if _PCT.search(path):
        raise HttpError(400, "malformed percent-encoding in path")

    def one(m: re.Match[str]) -> str:
        octet = int(m.group(1), 16)
        if octet in _REFUSED_OCTETS:
            raise HttpError(400, "encoded '/', '\\' or control character in path")
        if octet in _UNRESERVED:
            return chr(octet)
        return "%" + m.group(1).upper()

    norm = _ESCAPE.sub(one, path)
    raw = bytearray()  # the path fully decoded once, for the UTF-8 check
    pos = 0
    for m in _ESCAPE.finditer(norm):
        raw += norm[pos:m.start()].encode("ascii")
        raw.append(int(m.group(1), 16))
        pos = m.end()
    raw += norm[pos:].encode("ascii")
    try:
        decoded = raw.decode("utf-8")  # strict: overlong forms and surrogates fail
    except UnicodeDecodeError:
        raise HttpError(400, "invalid or overlong UTF-8 in path") from None
    for seg in decoded.split("/"):
        if seg.startswith((".;", "..;")):
            # Tomcat/Spring strip ";params" and would see "." / "..".
            raise HttpError(400, "dot-segment with path parameters ('..;') in path")
    return _remove_dot_segments(norm)


def _check_query(query: str) -> None:
    if _PCT.search(query):
        raise HttpError(400, "malformed percent-encoding in query")


def parse_target(target: str) -> tuple[str, str | None]:
    """(origin-form path to match and forward, normalised, authority of an
    absolute-form target)."""
    if target.startswith("/"):
        m = _ORIGIN.fullmatch(target)
        if m is None:
            raise HttpError(400, "invalid request-target")
        path = normalize_path(m.group(1))
        if m.group(2):
            _check_query(m.group(2))
        return path + (m.group(2) or ""), None
    m = _ABSOLUTE.fullmatch(target)
    if m is None:
        raise HttpError(400, "request-target is neither origin-form nor absolute-form")
    authority, path, query = m.group(1), m.group(2) or "/", m.group(3) or ""
    if _HOST.fullmatch(authority) is None:
        raise HttpError(400, "invalid authority in request-target")
    path = normalize_path(path)
    if query:
        _check_query(query)
    return path + query, authority


__all__ = ["normalize_path", "parse_target"]
