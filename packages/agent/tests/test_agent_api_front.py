"""The API's hot-route front (_apifast): the policy changes served by the lean
front answer exactly as the aiohttp routes do; everything else, and any
unusual request, is aiohttp's (real unix socket, real clients: the CLI's
AgentClient, curl, raw bytes)."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from axoneme.agent._api import HOT_ROUTES, MAX_BODY, build_app, error_reply
from axoneme.agent._apifast import FrontConn, FrontSite
from axoneme.agent.client import AgentBadRequest, AgentClient
from axoneme.core.policy.parse import parse_policy_obj

POLICY = {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
          "metadata": {"name": "web", "namespace": "default"},
          "spec": {"endpointSelector": {"matchLabels": {"app": "web"}},
                   "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "cli"}}]}]}}


class FakePolicies:
    """The policy service's two changes, parsing for real (InvalidRule as the agent)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.delay: float | None = 0.0  # None: no await at all (a change that never waits)
        self.fail: BaseException | None = None  # raised before anything is applied
        self.checked: list[bool] = []  # json_checked of each apply

    async def apply(self, docs: list[dict[str, Any]], json_checked: bool = False) -> dict[str, Any]:
        if self.fail is not None:
            raise self.fail
        if self.delay is not None:
            await asyncio.sleep(self.delay)
        self.checked.append(json_checked)
        pols = [parse_policy_obj(d.get("obj"), str(d.get("file", "<api>")), 0, False, json_checked)
                for d in docs]
        self.calls.append(("apply", [p.ref.name for p in pols]))
        return {"revision": 7, "applied": [p.ref.name for p in pols], "errors": {}}

    async def delete(self, refs: list[Any]) -> dict[str, Any]:
        self.calls.append(("delete", [r.name for r in refs]))
        return {"revision": 7, "removed": [r.name for r in refs]}


class Served:
    def __init__(self, path: str, policies: FakePolicies) -> None:
        self.path = path
        self.policies = policies

    def raw(self, data: bytes, chunks: int = 1) -> bytes:
        """Send ``data`` (in ``chunks`` pieces), read the answer until the agent closes
        (the requests say Connection: close; aiohttp does not answer a half-closed one)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(self.path)
        step = max(1, len(data) // chunks)
        for i in range(0, len(data), step):
            s.sendall(data[i:i + step])
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        s.close()
        return out


def _adopted() -> asyncio.Event:
    """The agent's adoption gate, open (no restart rebuilding in the background)."""
    ev = asyncio.Event()
    ev.set()
    return ev


@contextmanager
def serve(path: str, k8s_mode: bool = False) -> Iterator[Served]:
    """The agent's app behind the front (as ``agent run`` serves it) on its own loop."""
    policies = FakePolicies()
    agent = SimpleNamespace(adopted=_adopted(), views=SimpleNamespace(status=lambda: {"ok": 1}), endpoints=None,
                            policies=policies, namespaces=None, pods=None,
                            config=SimpleNamespace(k8s_mode=k8s_mode, flow_injection=False))
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        app = build_app(agent)  # type: ignore[arg-type]
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = FrontSite(runner, path, app[HOT_ROUTES], error_reply, MAX_BODY)
        await site.start()
        ready.set()
        await stop.wait()
        await runner.cleanup()

    th = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    th.start()
    assert ready.wait(10)
    try:
        yield Served(path, policies)
    finally:
        loop.call_soon_threadsafe(stop.set)
        th.join(10)
        loop.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serve(str(tmp_path / "api.sock")) as s:
        yield s


def _request(method: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close"]
    hdrs = {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}
    head += [f"{k}: {v}" for k, v in hdrs.items() if v is not None]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _answer(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":  # aiohttp's streamed answers
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            out, rest = out + rest[:n], rest[n + 2:]
            if n == 0:
                break
        body = out
    value = json.loads(body) if "json" in headers.get("content-type", "") else body
    return int(lines[0].split()[1]), headers, value


BODIES = [
    json.dumps({"documents": [{"file": "a.yaml", "index": 0, "obj": POLICY}]}).encode(),
    b"{not json",
    b"[1, 2]",
    b"",
    b"\xff\xfe",
    json.dumps({"documents": [{"file": "a.yaml", "index": 0,
                               "obj": {**POLICY, "kind": "Deployment"}}]}).encode(),
    json.dumps({"documents": [{"obj": {**POLICY, "spec": {"x": float("nan")}}}]}).encode(),
]


@pytest.mark.parametrize("body", BODIES, ids=range(len(BODIES)))
def test_hot_route_answers_as_aiohttp(served: Served, body: bytes) -> None:
    """The front's answer to POST /v1/policies equals aiohttp's to the same
    request (a query string sends it to aiohttp: same route, same handler)."""
    fast = _answer(served.raw(_request("POST", "/v1/policies", body)))
    slow = _answer(served.raw(_request("POST", "/v1/policies?via=aiohttp", body)))
    assert fast[0] == slow[0] and fast[2] == slow[2], (fast, slow)
    assert fast[1]["connection"] == "close" and "server" not in fast[1]  # the front's own
    assert "server" in slow[1]  # aiohttp's
    assert fast[1]["content-type"] == slow[1]["content-type"] == "application/json; charset=utf-8"


def test_delete_and_errors_through_the_cli_client(served: Served) -> None:
    """The CLI's client: an apply, a delete, an unknown kind (exit-2 error with
    the problems), a delete without refs; the handlers ran once each."""
    api = AgentClient(served.path, timeout=10)
    doc = {"documents": [{"file": "a.yaml", "index": 0, "obj": POLICY}]}
    assert api.post("/v1/policies", doc)["applied"] == ["web"]
    ref = {"kind": "CiliumNetworkPolicy", "namespace": "default", "name": "web"}
    assert api.post("/v1/policies/delete", {"refs": [ref]})["removed"] == ["web"]
    with pytest.raises(AgentBadRequest) as e:
        api.post("/v1/policies", {"documents": [{"obj": {**POLICY, "kind": "Pod"}}]})
    assert e.value.status == 400 and "unsupported kind" in str(e.value)
    assert e.value.body["problems"]
    with pytest.raises(AgentBadRequest, match="no policy given"):
        api.post("/v1/policies/delete", {"refs": []})
    assert served.policies.calls == [("apply", ["web"]), ("delete", ["web"])]
    assert api.get("/v1/healthz") == {"ok": True}  # aiohttp's route, same socket


def test_kubernetes_mode_conflict_before_the_body(tmp_path: Path) -> None:
    """In Kubernetes mode both changes are 409 on the front as on aiohttp, even
    with a bad body (the mode is checked first), and nothing is applied."""
    with serve(str(tmp_path / "k8s.sock"), k8s_mode=True) as s:
        for path in ("/v1/policies", "/v1/policies/delete"):
            fast = _answer(s.raw(_request("POST", path, b"{not json")))
            slow = _answer(s.raw(_request("POST", path + "?via=aiohttp", b"{not json")))
            assert fast[0] == slow[0] == 409 and fast[2] == slow[2], (fast, slow)
            assert "Kubernetes mode" in fast[2]["error"]
        assert s.policies.calls == []


@pytest.mark.parametrize("headers", [
    {"Expect": "100-continue"},
    {"Transfer-Encoding": "chunked", "Content-Length": None},
    {"Content-Type": "text/plain"},
], ids=["expect", "chunked", "text-plain"])
def test_unusual_requests_go_to_aiohttp(served: Served, headers: dict[str, Any]) -> None:
    """Expect, chunked bodies and other content types are aiohttp's (its answer,
    its Server header), and still apply the policy."""
    body = json.dumps({"documents": [{"file": "a.yaml", "index": 0, "obj": POLICY}]}).encode()
    if headers.get("Transfer-Encoding") == "chunked":
        wire = f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    else:
        wire = body
    # written in pieces: aiohttp gets what the front read, then the rest, in order
    raw = served.raw(_request("POST", "/v1/policies", wire, headers), chunks=30)
    if headers.get("Expect"):
        assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        raw = raw.split(b"\r\n\r\n", 1)[1]
    status, hdrs, value = _answer(raw)
    assert status == 200 and value["applied"] == ["web"] and "server" in hdrs


def test_split_writes_and_garbage(served: Served) -> None:
    """A request written a few bytes at a time is served; bytes that are not
    HTTP get aiohttp's 400."""
    body = json.dumps({"documents": [{"file": "a.yaml", "index": 0, "obj": POLICY}]}).encode()
    status, hdrs, value = _answer(served.raw(_request("POST", "/v1/policies", body), chunks=40))
    assert status == 200 and value["applied"] == ["web"] and hdrs["connection"] == "close"
    assert served.raw(b"\x16\x03\x01 not http\r\n\r\n").startswith(b"HTTP/1.0 400")


def test_keep_alive_after_a_hand_over(served: Served) -> None:
    """Two requests on one connection to aiohttp's routes: both answered."""
    two = (b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = served.raw(two)
    assert raw.count(b"HTTP/1.1 200 OK") == 2


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_big_body(served: Served, tmp_path: Path) -> None:
    """curl sends Expect: 100-continue for a body over 1 KiB: the documented
    `curl --unix-socket ... -d @file` apply works (aiohttp serves it)."""
    peers = [f"198.51.100.{i}/32" for i in range(1, 200)]
    pol = {**POLICY, "spec": {**POLICY["spec"], "ingress": [{"fromCIDR": peers}]}}
    f = tmp_path / "body.json"
    f.write_text(json.dumps({"documents": [{"file": "a.yaml", "index": 0, "obj": pol}]}))
    out = subprocess.run(["curl", "-s", "--unix-socket", served.path, "-H",
                          "Content-Type: application/json", "--data-binary", f"@{f}",
                          "http://localhost/v1/policies"], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "NO_PROXY": "*"})
    assert json.loads(out.stdout)["applied"] == ["web"], out


def test_a_change_in_flight_is_finished_and_answered_when_the_agent_stops(tmp_path: Path) -> None:
    """The agent stopping (the runner's cleanup) waits for a hot change that began."""
    body = json.dumps({"documents": [{"file": "a.yaml", "index": 0, "obj": POLICY}]}).encode()
    with serve(str(tmp_path / "stop.sock")) as s:
        s.policies.delay = 0.5
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(10)
        conn.connect(s.path)
        conn.sendall(_request("POST", "/v1/policies", body))
        import time

        time.sleep(0.1)  # the change has begun; leaving the block stops the server
    out = b""
    while chunk := conn.recv(65536):
        out += chunk
    conn.close()
    status, _, value = _answer(out)
    assert status == 200 and value["applied"] == ["web"]
    assert s.policies.calls == [("apply", ["web"])]


def test_a_connection_is_freed_without_the_cyclic_gc(served: Served,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A served connection (hot, or handed to aiohttp) and its request body go
    with their task by reference counting: a policy change of 200k+ objects
    freezes the cyclic GC's view of what is alive (_gcpause), and each such
    change kept its connection and body (2 MB at 100k peers) for good
    (issue 17, B5HIST)."""
    made: list[weakref.ref[FrontConn]] = []
    real_init = FrontConn.__init__

    def init(self: FrontConn, *args: Any) -> None:
        real_init(self, *args)
        made.append(weakref.ref(self))

    monkeypatch.setattr(FrontConn, "__init__", init)
    body = json.dumps({"documents": [{"file": "a.yaml", "index": 0, "obj": POLICY}]}).encode()
    gc.collect()
    gc.disable()
    try:
        assert _answer(served.raw(_request("POST", "/v1/policies", body)))[0] == 200
        assert served.raw(b"GET /v1/healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                          ).startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 5
        while any(r() is not None for r in made) and time.monotonic() < deadline:
            time.sleep(0.01)
        alive = sum(r() is not None for r in made)
    finally:
        gc.enable()
    assert len(made) == 2 and alive == 0


def _keep(method: str, path: str, body: bytes, version: str = "1.1",
          headers: dict[str, str] | None = None) -> bytes:
    """A request that keeps its connection (no Connection: close)."""
    head = [f"{method} {path} HTTP/{version}", "Host: localhost",
            "Content-Type: application/json", f"Content-Length: {len(body)}",
            *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _read_answer(s: socket.socket) -> tuple[int, dict[str, str], Any]:
    """One answer read off a kept connection (by its Content-Length)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"connection closed before an answer: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    length = int(next(v for k, _, v in (x.partition(b":") for x in head.split(b"\r\n")[1:])
                      if k.lower() == b"content-length"))
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk
        body += chunk
    assert len(body) == length  # nothing more was sent
    return _answer(head + b"\r\n\r\n" + body)


def _closed(s: socket.socket) -> bool:
    s.settimeout(5)
    return s.recv(1) == b""


def _conns_made(monkeypatch: pytest.MonkeyPatch) -> list[FrontConn]:
    """Every FrontConn the front makes from now on, in order."""
    made: list[FrontConn] = []
    real_init = FrontConn.__init__

    def init(self: FrontConn, *args: Any) -> None:
        real_init(self, *args)
        made.append(self)

    monkeypatch.setattr(FrontConn, "__init__", init)
    return made


APPLY = json.dumps({"documents": [{"file": "a.yaml", "index": 0, "obj": POLICY}]}).encode()


@pytest.mark.parametrize("delay", [None, 0.0], ids=["never-waits", "waits"])
def test_keep_alive_serves_requests_on_one_connection(served: Served, delay: float | None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that keeps its connection: a change, a bad request, a change
    again and a delete, each answered on the same connection (one FrontConn),
    whether the handler ran to its end at once (eager) or waited (a task)."""
    made = _conns_made(monkeypatch)
    served.policies.delay = delay
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(served.path)
    s.sendall(_keep("POST", "/v1/policies", APPLY))
    status, hdrs, value = _read_answer(s)
    assert status == 200 and value["applied"] == ["web"] and "connection" not in hdrs
    s.sendall(_keep("POST", "/v1/policies", b"{not json"))
    status, hdrs, value = _read_answer(s)
    assert status == 400 and "connection" not in hdrs
    s.sendall(_keep("POST", "/v1/policies", APPLY))
    assert _read_answer(s)[0] == 200
    ref = {"kind": "CiliumNetworkPolicy", "namespace": "default", "name": "web"}
    s.sendall(_keep("POST", "/v1/policies/delete", json.dumps({"refs": [ref]}).encode(),
                    headers={"Connection": "close"}))
    status, hdrs, value = _read_answer(s)
    assert status == 200 and value["removed"] == ["web"] and hdrs["connection"] == "close"
    assert _closed(s)
    s.close()
    assert len(made) == 1
    assert served.policies.calls == [("apply", ["web"]), ("apply", ["web"]), ("delete", ["web"])]


def test_a_handler_that_raises_at_once_is_answered_and_the_connection_kept(
        served: Served) -> None:
    """The handler raising in its first (eager) step: the error mapping's
    answer, and the connection serves the next request."""
    served.policies.fail = RuntimeError("boom")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(served.path)
    s.sendall(_keep("POST", "/v1/policies", APPLY))
    status, _, value = _read_answer(s)
    assert status == 500 and "boom" in value["error"]
    served.policies.fail = None
    s.sendall(_keep("POST", "/v1/policies", APPLY))
    status, _, value = _read_answer(s)
    assert status == 200 and value["applied"] == ["web"]
    s.close()


def test_a_client_that_half_closes_is_answered_then_closed(served: Served) -> None:
    """A keep-alive request then the client's write side shut: answered, then
    the connection closed (not kept for a request that cannot come)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(served.path)
    s.sendall(_keep("POST", "/v1/policies", APPLY))
    s.shutdown(socket.SHUT_WR)
    status, _, value = _read_answer(s)
    assert status == 200 and value["applied"] == ["web"]
    assert _closed(s)
    s.close()


def test_a_pipelined_request_is_not_served_and_the_connection_closes(served: Served) -> None:
    """Two changes in one write (the second sent before the first's answer):
    the first is served whole (its path, headers and body untouched by the
    second's), its answer closes the connection, the second is not applied."""
    other = json.dumps({"documents": [{"obj": {**POLICY, "metadata": {"name": "other"}}}]}).encode()
    raw = served.raw(_keep("POST", "/v1/policies", APPLY) + _keep("POST", "/v1/policies", other))
    status, hdrs, value = _answer(raw)
    assert status == 200 and value["applied"] == ["web"] and hdrs["connection"] == "close"
    assert raw.count(b"HTTP/1.1") == 1
    assert served.policies.calls == [("apply", ["web"])]


def test_http10_closes_unless_it_asks_to_keep(served: Served) -> None:
    """HTTP/1.0 closes after the answer; with Connection: keep-alive it is kept
    (and the answer says so)."""
    status, hdrs, _ = _answer(served.raw(_keep("POST", "/v1/policies", APPLY, version="1.0")))
    assert status == 200 and hdrs["connection"] == "close"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(served.path)
    for _ in range(2):
        s.sendall(_keep("POST", "/v1/policies", APPLY, version="1.0",
                        headers={"Connection": "keep-alive"}))
        status, hdrs, _ = _read_answer(s)
        assert status == 200 and hdrs["connection"] == "keep-alive"
    s.close()


def test_an_idle_kept_connection_is_closed(served: Served,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A kept connection with no request for KEEP_ALIVE_S is closed by the agent."""
    from axoneme.agent import _apifast

    monkeypatch.setattr(_apifast, "KEEP_ALIVE_S", 0.2)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(served.path)
    s.sendall(_keep("POST", "/v1/policies", APPLY))
    assert _read_answer(s)[0] == 200
    t0 = time.monotonic()
    assert _closed(s)
    assert time.monotonic() - t0 < 5
    s.close()


def test_the_client_keeps_its_connection(served: Served,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """AgentClient(keep_alive=True): the changes and an error on one kept
    connection; a GET on a connection of its own (aiohttp would keep the one
    it is given: later changes would miss the front), the changes after it
    still on the kept one; after the agent closed it (idle), the next change
    makes a new one; close() ends it. Without keep_alive, one connection each."""
    from axoneme.agent import _apifast
    from axoneme.core.apiclient import KEPT_ROUTES

    made = _conns_made(monkeypatch)
    doc = {"documents": [{"file": "a.yaml", "index": 0, "obj": POLICY}]}
    api = AgentClient(served.path, timeout=10, keep_alive=True)
    assert api.post("/v1/policies", doc)["applied"] == ["web"]
    with pytest.raises(AgentBadRequest):
        api.post("/v1/policies", {"documents": [{"obj": {**POLICY, "kind": "Pod"}}]})
    assert api.get("/v1/healthz") == {"ok": True}  # its own connection, handed to aiohttp
    assert api.post("/v1/policies", doc)["applied"] == ["web"]
    assert len(made) == 2 and made[0].parser is not None  # the kept one is the front's
    assert served.policies.checked == [True, True, True]  # plain JSON: no walk in the parser
    monkeypatch.setattr(_apifast, "KEEP_ALIVE_S", 0.1)
    assert api.post("/v1/policies/delete", {"refs": [
        {"kind": "CiliumNetworkPolicy", "namespace": "default", "name": "web"}]})["removed"]
    assert len(made) == 2
    time.sleep(0.5)  # the agent closes it
    assert api.post("/v1/policies", doc)["applied"] == ["web"]
    assert len(made) == 3
    api.close()
    assert api._sock is None
    once = AgentClient(served.path, timeout=10)
    for _ in range(2):
        once.post("/v1/policies", doc)
    assert len(made) == 5
    # the client's kept routes are the ones the agent's front serves
    agent = SimpleNamespace(adopted=_adopted(), views=None, endpoints=None, policies=FakePolicies(),
                            namespaces=None, pods=None,
                            config=SimpleNamespace(k8s_mode=False, flow_injection=False))
    app = build_app(agent)  # type: ignore[arg-type]
    assert set(app[HOT_ROUTES]) == KEPT_ROUTES  # type: ignore[index]


def test_a_body_not_proven_clean_is_walked(served: Served) -> None:
    """A body whose text json_text_safe cannot clear (here "NaN" in a label
    value) is parsed with the JSON round-trip walk; a plain one without."""
    odd = {**POLICY, "metadata": {"name": "web", "labels": {"note": "NaN"}}}
    for obj in (odd, POLICY):
        body = json.dumps({"documents": [{"file": "a.yaml", "index": 0, "obj": obj}]}).encode()
        assert _answer(served.raw(_request("POST", "/v1/policies", body)))[0] == 200
    assert served.policies.checked == [False, True]
