"""Cilium's star wars demo on a real cluster (scripts/cluster), eBPF and iptables.

The policies are Cilium's YAML verbatim (examples/starwars/), applied
with kubectl; the pods are created by kubelet through containerd and
axoneme-cni; the requests are curl's, from inside the ships, through
``kubectl exec``. L3/L4: tiefighter lands, xwing is dropped (and the drop is in
``axoneme observe`` inside the agent pod). L7: tiefighter's
``POST /v1/request-landing`` lands, ``PUT /v1/exhaust-port`` gets 403
"Access denied", xwing is still dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _testnet import poll

from .conftest import Cluster, cluster_up

MANIFESTS = Path(__file__).parent / "manifests"
POLICIES = Path(__file__).resolve().parents[2] / "examples" / "starwars"
NS = "default"


def _curl(cl: Cluster, ship: str, method: str, url: str) -> tuple[int, str]:
    """(curl's exit code, HTTP code + body) of one request from ``ship``."""
    res = cl.exec(NS, ship, "curl", "-s", "--connect-timeout", "2", "--max-time", "5",
                  "-w", "\n%{http_code}", "-X", method, url, timeout=30)
    return res.returncode, res.stdout.strip()


def deploy(cl: Cluster, app: str) -> str:
    """Apply the app's manifests; deathstar's URL once every pod is ready."""
    cl.kubectl("-n", NS, "apply", "-f", "-", input=app)
    cl.kubectl("-n", NS, "rollout", "status", "deploy/deathstar", "--timeout=180s", timeout=200)
    cl.kubectl("-n", NS, "wait", "--for=condition=Ready", "pod/tiefighter", "pod/xwing",
               "--timeout=180s", timeout=200)
    ip = cl.kubectl("-n", NS, "get", "pods", "-l", "org=empire,class=deathstar", "-o",
                    "jsonpath={.items[0].status.podIP}").stdout
    assert ip.startswith("10.244."), f"deathstar has no pod IP: {ip!r}"
    return f"http://{ip}"


def land_then_l3_l4(cl: Cluster, landing: str) -> None:
    """No policy: every ship lands; then rule1 (L3/L4): only the empire lands,
    xwing's SYN is dropped (curl's exit 28)."""
    for ship in ("tiefighter", "xwing"):
        rc, out = _curl(cl, ship, "POST", landing)
        assert rc == 0 and out.startswith("Ship landed"), (ship, rc, out)
    cl.kubectl("-n", NS, "apply", "-f", str(POLICIES / "sw_l3_l4_policy.yaml"))
    assert poll(lambda: _curl(cl, "xwing", "POST", landing)[0] == 28, timeout=15, interval=0.3), \
        "xwing still reaches deathstar under rule1 (L3/L4)"
    rc, out = _curl(cl, "tiefighter", "POST", landing)
    assert rc == 0 and out.startswith("Ship landed"), (rc, out)


@pytest.fixture(params=["ebpf", "iptables"])
def starwars(request, cluster_session):
    cl = cluster_up(request.param)
    app = (MANIFESTS / "sw-app.yaml").read_text()
    try:
        yield cl, deploy(cl, app)
    finally:
        cl.kubectl("-n", NS, "delete", "cnp", "rule1", "--ignore-not-found", check=False)
        cl.kubectl("-n", NS, "delete", "-f", "-", "--wait=true", "--timeout=120s", input=app,
                   check=False, timeout=150)


def test_starwars_l3_l4_then_l7(starwars):
    cl, deathstar = starwars
    landing, exhaust = f"{deathstar}/v1/request-landing", f"{deathstar}/v1/exhaust-port"

    land_then_l3_l4(cl, landing)
    rc, out = _curl(cl, "tiefighter", "PUT", exhaust)
    assert rc == 0 and "Panic: deathstar exploded" in out, (rc, out)  # L3/L4 lets the PUT in

    # the drop, as Cilium users look for it: observe inside the agent pod
    xwing_ip = cl.pod_ip(NS, "xwing")
    obs = cl.agent("observe", "--verdict", "DROPPED", "--last", "200", "-o", "json")
    assert obs.returncode == 0, obs.stderr
    drops = [json.loads(line) for line in obs.stdout.splitlines() if line.strip()]
    assert any(f["IP"]["source"] == xwing_ip and f.get("destination", {}).get("pod_name", "")
               .startswith("deathstar") for f in drops), f"no xwing drop in observe: {obs.stdout[-2000:]}"

    # L7: POST /v1/request-landing only
    cl.kubectl("-n", NS, "apply", "-f", str(POLICIES / "sw_l3_l4_l7_policy.yaml"))

    def exhaust_denied() -> bool:
        rc, out = _curl(cl, "tiefighter", "PUT", exhaust)
        return rc == 0 and out.endswith("403") and out.startswith("Access denied")

    assert poll(exhaust_denied, timeout=15, interval=0.3), f"PUT /v1/exhaust-port not denied: {_curl(cl, 'tiefighter', 'PUT', exhaust)}"
    rc, out = _curl(cl, "tiefighter", "POST", landing)
    assert rc == 0 and out.startswith("Ship landed") and out.endswith("200"), (rc, out)
    assert _curl(cl, "xwing", "POST", landing)[0] == 28

    # the policy's status says this node enforces it
    st = json.loads(cl.kubectl("-n", NS, "get", "cnp", "rule1", "-o", "json").stdout).get("status", {})
    nodes = st.get("nodes", {})
    assert nodes and all(n.get("ok") and n.get("enforcing") for n in nodes.values()), st
