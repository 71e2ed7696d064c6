"""The identity layout of the to-proxy and from-proxy marks (axoneme.core.marks)."""

from __future__ import annotations

import pytest
from axoneme.core.marks import (
    MARK_IDENTITY_PORT_MASK,
    MARK_MAGIC_HOST_MASK,
    MARK_MAGIC_PROXY_EGRESS,
    MARK_MAGIC_PROXY_INGRESS,
    MARK_MAGIC_TO_PROXY,
    MARK_TO_PROXY_PORT_MATCH,
    TPROXY_MARK,
    TPROXY_MASK,
    from_proxy_mark,
    identity_of_from_proxy_mark,
    identity_of_to_proxy_mark,
    identity_port_match,
    is_from_proxy,
    proxy_port_of,
    to_proxy_identity_mark,
    to_proxy_mark,
)

PORTS = (15000, 15001, 15002, 15053, 15101, 15102, 15153, 15255, 15256, 17047)


def tproxy(mark: int) -> int:
    """What the TPROXY target's --tproxy-mark 0x200/0xf00 leaves."""
    return (mark & ~TPROXY_MASK) ^ TPROXY_MARK


@pytest.mark.parametrize("identity", [1, 256, 4242, 15001, 0xFFFF])
def test_identity_marks_round_trip_and_match_only_their_port(identity: int) -> None:
    for port in PORTS:
        mark = to_proxy_identity_mark(port, identity)
        assert mark & MARK_MAGIC_HOST_MASK == MARK_MAGIC_TO_PROXY
        assert identity_of_to_proxy_mark(mark) == identity
        assert identity_of_to_proxy_mark(tproxy(mark)) == identity  # on the accepted socket
        for other in PORTS:
            low = identity_port_match(other)
            assert (mark & MARK_IDENTITY_PORT_MASK == low) == (other == port), (port, other)
            # never a plain rule's match, even when the identity equals a port
            assert mark & MARK_TO_PROXY_PORT_MATCH != to_proxy_mark(other)


def test_what_does_not_fit_gets_the_plain_mark() -> None:
    assert to_proxy_identity_mark(15001, 0) == to_proxy_mark(15001)
    assert to_proxy_identity_mark(15001, 1 << 24 | 5) == to_proxy_mark(15001)  # a CIDR identity
    assert to_proxy_identity_mark(14999, 4242) == to_proxy_mark(14999)
    assert to_proxy_identity_mark(17048, 4242) == to_proxy_mark(17048)
    assert identity_port_match(17048) is None
    for port in (14999, 15001, 21000):
        plain = to_proxy_mark(port)
        assert identity_of_to_proxy_mark(plain) == identity_of_to_proxy_mark(tproxy(plain)) == 0
        assert proxy_port_of(plain) == port


def test_from_proxy_marks_carry_the_identity_and_stay_from_proxy() -> None:
    assert from_proxy_mark(0) == MARK_MAGIC_PROXY_INGRESS
    assert from_proxy_mark(1) == MARK_MAGIC_PROXY_EGRESS
    m = from_proxy_mark(0, 4242)
    assert is_from_proxy(m) and m & MARK_MAGIC_HOST_MASK == MARK_MAGIC_PROXY_INGRESS
    assert identity_of_from_proxy_mark(m) == 4242
    assert from_proxy_mark(0, 1 << 24 | 5) == MARK_MAGIC_PROXY_INGRESS
    assert identity_of_from_proxy_mark(to_proxy_identity_mark(15001, 4242)) == 0
