"""The ipcache and the identity ipsets of the iptables datapath.

``AXON-IPC4``/``AXON-IPC6`` keep the ipcache itself (prefix with the identity
in the entry comment) so a restarted agent adopts it. From it, per family,
the longest-prefix-match view per identity: in plain mode disjoint CIDRs
(rendered one rule each), in ipset mode the ``AXON-ID-<id>``/``AXON-ID6-<id>``
sets (``hash:net`` with ``nomatch`` for the more specific prefixes of other
identities, i.e. CIDR excepts).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from axoneme.core.datapath import IPCacheChanges, IPNetwork
from axoneme.datapath.iptables import _prefixes as px
from axoneme.datapath.iptables import _readback as rb
from axoneme.datapath.iptables import _render as rd
from axoneme.datapath.iptables._backend import Backend
from axoneme.datapath.iptables._state import _State

IPC_SET = {4: "AXON-IPC4", 6: "AXON-IPC6"}
_IPC_RE = re.compile(r'^add (AXON-IPC[46]) (\S+) comment "id=(\d+)(,z)?"')
_SET_ADD_RE = re.compile(r"^add (AXON-ID6?-\d+) (\S+)( nomatch)?")
_SET_CREATE_RE = re.compile(r"^create (AXON-\S+) ")


class _IPSets(_State):
    """The ipcache, its address views per identity and their ipsets."""

    def _adopt_ipsets(self) -> None:
        existing = set()
        contents: dict[str, tuple[set[str], set[str]]] = {}
        ipcache: dict[int, dict[px.Prefix, int]] = {4: {}, 6: {}}
        for line in Backend.ipset_save().splitlines():
            if m := _SET_CREATE_RE.match(line):
                existing.add(m.group(1))
                continue
            if m := _IPC_RE.match(line):
                name, cidr, ident, zero = m.groups()
                net = ipaddress.ip_network(cidr, strict=False)
                if zero:
                    net = net.supernet(new_prefix=0)
                ipcache[net.version][px.to_prefix(net)] = int(ident)
            elif m := _SET_ADD_RE.match(line):
                name, cidr, nomatch = m.groups()
                c = str(ipaddress.ip_network(cidr, strict=False))
                contents.setdefault(name, (set(), set()))[1 if nomatch else 0].add(c)
        self._ipcache = ipcache
        self._sets = {name: (frozenset(contents.get(name, (set(), set()))[0]),
                             frozenset(contents.get(name, (set(), set()))[1]))
                      for name in existing if name.startswith(("AXON-ID-", "AXON-ID6-"))}
        lines = []
        for family, name in IPC_SET.items():
            if name not in existing:
                fam = "inet" if family == 4 else "inet6"
                lines.append(f"create {name} hash:net family {fam} comment "
                             f"maxelem {max(self.config.ipcache_max, 1024)}")
        Backend.ipset_restore("\n".join(lines) + "\n")

    def _destroy_ipsets(self) -> None:
        """Destroy every ipset of ours (the rules using them are gone)."""
        names = [m.group(1) for line in Backend.ipset_save().splitlines()
                 if (m := _SET_CREATE_RE.match(line)) and rb.OWNED_SET_RE.match(m.group(1))]
        Backend.ipset_restore("".join(f"destroy {name}\n" for name in names))

    def _identity_of(self, ip: str) -> int:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return 0
        family = addr.version
        bits = px.BITS[family]
        value = int(addr)
        table = self._ipcache[family]
        for plen in self._lengths[family]:
            mask = ((1 << bits) - 1) ^ ((1 << (bits - plen)) - 1)
            ident = table.get((value & mask, plen))
            if ident is not None:
                return ident
        return px.WORLD

    def _recompute(self, families: Iterable[int]) -> tuple[dict[int, set[int]], dict[int, set[int]]]:
        """Refresh the derived per-identity address views; return, per family,
        the identities whose addresses changed and those whose rules must be
        re-rendered (plain: the same; ipset: the ones gaining their first or
        losing their last address)."""
        changed: dict[int, set[int]] = {}
        rerender: dict[int, set[int]] = {}
        for family in families:
            table = self._ipcache[family]
            self._lengths[family] = sorted({plen for _, plen in table} | {0}, reverse=True)
            if self.mode == "plain":
                new = {ident: [px.to_cidr(p, family) for p in ranges]
                       for ident, ranges in px.effective_ranges(table, family).items()}
                old = self._ranges[family]
                changed[family] = {i for i in set(old) | set(new) if old.get(i) != new.get(i)}
                rerender[family] = changed[family]
                self._ranges[family] = new
            else:
                old_sets = self._idsets[family]
                new_sets = px.identity_sets(table, family)
                changed[family] = {i for i in set(old_sets) | set(new_sets)
                                   if old_sets.get(i) != new_sets.get(i)}
                rerender[family] = {i for i in changed[family]
                                    if bool(old_sets.get(i, ((), ()))[0])
                                    != bool(new_sets.get(i, ((), ()))[0])}
                self._idsets[family] = new_sets
        return changed, rerender

    def _ipset_apply(self, changes: IPCacheChanges) -> dict[int, set[int]]:
        """Write ``changes`` to the ipcache ipsets (and, in ipset mode, the
        identity sets) and the in-memory view; return, per family touched,
        the identities whose rules must be re-rendered."""
        lines = []
        touched = set()
        for net in changes.deletes:
            prefix = px.to_prefix(net)
            if self._ipcache[net.version].pop(prefix, None) is not None:
                touched.add(net.version)
                lines += [f"del {IPC_SET[net.version]} {c} -exist" for c in self._ipc_cidrs(net)]
        for net, ident in changes.upserts.items():
            prefix = px.to_prefix(net)
            if self._ipcache[net.version].get(prefix) == ident:
                continue
            self._ipcache[net.version][prefix] = ident
            touched.add(net.version)
            zero = ",z" if net.prefixlen == 0 else ""
            lines += [f'add {IPC_SET[net.version]} {c} comment "id={ident}{zero}" -exist'
                      for c in self._ipc_cidrs(net)]
        if not touched:
            return {}
        # Updating an existing entry's comment needs del + add.
        lines = [ln for ln in lines if ln.startswith("del")] + [
            f"del {ln.split()[1]} {ln.split()[2]} -exist" for ln in lines if ln.startswith("add")
        ] + [ln for ln in lines if ln.startswith("add")]
        Backend.ipset_restore("\n".join(lines) + "\n")
        changed, rerender = self._recompute(touched)
        if self.mode == "ipset":
            dirty = set().union(*changed.values())
            referenced = {k.identity for st in self._states.values() for k in st}
            self._sync_sets(need={i for i in dirty if i in referenced or any(
                rd.set_name(i, f) in self._sets for f in self._families)})
        return rerender

    @staticmethod
    def _ipc_cidrs(net: IPNetwork) -> list[str]:
        if net.prefixlen == 0:
            return [str(s) for s in net.subnets(prefixlen_diff=1)]
        return [str(net)]

    def dump_ipcache(self) -> dict[IPNetwork, int]:
        out: dict[IPNetwork, int] = {}
        for line in Backend.ipset_save().splitlines():
            if m := _IPC_RE.match(line):
                _, cidr, ident, zero = m.groups()
                net = ipaddress.ip_network(cidr, strict=False)
                if zero:
                    net = net.supernet(new_prefix=0)
                out[net] = int(ident)
        return out

    def _sync_sets(self, need: Iterable[int] = (), only_missing: bool = False) -> None:
        """Make the AXON-ID sets hold the current LPM view (ipset mode).

        ``need``: identities whose sets must exist and be current; with
        ``only_missing`` the sets that exist are taken as current
        (ipcache_apply keeps them so) and only absent ones are made."""
        lines: list[str] = []
        wanted = set(need)
        new_sets: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        for family in self._families:
            fam = "inet" if family == 4 else "inet6"
            if only_missing:
                idents = {i for i in wanted if rd.set_name(i, family) not in self._sets}
            else:
                idents = wanted
            for ident in idents:
                name = rd.set_name(ident, family)
                match, nomatch = self._idsets[family].get(ident, (set(), set()))
                want = (frozenset(px.to_cidr(p, family) for p in match),
                        frozenset(px.to_cidr(p, family) for p in nomatch))
                have = self._sets.get(name)
                if have is None and not match:
                    continue  # rules render a never-matching placeholder instead
                if have is None:
                    lines.append(f"create {name} hash:net family {fam} "
                                 f"maxelem {max(self.config.ipcache_max, 1024)} -exist")
                    have = (frozenset(), frozenset())
                new_sets[name] = want
                if have == want:
                    continue
                for c in (have[0] - want[0]) | (have[1] - want[1]):
                    lines.append(f"del {name} {c} -exist")
                for c in want[0] - have[0]:
                    lines.append(f"add {name} {c} -exist")
                for c in want[1] - have[1]:
                    if c in have[0]:
                        lines.append(f"del {name} {c} -exist")
                    lines.append(f"add {name} {c} nomatch -exist")
                for c in want[0] & have[1]:
                    lines.append(f"del {name} {c} -exist")
                    lines.append(f"add {name} {c} -exist")
        if lines:
            Backend.ipset_restore("\n".join(lines) + "\n")
        self._sets.update(new_sets)
