"""Host policies (CCNP nodeSelector) on the host endpoint (``set_host_endpoint``):
selected by the node's labels, default deny per direction only where a host
policy selects the host, pods untouched, as Cilium's host firewall."""

from __future__ import annotations

import textwrap

import yaml
from axoneme.core.endpoint import HOST_ENDPOINT_ID, Endpoint, host_endpoint
from axoneme.core.identity import ReservedIdentity
from axoneme.core.labels import Labels
from axoneme.core.mapstate import Direction, Protocol, Verdict
from axoneme.core.policy.engine import PolicyEngine
from axoneme.core.policy.parse import parse_policy_obj

IN, EG, TCP = Direction.INGRESS, Direction.EGRESS, Protocol.TCP
R = ReservedIdentity

CLUSTER_ONLY = textwrap.dedent("""\
    apiVersion: cilium.io/v2
    kind: CiliumClusterwideNetworkPolicy
    metadata: {name: nodeport-cluster-only}
    spec:
      nodeSelector: {matchLabels: {node-role: worker}}
      ingress:
      - fromEntities: [cluster]
        toPorts: [{ports: [{port: "30080", protocol: TCP}]}]
    """)


def host(**labels: str) -> Endpoint:
    return host_endpoint(labels, ("eth0",))


def engine_with(policy: str, **labels: str) -> PolicyEngine:
    engine = PolicyEngine()
    pod = engine.allocator.allocate(Labels.from_strings(["k8s:app=client",
                                                         "k8s:io.kubernetes.pod.namespace=default"]))
    engine.upsert_endpoint(Endpoint(1, pod.id, pod.labels, ipv4="10.244.0.10",
                                    namespace="default", pod_name="client"))
    engine.set_host_endpoint(host(**labels))
    engine.upsert_policy(parse_policy_obj(yaml.safe_load(policy)))
    return engine


def verdict(engine: PolicyEngine, d: Direction, peer: int, port: int = 30080) -> Verdict:
    return engine.explain(HOST_ENDPOINT_ID, d, peer, TCP, port).verdict


def test_a_selected_host_is_default_deny_in_ingress_only() -> None:
    engine = engine_with(CLUSTER_ONLY, **{"node-role": "worker"})
    pod = engine.endpoints()[0].identity
    assert engine.enforcement(HOST_ENDPOINT_ID) == (True, False)
    assert verdict(engine, IN, pod) is Verdict.ALLOWED
    assert verdict(engine, IN, int(R.REMOTE_NODE)) is Verdict.ALLOWED
    assert verdict(engine, IN, int(R.WORLD)) is Verdict.DENIED  # the outside peer
    assert verdict(engine, IN, pod, port=22) is Verdict.DENIED  # another port
    assert verdict(engine, EG, int(R.WORLD)) is Verdict.ALLOWED  # egress not selected
    [rule] = engine.selecting_rules(HOST_ENDPOINT_ID)
    assert rule.ref.name == "nodeport-cluster-only"
    # the pod is not selected by a host policy
    assert engine.enforcement(1) == (False, False)


def test_a_host_whose_labels_do_not_match_is_not_selected() -> None:
    engine = engine_with(CLUSTER_ONLY, **{"node-role": "control-plane"})
    assert engine.enforcement(HOST_ENDPOINT_ID) == (False, False)
    assert verdict(engine, IN, int(R.WORLD)) is Verdict.ALLOWED
    assert engine.selecting_rules(HOST_ENDPOINT_ID) == []


def test_node_labels_changing_select_and_unselect() -> None:
    engine = engine_with(CLUSTER_ONLY, **{"node-role": "control-plane"})
    engine.pending_changes()
    engine.set_host_endpoint(host(**{"node-role": "worker"}))
    assert engine.enforcement(HOST_ENDPOINT_ID) == (True, False)
    assert HOST_ENDPOINT_ID in engine.pending_changes()
    engine.set_host_endpoint(None)
    assert engine.host_endpoint() is None
    assert [ep.id for ep in engine.endpoints()] == [1]


def test_a_synced_host_endpoint_gets_diffs_deleting_its_allow_all() -> None:
    """After a full sync (mark_synced), a host policy's change deletes the
    unenforced direction's allow-all key (not only adds)."""
    engine = PolicyEngine()
    engine.set_host_endpoint(host(**{"node-role": "worker"}))
    engine.mark_synced(HOST_ENDPOINT_ID)
    assert HOST_ENDPOINT_ID not in engine.pending_changes()
    engine.upsert_policy(parse_policy_obj(yaml.safe_load(CLUSTER_ONLY)))
    changes = engine.pending_changes()[HOST_ENDPOINT_ID]
    assert any(k.identity == 0 and k.direction is IN for k in changes.deletes)


def test_policy_delete_ends_default_deny_and_egress_rules_select_egress() -> None:
    egress = CLUSTER_ONLY.replace("ingress:", "egress:").replace("fromEntities", "toEntities")
    engine = engine_with(egress, **{"node-role": "worker"})
    assert engine.enforcement(HOST_ENDPOINT_ID) == (False, True)
    assert verdict(engine, EG, int(R.WORLD)) is Verdict.DENIED
    assert verdict(engine, IN, int(R.WORLD)) is Verdict.ALLOWED
    [pol] = engine.policies()
    engine.delete_policy(pol.ref)
    assert engine.enforcement(HOST_ENDPOINT_ID) == (False, False)
    assert verdict(engine, EG, int(R.WORLD)) is Verdict.ALLOWED


def test_an_empty_node_selector_selects_every_node_and_pod_policies_not_the_host() -> None:
    pods_only = textwrap.dedent("""\
        apiVersion: cilium.io/v2
        kind: CiliumClusterwideNetworkPolicy
        metadata: {name: pods}
        spec:
          endpointSelector: {}
          ingress: [{fromEntities: [cluster]}]
        """)
    engine = engine_with(pods_only)
    assert engine.enforcement(HOST_ENDPOINT_ID) == (False, False)
    assert engine.enforcement(1) == (True, False)
    every = CLUSTER_ONLY.replace("{matchLabels: {node-role: worker}}", "{}")
    engine = engine_with(every)
    assert engine.enforcement(HOST_ENDPOINT_ID) == (True, False)


def test_offline_trace_evaluates_host_policies_for_a_node_with_labels() -> None:
    from axoneme.core.cluster import Cluster, Pod
    from axoneme.core.policy.trace import OfflineCluster, resolve_peer, trace

    cluster = Cluster(pods={"default/client": Pod("client", "default", {"app": "client"})})
    policy = parse_policy_obj(yaml.safe_load(CLUSTER_ONLY))
    env = OfflineCluster.build(cluster, [policy], node_labels={"node-role": "worker"})
    host = resolve_peer(env, "entity:host", "--to")
    world = resolve_peer(env, "entity:world", "--from")
    pod = resolve_peer(env, "default/client", "--from")
    assert trace(env, world, host, TCP, 30080).verdict == "denied"
    assert trace(env, pod, host, TCP, 30080).verdict == "allowed"
    assert trace(env, pod, host, TCP, 22).verdict == "denied"
    # without a node, host policies are not evaluated (as without the host firewall)
    env = OfflineCluster.build(cluster, [policy])
    assert trace(env, world, resolve_peer(env, "entity:host", "--to"), TCP, 30080).verdict \
        == "allowed"
