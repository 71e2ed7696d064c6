"""Examples shown at the end of each command's ``--help`` (its epilog).

One table for every command, applied after all areas registered their
subcommands (``build_parser``), so the modules keep only their flags. A command
whose module sets an epilog of its own keeps it. A test walks the parser and
fails on a command without examples or a flag without help text.
"""

from __future__ import annotations

import argparse

EXAMPLES: dict[str, tuple[str, ...]] = {
    "policy validate": (
        "axoneme policy validate -f examples/demo/policies",
        "kubectl get cnp -A -o yaml | axoneme policy validate -f -",
    ),
    "policy trace": (
        "axoneme policy trace --cluster cluster.yaml -f policies/ --from x/b --to x/a --port 80",
        "axoneme policy trace --cluster cluster.yaml -f policies/ --from default/app2 "
        "--to default/app1 --port 80 --http-method GET --http-path /private -o json",
        "axoneme policy trace ... --exit-code && echo allowed   # exit 1 when DENIED",
    ),
    "policy matrix": (
        "axoneme policy matrix --cluster cluster.yaml -f policies/ --port 80 --port 81/UDP",
        "axoneme policy matrix --cluster cluster.yaml -f policies/ --port http -o json",
    ),
    "policy apply": (
        "axoneme policy apply -f policies/",
        "axoneme policy get -o yaml > saved.yaml && axoneme policy apply -f saved.yaml",
    ),
    "policy delete": (
        "axoneme policy delete cnp/deny-y-c -n x",
        "axoneme policy delete -f policies/20-z-egress.yaml",
    ),
    "policy list": (
        "axoneme policy list -o wide",
        "axoneme policy list -l team=payments -o json",
    ),
    "policy get": (
        "axoneme policy get cnp/deny-y-c -n x -o yaml",
        "axoneme policy get default-deny-ingress -n x -o json",
        "axoneme policy get -o yaml > all.yaml   # a kind: List that policy apply takes",
    ),
    "policy diff": (
        "axoneme policy diff -f candidate.yaml",
        "axoneme policy diff --cluster cluster.yaml --old policies/ -f candidate/ --port 80",
    ),
    "policy recommend": (
        "axoneme policy recommend -n shop --since 30m > shop-policies.yaml",
        "axoneme policy recommend --flows flows.json --kind cnp",
    ),
    "plugins": (
        "axoneme plugins",
        "axoneme plugins -o json",
    ),
    "agent run": (
        "axoneme agent run --datapath ebpf --install-cni",
        "axoneme agent run --datapath iptables --iptables-mode ipset --state-dir /tmp/ax "
        "--api-socket /tmp/ax.sock",
    ),
    "agent cleanup": (
        "axoneme agent cleanup",
        "axoneme agent cleanup --state-dir /tmp/ax",
    ),
    "status": (
        "axoneme status",
        "axoneme status --brief   # readiness probe: OK and exit 0",
        "axoneme status -o json",
    ),
    "namespace create": ("axoneme namespace create shop --labels team=payments,env=prod",),
    "namespace label": ("axoneme namespace label shop env=staging old-",),
    "namespace delete": ("axoneme namespace delete shop",),
    "namespace list": (
        "axoneme namespace list",
        "axoneme namespace list -l 'env in (prod,staging)' -o yaml",
    ),
    "endpoint list": (
        "axoneme endpoint list -o wide",
        "axoneme endpoint list -l app=web,k8s:io.kubernetes.pod.namespace=shop -o json",
    ),
    "endpoint get": ("axoneme endpoint get 3", "axoneme endpoint get 3 -o json"),
    "identity list": (
        "axoneme identity list",
        "axoneme identity list -l '!reserved:host' -o wide",
    ),
    "pod run": (
        "axoneme pod run web -n shop --labels app=web --port http:80/TCP -- "
        "python3 -m http.server 80",
    ),
    "pod exec": ("axoneme pod exec web -n shop -- curl -s http://10.244.0.5/",),
    "pod delete": ("axoneme pod delete web -n shop",),
    "pod list": (
        "axoneme pod list -n shop -o wide",
        "axoneme pod list -l 'app notin (db),tier' -o yaml",
    ),
    "pod logs": ("axoneme pod logs web -n shop",),
    "observe": (
        "axoneme observe --last 50 --verdict DROPPED",
        "axoneme observe -f --pod shop/web -o json",
    ),
    "completion": (
        "source <(axoneme completion bash)",
        "axoneme completion zsh > \"${fpath[1]}/_axoneme\"",
    ),
}


def _commands(parser: argparse.ArgumentParser,
              path: tuple[str, ...] = ()) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every (path, parser) below ``parser`` that runs a command (aliases once)."""
    out: list[tuple[str, argparse.ArgumentParser]] = []
    if parser.get_default("handler") is not None:
        out.append((" ".join(path), parser))
    seen: set[int] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    out += _commands(sub, (*path, name))
    return out


def add_examples(parser: argparse.ArgumentParser) -> None:
    for path, sub in _commands(parser):
        examples = EXAMPLES.get(path)
        if sub.epilog or not examples:
            continue
        sub.epilog = "examples:\n" + "".join(f"  {line}\n" for line in examples)
        sub.formatter_class = argparse.RawDescriptionHelpFormatter


__all__ = ["EXAMPLES", "add_examples"]
