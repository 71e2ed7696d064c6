"""The standalone pod runtime: what a container runtime does, without containers.

A pod is a network namespace wired by ``axoneme-cni`` (run through the CNI
protocol exactly like a runtime runs it: CNI_* environment, network config on
stdin) and a process started inside it with ``ip netns exec`` semantics
(the netns plus /etc/netns/<name>/resolv.conf bind-mounted over
/etc/resolv.conf).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from axoneme.agent import _netlink as nl
from axoneme.agent._config import AgentConfig
from axoneme.agent._records import PodRecord
from axoneme.core.errors import AxonemeError

LOG = logging.getLogger(__name__)

POD_NETWORK = "axoneme-pods"
CNI_VERSION = "1.1.0"


class CNIError(AxonemeError):
    """The CNI plugin reported an error."""


def cni_binary(explicit: str | None = None) -> str:
    """The plugin: ``axoneme-cni-native`` (the Go fast path scripts/cni-build
    puts next to the Python plugin; it hands what it does not answer to it)
    when built, else ``axoneme-cni``; beside this interpreter, else on PATH."""
    if explicit:
        return explicit
    for name in ("axoneme-cni-native", "axoneme-cni"):
        here = os.path.join(os.path.dirname(sys.executable), name)
        if os.access(here, os.X_OK):
            return here
    found = shutil.which("axoneme-cni")
    if found:
        return found
    raise AxonemeError("the axoneme-cni executable is not installed (pip install axoneme-cni)")


def cni_env(command: str, container_id: str, netns_path: str, namespace: str, pod: str,
            plugin: str, ifname: str = "eth0") -> dict[str, str]:
    return {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns_path,
        "CNI_IFNAME": ifname,
        "CNI_PATH": os.path.dirname(plugin),
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod}",
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }


async def run_cni(plugin: str, env: Mapping[str, str], config: Mapping[str, Any],
                  timeout: float = 60.0) -> dict[str, Any]:
    """Execute the plugin once; its result JSON, or CNIError with its msg/details."""
    proc = await asyncio.create_subprocess_exec(
        plugin, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(env))
    try:
        out, err = await asyncio.wait_for(proc.communicate(json.dumps(config).encode()), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise CNIError(f"CNI {env.get('CNI_COMMAND')} timed out after {timeout:.0f}s") from None
    text = out.decode(errors="replace").strip()
    if proc.returncode != 0:
        try:
            res = json.loads(text)
            msg = f"{res.get('msg', 'failed')}" + (f": {res['details']}" if res.get("details") else "")
            code = res.get("code")
        except (json.JSONDecodeError, AttributeError):
            msg, code = text or err.decode(errors="replace").strip(), None
        raise CNIError(f"CNI {env.get('CNI_COMMAND')} failed (code {code}): {msg}")
    if not text:
        return {}
    try:
        res = json.loads(text)
    except json.JSONDecodeError as e:
        raise CNIError(f"CNI plugin printed invalid JSON: {e}") from e
    return res if isinstance(res, dict) else {}


def proc_start(pid: int) -> int:
    """Start time of a process (clock ticks since boot): tells a PID's reuse apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
        return int(data.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return 0


def process_alive(pid: int, start: int) -> bool:
    if pid <= 0:
        return False
    now = proc_start(pid)
    if now == 0 or (start and now != start):
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def kill_pod_process(pid: int, start: int, grace: float = 3.0) -> None:
    """SIGTERM the pod's process group, then SIGKILL after ``grace`` seconds."""
    if not process_alive(pid, start):
        return
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    except PermissionError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not process_alive(pid, start):
            return
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class PodRuntime:
    """Starts and stops standalone pods. ``children`` are the pod processes
    this agent started (reaped by the pods' monitor); ``remove_endpoint`` is
    the fallback when CNI DEL fails (the endpoint service's ``cni_del``)."""

    def __init__(self, config: AgentConfig,
                 remove_endpoint: Callable[[Mapping[str, Any]], Awaitable[Any]]) -> None:
        self.config = config
        self.remove_endpoint = remove_endpoint
        self.children: dict[int, subprocess.Popen[bytes]] = {}

    def net_config(self) -> dict[str, Any]:
        return {"cniVersion": CNI_VERSION, "name": POD_NETWORK, "type": "axoneme-cni",
                "agentSocket": self.config.api_socket}

    async def start_pod(self, rec: PodRecord, env: Mapping[str, str]) -> str:
        """Create the netns, wire it through CNI, start the command. Returns the pod IP."""
        cfg = self.config
        plugin = cni_binary(cfg.cni_bin)
        # the pod's resolver before its netns exists: nothing that ever runs in it
        # (CNI included) may fall back to the host's resolver, which pods cannot reach
        etc = os.path.join("/etc/netns", rec.netns)
        os.makedirs(etc, exist_ok=True)
        with open(os.path.join(etc, "resolv.conf"), "w") as f:
            f.write(f"nameserver {cfg.dns_server}\noptions timeout:1 attempts:1\n")
        await asyncio.to_thread(nl.create_netns, rec.netns)
        netns_path = os.path.join(nl.NETNS_DIR, rec.netns)
        result = await run_cni(plugin, cni_env("ADD", rec.container_id, netns_path, rec.namespace,
                                               rec.name, plugin), self.net_config())
        ips = result.get("ips") or []
        if not ips:
            raise CNIError("CNI ADD returned no IP address")
        ip = str(ips[0]["address"]).split("/")[0]
        os.makedirs(os.path.dirname(rec.log), exist_ok=True)
        penv = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": "/root", "LANG": "C.UTF-8"}
        penv.update({str(k): str(v) for k, v in env.items()})
        penv.update({"POD_NAME": rec.name, "POD_NAMESPACE": rec.namespace, "POD_IP": ip})
        cwd = rec.cwd if os.path.isdir(rec.cwd) else "/"
        with open(rec.log, "ab") as log:
            try:
                child = subprocess.Popen(
                    ["ip", "netns", "exec", rec.netns, *rec.command], stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=penv,
                    start_new_session=True, close_fds=True)
            except OSError as e:
                raise AxonemeError(f"cannot start {rec.command[0]}: {e}") from e
        rec.pid = child.pid
        rec.pid_start = proc_start(child.pid)
        self.children[child.pid] = child
        LOG.info("pod %s started: pid %d in %s, ip %s", rec.key, child.pid, rec.netns, ip)
        return ip

    async def stop_pod(self, rec: PodRecord, cni_del: bool = True) -> None:
        """Stop the process, CNI DEL, remove the netns. Idempotent."""
        if rec.pid:
            await asyncio.to_thread(kill_pod_process, rec.pid, rec.pid_start)
            child = self.children.pop(rec.pid, None)
            if child is not None:
                try:
                    await asyncio.to_thread(child.wait, 5)
                except Exception:
                    pass
        netns_path = os.path.join(nl.NETNS_DIR, rec.netns) if rec.netns else ""
        if cni_del and rec.container_id:
            try:
                plugin = cni_binary(self.config.cni_bin)
                env = cni_env("DEL", rec.container_id,
                              netns_path if os.path.exists(netns_path) else "",
                              rec.namespace, rec.name, plugin)
                await run_cni(plugin, env, self.net_config())
            except Exception as e:
                LOG.warning("CNI DEL for pod %s failed (%s); removing the endpoint directly",
                            rec.key, e)
                await self.remove_endpoint({"container_id": rec.container_id})
        await asyncio.to_thread(nl.delete_netns, rec.netns)
        try:
            os.unlink(rec.log)
        except OSError:
            pass
