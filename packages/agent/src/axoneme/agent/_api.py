"""The agent's REST/JSON API (aiohttp on a unix socket; the policy changes are also served by the lean front in ``_apifast``, with the same handlers)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket as _socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from axoneme.agent import _audit as audit
from axoneme.agent import _gcpause
from axoneme.agent._agent import Agent
from axoneme.agent._apifast import CheckedJSON, HotHandler
from axoneme.agent._errors import BadRequest, Conflict, NotFound, StateWriteError, TryAgain
from axoneme.agent._flowstore import FlowFilter, flow_from_json
from axoneme.core import failpoints
from axoneme.core.errors import AxonemeError, ConfigError, InvalidRule, PolicyError
from axoneme.core.flow import Flow
from axoneme.core.policy.api import PolicyKind, PolicyRef

LOG = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HOT_ROUTES = web.AppKey("axoneme_hot_routes", dict)  # (method, path) -> _apifast.HotHandler
MAX_BODY = 64 * 1024 * 1024  # a 100k-peer policy is ~3 MB of JSON


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def error_reply(e: BaseException, method: str, path: str) -> tuple[int, Any]:
    """(status, JSON body) of a request that raised ``e``: the API's one error
    mapping (the aiohttp middleware and the hot routes' front, ``_apifast``)."""
    if isinstance(e, InvalidRule):
        return 400, {"error": str(e), "problems": [str(p) for p in e.problems]}
    if isinstance(e, NotFound):
        return 404, {"error": str(e)}
    if isinstance(e, Conflict):
        return 409, {"error": str(e)}
    if isinstance(e, BadRequest | PolicyError | ConfigError):
        return 400, {"error": str(e)}
    if isinstance(e, TryAgain):
        return 503, {"error": str(e)}
    if isinstance(e, StateWriteError):  # nothing changed; worth retrying
        LOG.warning("%s %s refused: %s", method, path, e)
        return 503, {"error": f"{e}; nothing was changed"}
    if isinstance(e, AxonemeError):
        LOG.warning("%s %s failed: %s", method, path, e)
        return 500, {"error": str(e)}
    if isinstance(e, json.JSONDecodeError | ValueError | KeyError | TypeError | RecursionError):
        return 400, {"error": f"bad request: {e}"}
    # a bug, but the API keeps serving
    LOG.error("%s %s crashed", method, path, exc_info=e)
    return 500, {"error": f"internal error: {e}"}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as e:
        return _json(*reversed(error_reply(e, request.method, request.path)))


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    data = await request.json()
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def _ref(d: dict[str, Any]) -> PolicyRef:
    kind = PolicyKind(d["kind"])
    namespace = str(d.get("namespace") or "") if kind.namespaced else ""
    return PolicyRef(kind, namespace, str(d["name"]))


def build_app(agent: Agent) -> web.Application:
    views, endpoints, policies = agent.views, agent.endpoints, agent.policies
    namespaces, pods = agent.namespaces, agent.pods
    adopted = agent.adopted

    @web.middleware
    async def adoption_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
        # a restart adopting the kernel's state rebuilds the policy state in the
        # background (_checkpoint): everything but the health check waits for it
        if not adopted.is_set() and request.path != "/v1/healthz":
            await adopted.wait()
        return await handler(request)

    app = web.Application(middlewares=[errors_middleware, adoption_gate],
                          client_max_size=MAX_BODY)
    r = app.router

    async def healthz(request: web.Request) -> web.Response:
        return _json({"ok": True} if adopted.is_set() else {"ok": True, "adopting": True})

    async def status(request: web.Request) -> web.Response:
        return _json(await asyncio.to_thread(views.status))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=await asyncio.to_thread(agent.metrics.render),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # CNI
    async def cni_add(request: web.Request) -> web.Response:
        return _json(await endpoints.cni_add(await _body(request)))

    async def cni_del(request: web.Request) -> web.Response:
        return _json(await endpoints.cni_del(await _body(request)))

    async def cni_check(request: web.Request) -> web.Response:
        return _json(await endpoints.cni_check(await _body(request)))

    async def cni_gc(request: web.Request) -> web.Response:
        return _json(await endpoints.cni_gc(await _body(request)))

    # namespaces
    async def ns_list(request: web.Request) -> web.Response:
        return _json(namespaces.listing())

    async def ns_create(request: web.Request) -> web.Response:
        body = await _body(request)
        return _json(await namespaces.create(str(body.get("name", "")),
                                                  body.get("labels") or {}), 201)

    async def ns_label(request: web.Request) -> web.Response:
        body = await _body(request)
        return _json(await namespaces.label(request.match_info["name"],
                                            body.get("labels") or {},
                                            body.get("remove") or []))

    async def ns_delete(request: web.Request) -> web.Response:
        await namespaces.delete(request.match_info["name"])
        return _json({"deleted": request.match_info["name"]})

    # policies
    async def pol_list(request: web.Request) -> web.Response:
        documents = request.query.get("documents") in ("1", "true", "yes")
        return _json({"revision": policies.revision, "policies": policies.listing(documents)})

    def k8s_policies_only() -> None:
        if agent.config.k8s_mode:
            raise Conflict("the agent runs in Kubernetes mode: its policies come from the API "
                           "server; use kubectl apply/delete (NetworkPolicy, "
                           "CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy)")

    # the policy changes: also served by the hot routes' front (_apifast), same handlers
    async def apply_hot(read: Callable[[], Awaitable[dict[str, Any]]]) -> tuple[int, Any]:
        k8s_policies_only()
        if not adopted.is_set():  # the front (_apifast) skips the middlewares
            await adopted.wait()
        body = await read()
        return 200, await policies.apply(body.get("documents") or [],
                                         json_checked=type(body) is CheckedJSON)

    async def delete_hot(read: Callable[[], Awaitable[dict[str, Any]]]) -> tuple[int, Any]:
        k8s_policies_only()
        if not adopted.is_set():
            await adopted.wait()
        refs = [_ref(d) for d in (await read()).get("refs") or []]
        if not refs:
            raise BadRequest("no policy given")
        return 200, await policies.delete(refs)

    def routed(hot: HotHandler) -> Handler:
        async def route(request: web.Request) -> web.Response:
            status, value = await hot(lambda: _body(request))
            return _json(value, status)
        return route

    pol_apply, pol_delete = routed(apply_hot), routed(delete_hot)
    app[HOT_ROUTES] = {("POST", "/v1/policies"): apply_hot,
                       ("POST", "/v1/policies/delete"): delete_hot}

    async def pol_promote(request: web.Request) -> web.Response:
        k8s_policies_only()  # in Kubernetes: kubectl annotate ... policy.axoneme.io/mode-
        refs = [_ref(d) for d in (await _body(request)).get("refs") or []]
        if not refs:
            raise BadRequest("no policy given")
        return _json(await audit.promote(policies, refs))

    # pods
    async def pod_list(request: web.Request) -> web.Response:
        return _json(pods.listing(request.query.get("namespace")))

    async def pod_run(request: web.Request) -> web.Response:
        return _json(await pods.run(await _body(request)), 201)

    async def pod_get(request: web.Request) -> web.Response:
        rec = pods.get(request.match_info["ns"], request.match_info["name"])
        return _json(pods.view(rec))

    async def pod_delete(request: web.Request) -> web.Response:
        return _json(await pods.delete(request.match_info["ns"], request.match_info["name"]))

    async def pod_logs(request: web.Request) -> web.Response:
        rec = pods.get(request.match_info["ns"], request.match_info["name"])
        try:
            with open(rec.log, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        return web.Response(body=data, content_type="text/plain")

    # endpoints, identities
    async def ep_list(request: web.Request) -> web.Response:
        return _json(views.endpoint_list())

    def endpoint_id(request: web.Request) -> int:
        try:
            return int(request.match_info["id"])
        except ValueError:
            raise BadRequest(f"invalid endpoint id {request.match_info['id']!r}") from None

    async def ep_get(request: web.Request) -> web.StreamResponse:
        # the same JSON as _json(views.endpoint_get(...)), serialized a batch of
        # entries at a time and sent in chunks (a 100k-peer policy's answer is
        # ~100 MB: no list of entry dicts, no one string; issue 17, RSS)
        chunks = await asyncio.to_thread(views.endpoint_get_json, endpoint_id(request))
        resp = web.StreamResponse(headers={"Content-Type": "application/json; charset=utf-8"})
        resp.content_length = size = sum(map(len, chunks))
        await resp.prepare(request)
        chunks.reverse()
        while chunks:
            await resp.write(chunks.pop())
        await resp.write_eof()
        if size >= _gcpause.TRIM_VIEW_BYTES:  # what it freed goes back to the OS
            await asyncio.to_thread(_gcpause.trim_heap)
        return resp

    async def ep_config_get(request: web.Request) -> web.Response:
        return _json(audit.endpoint_config_view(agent, endpoint_id(request)))

    async def ep_config_set(request: web.Request) -> web.Response:
        return _json(await audit.endpoint_config(agent, endpoint_id(request), await _body(request)))

    async def id_list(request: web.Request) -> web.Response:
        return _json(views.identity_list())

    # flows
    async def flows_get(request: web.Request) -> web.StreamResponse:
        q = request.query
        flt = FlowFilter.from_query(q, q.getall("label", []))
        fmt = q.get("format", "json")
        last, first = q.get("last"), q.get("first")
        follow = q.get("follow") in ("1", "true", "yes")
        n = int(first or last) if (first or last) else None
        if n is None and flt.since is None and flt.until is None:
            n = 0 if follow else 20  # Hubble: the last 20 unless a time range says which
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        if follow:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        node = _socket.gethostname()

        def line(flow: Flow) -> bytes:
            if fmt == "compact":
                return (flow.compact() + "\n").encode()
            d = flow.to_json()
            if fmt == "jsonpb":
                d = {"flow": d, "node_name": node, "time": d["time"]}
            return (json.dumps(d, default=str) + "\n").encode()

        queue = agent.flows.subscribe() if follow else None
        try:
            for flow in agent.flows.last(n, flt, first=bool(first)):
                await resp.write(line(flow))
            if queue is not None:
                while True:
                    flow_or_none = await queue.get()
                    if flow_or_none is None:
                        break
                    if flt.matches(flow_or_none):
                        await resp.write(line(flow_or_none))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            if queue is not None:
                agent.flows.unsubscribe(queue)
        try:
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass
        return resp

    async def flows_post(request: web.Request) -> web.Response:
        data = await request.json()
        items = data if isinstance(data, list) else data.get("flows", [data])
        added = 0
        for item in items:
            agent.flows.add(flow_from_json(item))
            added += 1
        return _json({"added": added})

    r.add_get("/v1/healthz", healthz)
    r.add_get("/v1/status", status)
    r.add_get("/metrics", metrics)
    r.add_post("/v1/cni/add", cni_add)
    r.add_post("/v1/cni/del", cni_del)
    r.add_post("/v1/cni/check", cni_check)
    r.add_post("/v1/cni/gc", cni_gc)
    r.add_get("/v1/namespaces", ns_list)
    r.add_post("/v1/namespaces", ns_create)
    r.add_post("/v1/namespaces/{name}/labels", ns_label)
    r.add_delete("/v1/namespaces/{name}", ns_delete)
    r.add_get("/v1/policies", pol_list)
    r.add_post("/v1/policies", pol_apply)
    r.add_post("/v1/policies/delete", pol_delete)
    r.add_post("/v1/policies/promote", pol_promote)
    r.add_get("/v1/pods", pod_list)
    r.add_post("/v1/pods", pod_run)
    r.add_get("/v1/pods/{ns}/{name}", pod_get)
    r.add_delete("/v1/pods/{ns}/{name}", pod_delete)
    r.add_get("/v1/pods/{ns}/{name}/logs", pod_logs)
    r.add_get("/v1/endpoints", ep_list)
    r.add_get("/v1/endpoints/{id}", ep_get)
    r.add_get("/v1/endpoints/{id}/config", ep_config_get)
    r.add_post("/v1/endpoints/{id}/config", ep_config_set)
    r.add_get("/v1/identities", id_list)
    r.add_get("/v1/flows", flows_get)
    if agent.config.flow_injection:
        r.add_post("/v1/flows", flows_post)
    if failpoints.enabled():
        # fault tests only: the process was started with AXONEME_FAILPOINTS
        async def failpoints_get(request: web.Request) -> web.Response:
            return _json(failpoints.armed())

        async def failpoints_put(request: web.Request) -> web.Response:
            body = await _body(request)
            try:
                failpoints.set_failpoint(str(body.get("name", "")), str(body.get("action", "")))
            except failpoints.FailpointError as e:
                raise BadRequest(str(e)) from e
            LOG.warning("failpoint %s armed: %s", body.get("name"), body.get("action"))
            return _json(failpoints.armed())

        r.add_get("/v1/debug/failpoints", failpoints_get)
        r.add_put("/v1/debug/failpoints", failpoints_put)
    return app


def socket_in_use(path: str) -> bool:
    """Whether an agent already answers on ``path``."""
    if not os.path.exists(path):
        return False
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()
