"""Host prefixes (/32, /128) without the closure ``ipaddress`` gives each one.

``ipaddress.ip_network("10.0.0.1/32")`` stores ``hosts = lambda:
[IPv4Address(addr)]`` on the instance: a function, its cell and the address
text, ~250 of the ~500 bytes a /32 costs. A 100k-peer ``fromCIDR`` policy
holds 100k of them for as long as it is applied (issue 17: agent RSS).

``compact(net)`` gives such a network as a subclass whose ``hosts`` is a
method with the same answer (~185 B where the stdlib's takes ~500): equal
to, hashing as, printing (``repr`` too), copying and pickling as the
``ipaddress`` network; anything else (wider prefixes) is returned as is.
"""

from __future__ import annotations

import ipaddress
from typing import Any, TypeVar, cast

N = TypeVar("N", bound=ipaddress.IPv4Network | ipaddress.IPv6Network)


def _host_class(base: type[N]) -> type[N]:
    """``base`` whose ``hosts`` is a method giving the one address (what the
    stdlib's closure gives a host prefix); pickles as ``base``."""

    class Host(base):  # type: ignore[valid-type,misc]
        __slots__ = ()

        def hosts(self) -> list[Any]:
            return [self.network_address]

        def __reduce__(self) -> tuple[Any, ...]:
            return base, (str(self),)

    # repr() and error texts name the class: they read as the stdlib's
    Host.__name__ = Host.__qualname__ = base.__name__
    return Host


_HOST_CLASS: dict[type, type] = {b: _host_class(b)
                                 for b in (ipaddress.IPv4Network, ipaddress.IPv6Network)}


def compact(net: N) -> N:
    """``net``, or for a host prefix an equal network without the ``hosts`` closure.

    A new object with the three attributes ``ipaddress`` sets, in its order (a
    dict sharing its class's keys; deleting ``hosts`` from the original would
    unshare them and cost about what the closure did)."""
    cls = _HOST_CLASS.get(type(net))
    if cls is None or net.prefixlen != net.max_prefixlen:
        return net
    out: Any = object.__new__(cls)
    out.network_address = net.network_address
    out.netmask = net.netmask
    out._prefixlen = net.prefixlen
    return cast(N, out)


__all__ = ["compact"]
