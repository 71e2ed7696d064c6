"""The ``http`` L7 parser plugin: rule schema, trace inputs, matcher and proxy factory."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from axoneme.core.l7 import L7Parser, L7Request
from axoneme.core.policy.walk import Walker, item, join
from axoneme.core.regex import regex_problem
from axoneme.core.yamlsafe import excerpt as _q
from axoneme.l7.http._match import (
    HeaderAction,
    HttpVerdict,
    apply_actions,
    match_rules,
    rule_matches,
)
from axoneme.l7.http._rules import HeaderMatch, HTTPRule
from axoneme.l7.http._wire import HttpError, parse_target

_MISMATCH_ACTIONS = ("", "LOG", "ADD", "DELETE", "REPLACE")


class HttpParser(L7Parser):
    """HTTP/1.1: rule schema, matcher, ``policy trace`` mapping and the proxy factory."""

    name = "http"
    rules_field = "http"
    default_proxy_port = 15001
    trace_inputs = {
        "method": "request method (--http-method)",
        "path": "request target, e.g. /api?x=1 (--http-path)",
        "host": "Host header (--http-host)",
        "header": "a header 'Name: value' (--http-header; repeatable)",
    }

    def parse_rule(self, value: object, path: str, w: Walker) -> HTTPRule | None:
        """One ``rules.http[]`` item (Cilium ``PortRuleHTTP``): RE2 regexes, headers, headerMatches."""
        m = w.mapping(value, path, ("method", "path", "host", "headers", "headerMatches"))
        if m is None:
            return None
        n = len(w.problems)
        regexes: dict[str, str | None] = {}
        for k in ("method", "path", "host"):
            text = w.opt_string(m, k, path)
            if text:
                # Matched with RE2 on the packet path (linear time): refuse here
                # what RE2 cannot express, so no rule fails only at match time.
                why = regex_problem(text)
                if why is not None:
                    shown = text if len(text) <= 200 else text[:200] + "..."
                    w.problem(join(path, k), f"invalid regular expression \"{shown}\" "
                              f"(RE2 syntax: no backreferences or lookaround): {why}")
            regexes[k] = text or None
        headers: list[str] = []
        hp = join(path, "headers")
        for i, h in enumerate(w.list(m.get("headers"), hp)):
            text = w.string(h, item(hp, i), allow_empty=False)
            if text is not None:
                headers.append(text)
        matches: list[HeaderMatch] = []
        hmp = join(path, "headerMatches")
        for i, h in enumerate(w.list(m.get("headerMatches"), hmp)):
            ip = item(hmp, i)
            hm = w.mapping(h, ip, ("name", "value", "mismatch"), {"secret": "secret is not supported"})
            if hm is None:
                continue
            name = None
            if hm.get("name") is None:
                w.problem(join(ip, "name"), "missing required field \"name\"")
            else:
                name = w.string(hm["name"], join(ip, "name"), allow_empty=False)
            hv = w.opt_string(hm, "value", ip)
            mismatch = w.opt_string(hm, "mismatch", ip) or ""
            if mismatch not in _MISMATCH_ACTIONS:
                w.problem(join(ip, "mismatch"),
                          f"invalid mismatch action \"{_q(mismatch)}\" (expected LOG, ADD, DELETE or REPLACE)")
            if name is not None:
                matches.append(HeaderMatch(name, hv, mismatch))
        if len(w.problems) != n:
            return None
        return HTTPRule(method=regexes["method"], path=regexes["path"], host=regexes["host"],
                        headers=tuple(headers), header_matches=tuple(matches))

    def is_empty_rule(self, rule: Any) -> bool:
        return bool(rule == HTTPRule())

    def match(self, rules: Sequence[Any], request: L7Request) -> HttpVerdict:
        refused = request.fields.get("refused")
        if refused:
            return HttpVerdict(False, None, str(refused))
        return match_rules(rules, request)

    def request_from_trace(self, options: dict[str, Any]) -> L7Request:
        """``policy trace --http-method/--http-path/--http-host/--http-header``."""
        options = self.with_shorthands(options, "http")
        extra = options.get("header")  # --l7 header=... adds to --http-header
        if extra is not None:
            more = [extra] if isinstance(extra, str) else list(extra)
            options["http_headers"] = [*(options.get("http_headers") or ()), *more]
        headers: list[tuple[str, str]] = []
        for h in options.get("http_headers") or ():
            if isinstance(h, (tuple, list)):
                headers.append((str(h[0]), str(h[1])))
            else:
                name, _, value = str(h).partition(":")
                headers.append((name.strip(), value.strip()))
        host = str(options.get("http_host") or "")
        if not host:
            host = next((v for n, v in headers if n.lower() == "host"), "")
        path = str(options.get("http_path") or "/")
        refused = ""
        try:
            # what the proxy would match: the normalised path (``_wire``)
            path = parse_target(path)[0]
        except HttpError as e:  # the proxy answers it before any rule is asked
            refused = (f"the proxy refuses request target {_q(path)!r} "
                       f"({e.status} {e.reason}) before matching any rule")
        fields: dict[str, Any] = {
            "method": str(options.get("http_method") or "GET"),
            "path": path,
            "host": host,
            "headers": headers,
        }
        if refused:
            fields["refused"] = refused
        return L7Request(fields)

    def proxy_factory(self) -> Any:
        from axoneme.l7.http._proxy import HttpProxy

        return HttpProxy

    def proxy_factory_for(self, engine: str) -> tuple[Any, str]:
        """(the proxy factory, the engine it runs) for the agent's
        ``l7_http_engine``: native (axoneme-l7-http), python, or auto (native
        when built). FileNotFoundError: native asked, the binary not built."""
        from axoneme.l7.http._native import http_proxy_factory

        return http_proxy_factory(engine)


__all__ = ["HttpParser", "HttpVerdict", "HeaderAction", "apply_actions", "rule_matches"]
