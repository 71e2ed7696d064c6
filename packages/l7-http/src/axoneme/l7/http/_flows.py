"""The L7 flow records of the HTTP proxy (Hubble's ``l7.http``): one per
request, one per response."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any, Protocol

from axoneme.core.flow import Flow, FlowEndpoint, FlowVerdict, new_flow
from axoneme.core.l7proxy import ProxyPolicy
from axoneme.l7.http._wire import RequestHead

REDACTED = {"authorization", "proxy-authorization", "cookie", "set-cookie"}
_NO_ENDPOINT = FlowEndpoint()


class RequestFields(Protocol):
    """What a flow record reads of a request (a RequestHead, or the native engine's record)."""

    method: str
    host: str
    path: str
    version: str
    headers: list[tuple[str, str]]


def http_flow(req: RequestHead | RequestFields, pol: ProxyPolicy | None, verdict: FlowVerdict,
              client: tuple[str, int], dst: tuple[str, int], direction: str, reply: bool,
              code: int = 0, latency_ns: int = 0, when: float | None = None) -> Flow:
    """The record of ``req`` (``reply``: of its response, status ``code``);
    ``when``: the time it was observed (default now)."""
    return http_flow_of(req.method, req.host, req.path, req.version, req.headers, pol, verdict,
                        client[0], client[1], dst[0], dst[1], direction, reply, code, latency_ns,
                        time.time() if when is None else when)


def http_flow_of(method: str, host: str, path: str, version: str,
                 headers: Iterable[tuple[str, str]], pol: ProxyPolicy | None,
                 verdict: FlowVerdict, sip: str, sport: int, dip: str, dport: int,
                 direction: str, reply: bool, code: int, latency_ns: int, when: float) -> Flow:
    """``http_flow`` from the request's fields (the native engine's records
    come as fields): one call and one ``new_flow`` per record, as the agent's
    proxy thread builds two of these per proxied request."""
    if pol is not None:
        src_ep, dst_ep = pol.source, pol.destination
    else:
        src_ep = dst_ep = _NO_ENDPOINT
    url = f"http://{host}{path}"
    http: dict[str, Any] = {"code": code, "method": method, "url": url, "protocol": version}
    l7 = {"type": "RESPONSE" if reply else "REQUEST", "latency_ns": latency_ns, "http": http}
    ipv = "IPv6" if ":" in sip else "IPv4"
    if reply:
        return new_flow(when, verdict, dip, sip, dst_ep, src_ep, direction, "L7", "l7", None,
                        {"TCP": {"source_port": dport, "destination_port": sport}}, l7, True, ipv,
                        "", f"{version} {code} {latency_ns // 1_000_000}ms ({method} {url})")
    http["headers"] = [{"key": n, "value": "HUBBLE_REDACTED" if n.lower() in REDACTED else v}
                       for n, v in headers]
    return new_flow(when, verdict, sip, dip, src_ep, dst_ep, direction, "L7", "l7", None,
                    {"TCP": {"source_port": sport, "destination_port": dport}}, l7, False, ipv,
                    "", f"{version} {method} {url}")


__all__ = ["http_flow", "http_flow_of", "REDACTED", "RequestFields"]
