"""_hostnet.compact: a host prefix without its hosts closure, the same network otherwise."""

from __future__ import annotations

import copy
import ipaddress
import pickle

import pytest
from axoneme.core._hostnet import compact


@pytest.mark.parametrize("text", ["10.0.0.1/32", "198.51.100.7", "fd00::1/128", "::1"])
def test_a_host_prefix_behaves_as_the_stdlib_network(text: str) -> None:
    plain = ipaddress.ip_network(text)
    net = compact(ipaddress.ip_network(text))
    assert "hosts" not in net.__dict__  # the per-instance closure is gone
    assert net == plain and hash(net) == hash(plain) and {plain: 1}[net] == 1
    assert repr(net) == repr(plain) and str(net) == str(plain)
    assert net.hosts() == plain.hosts() == [plain.network_address]
    assert list(net) == list(plain) and net.num_addresses == 1
    assert isinstance(net, type(plain)) and net.version == plain.version
    for back in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net), copy.copy(net)):
        assert back == plain and type(back) is type(plain)
    outer = ipaddress.ip_network("10.0.0.0/8" if plain.version == 4 else "::/0")
    assert net.subnet_of(outer) == plain.subnet_of(outer)


def test_wider_prefixes_are_left_alone() -> None:
    for text in ("10.0.0.0/24", "10.0.0.0/31", "fd00::/64"):
        net = ipaddress.ip_network(text)
        assert compact(net) is net and type(net) in (ipaddress.IPv4Network, ipaddress.IPv6Network)
    # a host prefix: a new object (the original keeps its closure)
    host = ipaddress.ip_network("10.0.0.1/32")
    assert compact(host) is not host and "hosts" in host.__dict__


def test_parsed_cidr_peers_are_compact() -> None:
    from axoneme.core.policy.parse import parse_policy_obj

    pol = parse_policy_obj({"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
                            "metadata": {"name": "p", "namespace": "n"},
                            "spec": {"endpointSelector": {}, "ingress": [
                                {"fromCIDR": ["10.1.2.3/32", "10.1.0.0/16"]}]}}, "f", 0)
    peers = pol.rules[0].rules[0].peers or ()
    assert [str(p.cidr) for p in peers] == ["10.1.2.3/32", "10.1.0.0/16"]  # type: ignore[union-attr]
    assert "hosts" not in peers[0].cidr.__dict__  # type: ignore[union-attr]
