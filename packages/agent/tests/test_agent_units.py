"""Agent building blocks without root: IPAM, state files, flow store, label/port parsing, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from axoneme.agent._errors import BadRequest
from axoneme.agent._flowstore import FlowFilter, FlowStore, flow_from_json
from axoneme.agent._ipam import IPAM, IPAMExhausted
from axoneme.agent._netlink import host_ifname
from axoneme.agent._records import parse_labels, parse_port
from axoneme.agent._statefile import StateCorrupt, read_json, write_json_atomic
from axoneme.core.errors import ConfigError
from axoneme.core.flow import DropReason, Flow, FlowEndpoint, FlowVerdict

# -- IPAM -------------------------------------------------------------------------------

def test_ipam_skips_network_gateway_and_broadcast() -> None:
    ipam = IPAM("10.244.9.0/29")
    got = [ipam.allocate(f"c{i}") for i in range(5)]
    assert got == [f"10.244.9.{i}" for i in range(2, 7)]
    assert ipam.gateway == "10.244.9.1"
    with pytest.raises(IPAMExhausted):
        ipam.allocate("one-too-many")


def test_ipam_never_duplicates_and_does_not_reuse_at_once() -> None:
    ipam = IPAM("10.244.0.0/16")
    a = ipam.allocate("a")
    b = ipam.allocate("b")
    assert a != b
    assert ipam.allocate("a") == a  # idempotent per owner
    assert ipam.release(a)
    c = ipam.allocate("c")
    assert c not in (a, b)
    assert not ipam.release("10.9.9.9")


def test_ipam_restores_persisted_allocations() -> None:
    first = IPAM("10.244.5.0/24")
    taken = {first.allocate(f"c{i}"): f"c{i}" for i in range(10)}
    second = IPAM("10.244.5.0/24", taken)
    new = second.allocate("fresh")
    assert new not in taken
    assert second.allocated() == {**taken, new: "fresh"}


def test_ipam_rejects_bad_cidr() -> None:
    with pytest.raises(ConfigError):
        IPAM("10.244.0.1/16")
    with pytest.raises(ConfigError):
        IPAM("10.244.0.0/30")


# -- state files -------------------------------------------------------------------------

def test_state_file_atomic_roundtrip(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    assert read_json(path) is None
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2, "b": [1, 2]})
    assert read_json(path) == {"a": 2, "b": [1, 2]}
    assert os.listdir(tmp_path) == ["state.json"]  # no temp file left behind
    assert os.stat(path).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("content", [b"{\"a\": ", b"\xff\xfe", b"[1, 2]", b""])
def test_corrupt_state_file_names_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with pytest.raises(StateCorrupt) as e:
        read_json(str(path))
    assert e.value.path == str(path)
    assert str(path) in str(e.value)
    assert path.read_bytes() == content


# -- flows -----------------------------------------------------------------------------------

def _flow(i: int, verdict: FlowVerdict = FlowVerdict.FORWARDED, port: int = 80,
          src: str = "a", dst: str = "b") -> Flow:
    return Flow(time=1_700_000_000.0 + i, verdict=verdict, ip_source="10.244.0.2",
                ip_destination="10.244.0.3",
                source=FlowEndpoint(300, "default", src, ("k8s:app=" + src,), 1),
                destination=FlowEndpoint(400, "prod", dst, ("k8s:app=" + dst,), 2),
                traffic_direction="INGRESS",
                drop_reason=DropReason.POLICY_DENIED if verdict is FlowVerdict.DROPPED else None,
                l4={"TCP": {"source_port": 40000 + i, "destination_port": port,
                            "flags": {"SYN": True}}})


def test_flow_store_is_a_bounded_ring() -> None:
    store = FlowStore(capacity=5)
    for i in range(12):
        store.add(_flow(i))
    assert len(store) == 5
    assert [f.time for f in store.last()] == [1_700_000_000.0 + i for i in range(7, 12)]
    assert [f.time for f in store.last(2)] == [1_700_000_010.0, 1_700_000_011.0]
    assert store.last(0) == []
    assert store.seen == 12


def test_flow_filters() -> None:
    store = FlowStore()
    store.add(_flow(1))
    store.add(_flow(2, FlowVerdict.DROPPED, port=443))
    store.add(_flow(3, src="c", dst="d"))
    assert len(store.last(None, FlowFilter(verdict="DROPPED"))) == 1
    assert len(store.last(None, FlowFilter(port=443))) == 1
    assert len(store.last(None, FlowFilter(from_pod="default/c"))) == 1
    assert len(store.last(None, FlowFilter(to_pod="prod/b"))) == 2
    assert len(store.last(None, FlowFilter(pod="prod/d"))) == 1
    assert len(store.last(None, FlowFilter(namespace="prod"))) == 3
    assert len(store.last(None, FlowFilter(labels=("app=c",)))) == 1
    assert len(store.last(None, FlowFilter(protocol="udp"))) == 0
    assert len(store.last(None, FlowFilter(protocol="tcp"))) == 3
    assert len(store.last(None, FlowFilter(type="drop"))) == 1
    assert len(store.last(None, FlowFilter(type="l7"))) == 0


def test_flow_json_roundtrip() -> None:
    for flow in (_flow(1), _flow(2, FlowVerdict.DROPPED)):
        again = flow_from_json(json.loads(json.dumps(flow.to_json())))
        assert again.to_json() == flow.to_json()
        assert again.compact() == flow.compact()


# -- parsing helpers / CLI ---------------------------------------------------------------------

def test_parse_labels_names_the_bad_label() -> None:
    assert parse_labels("a=1,b=2") == {"a": "1", "b": "2"}
    assert parse_labels(["a=1", "app.kubernetes.io/name=x"]) == {"a": "1",
                                                                 "app.kubernetes.io/name": "x"}
    for bad in ("novalue", "bad key=1", "a=b c", "-x=1"):
        with pytest.raises(BadRequest) as e:
            parse_labels(f"ok=1,{bad}")
        assert bad in str(e.value)


def test_parse_port() -> None:
    assert parse_port("http:80/TCP") == parse_port("http:80")
    assert parse_port("dns:53/udp").protocol == "UDP"
    assert parse_port("8080").port == 8080
    for bad in ("http:0", "http:x/TCP", "http:80/ICMP", "http:70000"):
        with pytest.raises(BadRequest):
            parse_port(bad)


def test_host_ifname_fits_ifnamsiz() -> None:
    names = {host_ifname(f"container-{i}") for i in range(100)}
    assert len(names) == 100
    assert all(n.startswith("lxc") and len(n) == 14 for n in names)


def test_pod_command_is_everything_after_double_dash() -> None:
    from axoneme.agent.cli import build_parser

    parser, _ = build_parser()
    args = parser.parse_args(["pod", "run", "web", "--labels", "id=a", "--port", "http:80/TCP",
                              "--", "python3", "-m", "http.server", "-n", "--labels"])
    assert args.command == ["python3", "-m", "http.server", "-n", "--labels"]
    assert args.labels == ["id=a"] and args.port == ["http:80/TCP"]
    args = parser.parse_args(["pod", "exec", "web", "-n", "prod", "--", "curl", "-s", "-m", "2"])
    assert args.command == ["curl", "-s", "-m", "2"] and args.namespace == "prod"


def test_cli_without_agent_exits_1_with_the_socket(tmp_path: Path) -> None:
    sock = tmp_path / "none.sock"
    axoneme = str(Path(sys.executable).parent / "axoneme")
    res = subprocess.run([axoneme, "--api-socket", str(sock), "pod", "list"], capture_output=True,
                         text=True)
    assert res.returncode == 1
    assert res.stderr == (f"error: cannot reach the agent at {sock} "
                          f"(start it with: axoneme agent run)\n")
    t0 = time.monotonic()
    res = subprocess.run([axoneme, "observe", "--api-socket", str(sock)], capture_output=True,
                         text=True)
    assert res.returncode == 1 and str(sock) in res.stderr
    assert time.monotonic() - t0 >= 0  # returns instead of hanging


def test_cli_label_errors_exit_2() -> None:
    axoneme = str(Path(sys.executable).parent / "axoneme")
    res = subprocess.run([axoneme, "--api-socket", "/nonexistent.sock", "pod", "run", "x",
                          "--labels", "bad label=1", "--", "true"], capture_output=True, text=True)
    assert res.returncode == 2
    assert "bad label=1" in res.stderr
    res = subprocess.run([axoneme, "--api-socket", "/nonexistent.sock", "pod", "run", "x"],
                         capture_output=True, text=True)
    assert res.returncode == 2


def test_agent_config_file_and_flags(tmp_path: Path) -> None:
    from axoneme.agent.cli import build_parser
    from axoneme.agent.cli._agentcmds import build_agent_config
    from axoneme.core.errors import ConfigError

    conf = tmp_path / "agent.yaml"
    conf.write_text("datapath: iptables\niptables-mode: ipset\nflow_buffer: 100\n"
                    f"state_dir: {tmp_path}/state\npod-cidr: 10.244.3.0/24\n")
    parser, _ = build_parser()
    args = parser.parse_args(["agent", "run", "--config", str(conf), "--flow-buffer", "7",
                              "--api-socket", str(tmp_path / "s.sock")])
    cfg = build_agent_config(args)
    assert (cfg.datapath, cfg.iptables_mode, cfg.flow_buffer) == ("iptables", "ipset", 7)
    assert cfg.state_dir == f"{tmp_path}/state" and cfg.pod_cidr == "10.244.3.0/24"
    assert cfg.api_socket == str(tmp_path / "s.sock") and cfg.guard is True
    # the per-endpoint policy map size (Cilium --bpf-policy-map-max) reaches the datapath
    assert cfg.policy_map_max == 16384
    from axoneme.agent._agent import Agent
    # --iptables-mode reaches the datapath that declares a `mode` option
    assert Agent(cfg).make_datapath().config.mode == "ipset"
    cfg = build_agent_config(parser.parse_args(["agent", "run", "--config", str(conf),
                                                "--datapath", "noop", "--policy-map-max", "40000"]))
    assert Agent(cfg).make_datapath().config.policy_map_max == 40000
    from axoneme.agent.cli import UsageError
    with pytest.raises(UsageError, match="policy-map-max"):
        build_agent_config(parser.parse_args(["agent", "run", "--policy-map-max", "0"]))
    conf.write_text("datapth: ebpf\n")
    with pytest.raises(ConfigError) as e:
        build_agent_config(parser.parse_args(["agent", "run", "--config", str(conf)]))
    assert "datapth" in str(e.value) and str(conf) in str(e.value)


@pytest.mark.parametrize(("text", "message"), [
    ('flow_buffer: "x"\n', "config key flow_buffer: expected an integer, got str 'x'"),
    ("guard: 'no'\n", "config key guard: expected true or false, got str 'no'"),
    ("mtu: true\n", "config key mtu: expected an integer, got bool True"),
    ("cluster_name: 5\n", "config key cluster_name: expected a string, got int 5"),
    ("policy_dir: [a]\n", "config key policy_dir: expected a string or null, got list"),
])
def test_agent_config_values_have_the_declared_kind(tmp_path: Path, text: str,
                                                    message: str) -> None:
    """A wrongly typed config value is refused naming the key and the file
    (before: a TypeError traceback from deep inside the agent)."""
    from axoneme.agent.cli import build_parser
    from axoneme.agent.cli._agentcmds import build_agent_config
    from axoneme.core.errors import ConfigError

    conf = tmp_path / "agent.yaml"
    conf.write_text(text)
    parser, _ = build_parser()
    with pytest.raises(ConfigError) as e:
        build_agent_config(parser.parse_args(["agent", "run", "--config", str(conf)]))
    assert message in str(e.value) and str(conf) in str(e.value)


def test_host_addresses_over_netlink_are_what_ip_addr_shows() -> None:
    """host_addresses reads netlink (no fork of the agent per tick); it must give
    exactly the addresses `ip -o addr show` lists, minus loopback, link-local,
    multicast and the excluded CIDR."""
    import ipaddress

    from axoneme.agent._netlink import host_addresses

    out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True,
                         check=True).stdout
    everything = {ipaddress.ip_interface(p[3]).ip for p in (ln.split() for ln in out.splitlines())
                  if len(p) >= 4 and p[2] in ("inet", "inet6")}
    unicast = {ip for ip in everything if not (ip.is_loopback or ip.is_link_local or ip.is_multicast)}
    assert host_addresses() == sorted(str(ip) for ip in unicast)
    v4 = sorted((ip for ip in unicast if ip.version == 4), key=int)
    if v4:  # excluding one address's /32 removes exactly it
        assert host_addresses(f"{v4[0]}/32") == sorted(str(ip) for ip in unicast - {v4[0]})
