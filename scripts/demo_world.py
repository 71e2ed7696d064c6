"""The demo's "outside world": a DNS server and web servers in a netns of our own.

    python scripts/demo_world.py        # sets up, prints READY, tears down on SIGTERM/SIGINT
    python scripts/demo_world.py down   # removes what a killed run left

Nothing here leaves the machine. A netns ``axdemo-world`` holds
198.51.100.53 (the agent's default ``dns_server``: a dnslib server for the zone
below) and one address per name, each serving HTTP on :80. The node reaches
them through a veth with /32 host routes (so the test suites' worlds elsewhere
in 198.51.100.0/24 are not disturbed), and a guard chain drops anything from
198.51.100.0/24 or the pod CIDR that would leave through the uplink.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

NETNS, HOST_IF, PEER_IF, GUARD = "axdemo-world", "axdemo-w0h", "axdemo-w0p", "AXDEMO-GUARD"
HOST_IP = "198.51.100.49"
DNS_IP = "198.51.100.53"
# the world's own resolver: without /etc/netns/<name>/resolv.conf a process in the
# netns would ask the host's, which it cannot reach (each lookup waits for a timeout)
RESOLV_DIR = f"/etc/netns/{NETNS}"
ZONE = {  # name -> (address, TTL)
    "api.twitter.com": ("198.51.100.60", 60),
    "kubernetes.io": ("198.51.100.61", 60),
    "www.example.com": ("198.51.100.62", 60),
}

# a dnslib server for ``zone`` ({name: (ip, ttl)}) on argv[1]:53 (UDP and TCP);
# prints READY once bound. The e2e FQDN suite serves its own zone with it.
DNS_SERVER = textwrap.dedent("""
    import sys, threading
    from dnslib import RR, A, QTYPE, RCODE
    from dnslib.server import BaseResolver, DNSServer
    ZONE = {zone!r}
    class Zone(BaseResolver):
        def resolve(self, request, handler):
            reply = request.reply()
            name = str(request.q.qname).rstrip(".").lower()
            if name not in ZONE:
                reply.header.rcode = RCODE.NXDOMAIN
            elif request.q.qtype == QTYPE.A:
                ip, ttl = ZONE[name]
                reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=ttl, rdata=A(ip)))
            return reply
    for tcp in (False, True):
        DNSServer(Zone(), address=sys.argv[1], port=53, tcp=tcp).start_thread()
    print("READY", flush=True)
    threading.Event().wait()
""")

WEB_SERVER = textwrap.dedent("""
    import http.server, socketserver, sys
    class Server(http.server.ThreadingHTTPServer):
        def server_bind(self):  # HTTPServer's does a reverse DNS lookup before listening
            socketserver.TCPServer.server_bind(self)
    class Hello(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = f"hello from {self.headers.get('Host', '?')} (the demo's outside world)\\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *a):
            pass
    Server(("0.0.0.0", 80), Hello).serve_forever()
""")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {res.returncode}: {res.stderr.strip()}")
    return res


def uplink() -> str:
    out = sh("ip", "-o", "route", "show", "default", check=False).stdout.split()
    return out[out.index("dev") + 1] if "dev" in out else ""


def down() -> None:
    """Remove everything ``up`` makes, by name. Idempotent."""
    sh("ip", "link", "del", HOST_IF, check=False)
    sh("ip", "netns", "del", NETNS, check=False)
    shutil.rmtree(RESOLV_DIR, ignore_errors=True)
    sh("iptables", "-w", "5", "-D", "FORWARD", "-j", GUARD, check=False)
    sh("iptables", "-w", "5", "-F", GUARD, check=False)
    sh("iptables", "-w", "5", "-X", GUARD, check=False)


def up() -> list[subprocess.Popen[bytes]]:
    down()  # a previous demo that was killed
    sh("iptables", "-w", "5", "-N", GUARD)
    if up_if := uplink():
        for src in ("198.51.100.0/24", "10.244.0.0/16"):
            sh("iptables", "-w", "5", "-A", GUARD, "-s", src, "-o", up_if, "-j", "DROP")
    sh("iptables", "-w", "5", "-I", "FORWARD", "1", "-j", GUARD)
    os.makedirs(RESOLV_DIR, exist_ok=True)
    with open(os.path.join(RESOLV_DIR, "resolv.conf"), "w") as f:
        f.write(f"nameserver {DNS_IP}\noptions timeout:1 attempts:1\n")
    sh("ip", "netns", "add", NETNS)
    sh("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", PEER_IF)
    sh("ip", "link", "set", PEER_IF, "netns", NETNS)
    sh("ip", "addr", "add", f"{HOST_IP}/32", "dev", HOST_IF)
    sh("ip", "link", "set", HOST_IF, "up")
    ips = [DNS_IP, *(ip for ip, _ in ZONE.values())]
    for ip in ips:
        sh("ip", "-n", NETNS, "addr", "add", f"{ip}/32", "dev", PEER_IF)
    sh("ip", "-n", NETNS, "link", "set", PEER_IF, "up")
    sh("ip", "-n", NETNS, "link", "set", "lo", "up")
    sh("ip", "-n", NETNS, "route", "add", f"{HOST_IP}/32", "dev", PEER_IF)
    sh("ip", "-n", NETNS, "route", "add", "default", "via", HOST_IP, "dev", PEER_IF)
    for ip in ips:
        sh("ip", "route", "replace", f"{ip}/32", "dev", HOST_IF, "src", HOST_IP)
        route = sh("ip", "route", "get", ip).stdout
        if f"dev {HOST_IF}" not in route:
            raise RuntimeError(f"{ip} is not routed to the demo world: {route}")
    dns = subprocess.Popen(["ip", "netns", "exec", NETNS, sys.executable, "-c",
                            DNS_SERVER.format(zone=ZONE), DNS_IP],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    web = subprocess.Popen(["ip", "netns", "exec", NETNS, sys.executable, "-c", WEB_SERVER],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert dns.stdout is not None
    if dns.stdout.readline().strip() != b"READY":
        raise RuntimeError("the demo world's DNS server did not start")
    wait_accepting(web, next(iter(ZONE.values()))[0], 80)
    return [dns, web]


def wait_accepting(proc: subprocess.Popen[bytes], ip: str, port: int, timeout: float = 15.0) -> None:
    """Return once ``ip:port`` accepts (READY means every server answers), else raise."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            socket.create_connection((ip, port), timeout=0.5).close()
            return
        except OSError as e:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"the demo world's web server does not accept on {ip}:{port}: "
                                   f"{e}") from None
            time.sleep(0.05)
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    raise RuntimeError(f"the demo world's web server exited with {proc.returncode}: {err[-2000:]}")


def main() -> int:
    procs: list[subprocess.Popen[bytes]] = []
    stop = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        procs = up()
        names = ", ".join(f"{n}={ip}" for n, (ip, _) in ZONE.items())
        print(f"READY dns={DNS_IP} {names}", flush=True)
        while not stop and all(p.poll() is None for p in procs):
            time.sleep(0.2)
        return 0 if stop else 1
    except Exception as e:  # noqa: BLE001 - reported, then everything is removed
        print(f"error: demo world: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        for p in procs:
            p.kill()
            p.wait()
        down()


if __name__ == "__main__":
    if sys.argv[1:] == ["down"]:
        down()
        sys.exit(0)
    sys.exit(main())
