"""Cilium ``cilium.io/v2`` CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy -> rules.

L7 rules are parsed by the ``axoneme.l7`` parser they select
(``axoneme.core.l7.L7Parser``): nothing here knows a protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from axoneme.core import yamlsafe
from axoneme.core.errors import PluginError
from axoneme.core.l7 import RuleContext
from axoneme.core.labels import NAMESPACE_LABELS_PREFIX, POD_NAMESPACE_LABEL
from axoneme.core.mapstate import Direction
from axoneme.core.plugins import GROUP_L7, Registry, registry
from axoneme.core.policy._parse_base import _ParserBase
from axoneme.core.policy.api import (
    ENTITIES,
    CIDRPeer,
    EndpointPeer,
    EntityPeer,
    FQDNPeer,
    ICMPField,
    L7Spec,
    PeerRule,
    PolicyKind,
    PolicyRef,
    PortProtocol,
    PortRule,
    Rule,
    ServicePeer,
)
from axoneme.core.policy.fqdn import fqdn_selector
from axoneme.core.policy.walk import item, join
from axoneme.core.selectors import LabelSelector, Operator, Requirement

_q = yamlsafe.excerpt
_PORT_PROTOCOLS = ("TCP", "UDP", "SCTP", "ANY")

# Cilium's pkg/policy/api/icmp.go name tables (type names are CamelCase).
ICMP_TYPES: dict[str, dict[str, int]] = {
    "IPv4": {
        "EchoReply": 0, "DestinationUnreachable": 3, "Redirect": 5, "Echo": 8,
        "EchoRequest": 8, "RouterAdvertisement": 9, "RouterSelection": 10,
        "RouterSolicitation": 10, "TimeExceeded": 11, "ParameterProblem": 12,
        "Timestamp": 13, "TimestampReply": 14, "Photuris": 40,
        "ExtendedEchoRequest": 42, "ExtendedEchoReply": 43,
    },
    "IPv6": {
        "DestinationUnreachable": 1, "PacketTooBig": 2, "TimeExceeded": 3,
        "ParameterProblem": 4, "EchoRequest": 128, "EchoReply": 129,
        "MulticastListenerQuery": 130, "MulticastListenerReport": 131,
        "MulticastListenerDone": 132, "RouterSolicitation": 133,
        "RouterAdvertisement": 134, "NeighborSolicitation": 135,
        "NeighborAdvertisement": 136, "RedirectMessage": 137,
        "RouterRenumbering": 138, "ICMPNodeInformationQuery": 139,
        "ICMPNodeInformationResponse": 140,
        "InverseNeighborDiscoverySolicitation": 141,
        "InverseNeighborDiscoveryAdvertisement": 142,
        "HomeAgentAddressDiscoveryRequest": 144,
        "HomeAgentAddressDiscoveryReply": 145, "MobilePrefixSolicitation": 146,
        "MobilePrefixAdvertisement": 147,
        "DuplicateAddressRequestCodeSuffix": 157,
        "DuplicateAddressConfirmationCodeSuffix": 158,
        "ExtendedEchoRequest": 160, "ExtendedEchoReply": 161,
    },
}


class _CiliumParser(_ParserBase):
    services = False  # a Service source resolves toServices (else it is refused)

    def cilium_policy(self, m: Mapping[str, Any], ref: PolicyRef) -> list[Rule]:
        w = self.w
        specs: list[tuple[str, object]] = []
        if m.get("spec") is not None:
            specs.append(("spec", m["spec"]))
        if m.get("specs") is not None:
            for i, s in enumerate(w.list(m["specs"], "specs")):
                specs.append((item("specs", i), s))
        if m.get("spec") is None and m.get("specs") is None:
            w.problem("spec", "missing required field: one of \"spec\" or \"specs\"")
        rules: list[Rule] = []
        for index, (path, spec) in enumerate(specs):
            rule = self.cilium_rule(spec, path, ref, index)
            if rule is not None:
                rules.append(rule)
        return rules

    def cilium_rule(self, value: object, path: str, ref: PolicyRef, index: int) -> Rule | None:
        w = self.w
        m = w.mapping(value, path, (
            "endpointSelector", "nodeSelector", "ingress", "ingressDeny", "egress",
            "egressDeny", "labels", "description", "enableDefaultDeny",
        ))
        if m is None:
            return None
        clusterwide = self.kind is PolicyKind.CILIUM_CLUSTERWIDE_NETWORK_POLICY
        has_es = m.get("endpointSelector") is not None
        has_ns = m.get("nodeSelector") is not None
        subject: LabelSelector | None = None
        if has_ns and not clusterwide:
            w.problem(join(path, "nodeSelector"),
                      "nodeSelector is only allowed in a CiliumClusterwideNetworkPolicy")
        elif has_es and has_ns:
            w.problem(path, "rule cannot have both endpointSelector and nodeSelector")
        elif not has_es and not has_ns:
            w.problem(join(path, "endpointSelector"),
                      "missing required field: one of \"endpointSelector\" or \"nodeSelector\"")
        elif has_es:
            subject = self.selector(m["endpointSelector"], join(path, "endpointSelector"))
            if subject is not None and not clusterwide:
                subject = subject.with_requirement(
                    Requirement(f"k8s:{POD_NAMESPACE_LABEL}", Operator.IN, frozenset({self.namespace})))
        else:
            # a host policy: selects nodes by their labels (the host firewall
            # enforces it on the host endpoint of each selected node)
            subject = self.selector(m["nodeSelector"], join(path, "nodeSelector"))
        host = has_ns and not has_es
        description = ""
        if m.get("description") is not None:
            description = w.string(m["description"], join(path, "description")) or ""
        if m.get("labels") is not None:
            self.rule_labels(m["labels"], join(path, "labels"))
        default_deny: dict[str, bool] = {}
        if m.get("enableDefaultDeny") is not None:
            dp = join(path, "enableDefaultDeny")
            dd = w.mapping(m["enableDefaultDeny"], dp, ("ingress", "egress"))
            for k, v in (dd or {}).items():
                if v is None:
                    continue
                b = w.boolean(v, join(dp, k))
                if b is not None:
                    default_deny[k] = b
        peer_rules: list[PeerRule] = []
        has_rules = {"ingress": False, "egress": False}
        for field, direction, deny in (
            ("ingress", Direction.INGRESS, False), ("ingressDeny", Direction.INGRESS, True),
            ("egress", Direction.EGRESS, False), ("egressDeny", Direction.EGRESS, True),
        ):
            fp = join(path, field)
            items = w.list(m.get(field), fp)
            if items:
                has_rules[direction.name.lower()] = True
            for i, r in enumerate(items):
                pr = self.cilium_peer_rule(r, item(fp, i), direction, deny, host)
                if pr is not None:
                    peer_rules.append(pr)
        if subject is None:
            return None
        # Default deny per direction: on when the rule has (allow or deny)
        # rules there, unless enableDefaultDeny says otherwise (Cilium).
        return Rule(
            ref=ref, subject=subject, rules=tuple(peer_rules),
            enforce_ingress=default_deny.get("ingress", has_rules["ingress"]),
            enforce_egress=default_deny.get("egress", has_rules["egress"]),
            node_selector=host, description=description, index=index,
            origin=w.file, document=w.index,
        )

    def rule_labels(self, value: object, path: str) -> None:
        w = self.w
        for i, lab in enumerate(w.list(value, path)):
            lp = item(path, i)
            lm = w.mapping(lab, lp, ("key", "value", "source"))
            if lm is None:
                continue
            if lm.get("key") is None:
                w.problem(join(lp, "key"), "missing required field \"key\"")
            for k in ("key", "value", "source"):
                if lm.get(k) is not None:
                    w.string(lm[k], join(lp, k))

    def cilium_peer_rule(
        self, value: object, path: str, direction: Direction, deny: bool, host: bool,
    ) -> PeerRule | None:
        w = self.w
        ingress = direction is Direction.INGRESS
        pre = "from" if ingress else "to"
        allowed = [f"{pre}Endpoints", f"{pre}Entities", f"{pre}CIDR", f"{pre}CIDRSet", "toPorts", "icmps"]
        if not ingress:
            allowed += ["toServices", "toFQDNs"]
        unsupported = {
            f"{pre}Requires": f"{pre}Requires is not supported (deprecated in Cilium 1.17)",
            f"{pre}Nodes": f"{pre}Nodes is not supported",
            f"{pre}Groups": f"{pre}Groups is not supported",
            "authentication": "authentication (mutual auth) is not supported",
        }
        if deny and not ingress:
            unsupported["toFQDNs"] = "toFQDNs is not allowed in deny rules"
            # Cilium translates toServices in egress allow rules only: in a deny
            # rule it would deny nothing
            unsupported["toServices"] = "toServices is not allowed in deny rules"
        m = w.mapping(value, path, allowed, unsupported)
        if m is None:
            return None
        n_problems = len(w.problems)
        peers: list[Any] = []
        l3_fields: list[str] = []

        def present(field: str) -> list[Any]:
            items = w.list(m.get(field), join(path, field))
            if items:
                l3_fields.append(field)
            return items

        fp = f"{pre}Endpoints"
        for i, sel in enumerate(present(fp)):
            got = self.peer_selector(sel, item(join(path, fp), i))
            if got is not None:
                peers.append(got)
        fp = f"{pre}Entities"
        for i, ent in enumerate(present(fp)):
            ep = item(join(path, fp), i)
            name = w.string(ent, ep)
            if name is None:
                continue
            if name not in ENTITIES:
                w.problem(ep, f"unknown entity \"{_q(name)}\" (expected one of {', '.join(sorted(ENTITIES))})")
                continue
            peers.append(EntityPeer(name))
        fp = f"{pre}CIDR"
        for i, c in enumerate(present(fp)):
            net = self.network(c, item(join(path, fp), i), allow_address=True)
            if net is not None:
                peers.append(CIDRPeer(net))
        fp = f"{pre}CIDRSet"
        for i, c in enumerate(present(fp)):
            cp = item(join(path, fp), i)
            cm = w.mapping(c, cp, ("cidr", "except"), {
                "cidrGroupRef": "cidrGroupRef is not supported",
                "cidrGroupSelector": "cidrGroupSelector is not supported",
            })
            if cm is not None and not (isinstance(c, dict) and any(k in c for k in ("cidrGroupRef", "cidrGroupSelector"))):
                got_cidr = self.cidr_set(cm, cp, except_field="except")
                if got_cidr is not None:
                    peers.append(got_cidr)
        if not ingress:
            for i, s in enumerate(present("toServices")):
                got_svc = self.to_service(s, item(join(path, "toServices"), i))
                if got_svc is not None:
                    peers.append(got_svc)
            for i, f in enumerate(present("toFQDNs")):
                got_fqdn = fqdn_selector(w, f, item(join(path, "toFQDNs"), i))
                if got_fqdn is not None:
                    peers.append(FQDNPeer(got_fqdn[0], got_fqdn[1]))
            if "toFQDNs" in l3_fields and len(l3_fields) > 1:
                others = ", ".join(f for f in l3_fields if f != "toFQDNs")
                w.problem(join(path, "toFQDNs"), f"toFQDNs cannot be combined with {others} in one rule")

        port_items = w.list(m.get("toPorts"), join(path, "toPorts"))
        port_rules: list[PortRule] = []
        for i, pr in enumerate(port_items):
            got_pr = self.port_rule(pr, item(join(path, "toPorts"), i), direction, deny, host)
            if got_pr is not None:
                port_rules.append(got_pr)
        icmps: list[ICMPField] = []
        ip = join(path, "icmps")
        icmp_items = w.list(m.get("icmps"), ip)
        for i, ic in enumerate(icmp_items):
            icmps.extend(self.icmp_rule(ic, item(ip, i)))
        if len(w.problems) != n_problems:
            return None
        empty = not l3_fields and not port_items and not icmp_items
        return PeerRule(
            direction=direction, deny=deny,
            peers=tuple(peers) if l3_fields else None,
            ports=tuple(port_rules), icmps=tuple(icmps),
            allows_nothing=empty, path=path,
        )

    def peer_selector(self, value: object, path: str) -> EndpointPeer | None:
        sel = self.selector(value, path)
        if sel is None:
            return None
        # Policies on initializing endpoints (no labels yet) select reserved:init.
        matches_init = any(r.key == "reserved:init" for r in sel.requirements)
        if self.kind is PolicyKind.CILIUM_CLUSTERWIDE_NETWORK_POLICY:
            if sel.is_wildcard:
                sel = sel.with_requirement(Requirement(f"k8s:{POD_NAMESPACE_LABEL}", Operator.EXISTS))
        elif not (matches_init or sel.mentions_key(POD_NAMESPACE_LABEL)
                  or sel.mentions_key_prefix(NAMESPACE_LABELS_PREFIX)):
            sel = sel.with_requirement(
                Requirement(f"k8s:{POD_NAMESPACE_LABEL}", Operator.IN, frozenset({self.namespace})))
        return EndpointPeer(sel)

    def to_service(self, value: object, path: str) -> ServicePeer | None:
        """One toServices item (Cilium ``api.Service``): exactly one of
        ``k8sService {serviceName, namespace}`` and ``k8sServiceSelector
        {selector, namespace}``; an empty or absent namespace matches the
        Service in every namespace (Cilium). Refused where no Service source
        exists (``services`` off): nothing would ever match it."""
        w = self.w
        before = len(w.problems)
        m = w.mapping(value, path, ("k8sService", "k8sServiceSelector"))
        if m is None:
            return None
        present = [k for k in ("k8sService", "k8sServiceSelector") if m.get(k) is not None]
        if len(present) != 1:
            w.problem(path, "exactly one of k8sService or k8sServiceSelector is required")
            return None
        sp = join(path, present[0])
        name: str | None = None
        selector: LabelSelector | None = None
        namespace: str | None = None
        if present[0] == "k8sService":
            sm = w.mapping(m["k8sService"], sp, ("serviceName", "namespace"))
            if sm is not None:
                if sm.get("serviceName") is None:
                    w.problem(join(sp, "serviceName"), "missing required field \"serviceName\"")
                else:
                    name = w.string(sm["serviceName"], join(sp, "serviceName"), allow_empty=False)
                namespace = w.opt_string(sm, "namespace", sp)
        else:
            sm = w.mapping(m["k8sServiceSelector"], sp, ("selector", "namespace"))
            if sm is not None:
                if sm.get("selector") is None:
                    w.problem(join(sp, "selector"), "missing required field \"selector\"")
                else:
                    selector = self.selector(sm["selector"], join(sp, "selector"))
                namespace = w.opt_string(sm, "namespace", sp)
        if len(w.problems) != before:
            return None
        if not self.services:
            # A field that is parsed is enforced or refused: toServices needs the
            # Services/EndpointSlices of a cluster (the agent in Kubernetes mode,
            # or Service/EndpointSlice objects given to an offline command).
            w.problem(path, "toServices is not supported here: no Service source (the agent "
                            "in Kubernetes mode resolves it; offline, give the Services and "
                            "EndpointSlices with --cluster; or select the backends with "
                            "toEndpoints, their addresses with toCIDRSet)")
            return None
        return ServicePeer(name=name, selector=selector, namespace=namespace or None, path=path)

    def port_rule(
        self, value: object, path: str, direction: Direction, deny: bool, host: bool,
    ) -> PortRule | None:
        w = self.w
        allowed = ["ports"] if deny else ["ports", "rules"]
        unsupported = {k: f"{k} is not supported" for k in
                       ("serverNames", "terminatingTLS", "originatingTLS", "listener")}
        if deny:
            unsupported["rules"] = "L7 rules are not allowed in deny rules"
        m = w.mapping(value, path, allowed, unsupported)
        if m is None:
            return None
        n_problems = len(w.problems)
        ports: list[PortProtocol] = []
        pp = join(path, "ports")
        port_items = w.list(m.get("ports"), pp)
        for i, p in enumerate(port_items):
            got = self.cilium_port(p, item(pp, i))
            if got is not None:
                ports.append(got)
        l7 = None
        if m.get("rules") is not None:
            l7 = self.l7_rules(m["rules"], join(path, "rules"), direction, host, ports, len(port_items))
        if len(w.problems) != n_problems:
            return None
        return PortRule(ports=tuple(ports), l7=l7)

    def cilium_port(self, value: object, path: str) -> PortProtocol | None:
        def protocol(text: str, where: str) -> str | None:
            if text.upper() not in _PORT_PROTOCOLS and text != "":
                hint = " (ICMP goes in icmps)" if text.upper().startswith("ICMP") else ""
                self.w.problem(where, f"invalid protocol \"{_q(text)}\" (expected TCP, UDP, SCTP or ANY){hint}")
                return None
            return text.upper() or "ANY"

        return self.port_block(value, path, default="ANY", protocol=protocol)

    def l7_rules(
        self, value: object, path: str, direction: Direction, host: bool,
        ports: list[PortProtocol], n_port_items: int,
    ) -> L7Spec | None:
        """``toPorts[].rules``: the parser it selects validates its own rules.

        Selection (Cilium): a built-in field (``http: [...]``: a parser whose
        ``rules_field`` is the key) or ``l7proto: NAME`` + ``l7: [...]`` for
        any installed ``axoneme.l7`` parser; one parser per rules block."""
        w = self.w
        m = w.mapping(value, path)
        if m is None:
            return None
        reg = registry()
        kinds: list[str] = []
        for key in m:
            if key in ("l7proto", "l7"):
                if "l7proto" not in kinds:
                    kinds.append("l7proto")
            elif self._field_parser(reg, key) is not None:
                kinds.append(key)
            else:
                fields = [f for f in self._rule_fields(reg) if f not in m]
                w.problem(join(path, key), f"unknown field \"{_q(key)}\" (expected "
                          f"{', '.join([*fields, 'l7proto'])})")
        if not kinds:
            return None
        if len(kinds) > 1:
            w.problem(path, f"more than one L7 rule type in one rules block ({', '.join(kinds)})")
            return None
        if kinds[0] == "l7proto":
            name, parser, rules_path = self._generic_parser(reg, m, path)
            if parser is None:
                return None
            rules_value = m.get("l7")
        else:
            name = kinds[0]
            parser = self._field_parser(reg, name)
            rules_path, rules_value = join(path, name), m[name]
        self._l7_place(parser, name, rules_path, direction, host, ports, n_port_items,
                       join(path.rsplit(".", 1)[0], "ports"))
        return L7Spec(parser=name, rules=tuple(parser.parse_rules(rules_value, rules_path, w)))

    def _field_parser(self, reg: Registry, key: str) -> Any:
        """The parser whose built-in field is ``key`` (its entry point name), or None."""
        if key not in reg.names(GROUP_L7):
            return None
        try:
            parser = reg.l7_parser(key)
        except PluginError as e:
            self.w.problem("", str(e))
            return None
        return parser if getattr(parser, "rules_field", None) == key else None

    def _rule_fields(self, reg: Registry) -> list[str]:
        out: list[str] = []
        for name in reg.names(GROUP_L7):
            try:
                if reg.l7_parser(name).rules_field == name:
                    out.append(name)
            except PluginError:
                continue
        return out

    def _generic_parser(self, reg: Registry, m: Mapping[str, Any], path: str) -> tuple[str, Any, str]:
        """(name, parser or None, path of its rules) for ``l7proto`` + ``l7``."""
        w = self.w
        pp = join(path, "l7proto")
        if m.get("l7proto") is None:
            w.problem(pp, "missing required field \"l7proto\" (the L7 parser of the l7 rules)")
            return "", None, ""
        name = w.string(m["l7proto"], pp, allow_empty=False)
        if name is None:
            return "", None, ""
        if name not in reg.names(GROUP_L7):
            w.problem(pp, f"unknown L7 parser \"{_q(name)}\" (installed: "
                          f"{', '.join(reg.names(GROUP_L7)) or 'none'})")
            return name, None, ""
        try:
            return name, reg.l7_parser(name), join(path, "l7")
        except PluginError as e:
            w.problem(pp, str(e))
            return name, None, ""

    def _l7_place(self, parser: Any, name: str, rules_path: str, direction: Direction, host: bool,
                  ports: list[PortProtocol], n_port_items: int, port_path: str) -> None:
        """Where the parser's rules may not apply: host policies, its directions,
        its transport, all ports or port ranges, and the parser's own checks."""
        w = self.w
        if host:
            w.problem(rules_path, "L7 rules are not supported in host (nodeSelector) policies")
        if direction not in parser.directions:
            w.problem(rules_path, f"{name} rules are not allowed on {direction.name.lower()}")
        parser.check_context(RuleContext(direction, tuple(ports), n_port_items, port_path, rules_path), w)
        transport = tuple(parser.transport)
        allowed = (*transport, "ANY") if len(transport) > 1 else transport
        for i, p in enumerate(ports):
            where = item(port_path, i)
            if p.protocol not in allowed:
                w.problem(join(where, "protocol"), f"{name} rules can only apply to "
                          f"{', '.join(allowed[:-1]) + ' or ' if len(allowed) > 1 else ''}{allowed[-1]} "
                          f"(not {p.protocol})")
            if p.port == 0 and p.name is None:
                w.problem(join(where, "port"), "L7 rules cannot be used when the port is 0 (all ports)")
            if p.end_port is not None:
                w.problem(join(where, "endPort"), "L7 rules do not support port ranges")

    def icmp_rule(self, value: object, path: str) -> list[ICMPField]:
        w = self.w
        m = w.mapping(value, path, ("fields",))
        if m is None:
            return []
        out: list[ICMPField] = []
        fp = join(path, "fields")
        for i, f in enumerate(w.list(m.get("fields"), fp)):
            ip = item(fp, i)
            fm = w.mapping(f, ip, ("family", "type"))
            if fm is None:
                continue
            family = "IPv4"
            if fm.get("family") is not None:
                fam = w.string(fm["family"], join(ip, "family"))
                if fam is None:
                    continue
                if fam not in ("IPv4", "IPv6", ""):
                    w.problem(join(ip, "family"), f"invalid family \"{_q(fam)}\" (expected IPv4 or IPv6)")
                    continue
                family = fam or "IPv4"
            tp = join(ip, "type")
            if fm.get("type") is None:
                w.problem(tp, "missing required field \"type\"")
                continue
            t = fm["type"]
            number: int | None = None
            if isinstance(t, bool) or not isinstance(t, int | str):
                w.wrong_type(tp, "an ICMP type number or name", t)
                continue
            if isinstance(t, int) or (t.isascii() and t.isdigit()):
                # length first: int() of a long digit string is slow, then raises
                number = t if isinstance(t, int) else int(t) if len(t) <= 4 else 256
                if not 0 <= number <= 255:
                    w.problem(tp, f"ICMP type {_q(t)} out of range 0-255")
                    continue
            else:
                number = ICMP_TYPES[family].get(t)
                if number is None:
                    w.problem(tp, f"unknown {family} ICMP type \"{_q(t)}\" (expected 0-255 or one of "
                                  f"{', '.join(sorted(set(ICMP_TYPES[family])))})")
                    continue
            out.append(ICMPField(family, number))
        return out
