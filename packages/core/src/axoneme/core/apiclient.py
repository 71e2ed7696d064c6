"""The one client of the agent's REST API over its unix socket.

Stdlib only, so that whatever talks to the agent starts fast and needs none
of the agent's own dependencies: the ``axoneme`` CLI commands and the
``axoneme-cni`` plugin both use it (``axoneme.agent.client`` re-exports it).

Errors map to the CLI's exit codes: ``AgentUnreachable`` and ``AgentError``
are runtime failures (1), ``AgentBadRequest`` is bad input (2).
"""

from __future__ import annotations

import http.client
import json
import os
import select
import socket
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

from axoneme.core.errors import AxonemeError, PolicyError

DEFAULT_SOCKET = "/var/run/axoneme/axoneme.sock"
SOCKET_ENV = "AXONEME_API_SOCKET"

# Statuses with which the agent says "your request is wrong" (exit 2), not "I failed".
BAD_REQUEST_STATUSES = frozenset({400, 404, 409, 422})

__all__ = ["BAD_REQUEST_STATUSES", "DEFAULT_SOCKET", "KEPT_ROUTES", "SOCKET_ENV", "AgentBadRequest",
           "AgentClient", "AgentError", "AgentUnreachable", "q", "resolve_socket"]


class AgentUnreachable(AxonemeError):
    """Nothing answers on the socket (not started, gone, or it hung up)."""

    def __init__(self, socket_path: str, reason: str = "") -> None:
        self.socket_path = socket_path
        self.reason = reason
        super().__init__(f"cannot reach the agent at {socket_path} (start it with: axoneme agent run)")


class AgentError(AxonemeError):
    """The agent answered with an error (runtime failure)."""

    def __init__(self, status: int, message: str, body: dict[str, Any] | None = None) -> None:
        self.status = status
        self.body = body or {}
        super().__init__(message)


class AgentBadRequest(AgentError, PolicyError):
    """The agent rejected the request as bad input (exit 2)."""


def resolve_socket(explicit: str | None = None) -> str:
    """The socket path: the explicit one, else $AXONEME_API_SOCKET, else the default."""
    return explicit or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def q(part: str) -> str:
    """One path segment, quoted (``/`` included)."""
    return quote(part, safe="")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


# the requests a keep-alive client sends on its kept connection: the policy
# changes, which the agent's lean front serves (agent/_api.py HOT_ROUTES; a
# test in packages/agent keeps the two equal)
KEPT_ROUTES = frozenset({("POST", "/v1/policies"), ("POST", "/v1/policies/delete")})

# methods http.client sends "Content-Length: 0" for when they carry no body
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _with_query(path: str, query: dict[str, Any] | None) -> str:
    if not query:
        return path
    return path + "?" + urlencode({k: v for k, v in query.items() if v is not None}, doseq=True)


class AgentClient:
    """Synchronous JSON requests (the agent is local).

    One connection per request, unless ``keep_alive``: then the policy
    changes (``KEPT_ROUTES``) go on one connection the client keeps, as a
    controller or kubectl keeps theirs: each change spares the connect and
    the agent's accept (issue 17, B5CUT). Every other request still makes a
    connection of its own: the agent serves the changes on a lean front and
    hands a connection that asks for anything else to aiohttp for good, so a
    kept connection that carried a GET would serve every later change on the
    slow path. A kept connection the agent closed meanwhile (idle,
    restarted) is noticed before the request goes out and a new one made;
    ``close()`` ends it. Requests on one client are serialized."""

    def __init__(self, socket_path: str | None = None, timeout: float | None = 120.0,
                 keep_alive: bool = False) -> None:
        self.socket_path = resolve_socket(socket_path)
        self.timeout = timeout
        self.keep_alive = keep_alive
        self._sock: socket.socket | None = None  # the kept connection
        self._lock = threading.Lock()

    def _conn(self, timeout: float | None) -> _UnixConnection:
        conn = _UnixConnection(self.socket_path, timeout)
        try:
            conn.connect()
        except OSError as e:
            raise AgentUnreachable(self.socket_path, f"cannot connect: {e}") from e
        return conn

    def close(self) -> None:
        """Ends the kept connection (if any); the next request makes a new one."""
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _kept(self, timeout: float | None) -> socket.socket:
        """The kept connection, alive (the agent has not closed it), else a new one."""
        sock = self._sock
        if sock is not None:
            try:
                # an idle connection has nothing to read: readable (EOF, an error,
                # stray bytes) means the agent is done with it
                alive = not select.select([sock], [], [], 0)[0]
            except (OSError, ValueError):
                alive = False
            if alive:
                if sock.gettimeout() != timeout:  # settimeout is a syscall (ioctl)
                    sock.settimeout(timeout)
                return sock
            self._drop()
        conn = self._conn(timeout)
        assert conn.sock is not None
        self._sock, conn.sock = conn.sock, None
        return self._sock

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        """The decoded JSON answer (text when the agent did not answer JSON).

        The request goes out in one write, head and body together
        (``http.client`` writes them separately: the agent would wake up for the
        head, then again for the body); the answer is read by ``http.client``."""
        data = None if body is None else json.dumps(body).encode()
        head = [f"{method} {_with_query(path, query)} HTTP/1.1", "Host: localhost",
                "Accept-Encoding: identity"]
        if data is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        elif method in _BODY_METHODS:
            head.append("Content-Length: 0")
        if any(c <= " " or c == "\x7f" for c in head[0][len(method) + 1:-9]):
            raise http.client.InvalidURL(f"URL can't contain control characters: {path!r}")
        wire = "\r\n".join(head).encode("ascii") + b"\r\n\r\n" + (data or b"")
        timeout = timeout if timeout is not None else self.timeout
        if not self.keep_alive or (method, path) not in KEPT_ROUTES or query:
            conn = self._conn(timeout)
            try:
                assert conn.sock is not None
                status, payload, _ = self._exchange(conn.sock, method, wire)
            finally:
                conn.close()
        else:
            with self._lock:
                sock = self._kept(timeout)
                reusable = False
                try:
                    status, payload, reusable = self._exchange(sock, method, wire)
                finally:
                    if not reusable:
                        self._drop()
        if status >= 400:
            body_d = payload if isinstance(payload, dict) else None
            msg = str(body_d.get("error", body_d)) if body_d is not None else str(payload)
            if status in BAD_REQUEST_STATUSES:
                raise AgentBadRequest(status, msg, body_d)
            raise AgentError(status, msg, body_d)
        return payload

    def _exchange(self, sock: socket.socket, method: str, wire: bytes) -> tuple[int, Any, bool]:
        """Send one request, read its answer: (status, the decoded answer,
        whether the connection can carry another request)."""
        resp = None
        try:
            try:
                sock.sendall(wire)
                resp = http.client.HTTPResponse(sock, method=method)
                resp.begin()
                raw = resp.read()
            except (TimeoutError, ConnectionError) as e:
                raise AgentUnreachable(self.socket_path, f"no answer: {e}") from e
            payload: Any = raw.decode(errors="replace")
            if "json" in resp.getheader("Content-Type", ""):
                try:
                    payload = json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    pass  # keep the text: the error raised or the caller shows it
            return resp.status, payload, not resp.will_close
        finally:
            if resp is not None:
                resp.close()

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query or None)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body=body if body is not None else {})

    def delete(self, path: str, body: Any = None) -> Any:
        return self.request("DELETE", path, body=body)

    def stream_lines(self, path: str, query: dict[str, Any] | None = None) -> Iterator[str]:
        """Lines of a streamed (chunked) response, as they arrive."""
        conn = self._conn(None)
        try:
            conn.request("GET", _with_query(path, query))
            resp = conn.getresponse()
            if resp.status >= 400:
                raise AgentError(resp.status, resp.read().decode(errors="replace"))
            while True:
                line = resp.readline()
                if not line:
                    return
                yield line.decode(errors="replace").rstrip("\n")
        finally:
            conn.close()
