"""The plugin's small client of the agent API (stdlib only: the plugin starts fast)."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Mapping
from typing import Any


class AgentUnreachable(Exception):
    pass


class AgentError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


class AgentClient:
    def __init__(self, socket_path: str, timeout: float = 120.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _request(self, method: str, path: str, body: Mapping[str, Any] | None) -> Any:
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            try:
                conn.connect()
            except OSError as e:
                raise AgentUnreachable(f"cannot connect to {self.socket_path}: {e}") from e
            data = json.dumps(body).encode() if body is not None else None
            try:
                conn.request(method, path, body=data,
                             headers={"Content-Type": "application/json"} if data else {})
                resp = conn.getresponse()
                raw = resp.read()
            except (TimeoutError, ConnectionError) as e:
                raise AgentUnreachable(f"the agent at {self.socket_path} did not answer: {e}") from e
            try:
                payload = json.loads(raw) if raw else {}
            except json.JSONDecodeError:
                payload = {"error": raw.decode(errors="replace")}
            if resp.status >= 400:
                msg = payload.get("error") if isinstance(payload, dict) else str(payload)
                raise AgentError(resp.status, str(msg))
            return payload
        finally:
            conn.close()

    def get(self, path: str) -> Any:
        return self._request("GET", path, None)

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        return self._request("POST", path, body)
