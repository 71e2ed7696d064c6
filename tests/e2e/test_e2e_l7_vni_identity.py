"""The tunnel header's identity reaches the L7 proxy (eBPF, issue 20).

Two nodes (network namespaces of ours, ``axoneme.testing.twonodes``) joined
by a collect_md VXLAN tunnel: the VNI carries the sender's identity. Node b
runs an HTTP server pod with an L7 rule that admits only the client's
labels (``fromEndpoints``) and only ``GET /allowed``. Node b's ipcache has
no entry for the client's address (standalone agents share no API): by
its own lookup the proxy would judge the client as world and refuse every
request. The datapath judged the packet by the VNI's identity, and it puts
that identity in the to-proxy mark (``axoneme.core.marks``): the accepted
socket inherits it (``tcp_fwmark_accept``), the proxy judges the request by
it, and the upstream leg to the server carries it in the from-proxy mark,
so the server's to-container judges that leg by it too. So: ``/allowed`` is
the server's 200, ``/denied`` the proxy's 403, node b's L7 flows name the
client's identity, and a pod of other labels on node a never reaches the
server (the kernel drops it by the VNI's identity).

Without the identity in the mark the allowed request is refused as well
(the proxy's 403): this test fails, as it did before the change.
"""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import _capability  # tests/ is on sys.path (tests/conftest.py)
import pytest
from axoneme.testing.twonodes import HTTP_GET, HTTP_SERVER, VXLAN, TwoNodes, http_status, two_nodes

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

PORT = 8080
POLICY = textwrap.dedent(f"""\
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {{name: server-l7-from-client, namespace: default}}
    spec:
      endpointSelector: {{matchLabels: {{app: server}}}}
      ingress:
      - fromEndpoints: [{{matchLabels: {{app: client}}}}]
        toPorts:
        - ports: [{{port: "{PORT}", protocol: TCP}}]
          rules:
            http: [{{method: GET, path: /allowed}}]
    """)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[TwoNodes]:
    why = _capability.probe_datapath("ebpf", "")
    if why:
        pytest.skip(why)
    with two_nodes(tmp_path) as net:
        yield net


def test_the_proxy_judges_by_the_vni_identity_not_the_ipcache(nodes: TwoNodes) -> None:
    net = nodes
    net.route("tunnel", external=True)
    for node in (net.a, net.b):
        node.start("ebpf", "", "--devices", f"und0,{VXLAN}")
    client = net.a.pod("client-a", "app=client")
    intruder = net.a.pod("intruder-a", "app=intruder")
    server = net.b.pod("server-b", "app=server", sys.executable, "-c", HTTP_SERVER, str(PORT))
    twin = net.b.pod("twin-b", "app=client")  # node b knows the client's labels' identity
    assert client["identity"] == twin["identity"] != intruder["identity"]
    url = f"http://{server['ipv4']}:{PORT}"

    def get(pod: str, path: str) -> tuple[int, str]:
        return http_status(net.a.exec(pod, sys.executable, "-c", HTTP_GET, url + path).stdout)

    deadline = time.monotonic() + 20
    while get("client-a", "/warmup")[0] != 200:  # no policy yet: straight to the server
        assert time.monotonic() < deadline, net.b.log()
        time.sleep(0.5)

    (net.b.tmp / "l7.yaml").write_text(POLICY)
    net.b.ax("policy", "apply", "-f", str(net.b.tmp / "l7.yaml"))
    time.sleep(1.5)  # the policy and the proxy's rules reach the kernel
    assert get("client-a", "/allowed") == (200, "served /allowed"), net.b.log()
    assert get("client-a", "/denied")[0] == 403  # the proxy's answer
    assert get("intruder-a", "/allowed")[0] == 0  # dropped by the kernel: no answer at all

    flows = [json.loads(line) for line in net.b.ax("observe", "--last", "500", "-o",
                                                   "json").stdout.splitlines() if line.strip()]
    l7 = {(f["IP"]["source"], f["source"]["identity"], f["l7"]["http"]["url"].rsplit("/", 1)[-1],
           f["verdict"])
          for f in flows if f.get("Type") == "L7" and (f.get("l7") or {}).get("http")}
    ident = client["identity"]
    assert (client["ipv4"], ident, "allowed", "FORWARDED") in l7, sorted(l7)
    assert (client["ipv4"], ident, "denied", "DROPPED") in l7, sorted(l7)
    assert not any(src == intruder["ipv4"] for src, *_ in l7), sorted(l7)
