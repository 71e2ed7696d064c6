"""Cluster-wide identities on a real cluster (CRD mode, docs/kubernetes.md "Identities").

The agent (the DaemonSet of deploy/, run by ``scripts/cluster``) allocates each
identity as a CiliumIdentity object; this file checks, against the real API
server and the agent pod's CLI:

- the pods' identities are CiliumIdentity objects (``kubectl get``) whose
  numbers and ``security-labels`` are what ``axoneme identity list`` and
  ``axoneme endpoint list`` say in the agent pod;
- an identity object made by "another node" (``kubectl apply`` of a
  CiliumIdentity with labels no pod here has) becomes known to the agent;
- two more allocators (the agent's own code, in this process, every label set
  forced to collide at 256) racing through the real API server agree with
  each other and with the agent;
- a deleted pod's identity is marked unused (``io.cilium.heartbeat``) and
  deleted after the heartbeat timeout, not before, while identities in use are
  never touched;
- the agent pod deleted and replaced keeps every number (same objects, same uids).

The collector's timing is made short for the module through the agent's
config (``identity_gc_interval``, ``identity_heartbeat_timeout`` in the
ConfigMap's config.yaml, DaemonSet restarted), and restored afterwards.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import _testnet  # tests/ is on sys.path (tests/conftest.py)
import pytest
import yaml

from .conftest import Cluster, cluster_up
from .test_k8s_e2e_agent_restart import _agent_pod

NS = "idents"
AGNHOST = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"
GC_INTERVAL_S = 2
HEARTBEAT_TIMEOUT_S = 15
MARK = "io.cilium.heartbeat"


def _pod(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": {"terminationGracePeriodSeconds": 1,
                     "containers": [{"name": "c", "image": AGNHOST, "command": ["/agnhost", "pause"],
                                     "imagePullPolicy": "IfNotPresent"}]}}


def _wait(pred: Callable[[], Any], timeout: float) -> Any:
    return _testnet.poll(pred, timeout, 0.5)


def _agent_json(cl: Cluster, *cmd: str) -> Any:
    res = cl.agent(*cmd, "-o", "json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _objects(cl: Cluster) -> dict[int, dict[str, Any]]:
    """The CiliumIdentity objects: number -> object."""
    items = json.loads(cl.kubectl("get", "ciliumidentities", "-o", "json").stdout)["items"]
    return {int(o["metadata"]["name"]): o for o in items}


def _label_strings(obj: dict[str, Any]) -> list[str]:
    return sorted(f"{k}={v}" if v else k for k, v in obj["security-labels"].items())


def _endpoint_identity(cl: Cluster, pod: str) -> int:
    for e in _agent_json(cl, "endpoint", "list"):
        if e["pod"] == f"{NS}/{pod}":
            return int(e["identity"])
    raise AssertionError(f"no endpoint for {NS}/{pod}")


def _set_agent_config(cl: Cluster, text: str) -> None:
    patch = json.dumps({"data": {"config.yaml": text}})
    cl.kubectl("-n", "kube-system", "patch", "configmap", "axoneme-config", "--type", "merge",
               "-p", patch)
    cl.kubectl("-n", "kube-system", "rollout", "restart", "ds/axoneme")
    cl.kubectl("-n", "kube-system", "rollout", "status", "ds/axoneme", "--timeout=180s",
               timeout=200)
    assert _wait(lambda: cl.agent("status", "--brief").returncode == 0, 60), "agent not healthy"


@pytest.fixture(scope="module")
def idents(cluster_session):
    cl = cluster_up("ebpf")
    cm = json.loads(cl.kubectl("-n", "kube-system", "get", "configmap", "axoneme-config",
                               "-o", "json").stdout)
    original = cm["data"]["config.yaml"]
    conf = yaml.safe_load(original) or {}
    conf.update(identity_gc_interval=GC_INTERVAL_S, identity_heartbeat_timeout=HEARTBEAT_TIMEOUT_S)
    _set_agent_config(cl, "# test_k8s_identities.py: the cluster's config, a short collector\n"
                      + yaml.safe_dump(conf, sort_keys=False))
    try:
        cl.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
            _pod("web", {"app": "web"}), _pod("client", {"app": "client"})]))
        cl.wait_pods_ready(NS)
        yield cl
    finally:
        cl.kubectl("delete", "ns", NS, "--wait=true", "--timeout=120s", check=False, timeout=150)
        _set_agent_config(cl, original)


def test_pod_identities_are_ciliumidentity_objects_with_the_agents_numbers(idents):
    cl = idents
    objects = _objects(cl)
    # cluster identities (256-65535; CIDR identities, 1<<24|n, are this node's own)
    listed = {i["id"]: i for i in _agent_json(cl, "identity", "list")
              if not i["reserved"] and i["id"] <= 65535}
    for pod, app in (("web", "web"), ("client", "client")):
        number = _endpoint_identity(cl, pod)
        assert number in objects, f"{pod}: identity {number} is no CiliumIdentity ({sorted(objects)})"
        labels = _label_strings(objects[number])
        assert f"k8s:app={app}" in labels and f"k8s:io.kubernetes.pod.namespace={NS}" in labels
        assert sorted(listed[number]["labels"]) == labels
        assert listed[number]["endpoints"] >= 1
        # metadata.labels make it findable the Kubernetes way
        found = cl.kubectl("get", "ciliumid", "-l", f"app={app},io.kubernetes.pod.namespace={NS}",
                           "-o", "jsonpath={.items[*].metadata.name}").stdout.split()
        assert found == [str(number)]
    # every cluster identity the agent lists is an object with the same labels
    for number, ident in listed.items():
        assert number in objects, f"identity {number} listed by the agent, not in the API"
        assert sorted(ident["labels"]) == _label_strings(objects[number])
    # and the agent's status shows the allocator talking to the API server
    k8s = _agent_json(cl, "status")["components"]["kubernetes"]
    assert k8s["identities"]["mode"] == "crd" and k8s["resources"]["identities"]["synced"]


def _free_number(cl: Cluster) -> int:
    taken = set(_objects(cl))
    return next(n for n in range(65000, 65536) if n not in taken)


def test_identity_made_by_another_node_is_known_then_collected(idents):
    cl = idents
    number = _free_number(cl)
    tag = secrets.token_hex(3)
    obj = {"apiVersion": "cilium.io/v2", "kind": "CiliumIdentity",
           "metadata": {"name": str(number), "labels": {"app": f"remote-{tag}"}},
           "security-labels": {"k8s:app": f"remote-{tag}",
                               "k8s:io.kubernetes.pod.namespace": "elsewhere",
                               "k8s:io.cilium.k8s.policy.cluster": "default"}}
    cl.apply(json.dumps(obj))
    try:
        def known() -> bool:
            return any(i["id"] == number and f"k8s:app=remote-{tag}" in i["labels"]
                       for i in _agent_json(cl, "identity", "list"))

        assert _wait(known, 10), f"identity {number} made in the API is unknown to the agent"
        # no pod has these labels: marked, then deleted a heartbeat timeout later
        assert _wait(lambda: MARK in (_objects(cl).get(number, {}).get("metadata", {})
                                      .get("annotations") or {}), 4 * GC_INTERVAL_S + 5)
        assert _wait(lambda: number not in _objects(cl),
                     HEARTBEAT_TIMEOUT_S + 4 * GC_INTERVAL_S + 10), "never collected"
        assert _wait(lambda: not known(), 10), "the agent still knows a deleted identity"
    finally:
        cl.kubectl("delete", "ciliumidentity", str(number), "--ignore-not-found", check=False)


def _other_node(cl: Cluster) -> Any:
    """"Another node": the agent's own allocator (CRD store, forced collisions: every
    label set probes from 256) in this process, against the cluster's API server,
    knowing what is there now as an agent's first list would."""
    from axoneme.agent._config import AgentConfig
    from axoneme.agent._identitycrd import CRDIdentityStore, KubernetesIdentityAPI
    from axoneme.agent._k8sclient import api_client
    from axoneme.core.identity import IdentityAllocator

    api = KubernetesIdentityAPI(api_client(AgentConfig(k8s_kubeconfig=str(cl.kubeconfig))))
    alloc = IdentityAllocator(CRDIdentityStore(api), preferred=lambda key: 256)
    for number, obj in _objects(cl).items():
        alloc.learn(number, _label_strings(obj))
    return alloc


def test_allocators_racing_through_the_api_server_agree_with_the_agent(idents):
    """Two more allocators race on 30 new label sets through the real API server
    (create, 409 AlreadyExists, get), every label set colliding at 256: they
    give each label set one number, no number two label sets, the agent learns
    every one of them, and the pods' label sets get the agent's numbers."""
    import threading

    from axoneme.core.labels import Labels

    cl = idents
    tag = secrets.token_hex(3)
    sets = [Labels.from_strings([f"k8s:app=race-{tag}-{i}", "k8s:io.kubernetes.pod.namespace=away",
                                 "k8s:io.cilium.k8s.policy.cluster=default"]) for i in range(30)]
    web = _endpoint_identity(cl, "web")
    web_labels = Labels.from_strings(_label_strings(_objects(cl)[web]))
    got: dict[str, dict[int, int]] = {}
    errors: list[BaseException] = []

    def race(name: str, order: list[int]) -> None:
        try:
            alloc = _other_node(cl)
            got[name] = {i: alloc.allocate(sets[i]).id for i in order}
            got[name][-1] = alloc.allocate(web_labels).id
        except BaseException as e:
            errors.append(e)

    orders = [list(range(30)), list(reversed(range(30)))]
    threads = [threading.Thread(target=race, args=(n, o)) for n, o in zip("bc", orders, strict=True)]
    try:
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        # the agent's collector may delete these unused identities after its
        # heartbeat timeout: the race must be over well before
        assert time.monotonic() - t0 < HEARTBEAT_TIMEOUT_S, time.monotonic() - t0
        assert got["b"] == got["c"]
        assert got["b"][-1] == web  # an existing label set: the agent's number
        numbers = [got["b"][i] for i in range(30)]
        assert len(set(numbers)) == 30
        objects = _objects(cl)
        for i, number in enumerate(numbers):
            assert _label_strings(objects[number]) == sets[i].sorted_strings()

        def agent_knows() -> bool:
            listed = {i["id"]: sorted(i["labels"]) for i in _agent_json(cl, "identity", "list")}
            return all(listed.get(n) == sets[i].sorted_strings() for i, n in enumerate(numbers))

        assert _wait(agent_knows, 15), "the agent does not know every identity made elsewhere"
    finally:
        made = [str(n) for n in got.get("b", {}).values() if n != web]
        if made:
            cl.kubectl("delete", "ciliumidentity", *made, "--ignore-not-found", check=False)


def test_deleted_pods_identity_is_collected_after_the_timeout_and_used_ones_stay(idents):
    cl = idents
    app = f"ephemeral-{secrets.token_hex(3)}"
    cl.kubectl("apply", "-f", "-", input=yaml.safe_dump(_pod("ephemeral", {"app": app})))
    cl.kubectl("-n", NS, "wait", "--for=condition=Ready", "pod/ephemeral", "--timeout=120s",
               timeout=150)
    number = _endpoint_identity(cl, "ephemeral")
    in_use = {_endpoint_identity(cl, "web"), _endpoint_identity(cl, "client")}
    assert f"k8s:app={app}" in _label_strings(_objects(cl)[number])
    uids = {n: o["metadata"]["uid"] for n, o in _objects(cl).items() if n in in_use}
    cl.kubectl("-n", NS, "delete", "pod", "ephemeral", "--wait=true", "--timeout=60s", timeout=90)

    def mark() -> float | None:
        text = ((_objects(cl).get(number) or {}).get("metadata", {}).get("annotations")
                or {}).get(MARK)
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None

    marked = _wait(mark, 4 * GC_INTERVAL_S + 10)
    assert marked, f"identity {number} of a deleted pod never marked unused"
    assert _wait(lambda: number not in _objects(cl),
                 HEARTBEAT_TIMEOUT_S + 4 * GC_INTERVAL_S + 10), f"identity {number} never deleted"
    gone_at = time.time()
    # not before the timeout (same machine: one clock for the agent and the test)
    assert gone_at - marked >= HEARTBEAT_TIMEOUT_S - 1, (gone_at - marked)
    # the pods' identities were never marked or replaced
    now = _objects(cl)
    for n in in_use:
        assert now[n]["metadata"]["uid"] == uids[n]
        assert MARK not in (now[n]["metadata"].get("annotations") or {})
    listed = {i["id"] for i in _agent_json(cl, "identity", "list")}
    assert number not in listed and in_use <= listed


def test_agent_restart_keeps_every_number(idents):
    cl = idents
    before = {p: _endpoint_identity(cl, p) for p in ("web", "client")}
    objects = {n: o["metadata"]["uid"] for n, o in _objects(cl).items()}
    old = _agent_pod(cl)
    cl.kubectl("-n", "kube-system", "delete", "pod", old, "--wait=true", "--timeout=120s",
               timeout=150)
    cl.kubectl("-n", "kube-system", "rollout", "status", "ds/axoneme", "--timeout=180s",
               timeout=200)
    assert _agent_pod(cl) != old
    assert _wait(lambda: cl.agent("status", "--brief").returncode == 0, 60)
    after = {p: _endpoint_identity(cl, p) for p in ("web", "client")}
    assert after == before
    now = _objects(cl)
    for n in before.values():
        assert now[n]["metadata"]["uid"] == objects[n], f"identity {n} was made again"
    # a new pod with the labels of an existing one gets the same number
    cl.kubectl("apply", "-f", "-", input=yaml.safe_dump(_pod("web2", {"app": "web"})))
    try:
        cl.kubectl("-n", NS, "wait", "--for=condition=Ready", "pod/web2", "--timeout=120s",
                   timeout=150)
        assert _endpoint_identity(cl, "web2") == before["web"]
    finally:
        cl.kubectl("-n", NS, "delete", "pod", "web2", "--wait=false", check=False)


# -- entities from the API server ------------------------------------------------------------------

def _apiserver_addresses(cl: Cluster) -> list[str]:
    out = cl.kubectl("-n", "default", "get", "endpointslices", "-l",
                     "kubernetes.io/service-name=kubernetes", "-o",
                     "jsonpath={.items[*].endpoints[*].addresses[*]}").stdout.split()
    assert out, "default/kubernetes has no EndpointSlice addresses"
    return sorted(set(out))


def _egress_policy(entity: str) -> str:
    return json.dumps({
        "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "to-apiserver", "namespace": NS},
        "spec": {"endpointSelector": {"matchLabels": {"app": "client"}},
                 "egress": [{"toEntities": [entity]}]}})


def test_kube_apiserver_entity_is_the_api_servers_endpoints(idents):
    """kube-apiserver from default/kubernetes' EndpointSlices: on this one-node
    cluster the API server runs on the node, so its address stays host and the
    host identity carries kube-apiserver too (Cilium): toEntities kube-apiserver
    reaches it, toEntities world does not."""
    cl = idents
    addrs = _apiserver_addresses(cl)
    k8s = _agent_json(cl, "status")["components"]["kubernetes"]
    assert k8s["entities"]["kube_apiserver"] == addrs
    target = f"{addrs[0]}:6443"

    def reaches() -> bool:
        res = cl.exec(NS, "client", "/agnhost", "connect", target, "--timeout=1s",
                      "--protocol=tcp")
        return res.returncode == 0

    try:
        cl.apply(_egress_policy("kube-apiserver"))
        assert _wait(reaches, 10), f"toEntities kube-apiserver does not reach {target}"
        cl.apply(_egress_policy("world"))
        assert _wait(lambda: not reaches(), 10), f"toEntities world reaches {target}"
        cl.apply(_egress_policy("host"))
        assert _wait(reaches, 10), f"toEntities host does not reach {target} (host address)"
    finally:
        cl.kubectl("-n", NS, "delete", "cnp", "to-apiserver", "--ignore-not-found", check=False)
