"""The node's devices in the eBPF datapath (``Datapath.node_devices``).

Where traffic from other nodes and from outside the cluster enters the node
(Cilium's ``--devices`` and its tunnel device), tc programs decide it for
local endpoints before routing, so ingress L7 rules redirect it to the proxy:

- a collect_md ("external") VXLAN device, the tunnel of tunnel routing:
  ``ax_from_overlay``/``ax_to_overlay`` (bpf/overlay.c), which also carry the
  source's identity in the VNI;
- any other device: ``ax_from_netdev``/``ax_to_netdev`` (bpf/host.c), the
  programs the host firewall uses too (its part stays off on a device
  without a host endpoint record).

What is attached is recorded in ``<state_dir>/ebpf-node-devices.json`` (name
-> ifindex), so a restarted agent attaches its new programs there and
``cleanup`` detaches them; a device is only detached when its ifindex still
has the recorded name. A device the host firewall enforces on keeps its
programs when it leaves this list (and the other way round).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
from collections.abc import Sequence
from typing import Any

from axoneme.core.errors import DatapathProgramError
from axoneme.datapath.ebpf import _bpf, _tc

LOG = logging.getLogger(__name__)

STATE_FILE = "ebpf-node-devices.json"
OVERLAY, NETDEV = "overlay", "netdev"


def is_collect_md_vxlan(name: str) -> bool:
    """True for a VXLAN device in collect_md ("external") mode."""
    proc = subprocess.run(["ip", "-d", "-j", "link", "show", "dev", name], capture_output=True,
                          text=True, check=False)
    try:
        link = json.loads(proc.stdout)[0] if proc.returncode == 0 else {}
    except (ValueError, IndexError):
        return False
    info = link.get("linkinfo") or {}
    return bool(info.get("info_kind") == "vxlan" and (info.get("info_data") or {}).get("external"))


class NodeDevicesMixin:
    """``EbpfDatapath``'s node devices."""

    config: Any
    _fns: dict[str, Any]
    _lock: Any
    _host_attached: dict[str, int] | None
    _node_devs: dict[str, tuple[int, str]] | None = None  # name -> (ifindex, OVERLAY|NETDEV)

    def _node_state_path(self) -> str:
        return os.path.join(self.config.state_dir, STATE_FILE)

    def _recorded_node_devices(self) -> dict[str, int]:
        try:
            with open(self._node_state_path(), encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): int(v) for k, v in data.items() if isinstance(v, int)}

    def _record_node_devices(self) -> None:
        devs = {name: idx for name, (idx, _) in (self._node_devs or {}).items()}
        path = self._node_state_path()
        if not devs:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(devs, f, sort_keys=True)
        os.replace(tmp, path)

    def node_device_ifindexes(self) -> set[int]:
        return {idx for idx, _ in (self._node_devs or {}).values()}

    def node_devices(self, devices: Sequence[str]) -> None:
        """Attach to ``devices`` (and only those: a device no longer listed is
        detached). A name without an interface: DatapathProgramError (ENODEV),
        nothing changed."""
        with self._lock:
            self._require()  # type: ignore[attr-defined]
            want: dict[str, tuple[int, str]] = {}
            for name in dict.fromkeys(devices):
                idx = _tc.ifindex_of(name)
                if not idx:
                    raise DatapathProgramError("node_devices", errno.ENODEV,
                                               f"node device {name!r}: no such interface")
                want[name] = (idx, OVERLAY if is_collect_md_vxlan(name) else NETDEV)
            have = dict(self._node_devs or {})
            host = set((self._host_attached or {}).values())
            for name, (idx, kind) in have.items():
                if want.get(name) == (idx, kind):
                    continue
                if idx in host and kind == NETDEV:
                    continue  # the host firewall's programs stay
                self._detach_node_device(name, idx)
            for name, (idx, kind) in want.items():
                if have.get(name) != (idx, kind):
                    self._attach_node_device(idx, kind)
            self._node_devs = want
            self._record_node_devices()
            if want != have:
                LOG.info("ebpf: node devices %s", ", ".join(f"{n} ({k})" for n, (_, k)
                                                           in sorted(want.items())) or "none")

    def _attach_node_device(self, ifindex: int, kind: str) -> None:
        names = (_bpf.FROM_OVERLAY, _bpf.TO_OVERLAY) if kind == OVERLAY else \
            (_bpf.FROM_NETDEV, _bpf.TO_NETDEV)
        fi, fe = self._fns[names[0]], self._fns[names[1]]
        try:
            _tc.attach(ifindex, fi.fd, names[0], fe.fd, names[1])
        except Exception as e:
            code = getattr(e, "code", None)
            raise DatapathProgramError("tc attach", code, f"node device ifindex {ifindex}: {e}") \
                from e

    @staticmethod
    def _detach_node_device(name: str, ifindex: int) -> None:
        current = _tc.ifname_of(ifindex)
        if current and current == name:
            _tc.detach(ifindex)

    def _reattach_node_devices(self) -> int:
        """At start: the recorded devices get this run's programs (the agent
        names its devices again soon; until then the old programs would run)."""
        devs: dict[str, tuple[int, str]] = {}
        for name, idx in self._recorded_node_devices().items():
            if _tc.ifname_of(idx) != name:
                continue  # gone, or its ifindex reused
            kind = OVERLAY if is_collect_md_vxlan(name) else NETDEV
            self._attach_node_device(idx, kind)
            devs[name] = (idx, kind)
        self._node_devs = devs
        return len(devs)

    def _cleanup_node_devices(self) -> None:
        for name, idx in self._recorded_node_devices().items():
            self._detach_node_device(name, idx)
        self._node_devs = {}
        self._record_node_devices()
