"""ClusterIP translation in pods' namespaces (Kubernetes mode, ``_services``).

The table is rendered from Service and EndpointSlice objects as the API server
serves them; the privileged test writes it into a real network namespace and
connects through it: to a service with a ready backend (translated to it), to
one without endpoints (refused at once, as kube-proxy refuses).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess

import pytest
from axoneme.agent._services import ServiceTable, ServiceTranslator, render
from axoneme.testing.netns import add_netns, del_netns


def svc(name: str, ip: str, *ports: tuple[str, str, int], ns: str = "x", **spec: object) -> dict:
    return {"metadata": {"namespace": ns, "name": name},
            "spec": {"clusterIP": ip, "clusterIPs": [ip], **spec,
                     "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports]}}


def eps(name: str, service: str, addrs: list[tuple[str, bool | None]],
        *ports: tuple[str, str, int], ns: str = "x") -> dict:
    return {"metadata": {"namespace": ns, "name": name,
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [a], **({"conditions": {"ready": r}} if r is not None else {})}
                          for a, r in addrs],
            "ports": [{"name": n, "protocol": p, "port": port} for n, p, port in ports]}


def test_frontends_follow_slices_by_port_name_and_readiness() -> None:
    t = ServiceTable()
    t.apply("services", [("ADDED", svc("s-a", "10.96.0.20", ("serve-80-tcp", "TCP", 80),
                                       ("serve-81-udp", "UDP", 81)))])
    t.apply("endpointslices", [("ADDED", eps("s-a-1", "s-a",
                                             [("10.244.0.7", True), ("10.244.0.8", None),
                                              ("10.244.0.9", False)],
                                             ("serve-80-tcp", "TCP", 8080),
                                             ("serve-81-udp", "UDP", 81)))])
    f = t.frontends()
    # not-ready endpoints are not backends; unset readiness means ready
    assert f[("10.96.0.20", "tcp", 80)] == (("10.244.0.7", 8080), ("10.244.0.8", 8080))
    assert f[("10.96.0.20", "udp", 81)] == (("10.244.0.7", 81), ("10.244.0.8", 81))
    # a second slice of the same service adds backends; deleting it removes them
    t.apply("endpointslices", [("ADDED", eps("s-a-2", "s-a", [("10.244.0.10", True)],
                                             ("serve-80-tcp", "TCP", 8080)))])
    assert len(t.frontends()[("10.96.0.20", "tcp", 80)]) == 3
    t.apply("endpointslices", [("DELETED", eps("s-a-2", "s-a", [], ("serve-80-tcp", "TCP", 8080)))])
    assert len(t.frontends()[("10.96.0.20", "tcp", 80)]) == 2
    # headless and ExternalName services have nothing to translate
    t.apply("services", [("ADDED", svc("h", "None", ("p", "TCP", 80))),
                         ("ADDED", svc("e", "", ("p", "TCP", 80), type="ExternalName"))])
    assert {k[0] for k in t.frontends()} == {"10.96.0.20"}
    t.apply("services", [("DELETED", svc("s-a", "10.96.0.20"))])
    assert t.frontends() == {}


def test_render_one_many_none() -> None:
    script = render({("10.96.0.1", "tcp", 80): (("10.244.0.5", 8080),),
                     ("10.96.0.2", "udp", 53): (("10.244.0.5", 53), ("10.244.0.6", 53)),
                     ("10.96.0.3", "tcp", 80): (), ("10.96.0.3", "udp", 80): ()})
    assert "ip daddr 10.96.0.1 tcp dport 80 dnat to 10.244.0.5:8080" in script
    assert ("ip daddr 10.96.0.2 udp dport 53 dnat to numgen random mod 2 map "
            "{ 0 : 10.244.0.5 . 53, 1 : 10.244.0.6 . 53 }") in script
    assert "ip daddr 10.96.0.3 tcp dport 80 reject with tcp reset" in script
    assert "ip daddr 10.96.0.3 udp dport 80 reject\n" in script
    # replaced whole, in one transaction
    assert script.startswith("table ip axoneme_svc\ndelete table ip axoneme_svc\n")


@pytest.mark.privileged
def test_translation_in_a_pod_namespace() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, nftables)")
    for tool in ("nft", "nsenter", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    name = f"axt-svc-{os.getpid()}"
    add_netns(name)
    path = f"/var/run/netns/{name}"
    srv = None
    try:
        def ip(*args: str) -> None:
            subprocess.run(["ip", "-n", name, *args], check=True, capture_output=True)
        ip("addr", "add", "10.244.250.2/32", "dev", "lo")
        ip("route", "add", "10.96.250.0/24", "dev", "lo")
        srv = subprocess.Popen(
            ["ip", "netns", "exec", name, "python3", "-c",
             "import socket; s=socket.create_server(('10.244.250.2', 8080)); print('up', flush=True)\n"
             "while True:\n c,_=s.accept(); c.sendall(b'backend'); c.close()"],
            stdout=subprocess.PIPE, text=True)
        assert srv.stdout is not None and srv.stdout.readline().strip() == "up"
        paths = {"c1": path}
        tr = ServiceTranslator(lambda: paths)
        tr.table.apply("services", [("ADDED", svc("s", "10.96.250.1", ("web", "TCP", 80))),
                                    ("ADDED", svc("none", "10.96.250.9", ("web", "TCP", 80)))])
        tr.table.apply("endpointslices", [("ADDED", eps("s-1", "s", [("10.244.250.2", True)],
                                                        ("web", "TCP", 8080)))])
        tr.synced = True
        asyncio.run(tr.sync())
        assert tr.errors == 0, tr.last_error
        assert tr.view()["namespaces"] == 1

        probe = ("import socket,sys\ns=socket.create_connection((sys.argv[1], 80), timeout=3)\n"
                 "print(s.recv(100).decode())")

        def connect(vip: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["ip", "netns", "exec", name, "python3", "-c", probe, vip],
                                  capture_output=True, text=True, timeout=20)
        res = connect("10.96.250.1")
        assert res.returncode == 0 and res.stdout.strip() == "backend", res.stderr
        res = connect("10.96.250.9")  # no endpoints: refused at once, not a timeout
        assert res.returncode != 0 and "ConnectionRefusedError" in res.stderr, res.stderr
        listing = subprocess.run(["ip", "netns", "exec", name, "nft", "list", "table", "ip",
                                  "axoneme_svc"], capture_output=True, text=True, check=True).stdout
        assert "dnat to 10.244.250.2:8080" in listing
        # the service goes: the translation goes with it (and nothing is rewritten twice)
        asyncio.run(tr.on_events("services", [("DELETED", svc("s", "10.96.250.1"))]))
        res = connect("10.96.250.1")
        assert res.returncode != 0
    finally:
        if srv is not None:
            srv.kill()
            srv.wait()
        del_netns(name)
