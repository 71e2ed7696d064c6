"""iptables rule text -> state: what ``_render`` records in its rules read back.

Pure (no kernel), like ``_render``: the datapath parses ``iptables-save``
output here. An endpoint chain's key rules carry their key and entry in an
``AXK:`` comment (``_render.key_comment``), which ``parse_key_rules`` turns
back into the exact MapState; the hook chains' ``AXEP`` comments
(``EndpointRef.comment``) give the endpoints; an ``AXFC`` rule marks a
direction failing closed. ``OWNED_CHAIN_RE`` and ``OWNED_SET_RE`` say which
chains and sets in the kernel are this datapath's.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from axoneme.core.mapstate import Direction, Entry, Key, MapState, Protocol
from axoneme.datapath.iptables._render import FAIL_CLOSED_COMMENT, EndpointRef

# ---- rule comments -----------------------------------------------------------

_KEY_RE = re.compile(r'--comment "?AXK:(\d+):(\d+):(\d+):(\d+):(\d+):(\d):(\d+):(\d):(\d)'
                     r'(?:@([0-9A-Fa-f.:]+))?"?')


def parse_key_rules(rules: Sequence[str]) -> MapState:
    out: dict[Key, Entry] = {}
    for rule in rules:
        m = _KEY_RE.search(rule)
        if not m:
            continue
        v = [int(x) for x in m.groups()[:9]]
        key = Key(v[0], Direction(v[1]), Protocol(v[2]), v[3], v[4], m.group(10) or "")
        out[key] = Entry(deny=bool(v[5]), proxy_port=v[6], audit=bool(v[7]), auth_required=bool(v[8]))
    return MapState(out)


_EP_RE = re.compile(r'--comment "?AXEP,(\d+),([^,\s"]+),([^,\s"]+),([^,\s"]+),([ad])([ad])')


def parse_endpoint_refs(rules: Sequence[str]) -> list[EndpointRef]:
    out = []
    for rule in rules:
        m = _EP_RE.search(rule)
        if m:
            ep_id, ifname, v4, v6, ti, to = m.groups()
            out.append(EndpointRef(int(ep_id), ifname, "" if v4 == "-" else v4,
                                   "" if v6 == "-" else v6, ti == "d", to == "d"))
    return out


def is_fail_closed(rules: Sequence[str]) -> bool:
    """Whether an endpoint chain (rules as iptables-save prints them) fails closed."""
    return any(re.search(rf'--comment "?{FAIL_CLOSED_COMMENT}"? ', r) for r in rules)


# ---- iptables-save parsing ---------------------------------------------------

# The chains this datapath creates. Other AXON- chains (the agent's guard and
# proxy chains) belong to someone else and are never touched.
OWNED_CHAIN_RE = re.compile(
    r"^AXON-(FWD|INPUT|OUTPUT|PRE|(ALLOW|AUDIT|DENY|DROP|NRDY|NOEP|UNKNOWN)-(IN|OUT)|EP-\d+-(IN|OUT)(-S\d+)?"
    r"|PXY-\d+-(IN|OUT)|MPXY-\d+)$")
OWNED_SET_RE = re.compile(r"^AXON-(ID6?-\d+|IPC[46])$")


@dataclass(slots=True)
class Table:
    chains: dict[str, list[str]]  # chain -> rules (text after "-A <chain> ")

    def axon_chains(self) -> list[str]:
        """Chains we own, sub-chains first (a chain can only go once unreferenced)."""
        owned = [c for c in self.chains if OWNED_CHAIN_RE.match(c)]
        return sorted(owned, key=lambda c: (-c.count("-"), c))


def parse_save(text: str, table: str = "filter") -> Table:
    chains: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = line[1:].strip()
            continue
        if current != table:
            continue
        if line.startswith(":"):
            chains.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith("-A "):
            _, chain, rest = line.split(" ", 2)
            chains.setdefault(chain, []).append(rest)
    return Table(chains)
