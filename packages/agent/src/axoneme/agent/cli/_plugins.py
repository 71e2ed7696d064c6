"""``axoneme plugins``: installed datapaths, L7 parsers and hook plugins.

Per plugin: kind, name, distribution, version, entry point, whether it loads
(and why not), capabilities. Exit 1 when any installed plugin fails to load.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from axoneme.agent.cli._output import add_list_flags, emit
from axoneme.core.plugins import (
    GROUP_DATAPATH,
    GROUP_L7,
    GROUPS,
    KINDS,
    PluginInfo,
    Registry,
    registry,
)


def register(groups: dict[str, argparse._SubParsersAction]) -> None:  # type: ignore[type-arg]
    p = groups[""].add_parser("plugins", help="list installed datapaths, L7 parsers and plugins")
    add_list_flags(p, "{datapath, l7, plugins, details}; wide: the table (it shows everything)",
                   selector=False)
    p.set_defaults(handler=run)


def capabilities(group: str, obj: Any) -> list[str]:
    """What a loaded plugin declares: a datapath's ``capabilities``; an L7
    parser's transports, proxy (and its engine), toFQDNs learning and rules field."""
    if group == GROUP_DATAPATH:
        return sorted(str(c) for c in getattr(obj, "capabilities", frozenset()))
    if group == GROUP_L7 and isinstance(obj, type):
        from axoneme.core.l7 import FQDNParser, L7Parser

        if not issubclass(obj, L7Parser):
            return []
        caps = [f"transport:{t.lower()}" for t in obj.transport]
        if obj.proxy_factory is not L7Parser.proxy_factory:
            caps.append("proxy")
        if issubclass(obj, FQDNParser):
            caps.append("fqdn")
        factory_for = getattr(obj, "proxy_factory_for", None)
        if factory_for is not None:  # the engine l7_http_engine: auto would run
            try:
                caps.append(f"proxy-engine:{factory_for(obj(), 'auto')[1]}")
            except Exception:  # noqa: BLE001 - a capability, not a load failure
                pass
        caps.append(f"rules:{obj.rules_field}" if obj.rules_field else "rules:l7proto")
        return sorted(caps)
    return []


def describe(reg: Registry) -> list[dict[str, Any]]:
    """One record per installed entry point (allowed ones), loading each."""
    out: list[dict[str, Any]] = []
    for group in GROUPS:
        for info in reg.infos(group):
            out.append(_record(reg, info))
    return out


def _record(reg: Registry, info: PluginInfo) -> dict[str, Any]:
    error = reg.load_error(info.group, info.name)
    obj = None if error is not None else reg.load(info.group, info.name)
    return {"kind": info.kind, "name": info.name, "distribution": info.distribution,
            "version": info.version, "entry_point": info.entry_point, "loads": error is None,
            "error": str(error) if error is not None else None,
            "capabilities": capabilities(info.group, obj) if obj is not None else []}


def run(args: argparse.Namespace) -> int:
    reg = registry()
    details = describe(reg)
    failing = [d for d in details if not d["loads"]]
    data: dict[str, Any] = {KINDS[g]: reg.installed(g) for g in GROUPS}
    data["details"] = details
    if args.output == "json":
        json.dump(data, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    elif args.output == "yaml":
        emit(args, data, lambda wide: None)
    else:
        sys.stdout.write(f"{'KIND':<10} {'NAME':<12} {'DISTRIBUTION':<28} {'VERSION':<10} {'LOADS':<6} "
                         f"CAPABILITIES / ENTRY POINT\n")
        for d in details:
            caps = ",".join(d["capabilities"]) or "-"
            sys.stdout.write(f"{d['kind']:<10} {d['name']:<12} {d['distribution']:<28} {d['version']:<10} "
                             f"{'yes' if d['loads'] else 'NO':<6} {caps} {d['entry_point']}\n")
    for d in failing:
        sys.stderr.write(f"error: {d['error']} (plugins)\n")
    return 1 if failing else 0
