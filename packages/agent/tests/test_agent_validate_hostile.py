"""Hostile policy files and trace flags through the CLI (issue 13 items 2-4).

Each runs ``axoneme`` in a subprocess (a segfault or a memory blow-up must
not take pytest with it) and asserts exit 2, an ``error:`` line naming the
file (and field path where there is one) and no traceback.
"""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "examples" / "demo"
CLI = "import sys; from axoneme.agent.cli import main; sys.exit(main(sys.argv[1:]))"
MEMORY_LIMIT = 512 * 1024 * 1024


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def axoneme(*args: str, timeout: float = 60) -> tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True,
                       timeout=timeout, preexec_fn=_limit_memory)
    return r.returncode, r.stdout, r.stderr


def assert_clean_error(code: int, err: str, *needles: str, max_len: int = 2000) -> None:
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    lines = err.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), err[-2000:]
    for needle in needles:
        assert needle in err, (needle, err[-2000:])
    assert len(err) < max_len, len(err)


@pytest.mark.parametrize("name,text", [
    ("flow30k.yaml", "[" * 30_000),
    ("flow1M.yaml", "[" * 1_000_000),
    ("flowmap.yaml", "{" * 30_000),
    ("mapvalues.yaml", "{a: " * 30_000),
    ("block.yaml", "- " * 30_000 + "x"),
    ("indent.yaml", "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 400))),
    ("deep.json", "[" * 1_000_000),
])
def test_deep_nesting_exit_2_naming_the_file(tmp_path: Path, name: str, text: str) -> None:
    """Before: ``[`` x 30000 segfaulted the CLI (exit 139) in the C composer."""
    f = tmp_path / name
    f.write_text(text)
    code, out, err = axoneme("policy", "validate", "-f", str(f))
    assert_clean_error(code, err, "nesting deeper than 100 levels", str(f))
    assert out == ""


def test_alias_amplification_is_refused_within_512_mb(tmp_path: Path) -> None:
    """A 13 KB file aliasing a 10 KB string 300x300 times under toEntities.
    Before: 1.84 GB RSS (MemoryError under this test's 512 MB limit)."""
    s = "x" * 10240
    doc = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspecs:\n"
           f"- &r\n  endpointSelector: {{}}\n  egress:\n  - toEntities: [&s \"{s}\", "
           + ", ".join(["*s"] * 299) + "]\n" + "- *r\n" * 299)
    assert len(doc) < 14_000
    f = tmp_path / "bomb.yaml"
    f.write_text(doc)
    code, _, err = axoneme("policy", "validate", "-f", str(f))
    assert_clean_error(code, err, "document too large", str(f))


def test_problems_per_document_are_capped_and_values_truncated(tmp_path: Path) -> None:
    """1500 bad entities of 10 KB each (15 MB expanded, under the byte bound):
    100 problems, then a count; each value shown as an 80-character excerpt."""
    s = "y" * 10240
    doc = ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\nspec:\n"
           f"  endpointSelector: {{}}\n  egress:\n  - toEntities: [&s \"{s}\", "
           + ", ".join(["*s"] * 1499) + "]\n")
    f = tmp_path / "many.yaml"
    f.write_text(doc)
    code, _, err = axoneme("policy", "validate", "-f", str(f))
    assert_clean_error(code, err, "... and 1400 more problems", max_len=40_000)
    lines = err.splitlines()
    assert len(lines) == 101
    assert f'unknown entity "{"y" * 80}…"' in lines[0]
    assert lines[0].endswith(f"({f}, document 0, spec.egress[0].toEntities[0])")


BIG = "9" * 5000
HEX = "0x" + "f" * 5000


def _np(ports: str = "", types: str = "") -> str:
    return ("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n}\n"
            f"spec:\n  podSelector: {{}}\n{types}  ingress:\n  - ports:\n    - {ports}\n")


def _cnp(rule: str) -> str:
    return ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: c}\n"
            f"spec:\n  endpointSelector: {{}}\n  ingress:\n  - {rule}\n")


@pytest.mark.parametrize("name,text,field", [
    ("port.yaml", _np(f"port: {BIG}"), "spec.ingress[0].ports[0].port"),
    ("porthex.yaml", _np(f"port: {HEX}"), "spec.ingress[0].ports[0].port"),
    ("portstr.yaml", _np(f"port: \"{BIG}\""), "spec.ingress[0].ports[0].port"),
    ("endport.yaml", _np(f"port: 80\n      endPort: {HEX}"), "spec.ingress[0].ports[0].endPort"),
    ("types.yaml", _np("port: 80", f"  policyTypes: [{HEX}]\n"), "spec.policyTypes[0]"),
    ("typesdec.yaml", _np("port: 80", f"  policyTypes: [{BIG}]\n"), "spec.policyTypes[0]"),
    ("icmp.yaml", _cnp(f"icmps: [{{fields: [{{type: {HEX}}}]}}]"), "spec.ingress[0].icmps[0].fields[0].type"),
    ("icmpstr.yaml", _cnp(f"icmps: [{{fields: [{{type: \"{BIG}\"}}]}}]"),
     "spec.ingress[0].icmps[0].fields[0].type"),
    ("icmpsup.yaml", _cnp("icmps: [{fields: [{type: \"²\"}]}]"), "spec.ingress[0].icmps[0].fields[0].type"),
    ("kafka.yaml", _cnp("toPorts: [{ports: [{port: \"9092\", protocol: TCP}], "
                        f"rules: {{kafka: [{{apiVersion: {HEX}}}]}}}}]"),
     "spec.ingress[0].toPorts[0].rules.kafka[0].apiVersion"),
    ("kafkastr.yaml", _cnp("toPorts: [{ports: [{port: \"9092\", protocol: TCP}], "
                           f"rules: {{kafka: [{{apiVersion: \"{BIG}\"}}]}}}}]"),
     "spec.ingress[0].toPorts[0].rules.kafka[0].apiVersion"),
    ("kafkasup.yaml", _cnp("toPorts: [{ports: [{port: \"9092\", protocol: TCP}], "
                           "rules: {kafka: [{apiVersion: \"²\"}]}}]"),
     "spec.ingress[0].toPorts[0].rules.kafka[0].apiVersion"),
    ("key.yaml", _cnp("{}").replace("  ingress:\n  - {}\n", f"  ? {HEX}\n  : x\n"), "spec"),
    ("port.json", '{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "n"},'
                  f' "spec": {{"podSelector": {{}}, "ingress": [{{"ports": [{{"port": {BIG}}}]}}]}}}}',
     "spec.ingress[0].ports[0].port"),
    ("types.json", '{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "n"},'
                   f' "spec": {{"podSelector": {{}}, "policyTypes": [{BIG}]}}}}', "spec.policyTypes[0]"),
])
def test_huge_integers_are_field_errors(tmp_path: Path, name: str, text: str, field: str) -> None:
    """Before: ValueError (exit 1, traceback) from int()/str() past 4300 digits."""
    f = tmp_path / name
    f.write_text(text)
    code, _, err = axoneme("policy", "validate", "-f", str(f))
    assert_clean_error(code, err, f"({f}, document 0, {field})")


TRACE = ("policy", "trace", "--cluster", str(DEMO / "cluster.yaml"), "-f", str(DEMO / "policies"),
         "--from", "x/a", "--to", "x/b")


@pytest.mark.parametrize("flags,flag", [
    (("--port", "²"), "--port"),
    (("--port", "9" * 4301), "--port"),
    (("--port", "9" * 4301 + "/UDP"), "--port"),
    (("--port", "٨٠"), "--port"),
    (("--icmp-type", "²"), "--icmp-type"),
    (("--icmp-type", "9" * 4301), "--icmp-type"),
    (("--port", "80", "--kafka-role", "produce", "--kafka-api-version", "²"), "--kafka-api-version"),
    (("--port", "80", "--kafka-role", "produce", "--kafka-api-version", "9" * 4301), "--kafka-api-version"),
])
def test_trace_number_flags(flags: tuple[str, ...], flag: str) -> None:
    """Before: '²'.isdigit() is True and int('²') raised; so did 4301 digits."""
    code, out, err = axoneme(*TRACE, *flags)
    assert_clean_error(code, err, f"({flag})", max_len=600)
    assert out == ""


def test_trace_cluster_file_hostile(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 100_000)
    code, _, err = axoneme("policy", "trace", "--cluster", str(deep), "--from", "x/a", "--to", "x/b",
                           "--port", "80")
    assert_clean_error(code, err, "nesting deeper than 100 levels", str(deep))
    port = tmp_path / "port.yaml"
    port.write_text("kind: Pod\nmetadata: {name: a, labels: {" + "k: " + HEX + "}}\nspec:\n"
                    "  containers: [{ports: [{containerPort: " + HEX + "}]}]\n")
    code, _, err = axoneme("policy", "trace", "--cluster", str(port), "--from", "default/a",
                           "--to", "default/a", "--port", "80")
    assert_clean_error(code, err, str(port), "metadata.labels.k")


def test_endless_file_is_cut_at_the_size_bound() -> None:
    """Before: ``-f /dev/zero`` read until memory ran out."""
    code, _, err = axoneme("policy", "validate", "-f", "/dev/zero")
    assert_clean_error(code, err, "file too large (more than 32 MiB) (/dev/zero)")
