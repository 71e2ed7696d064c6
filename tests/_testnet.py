"""Network namespaces and servers of the test tiers, made one way everywhere.

Two rules of DESIGN.md ("Test network and safety") live here:

* every netns we make gets its own ``/etc/netns/<name>/resolv.conf`` before
  anything runs in it (``ip netns exec`` bind-mounts it over /etc/resolv.conf).
  Without one a process in the netns uses the host's resolver, which the netns
  cannot reach: each lookup then waits for the resolver timeout. The default
  names ``127.0.0.1`` *inside the netns*, where nothing listens on port 53, so a
  lookup fails at once (connection refused) instead;
* a server is only handed to a test once it accepts connections
  (``wait_accepting``), failing with the server's output if it never does.

Run as a script it is the HTTP server of the fixtures::

    python3 _testnet.py http --bind IP --port 80 [--directory DIR] [--echo]

Unlike ``python3 -m http.server`` it never looks up its own address
(``HTTPServer.server_bind`` calls ``socket.getfqdn``, a reverse DNS lookup,
before it listens).

Importable from the tests/ tree (tests/conftest.py puts tests/ on sys.path)
and, by path, from packages/*/tests (``importlib.util.spec_from_file_location``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import IO, Any

try:  # the namespaces of every test tier are the test kit's (one definition); re-exported here
    from axoneme.testing.netns import (  # noqa: F401
        NO_RESOLVER,
        add_netns,
        del_netns,
        remove_resolv_conf,
        wait_accepting,
        write_resolv_conf,
    )
except ImportError:
    # run as the fixtures' HTTP server by a python without axoneme (a pod's `python3`,
    # a container's): that needs the stdlib only
    if __name__ != "__main__":
        raise

RESOLV_DIR = "/etc/netns"
TEST_DNS_NET = ipaddress.ip_network("198.51.100.0/24")
SCRIPT = os.path.abspath(__file__)


# -- namespaces: made by the test kit (axoneme.testing.netns), imported above -----------------

def host_nameservers(path: str = "/etc/resolv.conf") -> set[str]:
    try:
        with open(path) as f:
            return {p[1] for line in f if (p := line.split())[:1] == ["nameserver"] and len(p) > 1}
    except OSError:
        return set()


def resolv_conf_problem(netns: str) -> str | None:
    """Why ``netns`` would use a resolver it must not (None when it is fine).

    Fine: its own resolv.conf naming only loopback (inside the netns: its own,
    never the host's) or the test DNS in 198.51.100.0/24, none of the host's
    non-loopback nameservers.
    """
    path = os.path.join(RESOLV_DIR, netns, "resolv.conf")
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        return f"netns {netns} has no resolv.conf of its own ({path}: {e.strerror})"
    named = [p[1] for line in text.splitlines()
             if (p := line.split())[:1] == ["nameserver"] and len(p) > 1]
    if not named:
        return f"{path} names no nameserver (the resolver would fall back to 127.0.0.1)"
    for ns in named:
        try:
            ip = ipaddress.ip_address(ns)
        except ValueError:
            return f"{path} names {ns!r}, not an address"
        if not (ip.is_loopback or ip in TEST_DNS_NET):
            return f"{path} names {ns}, neither loopback nor the test DNS (198.51.100.0/24)"
    return None


# -- servers --------------------------------------------------------------------------------

def http_server_argv(bind: str, port: int = 80, directory: str | None = None,
                     echo: bool = False) -> list[str]:
    """argv (after the interpreter) of the fixtures' HTTP server."""
    argv = [SCRIPT, "http", "--bind", bind, "--port", str(port)]
    if directory:
        argv += ["--directory", directory]
    return argv + (["--echo"] if echo else [])


def start_http_server(netns: str, bind: str, port: int = 80, directory: str | None = None,
                      log: str | None = None, timeout: float = 15.0,
                      python: str = "python3") -> subprocess.Popen[bytes]:
    """The HTTP server in ``netns``, accepting when this returns."""
    out: IO[bytes] | int = open(log, "ab") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(["ip", "netns", "exec", netns, python,
                                 *http_server_argv(bind, port, directory)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        if not isinstance(out, int):
            out.close()
    try:
        wait_accepting("127.0.0.1" if bind == "0.0.0.0" else bind, port, netns, proc, log, timeout)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc


def poll(pred: Any, timeout: float = 10.0, interval: float = 0.1) -> Any:
    """The first truthy ``pred()`` within ``timeout`` seconds, else its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    return pred()


def _serve_http(argv: list[str]) -> None:
    import functools
    import http.server
    import socketserver

    ap = argparse.ArgumentParser(prog="_testnet.py http")
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=80)
    ap.add_argument("--directory", default=os.getcwd())
    ap.add_argument("--echo", action="store_true",
                    help="answer every GET/POST with '<METHOD> <path> ok' (HTTP/1.1 keep-alive)")
    args = ap.parse_args(argv)

    class Server(http.server.ThreadingHTTPServer):
        def server_bind(self) -> None:
            # HTTPServer.server_bind also sets server_name = getfqdn(host): a reverse
            # DNS lookup before listening; nothing here needs the name
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = str(self.server_address[0]), args.port

    class Echo(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            body = f"{self.command} {self.path} ok\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _reply

    handler: Any = Echo if args.echo else functools.partial(http.server.SimpleHTTPRequestHandler, directory=args.directory)
    with Server((args.bind, args.port), handler) as httpd:
        sys.stderr.write(f"serving HTTP on {args.bind}:{args.port}\n")
        sys.stderr.flush()
        httpd.serve_forever()


if __name__ == "__main__":
    if sys.argv[1:2] != ["http"]:
        sys.exit("usage: _testnet.py http --bind IP [--port P] [--directory D] [--echo]")
    _serve_http(sys.argv[2:])


@contextlib.contextmanager
def kernel_agent_lock() -> Iterator[None]:
    """One kernel-datapath L7 agent of the e2e modules at a time on this node (the
    TPROXY ip rule and the fixed proxy ports are node-global)."""
    with open("/tmp/axoneme-kernel-agent.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def conftest_module() -> Any:
    """The shared tests/conftest.py module (AgentProcess, free_pod_cidr, probe helpers),
    as loaded by pytest (importlib import mode: not importable by name)."""
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None) or ""
        if f.endswith(os.path.join("tests", "conftest.py")) and hasattr(mod, "AgentProcess"):
            return mod
    raise RuntimeError("tests/conftest.py is not loaded")
