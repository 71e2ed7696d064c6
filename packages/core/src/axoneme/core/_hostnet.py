"""Host prefixes (/32, /128) without the closure ``ipaddress`` gives each one.

``ipaddress.ip_network("10.0.0.1/32")`` stores ``hosts = lambda:
[IPv4Address(addr)]`` on the instance: a function, its cell and the address
text, ~250 of the ~500 bytes a /32 costs. A 100k-peer ``fromCIDR`` policy
holds 100k of them for as long as it is applied (issue 17: agent RSS).

``compact(net)`` moves such a network to a subclass whose ``hosts`` is a
method with the same answer and drops the instance attribute. The network
stays equal to, hashes as, prints (``repr`` too), copies and pickles as the
``ipaddress`` network it was; anything else (wider prefixes) is returned as is.
"""

from __future__ import annotations

import ipaddress
from typing import Any, TypeVar

N = TypeVar("N", bound=ipaddress.IPv4Network | ipaddress.IPv6Network)


class _Host4(ipaddress.IPv4Network):
    __slots__ = ()

    def hosts(self) -> list[ipaddress.IPv4Address]:  # type: ignore[override]
        return [self.network_address]

    def __reduce__(self) -> tuple[Any, ...]:
        return ipaddress.IPv4Network, (str(self),)


class _Host6(ipaddress.IPv6Network):
    __slots__ = ()

    def hosts(self) -> list[ipaddress.IPv6Address]:  # type: ignore[override]
        return [self.network_address]

    def __reduce__(self) -> tuple[Any, ...]:
        return ipaddress.IPv6Network, (str(self),)


# repr() and error texts name the class: they read as the stdlib's
_Host4.__name__ = _Host4.__qualname__ = "IPv4Network"
_Host6.__name__ = _Host6.__qualname__ = "IPv6Network"
_HOST_CLASS: dict[type, type] = {ipaddress.IPv4Network: _Host4, ipaddress.IPv6Network: _Host6}


def compact(net: N) -> N:
    """``net`` itself, without its per-instance ``hosts`` closure when it is a host prefix."""
    cls = _HOST_CLASS.get(type(net))
    if cls is not None and net.prefixlen == net.max_prefixlen:
        net.__dict__.pop("hosts", None)
        net.__class__ = cls
    return net


__all__ = ["compact"]
