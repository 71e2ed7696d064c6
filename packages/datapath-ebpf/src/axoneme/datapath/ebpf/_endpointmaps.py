"""The eBPF datapath's endpoints: their records in ``axoneme_endpoints_v1``
(by host ifindex) and ``axoneme_lxc_v1`` (by IP), the tc programs on their
host veths, fail-closed flags, and removal with everything the endpoint held."""

from __future__ import annotations

import ctypes as ct
import errno
import ipaddress

from axoneme.core.endpoint import HOST_ENDPOINT_ID, Endpoint
from axoneme.core.errors import DatapathProgramError, MapFullError
from axoneme.core.mapstate import Direction
from axoneme.datapath.ebpf import _bpf, _tc
from axoneme.datapath.ebpf import _layout as L
from axoneme.datapath.ebpf._dpstate import _FULL_ERRNOS
from axoneme.datapath.ebpf._hostep import HostEndpointMixin
from axoneme.datapath.ebpf._ipcachemaps import EbpfIPCache
from axoneme.datapath.ebpf._mapcodec import lxc_key, paddr_key
from axoneme.datapath.ebpf._nodedev import NodeDevicesMixin
from axoneme.datapath.ebpf._policymaps import EbpfPolicyMaps


class EbpfEndpoints(HostEndpointMixin, NodeDevicesMixin, EbpfPolicyMaps, EbpfIPCache):
    """Pod endpoints (the host endpoint: ``_hostep``)."""

    def _endpoint_struct(self, ep: Endpoint, ifindex: int, ifname: str, enforce_ingress: bool,
                         enforce_egress: bool) -> L.Endpoint:
        v = L.Endpoint()
        v.ep_id = ep.id
        v.identity = ep.identity
        v.ifindex = ifindex
        v.flags = (L.EP_F_ENFORCE_INGRESS if enforce_ingress else 0) | (
            L.EP_F_ENFORCE_EGRESS if enforce_egress else 0) | self._fail_closed.get(ep.id, 0) \
            | self._skip_flags(ep.id)
        if ep.ipv4:
            ct.memmove(v.ipv4, ipaddress.IPv4Address(ep.ipv4.split("/")[0]).packed, 4)
        if ep.ipv6:
            ct.memmove(v.ipv6, ipaddress.IPv6Address(ep.ipv6.split("/")[0]).packed, 16)
        v.ifname = ifname.encode()[:15]
        return v

    def endpoint_added(self, endpoint: Endpoint, enforce_ingress: bool, enforce_egress: bool) -> None:
        with self._lock:
            self._require()
            if endpoint.is_host:
                self._host_added(endpoint, enforce_ingress, enforce_egress)
                return
            ifindex = endpoint.host_ifindex or (_tc.ifindex_of(endpoint.host_ifname)
                                                if endpoint.host_ifname else 0)
            if not ifindex:
                raise DatapathProgramError("endpoint_added", errno.ENODEV,
                                           f"no host interface {endpoint.host_ifname!r} for endpoint {endpoint.id}")
            ifname = endpoint.host_ifname or _tc.ifname_of(ifindex)
            self._register(endpoint, ifindex, ifname, enforce_ingress, enforce_egress)
            self._attach(ifindex)
            self._refresh_node_addresses()
            self._bump_revision()

    def _register(self, endpoint: Endpoint, ifindex: int, ifname: str, enforce_ingress: bool = True,
                  enforce_egress: bool = True) -> None:
        """Write the endpoint records (no tc attach: benchmarks use this with test runs)."""
        self._require()
        if endpoint.id not in self._fail_closed:
            # a restarted agent adopts the record: a fail-closed endpoint stays so
            # until the agent says otherwise
            old = L.Endpoint()
            if _bpf.map_lookup(self._fds["ax_endpoints"], ct.c_uint32(ifindex), old) \
                    and old.ep_id == endpoint.id:
                bits = old.flags & (L.EP_F_FAIL_CLOSED_INGRESS | L.EP_F_FAIL_CLOSED_EGRESS)
                if bits:
                    self._fail_closed[endpoint.id] = bits
        val = self._endpoint_struct(endpoint, ifindex, ifname, enforce_ingress, enforce_egress)
        try:
            # a stale record of the same endpoint on another interface goes first
            for idx, old in self._endpoints().items():
                if old.ep_id == endpoint.id and idx != ifindex:
                    _bpf.map_delete(self._fds["ax_endpoints"], ct.c_uint32(idx))
            for ip in (endpoint.ipv4, endpoint.ipv6):
                if ip:
                    _bpf.map_update(self._fds["ax_lxc"], lxc_key(ip), val)
            _bpf.map_update(self._fds["ax_endpoints"], ct.c_uint32(ifindex), val)
            self._ifindex[endpoint.id] = ifindex
            self._bump_revision()
        except OSError as e:
            if e.errno in _FULL_ERRNOS:
                self._map_full_errors += 1
                raise MapFullError(f"endpoint map full adding endpoint {endpoint.id}") from e
            raise DatapathProgramError("endpoint map update", e.errno, str(e)) from e

    def _attach(self, ifindex: int) -> None:
        fc, tc_ = self._fns[_bpf.FROM_CONTAINER], self._fns[_bpf.TO_CONTAINER]
        try:
            _tc.attach(ifindex, fc.fd, fc.name.decode() if isinstance(fc.name, bytes) else fc.name,
                       tc_.fd, tc_.name.decode() if isinstance(tc_.name, bytes) else tc_.name)
        except Exception as e:
            code = getattr(e, "code", None)
            raise DatapathProgramError("tc attach", code, f"ifindex {ifindex}: {e}") from e

    def _reattach_all(self) -> int:
        n = 0
        for ifindex, val in self._endpoints().items():
            name = _tc.ifname_of(ifindex)
            if name and name == val.ifname.decode(errors="replace"):
                if val.ep_id == HOST_ENDPOINT_ID:
                    self._attach_host(ifindex)  # a device of the host firewall
                else:
                    self._attach(ifindex)
                n += 1
        return n

    def endpoint_fail_closed(self, endpoint: Endpoint, directions: frozenset[Direction]) -> None:
        """Set the endpoint's FAIL_CLOSED flags in both endpoint maps (see lib/endpoint.h)."""
        bits = (L.EP_F_FAIL_CLOSED_INGRESS if Direction.INGRESS in directions else 0) | (
            L.EP_F_FAIL_CLOSED_EGRESS if Direction.EGRESS in directions else 0)
        mask = L.EP_F_FAIL_CLOSED_INGRESS | L.EP_F_FAIL_CLOSED_EGRESS
        with self._lock:
            self._require()
            self._fail_closed[endpoint.id] = bits
            found = False
            try:
                found = self._set_flags(endpoint.id, mask, bits)
            except OSError as e:
                raise DatapathProgramError("endpoint fail-closed", e.errno, str(e)) from e
            finally:
                self._bump_revision()  # cached CT verdicts must be decided again
            if not found and bits:
                raise DatapathProgramError("endpoint fail-closed", errno.ENOENT,
                                           f"endpoint {endpoint.id} has no record")

    def endpoint_removed(self, endpoint: Endpoint) -> None:
        with self._lock:
            self._require()
            if endpoint.is_host:
                self._host_attached = None
                if not any(v.ep_id == endpoint.id for v in self._endpoints().values()):
                    return  # no host firewall here (an agent start checks): nothing to walk
            self._fail_closed.pop(endpoint.id, None)
            self._ifindex.pop(endpoint.id, None)
            for idx, old in self._endpoints().items():
                if old.ep_id == endpoint.id:
                    if not (endpoint.is_host and idx in self.node_device_ifindexes()):
                        self._detach_if_ours(idx, old.ifname.decode(errors="replace"))
                    _bpf.map_delete(self._fds["ax_endpoints"], ct.c_uint32(idx))
                    for family, raw in ((4, bytes(old.ipv4)), (6, bytes(old.ipv6))):
                        if any(raw):
                            k = L.LxcKey()
                            k.family = family
                            ct.memmove(k.addr, raw + bytes(16 - len(raw)), 16)
                            _bpf.map_delete(self._fds["ax_lxc"], k)
            for ip in (endpoint.ipv4, endpoint.ipv6):
                if ip:
                    _bpf.map_delete(self._fds["ax_lxc"], lxc_key(ip))
            for fd in self._policy_fds():
                for k in [k for k in _bpf.map_keys(fd, L.PolicyKey) if k.ep_id == endpoint.id]:
                    _bpf.map_delete(fd, k)
            for address in self._slots_index().pop(endpoint.id, {}):
                _bpf.map_delete(self._fds["ax_paddr"], paddr_key(endpoint.id, address))
            if self._index is not None:
                self._index.pop(endpoint.id, None)
                self._kinds.pop(endpoint.id, None)
            self._bump_revision()

    @staticmethod
    def _detach_if_ours(ifindex: int, ifname: str) -> None:
        # an ifindex can be reused by an unrelated interface: check the name
        current = _tc.ifname_of(ifindex)
        if current and (not ifname or current == ifname):
            _tc.detach(ifindex)


__all__ = ["EbpfEndpoints"]
