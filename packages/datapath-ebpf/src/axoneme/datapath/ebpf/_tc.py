"""tc clsact attach/detach with pyroute2 (direct-action bpf filters)."""

from __future__ import annotations

import errno
import logging

from pyroute2 import IPRoute  # type: ignore[import-untyped]
from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]

LOG = logging.getLogger(__name__)

PARENT_INGRESS = "ffff:fff2"  # tc ingress of the host veth: packets leaving the pod
PARENT_EGRESS = "ffff:fff3"  # tc egress of the host veth: packets entering the pod
# One fixed filter slot per hook, so a restarted agent replaces its filter in place.
FILTER_PRIO = 1
FILTER_HANDLE = 1


def ensure_clsact(ipr: IPRoute, ifindex: int) -> None:
    """Add the clsact qdisc; EEXIST means it is there already (idempotent)."""
    try:
        ipr.tc("add", "clsact", ifindex)
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


def replace_filter(ipr: IPRoute, ifindex: int, parent: str, fd: int, name: str) -> None:
    ipr.tc("replace-filter", "bpf", ifindex, fd=fd, name=name, parent=parent, classid=1,
           direct_action=True, prio=FILTER_PRIO, handle=FILTER_HANDLE)


def delete_filter(ipr: IPRoute, ifindex: int, parent: str) -> bool:
    """Delete our filter; a missing filter or interface is success (idempotent)."""
    try:
        ipr.tc("del-filter", "bpf", ifindex, parent=parent, prio=FILTER_PRIO, handle=FILTER_HANDLE)
        return True
    except NetlinkError as e:
        if e.code in (errno.ENOENT, errno.ENODEV, errno.EINVAL):
            return False
        raise


def attach(ifindex: int, from_fd: int, from_name: str, to_fd: int, to_name: str) -> None:
    with IPRoute() as ipr:
        ensure_clsact(ipr, ifindex)
        replace_filter(ipr, ifindex, PARENT_INGRESS, from_fd, from_name)
        replace_filter(ipr, ifindex, PARENT_EGRESS, to_fd, to_name)


def detach(ifindex: int) -> None:
    with IPRoute() as ipr:
        for parent in (PARENT_INGRESS, PARENT_EGRESS):
            delete_filter(ipr, ifindex, parent)


def ifindex_of(name: str) -> int:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
    return int(found[0]) if found else 0


def ifname_of(ifindex: int) -> str:
    with IPRoute() as ipr:
        try:
            link = ipr.link("get", index=ifindex)[0]
        except NetlinkError:
            return ""
    return str(link.get_attr("IFLA_IFNAME") or "")


def node_addresses() -> list[tuple[int, str]]:
    """(family, address) of every address in this (the node's) netns."""
    out: list[tuple[int, str]] = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr():
            addr = msg.get_attr("IFA_ADDRESS")
            if addr:
                out.append((4 if msg["family"] == 2 else 6, str(addr)))
    return out
