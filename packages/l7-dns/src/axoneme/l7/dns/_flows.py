"""The DNS proxy's L7 flows: one per query (REQUEST) and per answer (RESPONSE),
shaped as Hubble shows DNS proxy flows (``l7.dns``, the summary line)."""

from __future__ import annotations

import logging
import time
from typing import Any

from axoneme.core.flow import Flow, FlowEndpoint, FlowVerdict
from axoneme.core.l7proxy import Addr
from axoneme.core.mapstate import Direction
from axoneme.l7.dns._proxyconfig import EndpointFor
from axoneme.l7.dns._wire import DnsAnswer, DnsQuery

LOG = logging.getLogger(__name__)


def _endpoint(endpoint_for: EndpointFor | None, ip: str) -> FlowEndpoint:
    if endpoint_for is not None:
        try:
            ep = endpoint_for(ip)
            if ep is not None:
                return ep
        except Exception:
            LOG.exception("dns proxy: endpoint_for(%s) failed", ip)
    return FlowEndpoint()


def dns_flow(verdict: FlowVerdict, kind: str, query: DnsQuery, client: Addr, server: Addr,
             proto: str, eps: tuple[FlowEndpoint, FlowEndpoint] | None, *,
             direction: Direction, endpoint_for: EndpointFor | None, rcode: int = 0,
             answer: DnsAnswer | None = None, latency_ns: int = 0, reason: str = "") -> Flow:
    """The flow of ``kind`` (REQUEST or RESPONSE); ``eps`` (client's, server's)
    when the policy named them, else ``endpoint_for`` of each address."""
    dns: dict[str, Any] = {
        "query": query.qname,
        "rcode": rcode,
        "qtypes": [query.qtype],
        "observation_source": "proxy",
    }
    if answer is not None:
        dns.update(ips=list(answer.ips), ttl=answer.ttl, cnames=list(answer.cnames),
                   rrtypes=list(answer.rrtypes))
    reply = kind == "RESPONSE"
    if reply and answer is not None:
        shown = ",".join(answer.ips) if answer.ips else f"RCode: {rcode}"
        summary = (f'DNS Answer "{shown}" TTL: {answer.ttl} '
                   f"(Proxy {query.qname} {query.qtype})")
    elif reply:
        summary = f"DNS Answer RCode: {rcode} (Proxy {query.qname} {query.qtype})"
    else:
        summary = f"DNS Query {query.qname} {query.qtype}"
    l7: dict[str, Any] = {"type": kind, "latency_ns": latency_ns, "dns": dns}
    if reason:
        l7["reason"] = reason
    src, dst = (server, client) if reply else (client, server)
    if eps is not None:
        src_ep, dst_ep = (eps[1], eps[0]) if reply else eps
    else:
        src_ep, dst_ep = _endpoint(endpoint_for, src[0]), _endpoint(endpoint_for, dst[0])
    version = "IPv6" if ":" in client[0] else "IPv4"
    return Flow(
        time=time.time(), verdict=verdict, ip_source=src[0], ip_destination=dst[0],
        source=src_ep, destination=dst_ep,
        traffic_direction=direction.name, type="L7", event_type="l7",
        l4={proto: {"source_port": src[1], "destination_port": dst[1]}},
        l7=l7, is_reply=reply, ip_version=version, summary=summary)
