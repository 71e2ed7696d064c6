"""What every policy kind's parser shares: label selectors, ports, CIDRs.

``_ParserBase`` methods take the value and its field path, record problems
on the ``Walker`` and return the parsed value or None.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Any

from axoneme.core import yamlsafe
from axoneme.core._hostnet import compact
from axoneme.core.labels import NAMESPACE_LABELS_PREFIX, valid_label_key, valid_label_value
from axoneme.core.policy.api import CIDRPeer, IPNetwork, PolicyKind, PortProtocol
from axoneme.core.policy.walk import Walker, item, join, type_name
from axoneme.core.selectors import LabelSelector, Operator, Requirement, split_selector_key

_q = yamlsafe.excerpt

# IANA service names (RFC 6335 5.1): 1-15 chars, letters/digits/hyphens, at
# least one letter, no leading/trailing or double hyphen.
_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9]|-(?=[a-z0-9]))*$")

# protocol(text, path) -> the normalised protocol, or None after reporting a problem
ProtocolCheck = Callable[[str, str], "str | None"]


def _valid_selector_key(key: str) -> bool:
    _, name = split_selector_key(key)
    if valid_label_key(name):
        return True
    # Namespace-label keys embed a whole label key (which may carry a prefix).
    return name.startswith(NAMESPACE_LABELS_PREFIX) and valid_label_key(name[len(NAMESPACE_LABELS_PREFIX):])


class _ParserBase:
    def __init__(self, w: Walker) -> None:
        self.w = w
        self.kind: PolicyKind = PolicyKind.CILIUM_NETWORK_POLICY
        self.namespace = ""

    # --- label selectors ---------------------------------------------------------

    def selector(
        self, value: object, path: str, rename: Callable[[str], str] = lambda k: k,
        check_key: Callable[[str], bool] = _valid_selector_key,
    ) -> LabelSelector | None:
        w = self.w
        m = w.mapping(value, path, ("matchLabels", "matchExpressions"))
        if m is None:
            return None
        ok = True
        labels: dict[str, str] = {}
        if m.get("matchLabels") is not None:
            lp = join(path, "matchLabels")
            raw = w.mapping(m["matchLabels"], lp)
            if raw is None:
                ok = False
            else:
                for k, v in raw.items():
                    kp = join(lp, k)
                    if not check_key(k):
                        w.problem(kp, f"invalid label key \"{_q(k)}\"")
                        ok = False
                    if v is None:
                        v = ""
                    if isinstance(v, bool) or not isinstance(v, str):
                        w.problem(kp, f"expected a string label value, got {type_name(v)} (quote the value)")
                        ok = False
                        continue
                    if not valid_label_value(v):
                        w.problem(kp, f"invalid label value \"{_q(v)}\"")
                        ok = False
                    labels[rename(k)] = v
        reqs: list[Requirement] = []
        for i, expr in enumerate(w.list(m.get("matchExpressions"), join(path, "matchExpressions"))):
            ep = item(join(path, "matchExpressions"), i)
            req = self.requirement(expr, ep, rename, check_key)
            if req is None:
                ok = False
            else:
                reqs.append(req)
        if not ok:
            return None
        return LabelSelector.build(labels, reqs)

    def requirement(
        self, value: object, path: str, rename: Callable[[str], str], check_key: Callable[[str], bool],
    ) -> Requirement | None:
        w = self.w
        m = w.mapping(value, path, ("key", "operator", "values"))
        if m is None:
            return None
        ok = True
        key = None
        if "key" not in m:
            w.problem(join(path, "key"), "missing required field \"key\"")
            ok = False
        else:
            key = w.string(m["key"], join(path, "key"))
            if key is not None and not check_key(key):
                w.problem(join(path, "key"), f"invalid label key \"{_q(key)}\"")
                ok = False
        op: Operator | None = None
        if "operator" not in m:
            w.problem(join(path, "operator"), "missing required field \"operator\"")
            ok = False
        else:
            op_text = w.string(m["operator"], join(path, "operator"))
            if op_text is not None:
                try:
                    op = Operator(op_text)
                except ValueError:
                    w.problem(join(path, "operator"),
                              f"invalid operator \"{_q(op_text)}\" (expected In, NotIn, Exists or DoesNotExist)")
        values: list[str] = []
        vp = join(path, "values")
        for i, v in enumerate(w.list(m.get("values"), vp)):
            if isinstance(v, bool) or not isinstance(v, str):
                w.problem(item(vp, i), f"expected a string, got {type_name(v)} (quote the value)")
                ok = False
            elif not valid_label_value(v):
                w.problem(item(vp, i), f"invalid label value \"{_q(v)}\"")
                ok = False
            else:
                values.append(v)
        if op in (Operator.IN, Operator.NOT_IN) and not m.get("values"):
            w.problem(vp, f"operator {op.value} requires at least one value")
            ok = False
        if op in (Operator.EXISTS, Operator.DOES_NOT_EXIST) and m.get("values"):
            w.problem(vp, f"operator {op.value} must not have values")
            ok = False
        if not ok or key is None or op is None:
            return None
        return Requirement(rename(key), op, frozenset(values))

    # --- ports -------------------------------------------------------------------

    def port_value(self, value: object, path: str) -> tuple[int, str | None] | None:
        """(number, None) or (0, name) for a port given as a number or string."""
        w = self.w
        if isinstance(value, bool) or not isinstance(value, int | str):
            w.wrong_type(path, "a port number or name", value)
            return None
        if isinstance(value, int):
            if not 0 <= value <= 65535:
                w.problem(path, f"port {value} out of range 0-65535")
                return None
            return value, None
        text = value.strip()
        if text == "":
            return 0, None
        if text.isascii() and text.isdigit():
            # length first: int() of a long digit string is slow, then raises
            number = int(text) if len(text) <= 6 else 65536
            if number > 65535:
                w.problem(path, f"port {_q(text)} out of range 0-65535")
                return None
            return number, None
        lowered = text.lower()
        if (len(lowered) <= 15 and _SVC_NAME.match(lowered) and any(c.isalpha() for c in lowered)):
            return 0, lowered
        w.problem(path, f"invalid port \"{_q(value)}\": not a number (0-65535) or a valid port name "
                        "(IANA service name: at most 15 letters, digits and '-', with a letter)")
        return None

    def end_port(self, m: Mapping[str, Any], path: str, port: int, name: str | None) -> int | None | bool:
        """endPort, None if absent, False after a problem."""
        w = self.w
        if m.get("endPort") is None:
            return None
        ep = join(path, "endPort")
        end = w.integer(m["endPort"], ep)
        if end is None:
            return False
        if not 0 <= end <= 65535:
            w.problem(ep, f"endPort {end} out of range 0-65535")
            return False
        if name is not None:
            w.problem(ep, "endPort cannot be used with a named port")
            return False
        if port == 0:
            w.problem(ep, "endPort requires a port")
            return False
        if end < port:
            w.problem(ep, f"endPort {end} is less than port {port}")
            return False
        return end if end > port else None

    def port_block(self, value: object, path: str, *, default: str,
                   protocol: ProtocolCheck) -> PortProtocol | None:
        """``{port, endPort, protocol}``: a NetworkPolicy port or a toPorts[].ports item.

        The kinds differ only in their protocols: ``protocol`` normalises one
        (or reports it and returns None); ``default`` applies when absent."""
        w = self.w
        m = w.mapping(value, path, ("port", "endPort", "protocol"))
        if m is None:
            return None
        ok = True
        proto = default
        if m.get("protocol") is not None:
            text = w.string(m["protocol"], join(path, "protocol"))
            got = None if text is None else protocol(text, join(path, "protocol"))
            if got is None:
                ok = False
            else:
                proto = got
        port, name = 0, None
        if m.get("port") is not None:
            got_port = self.port_value(m["port"], join(path, "port"))
            if got_port is None:
                ok = False
            else:
                port, name = got_port
        end = self.end_port(m, path, port, name)
        if end is False:
            ok = False
        if not ok:
            return None
        return PortProtocol(port=port, end_port=end or None, protocol=proto, name=name)

    # --- CIDRs -------------------------------------------------------------------

    def network(self, value: object, path: str, *, allow_address: bool) -> IPNetwork | None:
        w = self.w
        text = w.string(value, path)
        if text is None:
            return None
        try:
            if "/" not in text:
                if not allow_address:
                    raise ValueError("a prefix length is required")
                return compact(ipaddress.ip_network(text))
            # a 100k-peer policy keeps 100k /32s: without their hosts closures
            return compact(ipaddress.ip_network(text, strict=False))
        except ValueError as e:
            w.problem(path, f"invalid CIDR \"{_q(text)}\": {_q(str(e))}")
            return None

    def cidr_set(self, m: Mapping[str, Any], path: str, except_field: str) -> CIDRPeer | None:
        w = self.w
        if m.get("cidr") is None:
            w.problem(join(path, "cidr"), "missing required field \"cidr\"")
            return None
        net = self.network(m["cidr"], join(path, "cidr"), allow_address=False)
        excepts: list[IPNetwork] = []
        ok = net is not None
        xp = join(path, except_field)
        for i, x in enumerate(w.list(m.get(except_field), xp)):
            ex = self.network(x, item(xp, i), allow_address=False)
            if ex is None:
                ok = False
                continue
            if net is not None and (ex.version != net.version or not ex.subnet_of(net)):  # type: ignore[arg-type]
                w.problem(item(xp, i), f"except {ex} is not inside cidr {net}")
                ok = False
                continue
            excepts.append(ex)
        if not ok or net is None:
            return None
        return CIDRPeer(net, tuple(excepts))


__all__: list[str] = []
