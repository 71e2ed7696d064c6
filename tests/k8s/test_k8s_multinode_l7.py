"""The seed L7 scenario across nodes (``scripts/cluster up --nodes 2``, eBPF, issue 20).

Cilium's star wars demo (examples/starwars/, the manifests of test_k8s_e2e_starwars.py) with
deathstar on node 2 and the ships on node 1 (``nodeSelector: kubernetes.io/hostname``): every
request crosses the nodes, so node 2's agent decides it. In tunnel routing the packets carry
the sender's identity in the VXLAN header (collect_md ``axon_vxlan``, ``ax_to_overlay`` on node
1, ``ax_from_overlay`` on node 2); in native routing node 2's ipcache (from the API) names it.
L3/L4: tiefighter lands, xwing is dropped on node 2 (its flows show the drop with xwing's
identity). L7: tiefighter's ``POST /v1/request-landing`` lands, ``PUT /v1/exhaust-port``
gets node 2's proxy's 403 "Access denied" (the redirect is decided at node 2's device,
before routing), xwing is still dropped.

``AXONEME_K8S_MULTINODE_ROUTING=native`` (or ``tunnel``) runs one mode only. Time
(2026-12-05, 2 cores), this module and test_k8s_multinode.py in one run, `up --nodes 2` and
`down` included: tunnel 309 s, native 90 s (all passed).
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import yaml
from _testnet import poll

from .conftest import Cluster, cluster_up
from .test_k8s_e2e_starwars import MANIFESTS, NS, POLICIES, _curl, deploy, land_then_l3_l4

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]

NODE1, NODE2 = "axoneme-node", "axoneme-node2"
ROUTING = [m for m in ("tunnel", "native")
           if os.environ.get("AXONEME_K8S_MULTINODE_ROUTING", m) == m]


def _placed(docs: list[dict[str, Any]]) -> str:
    """The app's manifests with deathstar on node 2 and the ships on node 1."""
    for doc in docs:
        if doc.get("kind") == "Deployment":
            doc["spec"]["template"]["spec"]["nodeSelector"] = {"kubernetes.io/hostname": NODE2}
        elif doc.get("kind") == "Pod":
            doc["spec"]["nodeSelector"] = {"kubernetes.io/hostname": NODE1}
    return yaml.safe_dump_all(docs)


@pytest.fixture(scope="module", params=ROUTING)
def starwars(request: pytest.FixtureRequest, cluster_session: None) -> Any:
    cl = cluster_up("ebpf", nodes=2, routing=request.param)
    app = _placed(list(yaml.safe_load_all((MANIFESTS / "sw-app.yaml").read_text())))
    try:
        url = deploy(cl, app)
        pods = json.loads(cl.kubectl("-n", NS, "get", "pods", "-o", "json").stdout)["items"]
        where = {p["metadata"]["name"].split("-")[0]: p["spec"]["nodeName"] for p in pods}
        assert (where["deathstar"], where["tiefighter"], where["xwing"]) == (NODE2, NODE1, NODE1)
        yield cl, url
    finally:
        cl.kubectl("-n", NS, "delete", "cnp", "rule1", "--ignore-not-found", check=False)
        cl.kubectl("-n", NS, "delete", "-f", "-", "--wait=true", "--timeout=120s", input=app,
                   check=False, timeout=150)


def test_starwars_across_nodes_l3_l4_then_l7(starwars: tuple[Cluster, str]) -> None:
    cl, deathstar = starwars
    landing, exhaust = f"{deathstar}/v1/request-landing", f"{deathstar}/v1/exhaust-port"
    status = json.loads(cl.agent_on(NODE2, "status", "-o", "json").stdout)["components"]
    routing = status["routing"]
    assert routing["mode"] == cl.routing, routing
    if cl.routing == "tunnel":  # node 2's tunnel device carries identities (collect_md)
        assert "axon_vxlan" in routing["node_devices"], routing

    land_then_l3_l4(cl, landing)  # every request crosses the nodes

    # node 2 dropped xwing, knowing it by the identity node 1 gave it
    xwing_ip = cl.pod_ip(NS, "xwing")
    xwing = next(e for e in json.loads(cl.agent_on(NODE1, "endpoint", "list", "-o", "json")
                                       .stdout) if e["pod"] == f"{NS}/xwing")
    obs = cl.agent_on(NODE2, "observe", "--verdict", "DROPPED", "--last", "500", "-o", "json")
    assert obs.returncode == 0, obs.stderr
    drops = [json.loads(line) for line in obs.stdout.splitlines() if line.strip()]
    mine = [f for f in drops if f["IP"]["source"] == xwing_ip]
    assert mine and {f["source"]["identity"] for f in mine} == {xwing["identity"]}, mine[:2]

    # L7: node 2's proxy answers the PUT
    cl.kubectl("-n", NS, "apply", "-f", str(POLICIES / "sw_l3_l4_l7_policy.yaml"))

    def exhaust_denied() -> bool:
        rc, out = _curl(cl, "tiefighter", "PUT", exhaust)
        return rc == 0 and out.endswith("403") and out.startswith("Access denied")

    assert poll(exhaust_denied, timeout=20, interval=0.3), \
        f"PUT /v1/exhaust-port not denied: {_curl(cl, 'tiefighter', 'PUT', exhaust)}"
    rc, out = _curl(cl, "tiefighter", "POST", landing)
    assert rc == 0 and out.startswith("Ship landed") and out.endswith("200"), (rc, out)
    assert _curl(cl, "xwing", "POST", landing)[0] == 28
    obs = cl.agent_on(NODE2, "observe", "--type", "l7", "--last", "200", "-o", "json")
    l7 = [json.loads(line) for line in obs.stdout.splitlines() if line.strip()]
    assert any(f["l7"]["http"]["method"] == "PUT" and f["verdict"] == "DROPPED" for f in l7
               if (f.get("l7") or {}).get("http")), obs.stdout[-2000:]
