"""MapState -> iptables rule text.

Everything here is pure (no kernel): the datapath feeds the output to
``iptables-restore --noflush``; ``_readback`` parses ``iptables-save`` back.

Chain layout (filter table, both families):

- ``AXON-FWD`` (from FORWARD), ``AXON-INPUT`` (from INPUT), ``AXON-OUTPUT``
  (from OUTPUT): per endpoint, ``-i <host veth>`` jumps to the egress chain
  ``AXON-EP-<id>-OUT`` and ``-o <host veth>`` to the ingress chain
  ``AXON-EP-<id>-IN``.
- An endpoint chain ends every packet in a *verdict chain* reached with
  ``-g`` (goto), so that when the verdict chain returns, processing continues
  in the hook chain (a pod -> pod packet passes the source's egress chain and
  then the destination's ingress chain): ``AXON-ALLOW-<D>`` (log new
  connections, return = allowed), ``AXON-AUDIT-<D>`` (an allow entry with the
  audit flag: a staged policy or audit mode would drop it; log new
  connections as AUDIT, return = allowed), ``AXON-PXY-<port>-<D>`` (mark for the L7
  proxy, return), ``AXON-DENY-<D>`` (explicit deny: log, DROP),
  ``AXON-DROP-<D>`` (no match: log, DROP) and ``AXON-NRDY-<D>`` (the
  endpoint fails closed in that direction: log, DROP; its ``AXFC`` rule comes
  right after the reply rule, before any key, so nothing its policy would
  decide passes).
- The host endpoint (host firewall, ``HOST_ENDPOINT_ID``): its chains are
  reached from ``AXON-INPUT`` (``! -i lo``, after the pods' jumps: the
  host's INGRESS policy, for packets to the node from anywhere, its local
  pods included) and ``AXON-OUTPUT`` (``! -o lo``, before the pods' jumps:
  its EGRESS policy); never from ``AXON-FWD`` (forwarded traffic is not the
  host's). Its ``AXEP`` comment (interface ``*host``) sits on its INPUT rule.
- Unknown endpoints: after the per-endpoint jumps, packets through one of
  our pod interfaces (``-i``/``-o <prefix>+``) with a pod address (the pod
  CIDR) jump to ``AXON-NOEP-OUT``/``AXON-NOEP-IN``, which return for every
  interface that has an endpoint and send the rest to ``AXON-UNKNOWN-<D>``
  (log, DROP): an interface whose endpoint chains are not (yet, or any more)
  there passes nothing. The DROP sits in a verdict chain, written at start
  only, so its kernel counter survives the hook chains' rewrites.
- Allowed packets are not ACCEPTed: they return to the built-in chain and
  meet whatever else the host has there (we never decide for rules we did
  not create).

Every rule that stands for a MapState key carries the key and entry in its
comment (``AXK:...``), so ``dump()`` reconstructs the MapState exactly
(``_readback.parse_key_rules``); a key
that has no address in a family (an identity without prefixes, ICMPv6 in
the IPv4 table) is kept as a rule that can never match.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from axoneme.core.endpoint import HOST_ENDPOINT_ID
from axoneme.core.mapstate import Direction, Entry, Key, Protocol
from axoneme.core.marks import (
    MARK_MAGIC_HOST_MASK,
    MARK_MAGIC_PROXY_INGRESS,
    MARK_MAGIC_TO_PROXY,
    MARK_TO_PROXY_MASK,
    to_proxy_mark,
)

FWD_CHAIN = "AXON-FWD"
INPUT_CHAIN = "AXON-INPUT"
OUTPUT_CHAIN = "AXON-OUTPUT"
HOOKS = (("FORWARD", FWD_CHAIN), ("INPUT", INPUT_CHAIN), ("OUTPUT", OUTPUT_CHAIN))
HOOK_COMMENT = "axon-hook"
HOST_IFNAME = "*host"  # the host endpoint's EndpointRef.ifname: no interface of its own

# A match no packet satisfies: the same mark bit must be both 1 and 0.
NEVER = "-m mark --mark 0x1/0x1 -m mark --mark 0x0/0x1"
REPLY_RULE = "-m conntrack --ctstate RELATED,ESTABLISHED --ctdir REPLY -j RETURN"
# router solicitation/advertisement, neighbour solicitation/advertisement
ND_RULES = [f"-p ipv6-icmp -m icmp6 --icmpv6-type {t} -j RETURN" for t in (133, 134, 135, 136)]

# NFLOG prefixes: "AXON:<verdict>:<I|E>[:<proxy port>]"
LOG_ALLOW, LOG_REDIRECT, LOG_DENY, LOG_DROP = "A", "R", "X", "D"
LOG_NOT_READY, LOG_UNKNOWN = "N", "U"  # endpoint failing closed; no endpoint on the interface
LOG_AUDIT = "W"  # allowed, but it "would be dropped" (Entry.audit)
FAIL_CLOSED_COMMENT = "AXFC"

_DIR = {Direction.INGRESS: "IN", Direction.EGRESS: "OUT"}
_LOGDIR = {Direction.INGRESS: "I", Direction.EGRESS: "E"}


def ep_chain(ep_id: int, direction: Direction) -> str:
    return f"AXON-EP-{ep_id}-{_DIR[direction]}"


def set_name(identity: int, family: int) -> str:
    return f"AXON-ID-{identity}" if family == 4 else f"AXON-ID6-{identity}"


def allow_chain(d: Direction) -> str:
    return f"AXON-ALLOW-{_DIR[d]}"


def audit_chain(d: Direction) -> str:
    return f"AXON-AUDIT-{_DIR[d]}"


def deny_chain(d: Direction) -> str:
    return f"AXON-DENY-{_DIR[d]}"


def drop_chain(d: Direction) -> str:
    return f"AXON-DROP-{_DIR[d]}"


def not_ready_chain(d: Direction) -> str:
    return f"AXON-NRDY-{_DIR[d]}"


def unknown_chain(d: Direction) -> str:
    return f"AXON-NOEP-{_DIR[d]}"


def unknown_drop_chain(d: Direction) -> str:
    return f"AXON-UNKNOWN-{_DIR[d]}"


def proxy_chain(port: int, d: Direction) -> str:
    return f"AXON-PXY-{port}-{_DIR[d]}"


def _log(group: int, prefix: str, name: str, new_only: bool) -> str:
    # Per connection rate limit so a flood of one flow cannot drown the rest.
    ct = "-m conntrack --ctstate NEW " if new_only else ""
    return (f"{ct}-m hashlimit --hashlimit-upto 20/sec --hashlimit-burst 10 "
            f"--hashlimit-mode srcip,dstip,srcport,dstport --hashlimit-name {name} "
            f"-j NFLOG --nflog-group {group} --nflog-prefix {prefix} --nflog-threshold 1")


def shared_chains(group: int) -> dict[str, list[str]]:
    """The verdict chains every endpoint chain jumps into."""
    out: dict[str, list[str]] = {}
    for d in Direction:
        ld = _LOGDIR[d]
        out[allow_chain(d)] = [_log(group, f"AXON:{LOG_ALLOW}:{ld}", f"axon-a{ld}", True)]
        out[audit_chain(d)] = [_log(group, f"AXON:{LOG_AUDIT}:{ld}", f"axon-w{ld}", True)]
        out[deny_chain(d)] = [_log(group, f"AXON:{LOG_DENY}:{ld}", f"axon-x{ld}", False), "-j DROP"]
        out[drop_chain(d)] = [_log(group, f"AXON:{LOG_DROP}:{ld}", f"axon-d{ld}", False), "-j DROP"]
        out[not_ready_chain(d)] = [_log(group, f"AXON:{LOG_NOT_READY}:{ld}", f"axon-n{ld}", False),
                                   "-j DROP"]
        out[unknown_drop_chain(d)] = [_log(group, f"AXON:{LOG_UNKNOWN}:{ld}", f"axon-u{ld}", False),
                                      "-j DROP"]
    return out


def proxy_chain_rules(port: int, d: Direction, group: int) -> list[str]:
    ld = _LOGDIR[d]
    return [*mangle_proxy_rules(port),
            _log(group, f"AXON:{LOG_REDIRECT}:{ld}:{port}", f"axon-r{ld}", True)]


# ---- key comments (read back by _readback.parse_key_rules) ------------------

def key_comment(key: Key, entry: Entry) -> str:
    # an address key appends "@<address>" (IPv6 addresses hold ':', so not ':')
    addr = f"@{key.address}" if key.address else ""
    return (f"-m comment --comment AXK:{key.identity}:{int(key.direction)}:{int(key.protocol)}:"
            f"{key.port}:{key.prefix_len}:{int(entry.deny)}:{entry.proxy_port}:"
            f"{int(entry.audit)}:{int(entry.auth_required)}{addr}")


# ---- L4 matches --------------------------------------------------------------

def l4_matches(key: Key, family: int) -> list[str] | None:
    """Match strings (alternatives) for the key's L4 part; None: not in this family."""
    proto = key.protocol
    if proto is Protocol.ANY:
        return [""]
    if proto in (Protocol.ICMP, Protocol.ICMPV6):
        if (proto is Protocol.ICMP) != (family == 4):
            return None
        p, m, opt = ("icmp", "icmp", "--icmp-type") if family == 4 else (
            "ipv6-icmp", "icmp6", "--icmpv6-type")
        if key.prefix_len == 0:
            return [f"-p {p}"]
        lo, hi = key.port_range()
        # ICMP types are 0..255; a type block is one rule per type.
        return [f"-p {p} -m {m} {opt} {t}" for t in range(lo, min(hi, 255) + 1)] or None
    name = {Protocol.TCP: "tcp", Protocol.UDP: "udp", Protocol.SCTP: "sctp"}[proto]
    if key.prefix_len == 0:
        return [f"-p {name}"]
    lo, hi = key.port_range()
    ports = str(lo) if lo == hi else f"{lo}:{hi}"
    return [f"-p {name} -m {name} --dport {ports}"]


# ---- endpoint chains ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Peers:
    """How to match the peer addresses of an identity in one family."""

    mode: str  # plain | ipset
    family: int
    # plain: identity -> its CIDRs; ipset: non-empty when the identity's set has members
    ranges: Callable[[int], Sequence[str]]

    def matches(self, identity: int, direction: Direction) -> list[str]:
        if identity == 0:
            return [""]
        if self.mode == "ipset":
            if not self.ranges(identity):
                return []  # no address in this family: no set either
            flag = "src" if direction is Direction.INGRESS else "dst"
            return [f"-m set --match-set {set_name(identity, self.family)} {flag}"]
        opt = "-s" if direction is Direction.INGRESS else "-d"
        return [f"{opt} {cidr}" for cidr in self.ranges(identity)]


@dataclass(frozen=True, slots=True)
class Targets:
    """Where each verdict goes. The filter table enforces; the mangle table
    runs the same lookup before routing only to mark redirected packets for
    the L7 proxy's TPROXY rule (every other verdict just returns)."""

    table: str = "filter"

    def verdict(self, entry: Entry | None, d: Direction, deny: bool = False) -> str:
        if deny or (entry is not None and entry.deny):
            return "-j RETURN" if self.table == "mangle" else f"-g {deny_chain(d)}"
        if entry is None:
            raise ValueError("no entry")
        if entry.is_redirect:
            if self.table == "mangle":
                return f"-g {mangle_proxy_chain(entry.proxy_port)}"
            return f"-g {proxy_chain(entry.proxy_port, d)}"
        if self.table == "mangle":
            return "-j RETURN"
        return f"-g {audit_chain(d) if entry.audit else allow_chain(d)}"

    def fail_closed(self, d: Direction) -> str:
        """First rule after the reply rule of a direction failing closed: the
        mangle lookup returns (no proxy mark), the filter table drops."""
        target = "-j RETURN" if self.table == "mangle" else f"-g {not_ready_chain(d)}"
        return f"-m comment --comment {FAIL_CLOSED_COMMENT} {target}"

    def tail(self, drop: bool, d: Direction) -> str:
        if drop and self.table == "filter":
            return f"-g {drop_chain(d)}"
        return "-j RETURN"


FILTER = Targets("filter")
MANGLE = Targets("mangle")


def mangle_proxy_chain(port: int) -> str:
    return f"AXON-MPXY-{port}"


def mangle_proxy_rules(port: int) -> list[str]:
    """Mark for the L7 proxy on ``port`` (the agent's TPROXY rule matches it)."""
    return [f"-j MARK --set-xmark {to_proxy_mark(port):#x}/{MARK_TO_PROXY_MASK:#x}"]


def _combine(s: tuple[Key, Entry], w: tuple[Key, Entry] | None, d: Direction,
             targets: Targets) -> str:
    """Verdict when ``s`` is the longest identity-specific match and ``w`` the
    longest wildcard match (MapState.lookup steps 2 and 3). In an address
    chain ``w`` stands for the address and wildcard matches together, and
    wins a tie when the address key decided it (_merge_address)."""
    if s[1].deny or (w is not None and w[1].deny):
        return targets.verdict(None, d, deny=True)
    if w is not None and (w[0].l4_prefix > s[0].l4_prefix or
                          (w[0].l4_prefix == s[0].l4_prefix and w[0].is_address)):
        return targets.verdict(w[1], d)
    return targets.verdict(s[1], d)


def _merge_address(address_keys: list[tuple[Key, Entry]], wildcard: list[tuple[Key, Entry]]
                   ) -> list[tuple[Key, Entry]]:
    """One address's keys and the wildcard keys as one LPM over L4 (longest
    first): per L4 block of either, what ``decide`` makes of the longest
    address and wildcard matches of a packet in that block that no longer
    block holds. That is constant over such packets: a key of the same
    length covering one is the block itself, shorter ones cover the block.
    A block decided by the address key keeps its (address) key, so that
    _combine gives it the tie over an identity key, as lookup does."""
    from axoneme.core.mapstate import decide

    def longest(keys: list[tuple[Key, Entry]], block: Key) -> tuple[Key, Entry] | None:
        for k, e in keys:  # sorted longest first
            if k.l4_prefix <= block.l4_prefix and k.covers_l4(block):
                return k, e
        return None

    blocks = {(k.protocol, k.port, k.prefix_len): k for k, _ in address_keys + wildcard}
    out: list[tuple[Key, Entry]] = []
    for block in blocks.values():
        dec = decide(None, longest(address_keys, block), longest(wildcard, block))
        if dec.key is not None and dec.entry is not None:
            out.append((Key(dec.key.identity, dec.key.direction, block.protocol, block.port,
                            block.prefix_len, dec.key.address), dec.entry))
    return sorted(out, key=lambda ke: (-ke[0].l4_prefix, ke[0].protocol, ke[0].port))


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def render_endpoint(ep_id: int, direction: Direction, state: Mapping[Key, Entry], peers: Peers,
                    tail_drop: bool, targets: Targets = FILTER, placeholders: bool = True,
                    fail_closed: bool = False) -> dict[str, list[str]]:
    """Chains (main chain first) reproducing ``MapState.lookup`` for one direction.

    First match wins, in this order:
    1. replies of tracked connections (``--ctdir REPLY``) return: allowed;
    1b. a peer address that has address keys goes to its own chain: steps 2-4
       with that address's keys merged into the wildcard keys (_merge_address);
    2. identity-specific keys, longest L4 prefix first: the first one that
       matches is the longest specific match S. Its verdict is combined with
       the longest wildcard match W: when wildcard keys nest inside S's port
       block, S jumps to a sub-chain that tries them (longest first), else the
       combined verdict with the wildcard key covering S is static;
       combined: deny if S or W is a deny, else the longer L4 prefix of the
       two, the specific one on a tie;
    3. wildcard keys, longest L4 prefix first (no specific key matched);
    4. the tail: drop (enforced) or return (unenforced direction).

    ``fail_closed``: after step 1 (and IPv6 neighbour discovery), every packet
    goes to ``AXON-NRDY-<D>`` (DROP_EP_NOT_READY) whatever the keys say; the
    keys stay in the chain so ``dump()`` still reads them.

    ``placeholders``: keep never-matching rules for keys without addresses or
    protocol in this family, so that this table alone records every key (the
    IPv4 table does; ``dump()`` reads it).
    """
    main = ep_chain(ep_id, direction)
    keys = sorted(((k, e) for k, e in state.items() if k.direction == direction),
                  key=lambda ke: (-ke[0].l4_prefix, ke[0]))
    specific = [ke for ke in keys if ke[0].identity != 0 and not ke[0].is_address]
    wildcard = [ke for ke in keys if ke[0].identity == 0]
    by_address: dict[str, list[tuple[Key, Entry]]] = {}
    for ke in keys:
        if ke[0].is_address:
            by_address.setdefault(ke[0].address, []).append(ke)
    chains: dict[str, list[str]] = {main: [REPLY_RULE]}
    if peers.family == 6 and targets is FILTER:
        # Neighbour discovery is the link itself, not a connection: never policy.
        chains[main].extend(ND_RULES)
    if fail_closed:
        chains[main].append(targets.fail_closed(direction))
    rules = chains[main]
    subchains: dict[tuple[object, ...], str] = {}
    tail = targets.tail(tail_drop, direction)

    # Address keys: a packet of an address with keys goes to that address's
    # chain, the same lookup with its address keys merged into the wildcard
    # ones. Their own rules never match: they record the keys for dump().
    opt = "-s" if direction is Direction.INGRESS else "-d"
    for address, akeys in sorted(by_address.items()):
        if placeholders:
            rules.extend(_join(NEVER, key_comment(*ke), "-j RETURN") for ke in akeys)
        if ipaddress.ip_address(address).version != peers.family:
            continue
        name = f"{main}-S{len(subchains)}"
        subchains[("address", address)] = name
        chains[name] = []
        _render_keys(chains, name, specific, _merge_address(akeys, wildcard), peers, direction,
                     targets, subchains, main, comments=False)
        chains[name].append(tail)
        plen = 32 if peers.family == 4 else 128
        rules.append(f"{opt} {address}/{plen} -g {name}")

    _render_keys(chains, main, specific, wildcard, peers, direction, targets, subchains, main,
                 comments=True, placeholders=placeholders)
    rules.append(f"-m comment --comment AXTAIL:{'drop' if tail_drop else 'allow'} {tail}")
    return chains


def _render_keys(chains: dict[str, list[str]], chain: str, specific: list[tuple[Key, Entry]],
                 wildcard: list[tuple[Key, Entry]], peers: Peers, direction: Direction,
                 targets: Targets, subchains: dict[tuple[object, ...], str], main: str,
                 comments: bool, placeholders: bool = False) -> None:
    """Steps 2 and 3 of render_endpoint into ``chain``."""
    rules = chains[chain]
    for s in specific:
        skey, sentry = s
        comment = key_comment(skey, sentry) if comments else ""
        nested = [w for w in wildcard if w[0].l4_prefix > skey.l4_prefix and skey.covers_l4(w[0])]
        cover = next((w for w in wildcard if w[0].covers_l4(skey)), None)
        target = _combine(s, cover, direction, targets)
        if nested:
            sig = (chain, skey.protocol, skey.port, skey.prefix_len, sentry, cover)
            name = subchains.get(sig)
            if name is None:
                name = f"{main}-S{len(subchains)}"
                subchains[sig] = name
                sub: list[str] = []
                for w in nested:
                    for l4 in l4_matches(w[0], peers.family) or ():
                        sub.append(_join(l4, _combine(s, w, direction, targets)))
                sub.append(target)
                chains[name] = sub
            target = f"-g {name}"
        l4s = l4_matches(skey, peers.family)
        addrs = peers.matches(skey.identity, direction)
        if l4s is None or not addrs:
            if placeholders:
                rules.append(_join(NEVER, comment, target))
            continue
        for addr in addrs:
            for l4 in l4s:
                rules.append(_join(addr, l4, comment, target))

    for w in wildcard:
        comment = key_comment(*w) if comments else ""
        l4s = l4_matches(w[0], peers.family)
        if l4s is None:
            if placeholders:
                rules.append(_join(NEVER, comment, targets.verdict(w[1], direction)))
            continue
        for l4 in l4s:
            rules.append(_join(l4, comment, targets.verdict(w[1], direction)))


def proxy_ports(state: Mapping[Key, Entry]) -> set[tuple[int, Direction]]:
    return {(e.proxy_port, k.direction) for k, e in state.items() if e.is_redirect}


# ---- hook chains -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class EndpointRef:
    """What the hook chains need (and record) about one endpoint."""

    id: int
    ifname: str
    ipv4: str = ""
    ipv6: str = ""
    tail_in_drop: bool = True
    tail_out_drop: bool = True

    def comment(self) -> str:
        tails = ("d" if self.tail_in_drop else "a") + ("d" if self.tail_out_drop else "a")
        return (f"-m comment --comment AXEP,{self.id},{self.ifname},{self.ipv4 or '-'},"
                f"{self.ipv6 or '-'},{tails}")



@dataclass(frozen=True, slots=True)
class PodScope:
    """Where the unknown-endpoint catch-all applies in one family: the host
    side of our pod interfaces (names starting with ``ifname_prefix``) and
    packets with a pod address (``cidrs``)."""

    ifname_prefix: str
    cidrs: tuple[str, ...]


def hook_chains(endpoints: Sequence[EndpointRef], scope: PodScope | None = None,
                family: int = 4) -> dict[str, list[str]]:
    """The hook chains; with ``scope``, the catch-all for pod interfaces
    without an endpoint after the per-endpoint jumps (and its two chains)."""
    eps = sorted((e for e in endpoints if e.id != HOST_ENDPOINT_ID), key=lambda e: e.id)
    hosts = [e for e in endpoints if e.id == HOST_ENDPOINT_ID]
    fwd = [_join(f"-i {e.ifname}", e.comment(), f"-j {ep_chain(e.id, Direction.EGRESS)}") for e in eps]
    fwd += [f"-o {e.ifname} -j {ep_chain(e.id, Direction.INGRESS)}" for e in eps]
    out = {
        FWD_CHAIN: fwd,
        INPUT_CHAIN: [f"-i {e.ifname} -j {ep_chain(e.id, Direction.EGRESS)}" for e in eps],
        OUTPUT_CHAIN: [f"! -o lo -j {ep_chain(e.id, Direction.EGRESS)}" for e in hosts]
        + [f"-o {e.ifname} -j {ep_chain(e.id, Direction.INGRESS)}" for e in eps],
    }
    out[INPUT_CHAIN] += [_join("! -i lo", e.comment(), f"-j {ep_chain(e.id, Direction.INGRESS)}")
                         for e in hosts]
    if scope is None or not scope.ifname_prefix or not scope.cidrs:
        return out
    wild = f"{scope.ifname_prefix}+"
    from_pod = [f"-i {wild} -s {c} -j {unknown_chain(Direction.EGRESS)}" for c in scope.cidrs]
    to_pod = [f"-o {wild} -d {c} -j {unknown_chain(Direction.INGRESS)}" for c in scope.cidrs]
    out[FWD_CHAIN] += from_pod + to_pod
    out[INPUT_CHAIN] += from_pod
    out[OUTPUT_CHAIN] += to_pod
    for d, opt in ((Direction.EGRESS, "-i"), (Direction.INGRESS, "-o")):
        rules = [f"{opt} {e.ifname} -j RETURN" for e in eps
                 if e.ifname.startswith(scope.ifname_prefix)]
        if family == 6:
            rules += ND_RULES  # link control, not workload traffic
        rules.append(f"-j {unknown_drop_chain(d)}")
        out[unknown_chain(d)] = rules
    return out


def hook_rule(builtin: str, chain: str) -> str:
    return f"{builtin} -m comment --comment {HOOK_COMMENT} -j {chain}"


PRE_CHAIN = "AXON-PRE"
MANGLE_HOOKS = (("PREROUTING", PRE_CHAIN),)
# the marks (axoneme.core.marks) as iptables-save prints the match: 0xa00/0xf00
FROM_INGRESS_PROXY = f"-m mark --mark {MARK_MAGIC_PROXY_INGRESS:#x}/{MARK_MAGIC_HOST_MASK:#x} -j RETURN"
ALREADY_REDIRECTED = f"-m mark --mark {MARK_MAGIC_TO_PROXY:#x}/{MARK_MAGIC_HOST_MASK:#x} -j RETURN"


def pre_chain(endpoints: Sequence[EndpointRef], redirecting: set[tuple[int, Direction]],
              family: int) -> list[str]:
    """mangle/PREROUTING: run the lookup of endpoints with redirect entries
    before routing, so TPROXY sees the mark: the source pod's egress stage
    first (from its veth), then the destination pod's ingress stage (by
    address), unless the egress stage already redirected."""
    eps = sorted(endpoints, key=lambda e: e.id)
    rules = [FROM_INGRESS_PROXY]
    rules += [f"-i {e.ifname} -j {ep_chain(e.id, Direction.EGRESS)}" for e in eps
              if (e.id, Direction.EGRESS) in redirecting]
    ingress = []
    for e in eps:
        addr = e.ipv4 if family == 4 else e.ipv6
        if addr and (e.id, Direction.INGRESS) in redirecting:
            plen = 32 if family == 4 else 128
            ingress.append(f"-d {addr}/{plen} -j {ep_chain(e.id, Direction.INGRESS)}")
    if ingress:
        rules.append(ALREADY_REDIRECTED)
        rules += ingress
    return rules


# ---- iptables-restore payload ------------------------------------------------

def restore_payload(table: str, chains: Mapping[str, Sequence[str]], *,
                    delete_chains: Sequence[str] = (), pre: Sequence[str] = (),
                    post: Sequence[str] = ()) -> str:
    """One transaction: (re)declare ``chains`` (flushing them), fill them,
    then ``post`` lines (-I/-D on built-ins), then delete ``delete_chains``."""
    lines = [f"*{table}"]
    lines += pre
    lines += [f":{name} - [0:0]" for name in chains]
    for name, rules in chains.items():
        lines += [f"-A {name} {r}" for r in rules]
    lines += post
    lines += [f"-F {name}" for name in delete_chains]
    lines += [f"-X {name}" for name in delete_chains]
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"
