"""Hostile input on the agent's own socket: refused with 400, nothing created, agent serving.

The CNI plugin checks names too, but any root process can talk to the socket
directly, so the agent is where the check counts."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]


@pytest.mark.parametrize(("field", "value"), [
    ("namespace", "a/b"),
    ("namespace", "UPPER"),
    ("namespace", "x" * 64),
    ("pod_name", "web\nx"),
    ("pod_name", "p" * 300),
    ("container_id", "../../etc/passwd"),
    ("ifname", "eth0 x"),
])
def test_cni_add_refuses_bad_names(agent: Any, field: str, value: str) -> None:
    from axoneme.agent.client import AgentError

    body = {"container_id": "c" * 64, "netns": "/proc/self/ns/net", "ifname": "eth0",
            "namespace": "default", "pod_name": "web", field: value}
    with pytest.raises(AgentError) as err:
        agent.api().post("/v1/cni/add", body)
    assert err.value.status == 400
    assert f"invalid {field}" in str(err.value)
    assert agent.api().get("/v1/endpoints") == []
    assert agent.cli("status", check=True).returncode == 0


def test_deeply_nested_body_is_a_bad_request(agent: Any) -> None:
    """json.loads raises RecursionError on deep nesting: a 400, not a 500 with a traceback."""
    import http.client
    import socket

    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(agent.socket))

    conn = Conn("localhost", timeout=30)
    body = b"[" * 200_000
    conn.request("POST", "/v1/cni/add", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status in (400, 413)
    assert agent.cli("status", check=True).returncode == 0
