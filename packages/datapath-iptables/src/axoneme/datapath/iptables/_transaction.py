"""The iptables datapath's write path: rules rendered, restored in one transaction.

Every write is an ``iptables-restore --noflush`` payload per family (filter,
and mangle for endpoints holding redirects): an endpoint chain is flushed and
refilled in one restore, so the kernel never holds half a policy. A write
that fails in one family puts back those already written. What the rules
say is ``_render``'s (pure); this module knows which chains exist.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

from axoneme.core.errors import DatapathError, DatapathProgramError
from axoneme.core.mapstate import Direction, Entry, Key, MapState
from axoneme.datapath.iptables import _readback as rb
from axoneme.datapath.iptables import _render as rd
from axoneme.datapath.iptables._ipsets import _IPSets

LOG = logging.getLogger(__name__)

_SUB_RE = re.compile(r"^AXON-EP-(\d+)-(IN|OUT)-S\d+$")
_DIRS = {"IN": Direction.INGRESS, "OUT": Direction.EGRESS}


class _Transactions(_IPSets):
    """Render an endpoint's chains and restore them; the shared chains."""

    def _peers(self, family: int) -> rd.Peers:
        if self.mode == "ipset":
            sets = self._idsets[family]
            return rd.Peers(self.mode, family, lambda ident: ("set",) if sets.get(ident, ((), ()))[0] else ())
        ranges = self._ranges[family]
        return rd.Peers(self.mode, family, lambda ident: ranges.get(ident, ()))

    def _render(self, ep_id: int, d: Direction, family: int,
                state: Mapping[Key, Entry] | None = None,
                targets: rd.Targets = rd.FILTER,
                closed: frozenset[Direction] | None = None) -> dict[str, list[str]]:
        ref = self._refs[ep_id]
        tail = ref.tail_in_drop if d is Direction.INGRESS else ref.tail_out_drop
        st = self._states.get(ep_id, MapState()) if state is None else state
        if closed is None:
            closed = self._fail_closed.get(ep_id, frozenset())
        return rd.render_endpoint(ep_id, d, st, self._peers(family), tail, targets,
                                  placeholders=family == 4 and targets is rd.FILTER,
                                  fail_closed=d in closed)

    def _render_with_stale(self, ep_id: int, d: Direction, family: int,
                           state: Mapping[Key, Entry] | None = None,
                           closed: frozenset[Direction] | None = None
                           ) -> tuple[dict[str, list[str]], list[str]]:
        chains = self._render(ep_id, d, family, state, closed=closed)
        old = self._subchains.get((ep_id, family, d), set())
        return chains, sorted(old - set(chains))

    def _commit_subchains(self, chains: Mapping[str, list[str]], deleted: Iterable[str],
                          family: int) -> None:
        dead = set(deleted)
        for name in chains:
            m = _SUB_RE.match(name)
            if m:
                self._subchains.setdefault((int(m.group(1)), family, _DIRS[m.group(2)]),
                                           set()).add(name)
        for key in list(self._subchains):
            if key[1] == family:
                self._subchains[key] -= dead
        for name, rules in chains.items():
            parts = name.split("-")
            if len(parts) == 4 and parts[:2] == ["AXON", "EP"] and parts[2].isdigit():
                self._rule_counts[(int(parts[2]), family, _DIRS[parts[3]])] = len(rules)

    def _write(self, ep_id: int, state: MapState, dirs: set[Direction], hooks: bool = False,
               closed: frozenset[Direction] | None = None) -> None:
        """Render ``dirs`` of one endpoint (failing closed in ``closed``, default:
        as now) and restore them, one transaction per family; on failure the
        families already written are put back."""
        if self.mode == "ipset":
            self._sync_sets(need={k.identity for k in state if k.identity and not k.is_address},
                            only_missing=True)
        old_closed = self._fail_closed.get(ep_id, frozenset())
        new_closed = old_closed if closed is None else closed
        done: list[int] = []
        try:
            for family in self._families:
                self._write_family(ep_id, state, dirs, hooks, family, new_closed)
                done.append(family)
        except DatapathError:
            old = self._states.get(ep_id, MapState())
            for family in done:
                try:
                    self._write_family(ep_id, old, dirs, hooks, family, old_closed)
                except DatapathError:
                    LOG.exception("rollback of endpoint %d (IPv%d) failed", ep_id, family)
            raise
        self._proxy_chains |= rd.proxy_ports(state)
        self._states[ep_id] = state
        if new_closed:
            self._fail_closed[ep_id] = new_closed
        else:
            self._fail_closed.pop(ep_id, None)

    def _write_family(self, ep_id: int, state: MapState, dirs: set[Direction], hooks: bool,
                      family: int, closed: frozenset[Direction]) -> None:
        chains: dict[str, list[str]] = {}
        for port, d in sorted(rd.proxy_ports(state) - self._proxy_chains):
            chains[rd.proxy_chain(port, d)] = rd.proxy_chain_rules(port, d, self.nflog_group)
        deletes: list[str] = []
        for d in sorted(dirs):
            c, dels = self._render_with_stale(ep_id, d, family, state, closed)
            chains.update(c)
            deletes += dels
        if hooks:
            chains.update(self._hooks(family))
        payload = rd.restore_payload("filter", chains, delete_chains=deletes)

        # mangle: the same lookup, only for directions holding redirects
        mchains: dict[str, list[str]] = {}
        mdeletes: list[str] = []
        mangle = dict(self._mangle)
        for d in sorted(dirs):
            key = (ep_id, family, d)
            old = mangle.get(key, set())
            if any(e.is_redirect for k, e in state.items() if k.direction == d):
                c = self._render(ep_id, d, family, state, rd.MANGLE, closed)
                mchains.update(c)
                mdeletes += sorted(old - set(c))
                mangle[key] = set(c)
            elif old:
                mdeletes += sorted(old)
                mangle.pop(key)
        ports = {e.proxy_port for e in state.values() if e.is_redirect}
        new_mproxy = {(family, p) for p in ports} - self._mproxy
        for _, port in sorted(new_mproxy):
            mchains[rd.mangle_proxy_chain(port)] = rd.mangle_proxy_rules(port)
        redirecting = {(ep, d) for (ep, fam, d) in mangle if fam == family}
        if redirecting != self._redirecting(family) or (hooks and redirecting):
            mchains[rd.PRE_CHAIN] = rd.pre_chain(list(self._refs.values()), redirecting, family)
        if mchains or mdeletes:
            payload += rd.restore_payload("mangle", mchains, delete_chains=mdeletes)
        self._restore(family, payload)
        self._commit_subchains(chains, deletes, family)
        self._mangle = mangle
        self._mproxy |= new_mproxy

    def _restore(self, family: int, payload: str) -> None:
        if self.fault_injection is not None and family == 4:
            bad, self.fault_injection = self.fault_injection, None
            payload = payload.replace("COMMIT\n", f"{bad}\nCOMMIT\n")
        self._counters["restores"] += 1
        try:
            self.backend.restore(family, payload)
        except DatapathProgramError:
            self._counters["restore_errors"] += 1
            LOG.debug("failed restore payload:\n%s", payload)
            raise

    def _rerender_peers(self, family: int, idents: set[int]) -> None:
        """Rewrite (one restore) the chains of the endpoints whose keys name an
        identity of ``idents``: their addresses changed under them."""
        eps = [ep for ep, st in self._states.items()
               if ep in self._refs and any(k.identity in idents for k in st)]
        if not eps:
            return
        chains: dict[str, list[str]] = {}
        deletes: list[str] = []
        for ep_id in eps:
            for d in Direction:
                c, dels = self._render_with_stale(ep_id, d, family)
                chains.update(c)
                deletes += dels
        self._restore(family, rd.restore_payload("filter", chains, delete_chains=deletes))
        self._commit_subchains(chains, deletes, family)

    def _hooks(self, family: int) -> dict[str, list[str]]:
        scope = rd.PodScope(self.host_ifname_prefix, self._pod_cidrs.get(family, ()))
        return rd.hook_chains(list(self._refs.values()), scope, family)

    def _redirecting(self, family: int) -> set[tuple[int, Direction]]:
        return {(ep, d) for (ep, fam, d) in self._mangle if fam == family}

    def _write_base(self, tables: Mapping[int, tuple[rb.Table, rb.Table]]) -> None:
        """Verdict and hook chains (flushed and refilled: they are derived) and
        the jump rules from the built-in chains (added only when missing)."""
        for family in self._families:
            table, mangle = tables[family]
            chains = rd.shared_chains(self.nflog_group)
            for port, d in sorted(self._proxy_chains):
                chains[rd.proxy_chain(port, d)] = rd.proxy_chain_rules(port, d, self.nflog_group)
            hooks = self._hooks(family)
            # Endpoint chains must exist for the hook chains' jumps.
            for ep_id in self._refs:
                for d in Direction:
                    name = rd.ep_chain(ep_id, d)
                    if name not in table.chains:
                        chains.update(self._render(ep_id, d, family))
            chains.update(hooks)
            post = []
            for builtin, chain in rd.HOOKS:
                if not any(r.endswith(f"-j {chain}") for r in table.chains.get(builtin, [])):
                    post.append(f"-I {rd.hook_rule(builtin, chain)}".replace(
                        f"-I {builtin} ", f"-I {builtin} 1 ", 1))
            payload = rd.restore_payload("filter", chains, post=post)
            mpost = []
            for builtin, chain in rd.MANGLE_HOOKS:
                if not any(r.endswith(f"-j {chain}") for r in mangle.chains.get(builtin, [])):
                    mpost.append(f"-I {builtin} 1 -m comment --comment {rd.HOOK_COMMENT} -j {chain}")
            pre = {rd.PRE_CHAIN: rd.pre_chain(list(self._refs.values()), self._redirecting(family),
                                              family)}
            payload += rd.restore_payload("mangle", pre, post=mpost)
            self._restore(family, payload)
