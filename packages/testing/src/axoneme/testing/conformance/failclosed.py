"""Fail closed, on the datapath under test, through the Datapath contract
itself (issue 13): while ``endpoint_fail_closed(endpoint, {INGRESS})`` is
set, everything the endpoint's policy decides in that direction is dropped
(a DROP_EP_NOT_READY flow says so) though its policy allows it all; the other
direction is not affected; a re-add and a restarted datapath keep it; an
empty set ends it.

No agent can make every datapath fail closed (only the eBPF policy map can
be full), so the datapath is driven directly, with real traffic between two
veth pods hanging off a private node namespace this module's thread enters
(no uplink there; the host's forwarding guard is installed first anyway).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import pytest
from axoneme.testing.conformance.fixtures import Node

pytestmark = [pytest.mark.conformance, pytest.mark.privileged, pytest.mark.axoneme_kernel]


class Events:
    """The datapath's flows, read by a thread until ``stop()``."""

    def __init__(self, dp: Any) -> None:
        self.dp = dp
        self.flows: queue.Queue[Any] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for flow in self.dp.events():
            self.flows.put(flow)

    def find(self, pred: Any, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                flow = self.flows.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            if pred(flow):
                return flow
        return None


def test_endpoint_fail_closed(conformance_node: Node, conformance_kernel_datapath: Any) -> None:
    from axoneme.core.datapath import Datapath
    from axoneme.core.flow import DropReason
    from axoneme.core.mapstate import ALLOW, Direction, Key, MapState

    node = conformance_node
    cls, config = conformance_kernel_datapath
    IN, OUT = Direction.INGRESS, Direction.EGRESS
    eps = node.endpoints()
    open_policy = MapState({Key(0, IN): ALLOW, Key(0, OUT): ALLOW})

    def wire(dp: Any) -> None:
        node.wire(dp, eps, open_policy)

    dp = cls(config)
    dp.start()
    if cls.endpoint_fail_closed is Datapath.endpoint_fail_closed:
        # the contract's default: the agent removes the entries itself instead
        try:
            wire(dp)
            with pytest.raises(NotImplementedError):
                dp.endpoint_fail_closed(eps["b"], frozenset({IN}))
            assert "fail_closed" not in cls.capabilities, "declares fail_closed, implements none"
        finally:
            dp.stop()
        return
    events = Events(dp)
    try:
        wire(dp)
        assert node.probe("a", "b") and node.probe("b", "a")
        dp.endpoint_fail_closed(eps["b"], frozenset({IN}))
        dp.endpoint_fail_closed(eps["b"], frozenset({IN}))  # idempotent
        assert not node.probe("a", "b"), "b's policy allows a, but b fails closed in ingress"
        assert node.probe("b", "a"), "b's egress is not failing closed"
        if cls.events is not Datapath.events:  # a datapath without events has no flow to show
            # b's own IPv6 chatter (MLD to ff02::16) fails closed too: find a's probe
            flow = events.find(lambda f: f.drop_reason is DropReason.DROP_EP_NOT_READY
                               and f.ip_destination == node.pods["b"].ip)
            assert flow is not None, "no DROP_EP_NOT_READY flow"
            assert (flow.traffic_direction, flow.ip_destination) == ("INGRESS", node.pods["b"].ip)
            assert flow.to_json()["drop_reason_desc"] == "DROP_EP_NOT_READY"
        assert dp.dump(eps["b"]) == open_policy  # the policy itself stays
        dp.endpoint_added(eps["b"], True, False)  # re-added: still failing closed
        assert not node.probe("a", "b")
    finally:
        dp.stop()
        events.thread.join(10)
    # a restarted datapath adopts the kernel's state, failing closed included
    fresh = cls(config)
    fresh.start()
    try:
        wire(fresh)
        assert not node.probe("a", "b"), "the restarted datapath lost the fail-closed state"
        fresh.endpoint_fail_closed(eps["b"], frozenset())
        assert node.probe("a", "b"), "an empty set did not end failing closed"
        assert node.probe("b", "a")
    finally:
        fresh.stop()
