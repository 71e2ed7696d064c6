"""The L7 flow records of the HTTP proxy (Hubble's ``l7.http``): one per
request, one per response."""

from __future__ import annotations

import time
from typing import Any, Protocol

from axoneme.core.flow import Flow, FlowEndpoint, FlowVerdict
from axoneme.core.l7proxy import ProxyPolicy
from axoneme.l7.http._wire import RequestHead

REDACTED = {"authorization", "proxy-authorization", "cookie", "set-cookie"}


def _l4(sport: int, dport: int) -> dict[str, Any]:
    return {"TCP": {"source_port": sport, "destination_port": dport}}


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
    src_ep = pol.source if pol else FlowEndpoint()
    dst_ep = pol.destination if pol else FlowEndpoint()
    url = f"http://{req.host}{req.path}"
    http: dict[str, Any] = {"code": code, "method": req.method, "url": url,
                            "protocol": req.version}
    if not reply:
        http["headers"] = [{"key": n, "value": "HUBBLE_REDACTED" if n.lower() in REDACTED else v}
                           for n, v in req.headers]
        summary = f"{req.version} {req.method} {url}"
    else:
        summary = f"{req.version} {code} {latency_ns // 1_000_000}ms ({req.method} {url})"
    l7 = {"type": "RESPONSE" if reply else "REQUEST", "latency_ns": latency_ns, "http": http}
    (sip, sport), (dip, dport) = client, dst
    ipv = "IPv6" if ":" in sip else "IPv4"
    now = time.time() if when is None else when
    if reply:
        return Flow(now, verdict, dip, sip, dst_ep, src_ep, direction,
                    type="L7", event_type="l7", l4=_l4(dport, sport), l7=l7, is_reply=True,
                    summary=summary, ip_version=ipv)
    return Flow(now, verdict, sip, dip, src_ep, dst_ep, direction,
                type="L7", event_type="l7", l4=_l4(sport, dport), l7=l7, is_reply=False,
                summary=summary, ip_version=ipv)


__all__ = ["http_flow", "REDACTED", "RequestFields"]
