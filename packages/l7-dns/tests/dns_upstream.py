"""A real dnslib DNS server (UDP + TCP) serving fixed test data.

Used in-process by the loopback tests (``start_upstream``) and as a
subprocess in a netns by the privileged test (``python dns_upstream.py
ADDR PORT``: prints ``READY`` then one ``QUERY <name> <type>`` line per
query). The data is just data: nothing is ever contacted.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
from dataclasses import dataclass, field

from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

ZONE: dict[str, list[tuple[str, str, int]]] = {
    # name: [(type, value, ttl)]
    "api.twitter.com.": [("A", "198.51.100.10", 60), ("AAAA", "2001:db8::10", 60)],
    "kubernetes.io.": [("A", "198.51.100.11", 300)],
    "sub.example.com.": [("A", "198.51.100.12", 30)],
    "example.com.": [("A", "198.51.100.13", 120)],
    "a.b.example.com.": [("A", "198.51.100.16", 120)],
    "www.example.com.": [("CNAME", "edge.example.net.", 300)],
    "edge.example.net.": [("A", "198.51.100.14", 45), ("A", "198.51.100.15", 45)],
    "big.example.com.": [("A", f"198.51.100.{100 + i}", 60) for i in range(60)],
}


@dataclass
class RecordingResolver(BaseResolver):  # type: ignore[misc]
    seen: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    echo: bool = False
    delay: float = 0.0

    def resolve(self, request: DNSRecord, handler: object) -> DNSRecord:
        q = request.q
        qname = str(q.qname).lower()
        qtype = QTYPE[q.qtype]
        with self.lock:
            self.seen.append((qname, qtype))
        if self.echo:
            print(f"QUERY {qname} {qtype}", flush=True)
        if self.delay:
            import time
            time.sleep(self.delay)
        reply = request.reply()
        name = qname
        records = ZONE.get(name)
        if records is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for _ in range(8):  # follow CNAMEs inside the zone like a recursor
            nxt = None
            for rtype, value, ttl in ZONE.get(name, []):
                if rtype == "CNAME":
                    reply.add_answer(RR(name, QTYPE.CNAME, rdata=CNAME(value), ttl=ttl))
                    nxt = value
                elif rtype == qtype:
                    rdata = A(value) if rtype == "A" else AAAA(value)
                    reply.add_answer(RR(name, getattr(QTYPE, rtype), rdata=rdata, ttl=ttl))
            if nxt is None:
                break
            name = nxt
        return reply

    def names(self) -> list[str]:
        with self.lock:
            return [n for n, _ in self.seen]


class Upstream:
    """A UDP and a TCP dnslib server on one address/port."""

    def __init__(self, address: str = "127.0.0.1", port: int = 0, echo: bool = False) -> None:
        self.resolver = RecordingResolver(echo=echo)
        logger = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
        for attempt in range(20):
            self.udp = DNSServer(self.resolver, address=address, port=port, logger=logger)
            self.port = self.udp.server.server_address[1]
            try:
                self.tcp = DNSServer(self.resolver, address=address, port=self.port, tcp=True,
                                     logger=logger)
                break
            except OSError:  # port 0: the TCP twin of the UDP port is taken
                self.udp.server.server_close()
                if port or attempt == 19:
                    raise
        self.address = address

    @property
    def addr(self) -> tuple[str, int]:
        return self.address, self.port

    def start(self) -> Upstream:
        # serve_forever with a short poll so stop() is quick (dnslib's
        # start_thread uses socketserver's 0.5 s default)
        for srv in (self.udp, self.tcp):
            threading.Thread(target=srv.server.serve_forever, kwargs={"poll_interval": 0.02},
                             daemon=True).start()
        return self

    def stop(self) -> None:
        for srv in (self.udp, self.tcp):
            srv.server.shutdown()
            srv.server.server_close()


def udp_ask(addr: tuple[str, int], name: str, qtype: str = "A",
            timeout: float = 3.0) -> DNSRecord | None:
    """One UDP query; None when no answer came within ``timeout``."""
    q = DNSRecord.question(name, qtype)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q.pack(), addr)
        try:
            data, _ = s.recvfrom(65535)
        except TimeoutError:
            return None
    rec = DNSRecord.parse(data)
    assert rec.header.id == q.header.id
    return rec


def tcp_ask(addr: tuple[str, int], name: str, qtype: str = "A",
            timeout: float = 3.0) -> DNSRecord | None:
    q = DNSRecord.question(name, qtype).pack()
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(struct.pack("!H", len(q)) + q)
        head = b""
        while len(head) < 2:
            chunk = s.recv(2 - len(head))
            if not chunk:
                return None
            head += chunk
        (n,) = struct.unpack("!H", head)
        body = b""
        while len(body) < n:
            chunk = s.recv(n - len(body))
            if not chunk:
                return None
            body += chunk
    return DNSRecord.parse(body)


def main() -> None:
    address, port = sys.argv[1], int(sys.argv[2])
    quiet = "--quiet" in sys.argv[3:]  # benchmarks: nobody reads the QUERY lines
    up = Upstream(address, port, echo=not quiet).start()
    print("READY", flush=True)
    try:
        threading.Event().wait()
    finally:
        up.stop()


if __name__ == "__main__":
    main()
