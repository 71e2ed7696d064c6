"""make_policy_for: the proxies' per-request view of the current MapState."""

from __future__ import annotations

from axoneme.agent.proxy import make_policy_for
from axoneme.core.endpoint import Endpoint
from axoneme.core.labels import Labels
from axoneme.core.mapstate import Direction, Entry, Key, L7Rules, MapState, Protocol
from axoneme.l7.http import HTTPRule

CLIENT = Endpoint(1, 1001, Labels.from_strings(["app=client"]), ipv4="10.244.0.2",
                  namespace="default", pod_name="client")
SERVER = Endpoint(2, 1002, Labels.from_strings(["app=server"]), ipv4="10.244.0.3",
                  namespace="default", pod_name="server")
RULES = (HTTPRule(method="GET", path="/public"),)


def _policy_for(states: dict[int, MapState]):
    eps = {CLIENT.ipv4: CLIENT, SERVER.ipv4: SERVER}
    ids = {CLIENT.ipv4: CLIENT.identity, SERVER.ipv4: SERVER.identity}
    return make_policy_for("http", endpoint_by_ip=eps.get,
                           identity_of_ip=lambda ip: ids.get(ip, 2),
                           policy_of=lambda ep: states.get(ep.id))


def test_ingress_redirect_gives_rules_and_endpoints() -> None:
    states = {2: MapState({Key(1001, Direction.INGRESS, Protocol.TCP, 80, 16):
                           Entry(proxy_port=15001, l7=L7Rules("http", RULES))})}
    pf = _policy_for(states)
    pol = pf("10.244.0.2", 40000, "10.244.0.3", 80, Direction.INGRESS)
    assert pol is not None and tuple(pol.rules) == RULES
    assert pol.source.pod_name == "client" and pol.source.identity == 1001
    assert pol.destination.pod_name == "server" and pol.destination.id == 2
    # another peer identity or port: not allowed any more -> refuse
    assert pf("10.244.9.9", 40000, "10.244.0.3", 80, Direction.INGRESS) is None
    assert pf("10.244.0.2", 40000, "10.244.0.3", 81, Direction.INGRESS) is None


def test_egress_and_policy_changes() -> None:
    key = Key(1002, Direction.EGRESS, Protocol.TCP, 80, 16)
    states = {1: MapState({key: Entry(proxy_port=15002, l7=L7Rules("http", RULES))})}
    pf = _policy_for(states)
    pol = pf("10.244.0.2", 40000, "10.244.0.3", 80, Direction.EGRESS)
    assert pol is not None and tuple(pol.rules) == RULES and pol.source.pod_name == "client"
    states[1] = MapState({key: Entry()})  # L4-only allow now: every request allowed
    pol = pf("10.244.0.2", 40000, "10.244.0.3", 80, Direction.EGRESS)
    assert pol is not None and tuple(pol.rules) == ()
    states[1] = MapState({key: Entry(proxy_port=15003, l7=L7Rules("kafka", ()))})
    assert pf("10.244.0.2", 40000, "10.244.0.3", 80, Direction.EGRESS) is None
    states[1] = MapState({key: Entry(deny=True)})
    assert pf("10.244.0.2", 40000, "10.244.0.3", 80, Direction.EGRESS) is None
    del states[1]
    assert pf("10.244.0.2", 40000, "10.244.0.3", 80, Direction.EGRESS) is None
    assert pf("10.244.7.7", 40000, "10.244.0.3", 80, Direction.EGRESS) is None


def test_the_marks_source_identity_beats_the_ipcache_on_ingress() -> None:
    """A tunnelled client this node's ipcache does not know (world here): the
    identity the datapath judged it by (the VNI's, passed on in the mark)
    decides, and the flow's source names it; without it, the ipcache's world
    is refused. On EGRESS the source is the local endpoint: the keyword is
    ignored."""
    states = {2: MapState({Key(1001, Direction.INGRESS, Protocol.TCP, 80, 16):
                           Entry(proxy_port=15001, l7=L7Rules("http", RULES))}),
              1: MapState({Key(1002, Direction.EGRESS, Protocol.TCP, 80, 16): Entry()})}
    pf = _policy_for(states)
    assert pf("10.244.9.9", 40000, "10.244.0.3", 80, Direction.INGRESS) is None
    pol = pf("10.244.9.9", 40000, "10.244.0.3", 80, Direction.INGRESS, source_identity=1001)
    assert pol is not None and tuple(pol.rules) == RULES
    assert pol.source.identity == 1001 and pol.destination.pod_name == "server"
    # a wrong ipcache entry loses too: the client's address is the server's identity there
    assert pf("10.244.0.3", 40000, "10.244.0.3", 80, Direction.INGRESS,
              source_identity=1001) is not None
    pol = pf("10.244.0.2", 40000, "10.244.0.3", 80, Direction.EGRESS, source_identity=4242)
    assert pol is not None and pol.source.identity == 1001
