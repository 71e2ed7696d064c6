"""A small synchronous client of the agent's REST API (stdlib only: fast to import)."""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

from axoneme.core.errors import AxonemeError, ConfigError, PolicyError

DEFAULT_SOCKET = "/var/run/axoneme/axoneme.sock"
SOCKET_ENV = "AXONEME_API_SOCKET"

__all__ = ["AgentClient", "AgentError", "AgentUnreachable", "DEFAULT_SOCKET", "SOCKET_ENV",
           "resolve_socket"]


class AgentUnreachable(AxonemeError):
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        super().__init__(f"cannot reach the agent at {socket_path} (start it with: axoneme agent run)")


class AgentError(AxonemeError):
    """The agent answered with an error (runtime failure)."""

    def __init__(self, status: int, message: str, body: dict[str, Any] | None = None) -> None:
        self.status = status
        self.body = body or {}
        super().__init__(message)


class AgentBadRequest(AgentError, PolicyError):
    """The agent rejected the request as bad input (exit 2)."""


class AgentConfigError(AgentError, ConfigError):
    pass


def resolve_socket(explicit: str | None = None) -> str:
    return explicit or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class AgentClient:
    def __init__(self, socket_path: str | None = None, timeout: float | None = 120.0) -> None:
        self.socket_path = resolve_socket(socket_path)
        self.timeout = timeout

    def _conn(self, timeout: float | None) -> _UnixConnection:
        conn = _UnixConnection(self.socket_path, timeout)
        try:
            conn.connect()
        except OSError as e:
            raise AgentUnreachable(self.socket_path) from e
        return conn

    def request(self, method: str, path: str, body: Any = None, query: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        conn = self._conn(timeout if timeout is not None else self.timeout)
        try:
            if query:
                path += "?" + urlencode({k: v for k, v in query.items() if v is not None}, doseq=True)
            data = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if data is not None else {}
            try:
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (TimeoutError, ConnectionError) as e:
                raise AgentUnreachable(self.socket_path) from e
            ctype = resp.getheader("Content-Type", "")
            payload: Any = raw.decode(errors="replace")
            if "json" in ctype:
                payload = json.loads(raw) if raw else None
            if resp.status >= 400:
                msg = payload.get("error", str(payload)) if isinstance(payload, dict) else str(payload)
                body_d = payload if isinstance(payload, dict) else None
                if resp.status in (400, 404, 409, 422):
                    raise AgentBadRequest(resp.status, msg, body_d)
                raise AgentError(resp.status, msg, body_d)
            return payload
        finally:
            conn.close()

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
            if query:
                path += "?" + urlencode({k: v for k, v in query.items() if v is not None}, doseq=True)
            conn.request("GET", path)
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


def q(part: str) -> str:
    return quote(part, safe="")
