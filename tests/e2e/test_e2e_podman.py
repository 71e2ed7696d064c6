"""podman (CNI backend) wires a container through axoneme-cni, and it reaches a pod.

Nothing global is touched: podman gets its own containers.conf (CONTAINERS_CONF),
storage (--root/--runroot) and CNI config dir; the container runs from a
busybox rootfs directory (no image pull).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import _testnet  # tests/ is on sys.path (tests/conftest.py)
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.privileged]

TOOLS = ("podman", "runc", "conmon", "busybox")


@pytest.fixture
def podman_env(agent: Any, tmp_path: Path) -> Any:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"podman e2e needs {', '.join(missing)} "
                    f"(apt-get install podman runc conmon busybox-static)")
    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    for d in ("etc", "proc", "sys", "dev", "tmp"):
        (rootfs / d).mkdir()
    shutil.copy(shutil.which("busybox") or "", rootfs / "bin" / "busybox")
    for applet in ("sh", "ip", "cat", "nc", "printf", "grep", "sleep"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    netd = tmp_path / "net.d"
    netd.mkdir()
    (netd / "axtest.conflist").write_text(json.dumps({
        "cniVersion": "1.0.0", "name": "axtest",
        "plugins": [{"type": "axoneme-cni", "agentSocket": str(agent.socket)}]}))
    conf = tmp_path / "containers.conf"
    conf.write_text(f"""[containers]
default_ulimits = ["nofile=4096:4096", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
[network]
network_backend = "cni"
cni_plugin_dirs = ["/usr/lib/cni", "{Path(sys.executable).parent}"]
network_config_dir = "{netd}"
""")
    env = {**agent.env(), "CONTAINERS_CONF": str(conf)}
    # podman limits --runroot to 50 characters: keep it under the agent's short workdir
    base = ["podman", "--root", str(agent.workdir / "pr"), "--runroot", str(agent.workdir / "prr")]

    def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, "run", "--rm", "--network", "axtest", "--rootfs",
                               str(rootfs), *cmd], capture_output=True, text=True, env=env,
                              timeout=timeout)

    try:
        yield run
    finally:
        subprocess.run([*base, "rm", "--all", "--force"], capture_output=True, env=env)


def test_podman_container_gets_an_endpoint_and_reaches_a_pod(agent: Any, podman_env: Any,
                                                             tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello").write_text("hello podman\n")
    server = agent.pod_run("web", "python3", *_testnet.http_server_argv("0.0.0.0", 8080, str(www)),
                           labels="app=web")
    script = (f"ip -4 -o addr show eth0; "
              f"for i in 1 2 3 4 5 6 7 8 9 10; do "
              # (Debian's static busybox wget segfaults: speak HTTP with nc)
              f"printf 'GET /hello HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {server} 8080 | "
              f"grep -q hello && printf 'hello podman\\n' && break; sleep 0.3; done")
    res = podman_env("/bin/sh", "-c", script)
    assert res.returncode == 0, f"podman failed: {res.stderr}\n{agent.log()}"
    assert "hello podman" in res.stdout
    inet = next(w for w in res.stdout.split() if w.startswith("10.244."))
    assert inet.endswith("/32")
    import ipaddress

    assert ipaddress.ip_interface(inet).ip in ipaddress.ip_network(agent.pod_cidr)
    assert "endpoint" in agent.log() and "/" in agent.log()
    # --rm ran CNI DEL: only the pod-run endpoint is left
    assert [e["pod"] for e in agent.json("endpoint", "list")] == ["default/web"]
