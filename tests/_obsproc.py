"""Real observability back ends for the e2e tests (Prometheus, an OTLP
collector): a free loopback port, a daemon started with its output in a file
and handed over only once it accepts connections, stopped by its PID."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from axoneme.testing.netns import wait_accepting

# the policy both tests apply: pods app=web take ingress from app=friend only
WEB_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-from-friends, namespace: default}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress: [{fromEndpoints: [{matchLabels: {app: friend}}]}]
"""
WEB_POLICY_KEY = "CiliumNetworkPolicy/default/web-from-friends"


def free_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def daemon(argv: Sequence[str], log: Path, port: int, timeout: float = 60.0
           ) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` (its output in ``log``) until the block ends; yield once
    127.0.0.1:``port`` accepts. Stopped with SIGTERM, then SIGKILL, by PID."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(list(argv), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_accepting("127.0.0.1", port, None, proc, str(log), timeout)
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)


def get_json(url: str, params: dict[str, str] | None = None, timeout: float = 10.0) -> Any:
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())
