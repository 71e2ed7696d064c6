"""Bad policies on a real cluster.

- A mistyped CNP field is refused by the API server itself (the CRD's
  structural schema + kubectl's strict field validation), naming the field path.
- A CNP the server accepts but the agent refuses (an HTTP path that is not a
  valid regular expression) is reported in the CNP's status for this node and in
  an Event, with the field path; a good CNP applied beside it is enforced.
"""

from __future__ import annotations

import json
import time

import yaml

from .conftest import cluster_up

NS = "badinput"


def _cnp(name: str, ingress: list) -> dict:
    return {"apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"endpointSelector": {"matchLabels": {"app": name}}, "ingress": ingress}}


def test_bad_policies(cluster_session):
    cl = cluster_up("ebpf")
    cl.kubectl("create", "namespace", NS)
    try:
        typo = _cnp("typo", [{"fromEndpoints": [{}], "toPort": [{"ports": [{"port": "80"}]}]}])
        res = cl.kubectl("apply", "-f", "-", input=yaml.safe_dump(typo), check=False)
        assert res.returncode != 0, "the API server accepted a CNP with an unknown field"
        assert 'unknown field "spec.ingress[0].toPort"' in res.stderr, res.stderr

        bad = _cnp("bad", [{"fromEndpoints": [{}], "toPorts": [
            {"ports": [{"port": "80", "protocol": "TCP"}],
             "rules": {"http": [{"method": "GET", "path": "/v1/(["}]}}]}])
        good = _cnp("good", [{"fromEndpoints": [{"matchLabels": {"role": "client"}}]}])
        cl.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([bad, good]))

        def statuses() -> dict:
            out = {}
            for name in ("bad", "good"):
                obj = json.loads(cl.kubectl("-n", NS, "get", "cnp", name, "-o", "json").stdout)
                out[name] = list(obj.get("status", {}).get("nodes", {}).values())
            return out

        deadline = time.monotonic() + 20
        st = statuses()
        while not (st["bad"] and st["good"]) and time.monotonic() < deadline:
            time.sleep(0.5)
            st = statuses()
        assert st["bad"] and st["good"], f"no node status on the policies: {st}"
        assert all(not n["ok"] and not n.get("enforcing") for n in st["bad"]), st
        assert all("spec.ingress[0].toPorts[0].rules.http[0].path" in n["error"]
                   for n in st["bad"]), st
        assert all(n["ok"] and n["enforcing"] for n in st["good"]), st

        events = json.loads(cl.kubectl("-n", NS, "get", "events", "--field-selector",
                                       "involvedObject.name=bad", "-o", "json").stdout)["items"]
        assert any("spec.ingress[0].toPorts[0].rules.http[0].path" in (e.get("message") or e.get("note") or "")
                   for e in events), events

        listing = cl.agent("policy", "list", "-o", "json")
        assert listing.returncode == 0, listing.stderr
        names = {p.get("name") for p in json.loads(listing.stdout)}
        assert "good" in names and "bad" not in names, listing.stdout
    finally:
        cl.kubectl("delete", "namespace", NS, "--wait=false", check=False)
