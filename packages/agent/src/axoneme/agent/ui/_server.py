"""``axoneme ui``'s HTTP server: the bundled front-end plus a small JSON API.

A process of its own (aiohttp) that is a client of the agent's API socket, as
every other command is. What it computes is the CLI's: the what-if delta is
``policy diff``'s (``axoneme.core.policy.diff`` with the agent's pods,
policies and flows, read as ``policy diff --against live`` reads them), the
recommendations are ``policy recommend``'s, validation is the core parser's.

Read-only unless started with ``--allow-apply``. The API refuses requests from
another origin (a web page elsewhere cannot drive it) and POSTs that are not
JSON (no form can post them without a CORS preflight, which is never granted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from aiohttp import web
from axoneme.agent.cli._whatif import _live_pod_labels, live_cluster, live_policies
from axoneme.agent.ui import STATIC_DIR
from axoneme.agent.ui._model import check_text, edge_flows, service_map
from axoneme.core.apiclient import AgentBadRequest, AgentClient, AgentUnreachable
from axoneme.core.errors import AxonemeError, PolicyError
from axoneme.core.policy.diff import compose, diff
from axoneme.core.policy.engine import EngineOptions
from axoneme.core.policy.observed import observe
from axoneme.core.policy.recommend import CNP, NP, recommend

LOG = logging.getLogger(__name__)

# flows read from the agent per request (its ring holds a few thousand)
MAX_FLOWS = 20_000
DEFAULT_WINDOW = 900.0  # seconds of flows the map, the delta and the recommendations use
MAX_BODY = 4 << 20

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class UIError(Exception):
    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


class UIServer:
    """The web UI of one agent (its API socket)."""

    def __init__(self, socket_path: str | None, allow_apply: bool = False,
                 static_dir: Path = STATIC_DIR) -> None:
        self.client = AgentClient(socket_path, timeout=60.0)
        self.socket_path = self.client.socket_path
        self.allow_apply = allow_apply
        self.static_dir = static_dir

    # -- agent reads (blocking; run in a thread) ----------------------------------------

    def _args(self) -> argparse.Namespace:
        """What ``policy diff``'s live readers take: the socket."""
        return argparse.Namespace(api_socket_sub=self.socket_path)

    def _flows(self, window: float) -> list[dict[str, Any]]:
        since = time.time() - window
        raw = self.client.get("/v1/flows", last=MAX_FLOWS, since=f"{since:.6f}")
        # NDJSON: text, or one decoded object when it is a single line
        if isinstance(raw, str):
            return [json.loads(line) for line in raw.splitlines() if line.strip()]
        if isinstance(raw, Mapping):
            return [dict(raw)]
        return list(raw or [])

    def info(self) -> dict[str, Any]:
        status = self.client.get("/v1/status")
        return {"allow_apply": self.allow_apply, "socket": self.socket_path,
                "datapath": (status.get("datapath") or {}).get("name"),
                "policy_revision": status.get("policy_revision"),
                "endpoints": status.get("endpoints")}

    def map(self, window: float) -> dict[str, Any]:
        out = service_map(self.client.get("/v1/endpoints") or [],
                          self.client.get("/v1/identities") or [], self._flows(window))
        out["window"] = window
        return out

    def edge(self, source: str, target: str, window: float) -> dict[str, Any]:
        return {"source": source, "target": target,
                "flows": edge_flows(self._flows(window), source, target)}

    def policies(self) -> dict[str, Any]:
        res = self.client.get("/v1/policies", documents="1")
        items = []
        for view in res.get("policies") or []:
            doc = view.get("document")
            items.append({"kind": view.get("kind"), "namespace": view.get("namespace"),
                          "name": view.get("name"), "audit": bool(view.get("audit")),
                          "yaml": yaml.safe_dump(doc, sort_keys=False) if doc else ""})
        return {"policies": items}

    def validate(self, text: str) -> dict[str, Any]:
        return check_text(text).to_json()

    def whatif(self, text: str, window: float) -> dict[str, Any]:
        """``policy diff -f <editor> --since <window>`` against the live agent."""
        checked = check_text(text)
        if checked.problems:
            raise UIError(422, "the edited policy is invalid", problems=checked.problems)
        args = self._args()
        # the cluster and the cluster name its identities carry, as `policy diff --against live`
        cluster, cluster_name = live_cluster(args)
        in_force = live_policies(args)
        observed = observe(self._flows(window), time.time() - window)
        options = EngineOptions(cluster_name=cluster_name) if cluster_name else EngineOptions()
        result = diff(cluster, in_force, compose(in_force, checked.policies), options, observed)
        return result.to_json()

    def recommend(self, window: float, kind: str, namespaces: list[str] | None) -> dict[str, Any]:
        """``policy recommend --since <window>``: each policy a draft to edit."""
        if kind not in (NP, CNP):
            raise UIError(400, f"kind must be {NP} or {CNP}, got {kind!r}")
        rec = recommend(observe(self._flows(window), time.time() - window), kind, namespaces,
                        _live_pod_labels(self._args()))
        drafts = [{"kind": d.get("kind"), "namespace": d["metadata"].get("namespace", ""),
                   "name": d["metadata"].get("name"),
                   "yaml": yaml.safe_dump(d, sort_keys=False)} for d in rec.documents]
        return {"drafts": drafts, "notes": list(rec.notes), "connections": rec.connections}

    def apply(self, text: str) -> dict[str, Any]:
        if not self.allow_apply:
            raise UIError(403, "read-only: start the UI with `axoneme ui --allow-apply` to apply "
                               "policies")
        checked = check_text(text)
        if checked.problems:
            raise UIError(422, "the edited policy is invalid", problems=checked.problems)
        docs = [{"file": "ui", "index": i, "obj": obj} for i, obj in enumerate(checked.documents)]
        res = self.client.post("/v1/policies", {"documents": docs})
        return dict(res) if isinstance(res, Mapping) else {"result": res}

    # -- HTTP ----------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=MAX_BODY)
        r = app.router
        r.add_get("/api/info", self._wrap(lambda q, b: self.info()))
        r.add_get("/api/map", self._wrap(lambda q, b: self.map(_window(q))))
        r.add_get("/api/edge", self._wrap(
            lambda q, b: self.edge(_required(q, "source"), _required(q, "target"), _window(q))))
        r.add_get("/api/policies", self._wrap(lambda q, b: self.policies()))
        r.add_post("/api/validate", self._wrap(lambda q, b: self.validate(_text(b))))
        r.add_post("/api/whatif", self._wrap(lambda q, b: self.whatif(_text(b), _window(b))))
        r.add_get("/api/recommend", self._wrap(lambda q, b: self.recommend(
            _window(q), q.get("kind", NP), q.getall("namespace", []) or None)))
        r.add_post("/api/apply", self._wrap(lambda q, b: self.apply(_text(b))))
        r.add_get("/", self._index)
        if (self.static_dir / "assets").is_dir():
            r.add_static("/assets", self.static_dir / "assets")
        return app

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(self.static_dir / "index.html",
                                headers={"Cache-Control": "no-cache"})

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Same origin only: the Host is ours and an Origin, when sent, is that host."""
        if request.path.startswith("/api/"):
            origin = request.headers.get("Origin")
            if origin and urlsplit(origin).netloc != request.host:
                return _error(403, f"cross-origin request from {origin} refused")
            if request.method == "POST" and request.content_type != "application/json":
                return _error(415, "POST a JSON body (Content-Type: application/json)")
        return await handler(request)

    def _wrap(self, fn: Callable[[Any, Mapping[str, Any]], dict[str, Any]]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            body: Mapping[str, Any] = {}
            if request.method == "POST":
                try:
                    body = await request.json()
                except ValueError:
                    return _error(400, "the body is not JSON")
                if not isinstance(body, Mapping):
                    return _error(400, "the body must be a JSON object")
            try:
                return web.json_response(await asyncio.to_thread(fn, request.query, body))
            except UIError as e:
                return _error(e.status, str(e), **e.extra)
            except AgentUnreachable as e:
                return _error(502, str(e))
            except (AgentBadRequest, PolicyError) as e:
                return _error(422, str(e))
            except AxonemeError as e:
                return _error(502, str(e))
        return handler


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _required(q: Mapping[str, Any], key: str) -> str:
    value = q.get(key)
    if not value:
        raise UIError(400, f"missing parameter {key!r}")
    return str(value)


def _text(body: Mapping[str, Any]) -> str:
    text = body.get("yaml")
    if not isinstance(text, str):
        raise UIError(400, "expected {\"yaml\": TEXT}")
    return text


def _window(src: Mapping[str, Any]) -> float:
    raw = src.get("window", DEFAULT_WINDOW)
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise UIError(400, f"window must be seconds, got {raw!r}") from None
    if not 0 < value <= 7 * 86400:
        raise UIError(400, f"window must be between 0 and 604800 seconds, got {raw!r}")
    return value


async def serve(server: UIServer, host: str, port: int,
                started: Callable[[str, int], None]) -> None:
    """Serve until cancelled; ``started(host, port)`` once listening (port 0: the one bound)."""
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
        bound = port
        for sock in getattr(site._server, "sockets", None) or []:
            bound = sock.getsockname()[1]
            break
        started(host, bound)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


__all__ = ["DEFAULT_WINDOW", "STATIC_DIR", "UIServer", "serve"]
