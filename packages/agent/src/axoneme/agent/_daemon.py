"""``axoneme agent run`` and ``axoneme agent cleanup``."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import sys
from typing import Any

from aiohttp import web
from axoneme.agent import _gcpause, guard
from axoneme.agent import _netlink as nl
from axoneme.agent._agent import Agent
from axoneme.agent._api import HOT_ROUTES, MAX_BODY, build_app, error_reply, socket_in_use
from axoneme.agent._apifast import FrontSite
from axoneme.agent._config import LOCK_FILE, AgentConfig
from axoneme.agent._errors import StateDirLocked
from axoneme.agent._hubble import start_hubble
from axoneme.agent._k8sclient import node_name
from axoneme.agent._l7proxies import cleanup_redirect_rules
from axoneme.agent._noderoutes import NodeRouting
from axoneme.agent._records import PodRecord
from axoneme.agent._runtime import kill_pod_process
from axoneme.agent._statefile import StateCorrupt, read_json
from axoneme.core.datapath import build_datapath, datapath_class
from axoneme.core.errors import AxonemeError, ConfigError, DatapathUnavailable, PluginError
from axoneme.core.lockfile import LockHeld, PidLock

LOG = logging.getLogger(__name__)

EXIT_RUNTIME = 1
EXIT_BAD_INPUT = 2


def run_agent(config: AgentConfig) -> int:
    """Run the agent until SIGTERM/SIGINT; the exit code."""
    _gcpause.tune_heap()  # before any thread: the C heap of a long-lived agent (see _gcpause)
    try:
        return asyncio.run(_serve(config))
    except KeyboardInterrupt:  # pragma: no cover
        return 0


async def _serve(config: AgentConfig) -> int:
    if socket_in_use(config.api_socket):
        sys.stderr.write(f"error: another agent is already serving {config.api_socket} "
                         f"(--api-socket)\n")
        return EXIT_RUNTIME
    try:
        agent = Agent(config)
        await agent.start()
    except StateCorrupt as e:
        sys.stderr.write(f"error: {e} ({e.path})\n")
        return EXIT_BAD_INPUT
    except StateDirLocked as e:
        sys.stderr.write(f"error: {e} (--state-dir)\n")
        return EXIT_RUNTIME
    except DatapathUnavailable as e:
        sys.stderr.write(f"error: datapath {config.datapath} is unavailable: {e} (--datapath)\n")
        return EXIT_RUNTIME
    except PluginError as e:
        sys.stderr.write(f"error: {e} (--datapath)\n")
        return EXIT_RUNTIME
    except ConfigError as e:
        sys.stderr.write(f"error: {e} (configuration)\n")
        return EXIT_BAD_INPUT
    except AxonemeError as e:
        sys.stderr.write(f"error: {e} (agent start)\n")
        return EXIT_RUNTIME

    app = build_app(agent)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    sock_dir = os.path.dirname(config.api_socket)
    if sock_dir:
        os.makedirs(sock_dir, mode=0o755, exist_ok=True)
    try:
        os.unlink(config.api_socket)  # stale socket from a killed agent
    except FileNotFoundError:
        pass
    old = os.umask(0o177)
    try:
        # the policy changes are served by a lean front, everything else by aiohttp (_apifast)
        site = FrontSite(runner, config.api_socket, app[HOT_ROUTES], error_reply, MAX_BODY)
        await site.start()
    finally:
        os.umask(old)
    os.chmod(config.api_socket, 0o600)
    try:
        hubble = await start_hubble(agent.flows, config, node_name(config))
    except ConfigError as e:
        sys.stderr.write(f"error: {e} (--hubble-socket-path)\n")
        await runner.cleanup()
        await agent.stop()
        return EXIT_BAD_INPUT
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    LOG.warning("axoneme agent ready: datapath %s, api %s, state %s", config.datapath,
                config.api_socket, config.state_dir)
    await stop.wait()
    LOG.warning("axoneme agent stopping")
    if hubble is not None:
        await hubble.stop()
    await runner.cleanup()
    await agent.stop()
    try:
        os.unlink(config.api_socket)
    except FileNotFoundError:
        pass
    return 0


def cleanup(state_dir: str) -> int:
    """Remove everything an agent with ``state_dir`` made. Idempotent.

    Refuses (exit 1) while an agent holds the state dir's lock."""
    lock = PidLock(os.path.join(state_dir, LOCK_FILE))
    if os.path.isdir(state_dir):
        # an agent still serving the dir keeps it: cleaning up under it would
        # tear down what it enforces and leave it writing to a removed dir
        try:
            lock.acquire("axoneme agent cleanup")
        except LockHeld as e:
            who = f"agent pid {e.pid}" if e.pid else "another agent"
            sys.stderr.write(f"error: {who} is running with state dir {state_dir} "
                             f"({e.info or 'holds ' + e.path}); stop it first, then run "
                             f"`axoneme agent cleanup`\n")
            return EXIT_RUNTIME
    try:
        return _cleanup(state_dir)
    finally:
        if lock.held:
            try:
                os.unlink(lock.path)
            except FileNotFoundError:
                pass
            lock.release()
            try:
                os.rmdir(state_dir)
            except OSError:
                pass


def _recorded_options(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """The datapath options the agent recorded; for a state file written
    before they were, the legacy fields the datapath still declares."""
    options = data.get("datapath_options")
    if isinstance(options, dict):
        return options
    declared = {o.name for o in datapath_class(name).options}
    legacy = {"mode": data.get("datapath_mode"), "bpffs_root": data.get("bpffs_root")}
    return {k: v for k, v in legacy.items() if v and (not declared or k in declared)}


def _cleanup(state_dir: str) -> int:
    path = os.path.join(state_dir, "state.json")
    code = 0
    try:
        data: dict[str, Any] | None = read_json(path)
    except StateCorrupt as e:
        sys.stderr.write(f"error: {e} ({path})\n")
        data, code = None, EXIT_BAD_INPUT
    data = data or {}
    for rec_d in (data.get("pods") or {}).values():
        try:
            rec = PodRecord(**rec_d)
        except TypeError:
            continue
        kill_pod_process(rec.pid, rec.pid_start, grace=2.0)
        nl.delete_netns(rec.netns)
    for ep in (data.get("endpoints") or {}).values():
        host = ep.get("host_ifname") or (nl.host_ifname(ep.get("container_id", ""))
                                         if ep.get("container_id") else "")
        try:
            nl.teardown_endpoint(host)
        except Exception as e:
            sys.stderr.write(f"warning: cannot remove {host}: {e}\n")
    name = data.get("datapath")
    if name:
        try:
            dp = build_datapath(name, state_dir=state_dir,
                                pod_cidr=data.get("pod_cidr", "10.244.0.0/16"),
                                options=_recorded_options(name, data))
            dp.cleanup()
        except Exception as e:
            sys.stderr.write(f"warning: datapath {name} cleanup failed: {e}\n")
            code = code or EXIT_RUNTIME
    if data.get("l7_proxies"):
        try:
            cleanup_redirect_rules(state_dir)
        except Exception as e:
            sys.stderr.write(f"warning: L7 redirect rules cleanup failed: {e}\n")
    if data.get("routing"):  # Kubernetes mode: routes to other nodes' pods (_routing)
        try:
            NodeRouting().cleanup()
        except Exception as e:
            sys.stderr.write(f"warning: routing cleanup failed: {e}\n")
    try:
        guard.remove(state_dir)
    except Exception as e:
        sys.stderr.write(f"warning: guard removal failed: {e}\n")
    sock = data.get("api_socket")
    if sock and os.path.exists(sock):
        if not socket_in_use(sock):
            try:
                os.unlink(sock)
            except OSError:
                pass
    if code != EXIT_BAD_INPUT:
        for name_ in ("state.json", "fqdn-cache.json", "dropped-policies.json"):
            try:
                os.unlink(os.path.join(state_dir, name_))
            except FileNotFoundError:
                pass
        shutil.rmtree(os.path.join(state_dir, "pods"), ignore_errors=True)
        for entry in os.listdir(state_dir) if os.path.isdir(state_dir) else []:
            if entry.startswith(("state.json.tmp.", "fqdn-cache.json.tmp.")):
                try:
                    os.unlink(os.path.join(state_dir, entry))
                except OSError:
                    pass
        try:
            os.rmdir(state_dir)
        except OSError:
            pass
    return code
