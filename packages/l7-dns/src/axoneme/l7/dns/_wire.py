"""DNS messages on the wire: what the proxy needs to know of a query and of an answer.

dnslib does the parsing; this module turns its records into frozen summaries
and builds the proxy's own replies. Anything dnslib cannot parse raises
``MalformedMessage`` (dnslib raises a zoo of exception types on garbage).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from axoneme.l7.dns._match import normalize_name
from dnslib import CLASS, QTYPE, RCODE, RR, DNSError, DNSRecord  # type: ignore[import-untyped]

__all__ = [
    "MalformedMessage", "DnsQuery", "DnsAnswer", "parse_query", "parse_answer",
    "reject_reply", "rcode_value", "rcode_name", "qtype_name", "name_of",
]

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_REFUSED = 5


class MalformedMessage(ValueError):
    """Bytes that are not a usable DNS message."""


_PLAIN = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_*")


def name_of(label: Any) -> str:
    """A dnslib ``DNSLabel`` as a normalised presentation-format name.

    dnslib's ``str()`` does not escape a ``.`` inside a label, so the
    two-label name ``sub\\.example`` + ``com`` would print as
    ``sub.example.com.`` and match ``*.example.com``. Like miekg/dns (what
    Cilium matches on), ``.`` and ``\\`` are escaped with a backslash and
    other bytes outside letters, digits, ``-``, ``_``, ``*`` as ``\\DDD``;
    since patterns cannot contain a backslash, such names only match ``*``.
    """
    parts = []
    for raw in label.label:
        out = []
        for b in bytes(raw):
            if b in _PLAIN:
                out.append(chr(b))
            elif b in (0x2E, 0x5C):
                out.append("\\" + chr(b))
            else:
                out.append(f"\\{b:03d}")
        parts.append("".join(out))
    return normalize_name(".".join(parts))


def qtype_name(qtype: int) -> str:
    try:
        return str(QTYPE[qtype])
    except Exception:  # dnslib raises on unknown codes in some versions
        return f"TYPE{qtype}"


def rcode_name(rcode: int) -> str:
    try:
        return str(RCODE[rcode])
    except Exception:
        return f"RCODE{rcode}"


def rcode_value(rcode: int | str) -> int:
    """``"REFUSED"``, ``"refused"``, ``"nameError"`` (Cilium's flag value),
    ``"NXDOMAIN"`` or an int -> the numeric rcode."""
    if isinstance(rcode, int):
        return rcode
    key = rcode.strip().upper()
    if key in ("NAMEERROR", "NXDOMAIN"):
        return RCODE_NXDOMAIN
    if key == "REFUSED":
        return RCODE_REFUSED
    try:
        return int(getattr(RCODE, key))
    except Exception as exc:
        raise ValueError(f"unknown DNS rcode {rcode!r}") from exc


@dataclass(frozen=True, slots=True)
class DnsQuery:
    """One question of a client's query (the proxy only handles qdcount == 1)."""

    id: int
    qname: str  # normalised: lower-case, trailing dot
    qtype: str  # e.g. "A", "AAAA", "TYPE65"
    record: DNSRecord = field(compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """What an upstream answer teaches: the names of the CNAME chain and their IPs.

    ``ips`` belong to every name in ``names`` (the query name first, then each
    CNAME target, in chain order). ``ttl`` is the lowest TTL of the records
    used (the chain is only as fresh as its shortest-lived link).
    """

    id: int
    qname: str
    qtype: str
    rcode: int
    names: tuple[str, ...]
    cnames: tuple[str, ...]
    ips: tuple[str, ...]
    ttl: int
    rrtypes: tuple[str, ...]
    truncated: bool


def _parse(data: bytes) -> DNSRecord:
    if len(data) < 12:
        raise MalformedMessage("shorter than a DNS header")
    try:
        return DNSRecord.parse(data)
    except (DNSError, struct.error, ValueError, IndexError, KeyError, TypeError,
            UnicodeError, AttributeError, OverflowError, RecursionError) as exc:
        raise MalformedMessage(str(exc) or type(exc).__name__) from exc


def parse_query(data: bytes) -> DnsQuery:
    """A client query: exactly one question, QR=0, opcode QUERY."""
    rec = _parse(data)
    if rec.header.qr:
        raise MalformedMessage("a response, not a query")
    if rec.header.opcode != 0:
        raise MalformedMessage(f"opcode {rec.header.opcode} is not QUERY")
    if len(rec.questions) != 1:
        raise MalformedMessage(f"{len(rec.questions)} questions (need exactly 1)")
    q = rec.questions[0]
    try:
        qname = name_of(q.qname)
    except Exception as exc:
        raise MalformedMessage(f"bad query name: {exc}") from exc
    return DnsQuery(rec.header.id, qname, qtype_name(q.qtype), rec)


def _ip_of(rr: RR) -> str | None:
    if rr.rclass != CLASS.IN:
        return None
    if rr.rtype in (QTYPE.A, QTYPE.AAAA):
        return str(rr.rdata)
    return None


def parse_answer(data: bytes, query: DnsQuery | None = None) -> DnsAnswer:
    """An upstream answer. With ``query``, the ID and question must match it.

    Only records on the CNAME chain starting at the query name count: an A
    record for an unrelated name in the same answer is ignored, so an
    upstream cannot teach IPs for names nobody asked for.
    """
    rec = _parse(data)
    if not rec.header.qr:
        raise MalformedMessage("not a response")
    if len(rec.questions) != 1:
        raise MalformedMessage(f"{len(rec.questions)} questions in the answer")
    qname = name_of(rec.questions[0].qname)
    qtype = qtype_name(rec.questions[0].qtype)
    if query is not None and (rec.header.id != query.id or qname != query.qname
                              or qtype != query.qtype):
        raise MalformedMessage("answer does not match the query")
    chain = [qname]
    cnames: list[str] = []
    ttls: list[int] = []
    rrs = list(rec.rr)
    # Follow CNAMEs in whatever order the server listed them (bounded: a
    # loop cannot make the chain longer than the answer section).
    for _ in range(len(rrs)):
        nxt = None
        for rr in rrs:
            if rr.rtype == QTYPE.CNAME and name_of(rr.rname) == chain[-1]:
                nxt = name_of(rr.rdata.label)
                ttls.append(int(rr.ttl))
                break
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
        cnames.append(nxt)
    in_chain = set(chain)
    ips: list[str] = []
    rrtypes: list[str] = []
    for rr in rrs:
        if name_of(rr.rname) not in in_chain:
            continue
        rrtypes.append(qtype_name(rr.rtype))
        ip = _ip_of(rr)
        if ip is not None:
            if ip not in ips:
                ips.append(ip)
            ttls.append(int(rr.ttl))
    ttl = min(ttls) if ips and ttls else 0
    return DnsAnswer(rec.header.id, qname, qtype, rec.header.rcode, tuple(chain),
                     tuple(cnames), tuple(ips), ttl, tuple(rrtypes), bool(rec.header.tc))


def reject_reply(data: bytes, rcode: int, query: DnsQuery | None = None) -> bytes | None:
    """The proxy's own answer (REFUSED, NXDOMAIN, SERVFAIL, FORMERR) to ``data``.

    Echoes the ID, RD flag and the question when it can; for a query whose
    question cannot be re-encoded it answers with a bare header. Returns None
    when ``data`` is too short to even carry an ID (nothing to answer).
    """
    if query is not None:
        try:
            rec = query.record
            reply = DNSRecord(rec.header.__class__(id=rec.header.id, qr=1, aa=0, ra=1,
                                                   rd=rec.header.rd, rcode=rcode),
                              q=rec.questions[0])
            return bytes(reply.pack())
        except Exception:  # fall back to a bare header below
            pass
    if len(data) < 4:
        return None
    ident, flags = struct.unpack("!HH", data[:4])
    rd = flags & 0x0100
    opcode = flags & 0x7800
    return struct.pack("!HHHHHH", ident, 0x8000 | opcode | rd | 0x0080 | (rcode & 0xF),
                       0, 0, 0, 0)
