"""Entry point of the axoneme-cni executable (CNI spec 1.0.0 / 1.1.0).

The runtime runs us with CNI_* environment variables and the network
configuration on stdin; we answer with a result (or error) JSON on stdout.
IPAM, the veth pair and the endpoint all come from the agent: one API call
per operation, over the socket named by ``agentSocket`` in the network
configuration (default /var/run/axoneme/axoneme.sock). Logs go to stderr.

Error codes (spec "Error codes"): 1 incompatible version, 2 unsupported
field, 3 unknown container, 4 invalid environment variables, 5 I/O failure,
6 failed to decode content, 7 invalid network config, 11 try again later
(the agent is unreachable, or answers 503: not possible yet); STATUS uses 50 (plugin not available); 100+ are
ours (100: the agent refused the operation).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

from axoneme.core.apiclient import DEFAULT_SOCKET, AgentClient, AgentError, AgentUnreachable
from axoneme.core.names import (
    container_id_problem,
    dns_label_problem,
    ifname_problem,
    pod_name_problem,
)

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
PRIMARY_VERSIONS = ("1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION", "STATUS", "GC")

ERR_INCOMPATIBLE_VERSION = 1
ERR_UNSUPPORTED_FIELD = 2
ERR_UNKNOWN_CONTAINER = 3
ERR_INVALID_ENV = 4
ERR_IO = 5
ERR_DECODE = 6
ERR_INVALID_CONFIG = 7
ERR_TRY_AGAIN = 11
ERR_NOT_AVAILABLE = 50
ERR_AGENT = 100


class CNIError(Exception):
    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


def parse_cni_args(text: str) -> dict[str, str]:
    """``K=V;K=V`` (order varies, IgnoreUnknown included) into a dict."""
    out: dict[str, str] = {}
    for part in (text or "").split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep or not key:
            raise CNIError(ERR_INVALID_ENV, "invalid CNI_ARGS", f"expected K=V pairs, got {part!r}")
        out[key] = value
    return out


def check_version(config: Mapping[str, Any]) -> str:
    version = config.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise CNIError(ERR_INVALID_CONFIG, "invalid network config",
                       "cniVersion is required")
    if version not in PRIMARY_VERSIONS:
        raise CNIError(ERR_INCOMPATIBLE_VERSION, "incompatible CNI version",
                       f"cniVersion {version} is not supported by axoneme-cni "
                       f"(supported: {', '.join(PRIMARY_VERSIONS)})")
    return version


def read_config(stdin: Any) -> dict[str, Any]:
    try:
        raw = stdin.read()
    except OSError as e:
        raise CNIError(ERR_IO, "cannot read the network config from stdin", str(e)) from e
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", errors="replace")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CNIError(ERR_DECODE, "cannot decode the network config", str(e)) from e
    if not isinstance(config, dict):
        raise CNIError(ERR_DECODE, "cannot decode the network config", "expected a JSON object")
    return config


def validate_config(config: Mapping[str, Any]) -> None:
    name = config.get("name")
    if not isinstance(name, str) or not name:
        raise CNIError(ERR_INVALID_CONFIG, "invalid network config", "name is required")
    sock = config.get("agentSocket")
    if sock is not None and (not isinstance(sock, str) or not sock):
        raise CNIError(ERR_INVALID_CONFIG, "invalid network config",
                       "agentSocket must be a path")
    mtu = config.get("mtu")
    if mtu is not None and (not isinstance(mtu, int) or mtu < 576):
        raise CNIError(ERR_INVALID_CONFIG, "invalid network config", f"mtu {mtu!r} is invalid")


def _require(env: Mapping[str, str], *names: str) -> None:
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise CNIError(ERR_INVALID_ENV, "missing environment variables",
                       ", ".join(missing) + " must be set")


def _client(config: Mapping[str, Any]) -> AgentClient:
    return AgentClient(str(config.get("agentSocket") or DEFAULT_SOCKET))


def _call(client: AgentClient, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
    try:
        res = client.post(path, body)
    except AgentUnreachable as e:
        raise CNIError(ERR_TRY_AGAIN, "the axoneme agent is not reachable",
                       f"{e}: {e.reason}") from e
    except AgentError as e:
        code = ERR_AGENT
        if e.status == 409:
            # the container id already has an attachment: CNI_CONTAINERID is invalid
            code = ERR_INVALID_ENV
        elif e.status == 404:
            code = ERR_UNKNOWN_CONTAINER
        elif e.status == 503:
            # not possible yet (e.g. a pod the agent's API server cache lacks)
            code = ERR_TRY_AGAIN
        raise CNIError(code, "the axoneme agent refused the request", str(e)) from e
    return res if isinstance(res, dict) else {}


def _pod_args(env: Mapping[str, str]) -> dict[str, str]:
    """Namespace and pod name from CNI_ARGS, checked as Kubernetes names.

    They become identity labels and keys in the agent's state: a runtime (or
    anyone who can run the plugin) must not smuggle '/', control characters
    or megabytes through them."""
    args = parse_cni_args(env.get("CNI_ARGS", ""))
    namespace = args.get("K8S_POD_NAMESPACE", "") or "default"
    pod_name = args.get("K8S_POD_NAME", "")
    problem = dns_label_problem(namespace)
    if problem:
        raise CNIError(ERR_INVALID_ENV, "invalid CNI_ARGS", f"K8S_POD_NAMESPACE {problem}")
    if pod_name and (problem := pod_name_problem(pod_name)):
        raise CNIError(ERR_INVALID_ENV, "invalid CNI_ARGS", f"K8S_POD_NAME {problem}")
    return {"namespace": namespace, "pod_name": pod_name}


def _check_env_names(env: Mapping[str, str]) -> None:
    """CNI_CONTAINERID and CNI_IFNAME as the CNI spec defines them."""
    for var, check in (("CNI_CONTAINERID", container_id_problem), ("CNI_IFNAME", ifname_problem)):
        problem = check(env[var])
        if problem:
            raise CNIError(ERR_INVALID_ENV, f"invalid {var}", f"{var} {problem}")


def cmd_add(env: Mapping[str, str], config: Mapping[str, Any]) -> dict[str, Any]:
    version = check_version(config)
    validate_config(config)
    _require(env, "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
    _check_env_names(env)
    netns = env["CNI_NETNS"]
    if not os.path.exists(netns):
        raise CNIError(ERR_INVALID_ENV, "invalid CNI_NETNS",
                       f"network namespace {netns} does not exist")
    body = {"container_id": env["CNI_CONTAINERID"], "netns": netns, "ifname": env["CNI_IFNAME"],
            "network": config.get("name"), "cni_version": version, **_pod_args(env)}
    res = _call(_client(config), "/v1/cni/add", body)
    return result_json(version, res)


def result_json(version: str, res: Mapping[str, Any]) -> dict[str, Any]:
    return {"cniVersion": version, "interfaces": res.get("interfaces", []),
            "ips": res.get("ips", []), "routes": res.get("routes", []), "dns": res.get("dns", {})}


def cmd_del(env: Mapping[str, str], config: Mapping[str, Any]) -> None:
    check_version(config)
    validate_config(config)
    _require(env, "CNI_CONTAINERID")
    body = {"container_id": env["CNI_CONTAINERID"], "netns": env.get("CNI_NETNS", ""),
            "ifname": env.get("CNI_IFNAME", "eth0"), "network": config.get("name")}
    _call(_client(config), "/v1/cni/del", body)


def cmd_check(env: Mapping[str, str], config: Mapping[str, Any]) -> None:
    check_version(config)
    validate_config(config)
    _require(env, "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME")
    prev = config.get("prevResult")
    if not isinstance(prev, dict):
        raise CNIError(ERR_INVALID_CONFIG, "invalid network config",
                       "CHECK needs prevResult")
    res = _call(_client(config), "/v1/cni/check", {"container_id": env["CNI_CONTAINERID"]})
    want = {str(ip.get("address")) for ip in prev.get("ips", []) if isinstance(ip, dict)}
    have = {str(ip.get("address")) for ip in res.get("ips", []) if isinstance(ip, dict)}
    if want and want != have:
        raise CNIError(ERR_AGENT, "endpoint does not match prevResult",
                       f"prevResult has {sorted(want)}, the agent has {sorted(have)}")


def cmd_status(env: Mapping[str, str], config: Mapping[str, Any]) -> None:
    check_version(config)
    validate_config(config)
    try:
        _client(config).get("/v1/healthz")
    except (AgentUnreachable, AgentError) as e:
        raise CNIError(ERR_NOT_AVAILABLE, "the plugin is not available",
                       f"the axoneme agent does not answer: {e}") from e


def cmd_gc(env: Mapping[str, str], config: Mapping[str, Any]) -> None:
    check_version(config)
    validate_config(config)
    valid = config.get("cni.dev/valid-attachments", [])
    if not isinstance(valid, list):
        raise CNIError(ERR_INVALID_CONFIG, "invalid network config",
                       "cni.dev/valid-attachments must be a list")
    _call(_client(config), "/v1/cni/gc", {"network": config.get("name"),
                                            "valid_attachments": valid})


def cmd_version(config: Mapping[str, Any] | None) -> dict[str, Any]:
    version = "1.1.0"
    if config and isinstance(config.get("cniVersion"), str):
        version = config["cniVersion"]
    return {"cniVersion": version, "supportedVersions": list(PRIMARY_VERSIONS)}


def run(env: Mapping[str, str], stdin: Any, stdout: Any) -> int:
    command = env.get("CNI_COMMAND", "")
    version = "1.1.0"
    try:
        if command not in COMMANDS:
            raise CNIError(ERR_INVALID_ENV, "invalid CNI_COMMAND",
                           f"CNI_COMMAND must be one of {', '.join(COMMANDS)}, got {command!r}")
        if command == "VERSION":
            try:
                config: dict[str, Any] | None = read_config(stdin)
            except CNIError:
                config = None  # VERSION may come with an empty or dummy config
            json.dump(cmd_version(config), stdout)
            return 0
        config = read_config(stdin)
        if isinstance(config.get("cniVersion"), str):
            version = config["cniVersion"]
        if command == "ADD":
            json.dump(cmd_add(env, config), stdout)
        elif command == "DEL":
            cmd_del(env, config)
        elif command == "CHECK":
            cmd_check(env, config)
        elif command == "STATUS":
            cmd_status(env, config)
        elif command == "GC":
            cmd_gc(env, config)
        return 0
    except CNIError as e:
        if e.code == ERR_INCOMPATIBLE_VERSION:
            version = PRIMARY_VERSIONS[-1]
        err = {"cniVersion": version, "code": e.code, "msg": e.msg}
        if e.details:
            err["details"] = e.details
        json.dump(err, stdout)
        sys.stderr.write(f"axoneme-cni {command}: {e.msg}: {e.details}\n")
        return 1


def main() -> int:
    code = run(os.environ, sys.stdin, sys.stdout)
    sys.stdout.flush()
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
