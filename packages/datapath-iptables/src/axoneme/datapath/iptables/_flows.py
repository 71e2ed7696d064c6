"""NFLOG verdicts of the iptables datapath as flows.

Each verdict chain logs with a prefix ``AXON:<kind>:<I|E>`` (see
``_render``); the packet's addresses are looked up in the ipcache and the
endpoints, and the key that decided in the endpoint's MapState (Hubble's
policy_match_type).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from axoneme.core.endpoint import HOST_ENDPOINT_ID
from axoneme.core.flow import DropReason, Flow, FlowEndpoint, FlowVerdict
from axoneme.core.identity import ReservedIdentity
from axoneme.core.mapstate import Direction, Protocol
from axoneme.datapath.iptables import _render as rd
from axoneme.datapath.iptables._ipsets import _IPSets
from axoneme.datapath.iptables._nflog import decode_l4

LOG = logging.getLogger(__name__)


class _Flows(_IPSets):
    """``events()`` and ``flow_from_log``: the NFLOG group read as flows."""

    def _flow_endpoint(self, ip: str) -> FlowEndpoint:
        ident = self._identity_of(ip)
        for ep_id, ref in self._refs.items():
            if ip in (ref.ipv4, ref.ipv6):
                ep = self._endpoints.get(ep_id)
                if ep is None:
                    return FlowEndpoint(identity=ident, id=ep_id)
                return FlowEndpoint(identity=ep.identity or ident, namespace=ep.namespace,
                                    pod_name=ep.pod_name,
                                    labels=tuple(ep.labels.sorted_strings()), id=ep_id)
        if ident == int(ReservedIdentity.HOST) and HOST_ENDPOINT_ID in self._refs:
            # the node's own address: the host endpoint (host firewall) decided
            return FlowEndpoint(identity=ident, id=HOST_ENDPOINT_ID)
        return FlowEndpoint(identity=ident)

    def flow_from_log(self, prefix: str, ts: float, payload: bytes) -> Flow | None:
        parts = prefix.split(":")
        if len(parts) < 3 or parts[0] != "AXON":
            return None
        kind, direction = parts[1], parts[2]
        ipv, src, dst, l4 = decode_l4(payload)
        if not src:
            return None
        verdict, reason, event_type = {
            rd.LOG_ALLOW: (FlowVerdict.FORWARDED, None, "policy-verdict"),
            rd.LOG_AUDIT: (FlowVerdict.AUDIT, None, "policy-verdict"),
            rd.LOG_REDIRECT: (FlowVerdict.REDIRECTED, None, "policy-verdict"),
            rd.LOG_DENY: (FlowVerdict.DROPPED, DropReason.POLICY_DENY, "drop"),
            rd.LOG_DROP: (FlowVerdict.DROPPED, DropReason.POLICY_DENIED, "drop"),
            rd.LOG_NOT_READY: (FlowVerdict.DROPPED, DropReason.DROP_EP_NOT_READY, "drop"),
            rd.LOG_UNKNOWN: (FlowVerdict.DROPPED, DropReason.NO_MATCHING_LOCAL_CONTAINER_FOUND,
                             "drop"),
        }.get(kind, (None, None, ""))
        if verdict is None:
            return None
        ingress = direction == "I"
        with self._lock:
            source, destination = self._flow_endpoint(src), self._flow_endpoint(dst)
            local, peer = (destination, source) if ingress else (source, destination)
            match = self._match_type(local.id, peer.identity, ingress, l4, src if ingress else dst)
        return Flow(time=ts, verdict=verdict, ip_source=src, ip_destination=dst,
                    source=source, destination=destination,
                    traffic_direction="INGRESS" if ingress else "EGRESS",
                    event_type=event_type, drop_reason=reason, l4=l4, is_reply=False,
                    ip_version=ipv, match_type=match)

    def _match_type(self, ep_id: int, peer: int, ingress: bool, l4: Mapping[str, Any],
                    address: str | None = None) -> str:
        """Hubble's policy_match_type of the key that decided (from our MapState)."""
        state = self._states.get(ep_id)
        if not ep_id or state is None or not l4:
            return ""
        name, info = next(iter(l4.items()))
        proto = {"TCP": Protocol.TCP, "UDP": Protocol.UDP, "SCTP": Protocol.SCTP,
                 "ICMPv4": Protocol.ICMP, "ICMPv6": Protocol.ICMPV6}.get(name)
        if proto is None:
            return ""
        port = info.get("type", 0) if proto in (Protocol.ICMP, Protocol.ICMPV6) else info.get(
            "destination_port", 0)
        key = state.lookup(peer, Direction.INGRESS if ingress else Direction.EGRESS, proto,
                           int(port), address).key
        if key is None:
            return ""
        l3 = key.identity != 0
        if key.protocol is Protocol.ANY:
            return "L3_ONLY" if l3 else "ALL"
        return "L3_L4" if l3 else "L4_ONLY"

    def events(self) -> Iterator[Flow]:
        while not self._stopped.is_set():
            sock = self._nflog
            if sock is None:
                if self._stopped.wait(0.5):
                    return
                continue
            try:
                packets = sock.read(0.5)
            except (OSError, ValueError):
                if self._stopped.is_set():
                    return
                LOG.debug("nflog read failed", exc_info=True)
                time.sleep(0.1)
                continue
            for pkt in packets:
                flow = self.flow_from_log(pkt.prefix, pkt.time, pkt.payload)
                if flow is not None:
                    self._counters["events"] += 1
                    yield flow
