"""``axoneme policy validate`` through the CLI entry point."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import pytest
from axoneme.agent.cli import main

GOOD_CNP = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{method: GET, path: "/.*"}]}
"""

GOOD_NP = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 5432}]
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: dns}
spec:
  endpointSelector: {}
  egress:
  - toEntities: [cluster]
"""

BAD = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad}
spec:
  endpointSelector: {}
  ingress:
  - toPorts:
    - ports: [{port: "99999", protocol: TCP}]
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad2}
spec:
  endpointSelector: {}
  egress:
  - toEntities: [mars]
"""


def write(tmp: Path, name: str, text: str) -> str:
    p = tmp / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["policy", "validate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_valid_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path, "a.yaml", GOOD_CNP)
    b = write(tmp_path, "b.yaml", GOOD_NP)
    code, out, err = run(capsys, "-f", a, "-f", b)
    assert code == 0 and err == ""
    assert out.splitlines() == [f"{a}: 1 document(s) valid", f"{b}: 2 document(s) valid"]


def test_f_takes_several_values_and_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "dir"
    d.mkdir()
    write(d, "2.yml", GOOD_NP)
    write(d, "1.yaml", GOOD_CNP)
    write(d, "notes.txt", "not a policy")
    a = write(tmp_path, "a.yaml", GOOD_CNP)
    code, out, _ = run(capsys, "-f", str(d), a)
    assert code == 0
    assert [line.split(": ")[0] for line in out.splitlines()] == [str(d / "1.yaml"), str(d / "2.yml"), a]


def test_invalid_reports_every_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = write(tmp_path, "good.yaml", GOOD_CNP)
    bad = write(tmp_path, "bad.yaml", BAD)
    code, out, err = run(capsys, "-f", good, bad)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("error: port 99999 out of range 0-65535")
    assert lines[0].endswith(f"({bad}, document 0, spec.ingress[0].toPorts[0].ports[0].port)")
    assert lines[1].startswith('error: unknown entity "mars"')
    assert lines[1].endswith(f"({bad}, document 1, spec.egress[0].toEntities[0])")


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path, "bad.yaml", BAD)
    good = write(tmp_path, "good.yaml", GOOD_NP)
    code, out, err = run(capsys, "-f", bad, good, "-o", "json")
    assert code == 2
    data = json.loads(out)
    assert data["valid"] is False and data["documents"] == 4
    assert [(p["file"], p["document"], p["field"]) for p in data["problems"]] == [
        (bad, 0, "spec.ingress[0].toPorts[0].ports[0].port"), (bad, 1, "spec.egress[0].toEntities[0]")]
    assert err.count("error:") == 2
    code, out, _ = run(capsys, "-f", good, "-o", "json")
    assert code == 0 and json.loads(out) == {"valid": True, "documents": 2, "problems": []}


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope.yaml")
    code, out, err = run(capsys, "-f", missing)
    assert code == 2 and out == ""
    assert err == f"error: no such file or directory ({missing})\n"


def test_malformed_yaml_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path, "broken.yaml", "kind: CiliumNetworkPolicy\nspec: {a: [\n")
    code, _, err = run(capsys, "-f", bad)
    assert code == 2
    assert err.startswith("error: invalid YAML:") and "line" in err and bad in err


def test_unsupported_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, "pod.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
    code, _, err = run(capsys, "-f", f)
    assert code == 2 and 'unsupported kind "Pod"' in err and f"({f}, document 0, kind)" in err


def test_stdin(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    class FakeStdin:
        buffer = io.BytesIO(GOOD_CNP.encode())

    monkeypatch.setattr("sys.stdin", FakeStdin())
    code, out, _ = run(capsys, "-f", "-")
    assert code == 0 and out == "<stdin>: 1 document(s) valid\n"


def test_requires_f(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["policy", "validate"])
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_invalid_examples_are_invalid(capsys: pytest.CaptureFixture[str]) -> None:
    root = Path(__file__).resolve().parents[3] / "examples" / "invalid"
    files = sorted(root.glob("*.yaml"))
    assert files, "examples/invalid/ holds sample bad policies"
    for f in files:
        code, _, err = run(capsys, "-f", str(f))
        assert code == 2, f
        assert err.startswith("error: ") and str(f) in err


def test_empty_directory_is_said(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "-f", str(tmp_path))
    assert code == 0 and err == ""
    assert out == f"{tmp_path}: no *.yaml, *.yml or *.json files\n"


def test_duplicate_keys_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, "dup.yaml", GOOD_CNP + "  ingress: []\n")
    code, _, err = run(capsys, "-f", f)
    assert code == 2 and 'duplicate key "ingress"' in err and "line 11" in err
    j = write(tmp_path, "dup.json", '{"kind": "NetworkPolicy", "kind": "x"}')
    code, _, err = run(capsys, "-f", j)
    assert code == 2 and 'duplicate key "kind"' in err and j in err


def test_problems_in_input_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write(tmp_path, "bad.yaml", BAD)
    broken = write(tmp_path, "broken.yaml", "a: [\n")
    missing = str(tmp_path / "missing.yaml")
    code, _, err = run(capsys, "-f", bad, missing, broken)
    assert code == 2
    where = [line.rsplit("(", 1)[1] for line in err.splitlines()]
    assert [w.split(",")[0].rstrip(")") for w in where] == [bad, bad, missing, broken]


NON_RE2 = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: lookaround, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - toPorts:
    - ports: [{port: "80", protocol: TCP}]
      rules: {http: [{path: "/public/.*"}, {path: "/(?!admin).*"}, {method: "(GET)\\\\1"}]}
"""


def test_regex_re2_cannot_run_is_refused_with_field_path(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Policy regexes run on RE2 (linear time): lookaround and backreferences
    are refused at validation, never accepted and then mismatched."""
    bad = write(tmp_path, "re.yaml", NON_RE2)
    code, out, err = run(capsys, "-f", bad)
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 2, err
    rules = "spec.ingress[0].toPorts[0].rules.http"
    assert lines[0].endswith(f"({bad}, document 0, {rules}[1].path)")
    assert lines[1].endswith(f"({bad}, document 0, {rules}[2].method)")
    assert all("invalid regular expression" in line and "RE2" in line for line in lines)
    assert "Traceback" not in err


def test_redos_pattern_is_valid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # RE2 runs it in linear time, so it needs no special treatment.
    ok = write(tmp_path, "ok.yaml", NON_RE2.replace('{path: "/(?!admin).*"}, {method: "(GET)\\\\1"}',
                                                    r'{path: "/files/([a-z0-9]+/?)+\\.txt"}'))
    code, out, err = run(capsys, "-f", ok)
    assert (code, err) == (0, ""), err
    assert out == f"{ok}: 1 document(s) valid\n"
