"""Cilium's policy cases, in the kernel, on the datapath under test: namespace labels
in fromEndpoints, entities (world via the test's outside netns, host via the
node's own address), toCIDR/toCIDRSet with except, port ranges, ICMP types,
deny precedence over allows from any policy kind, CCNP, revocation of an
established connection, and an agent restart that keeps enforcement."""

from __future__ import annotations

import signal
import subprocess

import pytest
from axoneme.testing.conformance._cases import ALL_PODS, L4, ns_of, run_case
from axoneme.testing.conformance._harness import HERE, PYTHON, probe_all

pytestmark = [pytest.mark.conformance, pytest.mark.privileged, pytest.mark.axoneme_kernel]


def cnp(name: str, ns: str, spec: dict) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def ccnp(name: str, spec: dict) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumClusterwideNetworkPolicy",
            "metadata": {"name": name}, "spec": spec}


A = {"matchLabels": {"pod": "a"}}


@pytest.fixture
def clean(conformance_topology):
    yield conformance_topology
    conformance_topology.agent.reset_policies()


def test_from_endpoints_with_namespace_label(clean, tmp_path):
    docs = [cnp("a-from-y", "x", {"endpointSelector": A, "ingress": [{"fromEndpoints": [
        {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "y"}}]}]})]
    run_case(clean, tmp_path, "ns-label", docs, lambda s, d, p, pr: d != "x/a" or ns_of(s) == "y")


def test_from_endpoints_is_namespace_scoped(clean, tmp_path):
    docs = [cnp("a-from-b", "x", {"endpointSelector": A, "ingress": [{"fromEndpoints": [
        {"matchLabels": {"pod": "b"}}]}]})]
    run_case(clean, tmp_path, "scoped", docs, lambda s, d, p, pr: d != "x/a" or s == "x/b")


def test_port_range(clean, tmp_path):
    docs = [cnp("a-range", "x", {"endpointSelector": A, "ingress": [{"toPorts": [
        {"ports": [{"port": "80", "endPort": 81, "protocol": "UDP"}]}]}]})]
    run_case(clean, tmp_path, "range", docs, lambda s, d, p, pr: d != "x/a" or pr == "udp")


def test_deny_beats_allow_from_any_kind(clean, tmp_path):
    docs = [{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "allow-all", "namespace": "x"},
             "spec": {"podSelector": {}, "ingress": [{}]}},
            cnp("deny-y", "x", {"endpointSelector": {}, "ingressDeny": [{"fromEndpoints": [
                {"matchLabels": {"k8s:io.kubernetes.pod.namespace": "y"}}], "toPorts": [
                {"ports": [{"port": "80", "protocol": "TCP"}]}]}]})]

    def expect(s, d, p, pr):
        return not (ns_of(d) == "x" and ns_of(s) == "y" and (p, pr) == (80, "tcp"))
    run_case(clean, tmp_path, "deny", docs, expect)


def test_ccnp_is_not_namespace_scoped(clean, tmp_path):
    docs = [ccnp("c-from-a", {"endpointSelector": {"matchLabels": {"pod": "c"}},
                              "ingress": [{"fromEndpoints": [A]}]})]
    run_case(clean, tmp_path, "ccnp", docs, lambda s, d, p, pr: not d.endswith("/c") or s.endswith("/a"))


def _world_probes(topo, src: str = "x/a") -> list:
    return [(src, ip, 80, "tcp") for ip in topo.world.ips] + [(src, d, 80, "tcp") for d in ALL_PODS if d != src]


def test_to_entities_world(clean, tmp_path):
    world = clean.world.ips
    docs = [cnp("a-world", "x", {"endpointSelector": A, "egress": [{"toEntities": ["world"]}]})]
    run_case(clean, tmp_path, "world", docs, lambda s, d, p, pr: d in world,
             probes=_world_probes(clean), engine=False)


def test_to_cidr_set_with_except(clean, tmp_path):
    world = clean.world.ips
    docs = [cnp("a-cidr", "x", {"endpointSelector": A, "egress": [{"toCIDRSet": [
        {"cidr": "198.51.100.0/24", "except": [f"{world[1]}/32"]}]}]})]
    run_case(clean, tmp_path, "cidr-except", docs,
             lambda s, d, p, pr: d in world and d != world[1],
             probes=_world_probes(clean), engine=False)


def test_to_cidr(clean, tmp_path):
    world = clean.world.ips
    docs = [cnp("a-cidr", "x", {"endpointSelector": A, "egress": [{"toCIDR": [f"{world[2]}/32"]}]})]
    run_case(clean, tmp_path, "cidr", docs, lambda s, d, p, pr: d == world[2],
             probes=_world_probes(clean), engine=False)


def test_icmp_type_rule(clean, tmp_path):
    docs = [cnp("a-echo", "x", {"endpointSelector": A, "ingress": [{"icmps": [
        {"fields": [{"type": "EchoRequest", "family": "IPv4"}]}]}]})]
    probes = [(s, "x/a", 0, "icmp") for s in ("x/b", "y/c")] + [(s, "x/a", 80, "tcp") for s in ("x/b", "y/c")]
    run_case(clean, tmp_path, "icmp", docs, lambda s, d, p, pr: pr == "icmp", probes=probes,
             engine=False, flows=False)


def test_to_entities_host(clean, tmp_path):
    docs = [cnp("a-host", "x", {"endpointSelector": A, "egress": [{"toEntities": ["host"]}]})]
    host, world = clean.world.host_ip, clean.world.ips
    probes = [("x/a", host, 0, "icmp"), ("x/a", world[0], 0, "icmp"), ("x/a", "x/b", 80, "tcp")]
    run_case(clean, tmp_path, "host", docs, lambda s, d, p, pr: d == host, probes=probes,
             engine=False, flows=False)


class Holder:
    """An established TCP connection held open from inside a pod."""

    def __init__(self, topo, src: str, dst_ip: str, port: int, ctl) -> None:
        self.ctl = ctl
        self.proc = subprocess.Popen([*topo.exec_argv(src), PYTHON, str(HERE / "holder.py"),
                                      dst_ip, str(port), str(ctl)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        self.first = self.proc.stdout.readline().split()

    def second(self) -> list[str]:
        self.ctl.touch()
        out, _ = self.proc.communicate(timeout=30)
        return out.split()


def test_revocation_cuts_established_connection(clean, tmp_path):
    agent = clean.agent
    held = Holder(clean, "x/b", clean.ips["x/a"], 80, tmp_path / "go")
    kept = Holder(clean, "x/c", clean.ips["x/a"], 80, tmp_path / "go2")
    assert held.first == ["first", "ok"] and kept.first == ["first", "ok"]
    docs = [cnp("a-from-c", "x", {"endpointSelector": A, "ingress": [{"fromEndpoints": [
        {"matchLabels": {"pod": "c"}}]}]})]
    path = tmp_path / "revoke.yaml"
    import yaml
    path.write_text(yaml.safe_dump_all(docs))
    agent.apply(path)
    assert held.second() == ["second", "fail"], "revoked connection still passes"
    assert kept.second() == ["second", "ok"], "still-allowed connection was cut"


def test_zz_agent_restart_keeps_enforcement(clean, tmp_path):
    """SIGKILL the agent: enforcement holds while it is down; the restarted
    agent adopts the kernel state and established connections survive."""
    agent = clean.agent
    docs = [cnp("a-from-b", "x", {"endpointSelector": A, "ingress": [{"fromEndpoints": [
        {"matchLabels": {"pod": "b"}}]}]})]
    path = tmp_path / "restart.yaml"
    import yaml
    path.write_text(yaml.safe_dump_all(docs))
    agent.apply(path)
    held = Holder(clean, "x/b", clean.ips["x/a"], 80, tmp_path / "go")
    assert held.first == ["first", "ok"]
    probes = [("x/b", "x/a", 80, "tcp"), ("x/c", "x/a", 80, "tcp"), ("y/a", "x/a", 80, "tcp")]
    endpoints_before = agent.json("endpoint", "list")
    agent.stop(signal.SIGKILL)
    try:
        # the agent is down: the probers enter the pod netns directly
        down = probe_all(clean, probes)
        assert down == {probes[0]: True, probes[1]: False, probes[2]: False}, down
    finally:
        agent.start()
    agent.wait_realized()
    assert held.second() == ["second", "ok"], "established allowed connection did not survive the restart"
    assert agent.json("endpoint", "list") == endpoints_before
    after = probe_all(clean, probes)
    assert after == {probes[0]: True, probes[1]: False, probes[2]: False}, after
    # re-applying the same policy changes nothing; it gives the engine check its input
    run_case(clean, tmp_path, "after-restart", docs, lambda s, d, p, pr: d != "x/a" or s == "x/b",
             l4=L4[:1])
