"""The endpoint plumbing (_netlink over axoneme.core.netlink) against the
kernel: a veth pair with its peer moved into a test netns, the pod side's
address, routes and gateway neighbour set up from a socket opened inside that
netns (a thread that setns()'s, no fork), the host route and neighbour,
teardown, and the errors: a missing netns, a taken name (rolled back), a
leftover host veth of the same container (replaced)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from axoneme.agent import _netlink as nl
from axoneme.core.netlink import Rtnl, RtnlError
from axoneme.testing.capability import lacks_root, lacks_tools
from axoneme.testing.netns import add_netns, del_netns

pytestmark = [pytest.mark.privileged]


def _ipj(*args: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True).stdout
    return list(json.loads(out or "[]"))


@pytest.fixture
def pod_ns() -> Iterator[tuple[str, str]]:
    why = lacks_root() or lacks_tools("ip")
    if why:
        pytest.skip(why)
    ns = f"axnk-{secrets.token_hex(3)}"
    add_netns(ns)
    cid = f"axnk-test-{secrets.token_hex(6)}"
    try:
        yield ns, cid
    finally:
        nl.teardown_endpoint(nl.host_ifname(cid))
        del_netns(ns)


def test_setup_endpoint_configures_both_ends_and_teardown_is_idempotent(
        pod_ns: tuple[str, str]) -> None:
    ns, cid = pod_ns
    ip = "10.244.251.7"
    threads = threading.active_count()
    ep = nl.setup_endpoint(cid, f"/run/netns/{ns}", "eth0", ip, mtu=1400)
    assert threading.active_count() == threads  # the netns thread is gone again
    assert ep.host_ifname == nl.host_ifname(cid) and ep.host_ifindex == nl.link_index(ep.host_ifname)
    host = _ipj("link", "show", "dev", ep.host_ifname)[0]
    assert host["address"] == ep.host_mac and host["mtu"] == 1400 and "UP" in host["flags"]
    pod = _ipj("-n", ns, "addr", "show", "dev", "eth0")[0]
    assert pod["address"] == ep.pod_mac and pod["mtu"] == 1400 and "UP" in pod["flags"]
    assert [(a["local"], a["prefixlen"]) for a in pod["addr_info"] if a["family"] == "inet"] == [(ip, 32)]
    assert "UP" in _ipj("-n", ns, "link", "show", "dev", "lo")[0]["flags"]
    routes = {(r["dst"], r.get("gateway"), r.get("scope")) for r in _ipj("-n", ns, "route")}
    assert routes == {("default", nl.GATEWAY_IP, None), (nl.GATEWAY_IP, None, "link")}
    neigh = _ipj("-n", ns, "neigh", "show", nl.GATEWAY_IP)
    assert neigh[0]["lladdr"] == ep.host_mac and neigh[0]["state"] == ["PERMANENT"]
    hroute = _ipj("route", "show", f"{ip}/32")
    assert hroute[0]["dev"] == ep.host_ifname and hroute[0]["scope"] == "link"
    hneigh = _ipj("neigh", "show", ip, "dev", ep.host_ifname)
    assert hneigh[0]["lladdr"] == ep.pod_mac and hneigh[0]["state"] == ["PERMANENT"]
    with open(f"/proc/sys/net/ipv4/conf/{ep.host_ifname}/proxy_arp") as f:
        assert f.read().strip() == "1"

    assert nl.teardown_endpoint(ep.host_ifname) is True
    assert nl.link_index(ep.host_ifname) == 0
    assert _ipj("route", "show", f"{ip}/32") == []
    assert "eth0" not in {link["ifname"] for link in _ipj("-n", ns, "link")}  # the peer went with it
    assert nl.teardown_endpoint(ep.host_ifname) is False  # already gone: not an error


def test_a_leftover_host_veth_of_the_same_container_is_replaced(pod_ns: tuple[str, str]) -> None:
    ns, cid = pod_ns
    host = nl.host_ifname(cid)
    subprocess.run(["ip", "link", "add", host, "type", "veth", "peer", "name", host[:-1] + "z"],
                   check=True, capture_output=True)
    stale = nl.link_index(host)
    ep = nl.setup_endpoint(cid, f"/run/netns/{ns}", "eth0", "10.244.251.8")
    assert ep.host_ifindex != stale and nl.link_index(host) == ep.host_ifindex


def test_a_taken_pod_ifname_fails_and_rolls_the_host_veth_back(pod_ns: tuple[str, str]) -> None:
    ns, cid = pod_ns
    subprocess.run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"],
                   check=True)
    with pytest.raises(nl.NetlinkError, match="cannot create veth") as err:
        nl.setup_endpoint(cid, f"/run/netns/{ns}", "eth0", "10.244.251.9")
    assert isinstance(err.value.__cause__, OSError)
    assert nl.link_index(nl.host_ifname(cid)) == 0


def test_a_taken_address_fails_after_the_veth_and_removes_it(pod_ns: tuple[str, str]) -> None:
    ns, cid = pod_ns
    first = nl.setup_endpoint(cid, f"/run/netns/{ns}", "eth0", "10.244.251.10")
    other = cid + "-b"
    try:
        # same pod netns, another ifname, the same route to the gateway: EEXIST
        with pytest.raises(nl.NetlinkError, match="cannot configure endpoint") as err:
            nl.setup_endpoint(other, f"/run/netns/{ns}", "eth1", "10.244.251.11")
        assert getattr(err.value.__cause__, "errno", None) == 17
        assert nl.link_index(nl.host_ifname(other)) == 0  # rolled back
        assert nl.link_index(first.host_ifname) > 0  # the first endpoint untouched
    finally:
        nl.teardown_endpoint(nl.host_ifname(other))


def test_missing_netns_is_a_netlink_error() -> None:
    with pytest.raises(nl.NetlinkError, match="does not exist"):
        nl.setup_endpoint("x", "/run/netns/axnk-missing-" + secrets.token_hex(4), "eth0", "10.0.0.1")
    with pytest.raises(OSError):
        Rtnl("/run/netns/axnk-missing-" + secrets.token_hex(4))


def test_sockets_in_another_or_a_new_netns_see_only_theirs(pod_ns: tuple[str, str]) -> None:
    ns, _ = pod_ns
    subprocess.run(["ip", "-n", ns, "link", "add", "axdum0", "type", "veth", "peer", "name", "axdum1"],
                   check=True)
    with Rtnl(f"/run/netns/{ns}") as inside, Rtnl() as here, Rtnl.in_new_netns() as fresh:
        assert inside.link_index("axdum0") > 0
        assert here.link_index("axdum0") == 0
        assert [link for link in (fresh.link_get(1),) if link] and fresh.link_index("axdum0") == 0
        assert [a.address for a in fresh.addr_dump()] == []  # lo is down: no address yet
        with pytest.raises(RtnlError) as err:
            fresh.link_del(4242)
        assert err.value.errno == 19
    assert os.path.exists(f"/run/netns/{ns}")


def test_host_addresses_skip_loopback_and_the_pod_cidr() -> None:
    got = nl.host_addresses()
    assert "127.0.0.1" not in got and "::1" not in got
    assert all(not a.startswith("fe80:") for a in got)
    if got:
        first = got[0]
        assert first not in nl.host_addresses(first + ("/32" if ":" not in first else "/128"))


def test_ipv6_address_route_and_neighbour_reach_the_kernel(pod_ns: tuple[str, str]) -> None:
    """The IPv6 encodings (the product's pods are IPv4 today): what the kernel
    holds afterwards, read back with ip(8)."""
    ns, _ = pod_ns
    subprocess.run(["ip", "-n", ns, "link", "add", "axv6a", "type", "veth", "peer", "name", "axv6b"],
                   check=True)
    with Rtnl(f"/run/netns/{ns}") as rt:
        index = rt.link_index("axv6a")
        rt.link_up(index)
        rt.addr_add(index, "fd00:a::7", 128)
        rt.route_add("fd00:a:1::", 64, index)
        rt.route_add("fd00:a:2::", 64, index, gateway="fe80::1")
        rt.neigh_replace(index, "fe80::1", "02:00:00:00:00:01")
        assert ("fd00:a::7", 128) in [(a.address, a.prefixlen) for a in rt.addr_dump()]
        with pytest.raises(RtnlError) as err:
            rt.addr_add(index, "fd00:a::7", 128)  # NLM_F_EXCL: already there
        assert err.value.errno == 17
    addrs = _ipj("-n", ns, "-6", "addr", "show", "dev", "axv6a")[0]["addr_info"]
    assert {(a["local"], a["prefixlen"]) for a in addrs if a["scope"] == "global"} == {("fd00:a::7", 128)}
    routes = {r["dst"]: r for r in _ipj("-n", ns, "-6", "route", "show", "dev", "axv6a")}
    assert "gateway" not in routes["fd00:a:1::/64"]
    assert routes["fd00:a:2::/64"]["gateway"] == "fe80::1"
    assert {routes[d]["protocol"] for d in ("fd00:a:1::/64", "fd00:a:2::/64")} == {"static"}
    neigh = _ipj("-n", ns, "-6", "neigh", "show", "dev", "axv6a")
    assert [(n["dst"], n["lladdr"], n["state"]) for n in neigh] == [
        ("fe80::1", "02:00:00:00:00:01", ["PERMANENT"])]
