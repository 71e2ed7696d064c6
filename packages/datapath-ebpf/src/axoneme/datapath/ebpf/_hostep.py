"""The host endpoint (host firewall) in the eBPF datapath.

The host endpoint (``Endpoint.is_host``) has one record in
``axoneme_endpoints_v1`` per device it enforces on (key: the device's
ifindex), where ``ax_from_netdev``/``ax_to_netdev`` (bpf/host.c) run, and one
under key ``AX_HOST_EP_KEY`` (0) that the pod programs look up for traffic
between the host and its local pods. Its policy lives in the policy maps
under its endpoint id, like a pod's.
"""

from __future__ import annotations

import ctypes as ct
import errno
from typing import Any

from axoneme.core.endpoint import HOST_ENDPOINT_ID, Endpoint
from axoneme.core.errors import DatapathProgramError
from axoneme.datapath.ebpf import _bpf, _tc
from axoneme.datapath.ebpf._hostct import seed_host_connections

HOST_EP_KEY = 0  # DO NOT CHANGE: mirrors AX_HOST_EP_KEY in lib/endpoint.h


class HostEndpointMixin:
    """``EbpfDatapath``'s host endpoint (``endpoint_added`` of a host endpoint)."""

    _fds: dict[str, int]
    _fns: dict[str, Any]

    # device name -> ifindex of the devices this run attached to: a later
    # endpoint_added of the host (its enforcement flags changed) only rewrites
    # the records, with map syscalls and no netlink (blocking netlink must not
    # run on the agent's event loop, where a small regeneration may write)
    _host_attached: dict[str, int] | None = None

    def _host_added(self: Any, ep: Endpoint, enforce_ingress: bool, enforce_egress: bool) -> None:
        attached: dict[str, int] = self._host_attached or {}
        devices: dict[int, str] = {}
        for name in ep.devices:
            idx = attached.get(name) or _tc.ifindex_of(name)
            if not idx:
                raise DatapathProgramError("endpoint_added", errno.ENODEV,
                                           f"host firewall: no device {name!r}")
            devices[idx] = name
        if not devices:
            raise DatapathProgramError("endpoint_added", errno.ENODEV,
                                       "host firewall: the host endpoint names no device")
        self._host_records(ep, devices, enforce_ingress, enforce_egress)
        new = {idx: name for idx, name in devices.items() if attached.get(name) != idx}
        if new:
            # the node's connections from before: tracked, before and after the attach
            # (one opened in between is in the second pass)
            seed_host_connections(self._fds["ax_ct"])
        for idx in new:
            self._attach_host(idx)
        if new:
            seed_host_connections(self._fds["ax_ct"])
            self._refresh_node_addresses()
        self._host_attached = {name: idx for idx, name in devices.items()}
        self._bump_revision()

    def _host_records(self: Any, ep: Endpoint, devices: dict[int, str], enforce_ingress: bool,
                      enforce_egress: bool) -> None:
        """Write the host endpoint's records (no tc attach: test runs use this)."""
        fd = self._fds["ax_endpoints"]
        want = {HOST_EP_KEY: "", **devices}
        for idx, old in self._endpoints().items():
            if old.ep_id == HOST_ENDPOINT_ID and idx not in want:
                # a device no longer enforced on (or a previous run's); a node
                # device keeps the programs (_nodedev: local delivery)
                if idx not in self.node_device_ifindexes():
                    self._detach_if_ours(idx, old.ifname.decode(errors="replace"))
                _bpf.map_delete(fd, ct.c_uint32(idx))
        try:
            for idx, name in want.items():
                val = self._endpoint_struct(ep, idx, name, enforce_ingress, enforce_egress)
                _bpf.map_update(fd, ct.c_uint32(idx), val)
        except OSError as e:
            raise DatapathProgramError("host endpoint map update", e.errno, str(e)) from e
        self._bump_revision()

    def _attach_host(self: Any, ifindex: int) -> None:
        fi, fe = self._fns[_bpf.FROM_NETDEV], self._fns[_bpf.TO_NETDEV]

        def name(fn: Any) -> str:
            return fn.name.decode() if isinstance(fn.name, bytes) else str(fn.name)

        try:
            _tc.attach(ifindex, fi.fd, name(fi), fe.fd, name(fe))
        except Exception as e:
            code = getattr(e, "code", None)
            raise DatapathProgramError("tc attach", code, f"device ifindex {ifindex}: {e}") from e
