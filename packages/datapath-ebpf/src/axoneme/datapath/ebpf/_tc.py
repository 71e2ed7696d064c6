"""tc clsact attach/detach over rtnetlink (direct-action bpf filters)."""

from __future__ import annotations

import errno
import logging
import socket

from axoneme.core.netlink import Rtnl, RtnlError, tc_handle

LOG = logging.getLogger(__name__)

PARENT_INGRESS = "ffff:fff2"  # tc ingress of the host veth: packets leaving the pod
PARENT_EGRESS = "ffff:fff3"  # tc egress of the host veth: packets entering the pod
# One fixed filter slot per hook, so a restarted agent replaces its filter in place.
FILTER_PRIO = 1
FILTER_HANDLE = 1


def ensure_clsact(rtnl: Rtnl, ifindex: int) -> None:
    """Add the clsact qdisc; EEXIST means it is there already (idempotent)."""
    try:
        rtnl.clsact_add(ifindex)
    except RtnlError as e:
        if e.errno != errno.EEXIST:
            raise


def replace_filter(rtnl: Rtnl, ifindex: int, parent: str, fd: int, name: str) -> None:
    rtnl.bpf_filter_replace(ifindex, tc_handle(parent), fd, name, prio=FILTER_PRIO,
                            handle=FILTER_HANDLE, classid=1, direct_action=True)


def delete_filter(rtnl: Rtnl, ifindex: int, parent: str) -> bool:
    """Delete our filter; a missing filter or interface is success (idempotent)."""
    try:
        rtnl.filter_del(ifindex, tc_handle(parent), prio=FILTER_PRIO, handle=FILTER_HANDLE)
        return True
    except RtnlError as e:
        if e.errno in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False
        raise


def attach(ifindex: int, from_fd: int, from_name: str, to_fd: int, to_name: str) -> None:
    with Rtnl() as rtnl:
        ensure_clsact(rtnl, ifindex)
        replace_filter(rtnl, ifindex, PARENT_INGRESS, from_fd, from_name)
        replace_filter(rtnl, ifindex, PARENT_EGRESS, to_fd, to_name)


def detach(ifindex: int) -> None:
    with Rtnl() as rtnl:
        for parent in (PARENT_INGRESS, PARENT_EGRESS):
            delete_filter(rtnl, ifindex, parent)


def ifindex_of(name: str) -> int:
    with Rtnl() as rtnl:
        return rtnl.link_index(name)


def ifname_of(ifindex: int) -> str:
    with Rtnl() as rtnl:
        try:
            link = rtnl.link_get(ifindex)
        except RtnlError:
            return ""
    return link.name if link else ""


def node_addresses() -> list[tuple[int, str]]:
    """(family, address) of every address in this (the node's) netns."""
    with Rtnl() as rtnl:
        addrs = rtnl.addr_dump()
    return [(4 if a.family == socket.AF_INET else 6, a.address) for a in addrs if a.address]
