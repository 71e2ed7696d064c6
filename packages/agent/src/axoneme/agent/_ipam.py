"""Pod IP address management: one IPv4 pool, addresses owned by container ids."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from axoneme.core.errors import AxonemeError, ConfigError


class IPAMExhausted(AxonemeError):
    """No free address is left in the pod CIDR."""


class IPAM:
    """Sequential allocator over a CIDR.

    The network address, network+1 (the gateway address, put on nothing) and
    the broadcast address are never handed out. Allocation continues after
    the last address handed out so a released IP is not reused at once.
    """

    def __init__(self, cidr: str, allocated: Mapping[str, str] | None = None) -> None:
        try:
            self.network = ipaddress.IPv4Network(cidr, strict=True)
        except ValueError as e:
            raise ConfigError(f"invalid pod CIDR {cidr!r}: {e}") from e
        if self.network.prefixlen > 29:
            raise ConfigError(f"pod CIDR {cidr} is too small (at most /29)")
        self._first = int(self.network.network_address) + 2
        self._last = int(self.network.broadcast_address) - 1
        self._owner: dict[str, str] = {}  # ip -> owner
        self._cursor = self._first
        for ip, owner in (allocated or {}).items():
            self.reserve(ip, owner)

    @property
    def gateway(self) -> str:
        return str(self.network.network_address + 1)

    def reserve(self, ip: str, owner: str) -> None:
        addr = ipaddress.IPv4Address(ip)
        if addr not in self.network:
            # an address from an older, different pod CIDR: keep it reserved
            # anyway so it is never handed out twice.
            self._owner[ip] = owner
            return
        current = self._owner.get(ip)
        if current is not None and current != owner:
            raise AxonemeError(f"IP {ip} is owned by {current}, not {owner}")
        self._owner[ip] = owner
        self._cursor = max(self._cursor, int(addr) + 1)
        if self._cursor > self._last:
            self._cursor = self._first

    def allocate(self, owner: str) -> str:
        for ip, who in self._owner.items():
            if who == owner:
                return ip
        span = self._last - self._first + 1
        cur = self._cursor
        for _ in range(span):
            if cur > self._last:
                cur = self._first
            ip = str(ipaddress.IPv4Address(cur))
            cur += 1
            if ip not in self._owner:
                self._owner[ip] = owner
                self._cursor = cur
                return ip
        raise IPAMExhausted(f"pod CIDR {self.network} has no free address")

    def release(self, ip: str) -> bool:
        return self._owner.pop(ip, None) is not None

    def owner(self, ip: str) -> str | None:
        return self._owner.get(ip)

    def allocated(self) -> dict[str, str]:
        return dict(self._owner)
