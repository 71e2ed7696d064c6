"""Hubble's Observer gRPC API on a unix socket, through a client of the same generated stubs."""

from __future__ import annotations

import asyncio
import socket
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from axoneme.agent._flowstore import FlowStore
from axoneme.agent._hubble import (
    HubbleServer,
    default_socket_path,
    load_stubs,
    start_hubble,
    tls_listen,
)
from axoneme.core.errors import ConfigError
from axoneme.core.flow import DropReason, Flow, FlowEndpoint, FlowPolicy, FlowVerdict
from axoneme.testing.tlscerts import make_certs


def _flow(i: int, verdict: FlowVerdict = FlowVerdict.FORWARDED, **kw: Any) -> Flow:
    kw.setdefault("event_type", "drop" if verdict is FlowVerdict.DROPPED else "policy-verdict")
    kw.setdefault("l4", {"TCP": {"source_port": 40000 + i, "destination_port": 80}})
    return Flow(time=1_700_000_000.0 + i, verdict=verdict, ip_source="10.244.0.2",
                ip_destination="10.244.0.3",
                source=FlowEndpoint(300, "default", "client", ("k8s:app=client",), 1),
                destination=FlowEndpoint(400, "prod", "web", ("k8s:app=web",), 2),
                traffic_direction="INGRESS", node_name="node1", uuid=f"u{i}",
                drop_reason=DropReason.POLICY_DENIED if verdict is FlowVerdict.DROPPED else None,
                **kw)


def test_observer_api(tmp_path: Path) -> None:
    pb = load_stubs()
    store = FlowStore(capacity=100)
    denied = _flow(2, FlowVerdict.DROPPED, ingress_denied_by=(
        FlowPolicy("web", "prod", "CiliumNetworkPolicy", "spec.ingress", default_deny=True),))
    for f in (_flow(1), denied, _flow(3, type="L7", l7={
            "type": "REQUEST", "reason": "ours", "http": {"method": "GET", "url": "http://web/a",
                                                          "code": 0}})):
        store.add(f)
    sock = str(tmp_path / "hubble.sock")

    async def run() -> None:
        store.bind_loop(asyncio.get_running_loop())
        srv = HubbleServer(store, "node1", sock, "axoneme test")
        await srv.start()
        try:
            async with pb.grpc.aio.insecure_channel(f"unix://{sock}") as ch:
                stub = pb.observer_pb2_grpc.ObserverStub(ch)
                req = pb.observer_pb2.GetFlowsRequest
                got = [r async for r in stub.GetFlows(req(number=20))]
                # a policy drop is two events, as Cilium reports it: policy-verdict, drop
                pv_uuid = str(uuid.uuid5(uuid.NAMESPACE_OID, "u2"))
                assert [r.flow.uuid for r in got] == ["u1", pv_uuid, "u2", "u3"]
                verdict = got[1].flow
                assert verdict.event_type.type == 5 and verdict.verdict == pb.flow_pb2.DROPPED
                assert [p.name for p in verdict.ingress_denied_by] == ["web"]
                got.pop(1)
                drop = got[1].flow
                assert drop.verdict == pb.flow_pb2.DROPPED and got[1].node_name == "node1"
                assert drop.event_type.type == 1 and drop.event_type.sub_type == 133
                assert drop.drop_reason_desc == pb.flow_pb2.POLICY_DENIED
                assert [(p.name, p.namespace, p.kind) for p in drop.ingress_denied_by] == [
                    ("web", "prod", "CiliumNetworkPolicy")]
                assert "axoneme:default-deny=true" in drop.ingress_denied_by[0].labels
                assert got[2].flow.l7.http.method == "GET" and got[2].flow.Type == pb.flow_pb2.L7
                # filters: Hubble's FlowFilter, whitelist and blacklist
                ff = pb.flow_pb2.FlowFilter
                only_drops = req(number=20, whitelist=[ff(verdict=[pb.flow_pb2.DROPPED])])
                assert [r.flow.uuid async for r in stub.GetFlows(only_drops)] == [pv_uuid, "u2"]
                no_l7 = req(number=20, blacklist=[ff(event_type=[pb.flow_pb2.EventTypeFilter(
                    type=129)])])
                assert [r.flow.uuid async for r in stub.GetFlows(no_l7)] == ["u1", pv_uuid, "u2"]
                first = req(number=1, first=True)
                assert [r.flow.uuid async for r in stub.GetFlows(first)] == ["u1"]
                since = req()
                since.since.FromNanoseconds(int(1_700_000_002.0 * 1e9))
                assert [r.flow.uuid async for r in stub.GetFlows(since)] == [pv_uuid, "u2", "u3"]
                last2 = req(number=2)
                assert [r.flow.uuid async for r in stub.GetFlows(last2)] == ["u2", "u3"]
                bad = req(whitelist=[ff(source_service=["prod/web"])])
                with pytest.raises(pb.grpc.aio.AioRpcError) as e:
                    [r async for r in stub.GetFlows(bad)]
                assert e.value.code() == pb.grpc.StatusCode.INVALID_ARGUMENT
                # follow: a flow added after the call arrives on the stream
                call = stub.GetFlows(req(follow=True, whitelist=[ff(destination_port=["8080"])]))
                await asyncio.sleep(0.3)
                store.add(_flow(9, l4={"TCP": {"source_port": 1, "destination_port": 8080}}))
                msg = await asyncio.wait_for(call.read(), 5)
                assert msg.flow.uuid == "u9"
                call.cancel()
                status = await stub.ServerStatus(pb.observer_pb2.ServerStatusRequest())
                assert (status.num_flows, status.max_flows, status.seen_flows) == (4, 100, 4)
                assert status.version == "axoneme test"
                nodes = await stub.GetNodes(pb.observer_pb2.GetNodesRequest())
                assert [n.name for n in nodes.nodes] == ["node1"]
                assert nodes.nodes[0].state == pb.relay_pb2.NODE_CONNECTED
                ns = await stub.GetNamespaces(pb.observer_pb2.GetNamespacesRequest())
                assert [n.namespace for n in ns.namespaces] == ["default", "prod"]
        finally:
            await srv.stop()
        assert not Path(sock).exists()

    asyncio.run(run())


def test_socket_path_defaults_and_off(tmp_path: Path) -> None:
    assert default_socket_path("/var/run/axoneme/axoneme.sock") == "/var/run/axoneme/hubble.sock"

    async def run() -> None:
        store = FlowStore()
        off = SimpleNamespace(hubble_socket_path="", api_socket=str(tmp_path / "a.sock"))
        assert await start_hubble(store, off, "n") is None
        on = SimpleNamespace(hubble_socket_path=None, api_socket=str(tmp_path / "a.sock"))
        srv = await start_hubble(store, on, "n")
        assert srv is not None and srv.path == str(tmp_path / "hubble.sock")
        assert (Path(srv.path).stat().st_mode & 0o777) == 0o600
        await srv.stop()
        bad = SimpleNamespace(hubble_socket_path="/proc/nope/hubble.sock", api_socket="x")
        with pytest.raises(ConfigError):
            await start_hubble(store, bad, "n")

    asyncio.run(run())


def test_flow_json_is_hubbles_protojson() -> None:
    """Every field of our JSON is Hubble's (a strict protojson reader takes it), our
    own extras aside (l7.reason)."""
    pb = load_stubs()
    pol = FlowPolicy("web", "prod", "NetworkPolicy", "spec.ingress[0]")
    flows = [
        _flow(1, is_reply=False, match_type="L3_L4", trace_observation_point="TO_ENDPOINT",
              interface=(4, "lxc1"), ingress_allowed_by=(pol,), destination_names=("a.b",)),
        _flow(2, FlowVerdict.DROPPED, ingress_denied_by=(pol,), ethernet=("a", "b")),
        _flow(3, type="L7", is_reply=True, l7={"type": "RESPONSE", "latency_ns": 5, "http": {
            "code": 200, "method": "GET", "url": "http://web/", "protocol": "HTTP/1.1"}}),
        _flow(4, type="L7", l4={"UDP": {"source_port": 5, "destination_port": 53}}, l7={
            "type": "REQUEST", "dns": {"query": "a.example.", "qtypes": ["A"], "rcode": 0,
                                       "observation_source": "proxy"}}),
    ]
    for f in flows:
        msg = pb.json_format.ParseDict(f.to_json(), pb.flow_pb2.Flow())
        assert msg.uuid == f.uuid and msg.node_name == "node1"
    assert msg.l7.dns.query == "a.example." and msg.event_type.type == 129


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tls_listener(tmp_path: Path) -> None:
    """--hubble-listen-address: TLS with the given certificate; with client CAs, mTLS."""
    certs = make_certs(tmp_path / "certs")
    port = _free_port()
    conf = SimpleNamespace(hubble_listen_address=f"127.0.0.1:{port}",
                           hubble_tls_cert_file=str(certs.server_cert),
                           hubble_tls_key_file=str(certs.server_key),
                           hubble_tls_client_ca_files=[str(certs.ca)],
                           hubble_socket_path="", api_socket=str(tmp_path / "a.sock"))
    pb = load_stubs()
    store = FlowStore()
    store.add(_flow(1))

    async def status(**creds: bytes) -> Any:
        cred = pb.grpc.ssl_channel_credentials(root_certificates=certs.ca.read_bytes(), **creds)
        opts = [("grpc.ssl_target_name_override", certs.server_name)]
        async with pb.grpc.aio.secure_channel(f"127.0.0.1:{port}", cred, options=opts) as ch:
            stub = pb.observer_pb2_grpc.ObserverStub(ch)
            return await stub.ServerStatus(pb.observer_pb2.ServerStatusRequest(), timeout=5)

    async def run() -> None:
        srv = await start_hubble(store, conf, "n")
        assert srv is not None and srv.path == "" and srv.tls_port == port
        try:
            got = await status(private_key=certs.client_key.read_bytes(),
                               certificate_chain=certs.client_cert.read_bytes())
            assert got.num_flows == 1
            with pytest.raises(pb.grpc.aio.AioRpcError):  # no client certificate: refused
                await status()
        finally:
            await srv.stop()

    asyncio.run(run())
    for bad in ({"hubble_tls_cert_file": None}, {"hubble_listen_address": "nohost"},
                {"hubble_listen_address": "::1:4244"}, {"hubble_listen_address": None},
                {"hubble_tls_key_file": str(tmp_path / "missing.pem")},
                {"hubble_tls_client_ca_files": [str(certs.server_key.parent / "ca.srl")]}):
        with pytest.raises(ConfigError):
            tls_listen(SimpleNamespace(**{**vars(conf), **bad}))
