"""axoneme-cni against a real agent, driven exactly as podman / containerd drive it."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from axoneme.testing.cni import KINDS, plugin_executable

pytestmark = [pytest.mark.privileged]

PLUGIN = str(Path(sys.executable).parent / "axoneme-cni")
_in_use = [PLUGIN]


@pytest.fixture(autouse=True, params=KINDS)
def plugin(request: pytest.FixtureRequest) -> Any:
    exe = plugin_executable(request.param)
    _in_use[0] = exe
    yield exe
    _in_use[0] = PLUGIN


def cni(command: str, config: dict[str, Any], container_id: str, netns: str = "",
        args: str = "IgnoreUnknown=1", ifname: str = "eth0") -> tuple[int, Any]:
    env = {"CNI_COMMAND": command, "CNI_CONTAINERID": container_id, "CNI_NETNS": netns,
           "CNI_IFNAME": ifname, "CNI_PATH": os.path.dirname(PLUGIN), "CNI_ARGS": args,
           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    res = subprocess.run([_in_use[0]], input=json.dumps(config), capture_output=True, text=True,
                         env=env, timeout=120)
    return res.returncode, (json.loads(res.stdout) if res.stdout.strip() else None)


def host_link(container_id: str) -> str:
    return "lxc" + hashlib.sha256(container_id.encode()).hexdigest()[:11]


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


@pytest.fixture
def net(agent_factory: Any) -> tuple[Any, dict[str, Any]]:
    ap = agent_factory("noop")
    return ap, {"cniVersion": "1.0.0", "name": "itest", "type": "axoneme-cni",
                "agentSocket": str(ap.socket)}


def test_add_check_del_like_a_runtime(net: tuple[Any, dict[str, Any]], netns_factory: Any) -> None:
    ap, config = net
    ns = netns_factory("axcni")
    cid = secrets.token_hex(32)
    # podman: only K8S_POD_NAME in CNI_ARGS
    code, result = cni("ADD", config, cid, f"/run/netns/{ns}", "IgnoreUnknown=1;K8S_POD_NAME=pm1")
    assert code == 0, result
    addr = result["ips"][0]["address"]
    ip = addr.split("/")[0]
    assert addr.endswith("/32")
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(ap.pod_cidr)
    assert ip != str(ipaddress.ip_network(ap.pod_cidr).network_address + 1)  # .1 is the gateway
    host, pod = result["interfaces"]
    assert host["name"] == host_link(cid) and len(host["name"]) <= 15
    assert pod == {"name": "eth0", "mac": pod["mac"], "sandbox": f"/run/netns/{ns}"}
    assert result["ips"][0]["interface"] == 1
    assert link_exists(host["name"])
    inside = subprocess.run(["ip", "-n", ns, "-o", "addr", "show", "eth0"], capture_output=True,
                            text=True).stdout
    assert f"{ip}/32" in inside
    routes = subprocess.run(["ip", "-n", ns, "route"], capture_output=True, text=True).stdout
    assert "default via 169.254.1.1 dev eth0" in routes
    host_route = subprocess.run(["ip", "route", "show", f"{ip}/32"], capture_output=True,
                                text=True).stdout
    assert f"dev {host['name']}" in host_route
    eps = ap.json("endpoint", "list")
    assert [(e["pod"], e["ipv4"]) for e in eps] == [("default/pm1", ip)]

    # ADD again for the same container: an error, and nothing changes
    code, err = cni("ADD", config, cid, f"/run/netns/{ns}", "IgnoreUnknown=1;K8S_POD_NAME=pm1")
    assert code != 0
    assert err["code"] == 4 and cid in err["details"]
    assert ap.json("endpoint", "list") == eps
    assert link_exists(host["name"])

    code, out = cni("CHECK", {**config, "prevResult": result}, cid, f"/run/netns/{ns}")
    assert code == 0, out

    # DEL with prevResult, then containerd's second DEL: empty netns, no prevResult
    code, out = cni("DEL", {**config, "prevResult": result}, cid, f"/run/netns/{ns}")
    assert code == 0, out
    assert not link_exists(host["name"])
    assert ap.json("endpoint", "list") == []
    code, out = cni("DEL", config, cid, "")
    assert code == 0, out
    code, out = cni("DEL", config, secrets.token_hex(32), "")  # never seen: fine too
    assert code == 0, out
    code, out = cni("CHECK", {**config, "prevResult": result}, cid, f"/run/netns/{ns}")
    assert code != 0 and out["code"] == 3


def test_k8s_args_and_failed_add_leaves_nothing(net: tuple[Any, dict[str, Any]],
                                                  netns_factory: Any, tmp_path: Path) -> None:
    ap, config = net
    ns = netns_factory("axcni")
    cid = secrets.token_hex(32)
    args = "K8S_POD_INFRA_CONTAINER_ID=x;K8S_POD_NAME=kp;IgnoreUnknown=1;K8S_POD_NAMESPACE=team;K8S_POD_UID=u"
    code, result = cni("ADD", {**config, "cniVersion": "1.1.0"}, cid, f"/run/netns/{ns}", args)
    assert code == 0, result
    assert result["cniVersion"] == "1.1.0"
    assert [e["pod"] for e in ap.json("endpoint", "list")] == ["team/kp"]

    # a path that exists but is no network namespace: ADD fails and rolls back
    bogus = tmp_path / "not-a-netns"
    bogus.write_text("")
    bad_cid = secrets.token_hex(32)
    code, err = cni("ADD", config, bad_cid, str(bogus), "K8S_POD_NAME=bad")
    assert code != 0
    assert err["code"] >= 100 and err["msg"]
    assert not link_exists(host_link(bad_cid))
    assert [e["pod"] for e in ap.json("endpoint", "list")] == ["team/kp"]
    code, _ = cni("DEL", config, cid, f"/run/netns/{ns}")
    assert code == 0


def test_gc_removes_only_stale_attachments_of_its_network(net: tuple[Any, dict[str, Any]],
                                                           netns_factory: Any) -> None:
    ap, config = net
    config = {**config, "cniVersion": "1.1.0"}
    kept, stale = secrets.token_hex(32), secrets.token_hex(32)
    for cid, name in ((kept, "keep"), (stale, "stale")):
        ns = netns_factory("axgc")
        code, out = cni("ADD", config, cid, f"/run/netns/{ns}", f"K8S_POD_NAME={name}")
        assert code == 0, out
    # a pod of another network (the pod runtime's) is not this GC's business
    ap.pod_run("other", "sleep", "infinity")
    gc = {**config, "cni.dev/valid-attachments": [{"containerID": kept, "ifname": "eth0"}]}
    code, out = cni("GC", gc, "")
    assert code == 0, out
    pods = sorted(e["pod"] for e in ap.json("endpoint", "list"))
    assert pods == ["default/keep", "default/other"]
    assert not link_exists(host_link(stale))
    code, _ = cni("DEL", config, kept, "")
    assert code == 0


def test_install_cni_writes_conflist_and_wrapper(tmp_path: Path, plugin: str) -> None:
    from axoneme.agent._agent import AgentConfig
    from axoneme.agent._cniinstall import install_cni

    cfg = AgentConfig(api_socket=str(tmp_path / "a.sock"), cni_bin=plugin)
    install_cni(cfg, conf_dir=str(tmp_path / "net.d"), bin_dir=str(tmp_path / "bin"))
    conflist = json.loads((tmp_path / "net.d" / "05-axoneme.conflist").read_text())
    assert conflist["plugins"][0] == {"type": "axoneme-cni", "agentSocket": str(tmp_path / "a.sock")}
    wrapper = tmp_path / "bin" / "axoneme-cni"
    assert os.access(wrapper, os.X_OK)
    res = subprocess.run([str(wrapper)], input=json.dumps({"cniVersion": "1.0.0"}),
                         capture_output=True, text=True, env={"CNI_COMMAND": "VERSION"})
    assert res.returncode == 0 and "1.0.0" in json.loads(res.stdout)["supportedVersions"]
