"""The differential of scripts/k8s-e2e: did `axoneme policy matrix` predict what the kernel did?

While upstream's NetworkPolicy e2e tests run, two recorders watch the cluster:

- the state: a watch of namespaces, pods and NetworkPolicies (`kubectl get
  KIND -A --watch --output-watch-events -o json`; the system namespaces left
  out), sampled every 0.2 s and on every event. Each distinct state
  (namespace labels; pods with their labels, address and ports;
  NetworkPolicy specs) gets a window: from its first sample plus a settle
  time (the agent's programming latency) to its last sample. A connection
  seen outside every window (around a change) is not decided: the kernel may
  be between two states there. While a watch is restarted (the API server
  ends watches after 30-60 min) there is no state, and nothing is decided.
- the kernel: every flow the agent reports, live (`axoneme observe -f -o json`
  inside the agent pod, Hubble's JSON). Each attempt a pod makes to a pod is
  an outcome: dropped by policy (a DROPPED flow with a policy drop reason, at
  either end) or admitted (the destination pod's ingress verdict FORWARDED).

Afterwards each window's pods, namespaces and policies are written as files
(`state-N/cluster.json`, `state-N/policies.json`) and loaded into the offline
engine of `axoneme policy trace/matrix`; every attempt in the window is decided
with it. A disagreement (the kernel admitted what the engine denies, or the
reverse) is a bug in one of them; each is listed with the `axoneme policy trace`
command that reproduces the engine's side from those files.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from axoneme.core.cluster import Cluster
from axoneme.core.mapstate import Protocol
from axoneme.core.policy.engine import EngineOptions
from axoneme.core.policy.observed import PASSED, POLICY_DROPS, flow_time
from axoneme.core.policy.parse import parse_policies
from axoneme.core.policy.trace import DENIED, OfflineCluster, resolve_peer, trace

SYSTEM_NAMESPACES = frozenset({"kube-system", "kube-public", "kube-node-lease"})
PROTOCOLS = ("TCP", "UDP", "SCTP")
SETTLE_S = 1.0  # the agent programs a change in ~0.3 s (tests/k8s/test_k8s_e2e_churn.py)
SAMPLE_S = 0.2
RESYNC_S = 3.0  # no state for this long after a watch is restarted (its list replays)
KINDS = ("namespaces", "pods", "networkpolicies")

Obj = Mapping[str, Any]


# -- the state -------------------------------------------------------------------------

def _pod_view(pod: Obj) -> dict[str, Any] | None:
    """What of a pod decides policy; None while it has no address (or is finished)."""
    meta, spec, status = pod.get("metadata") or {}, pod.get("spec") or {}, pod.get("status") or {}
    if not status.get("podIP") or status.get("phase") in ("Succeeded", "Failed"):
        return None
    if spec.get("hostNetwork"):
        return None
    ports = [{k: p.get(k) for k in ("name", "containerPort", "protocol")}
             for c in spec.get("containers") or [] for p in c.get("ports") or []]
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"),
                         "labels": dict(meta.get("labels") or {})},
            "spec": {"containers": [{"name": "c", "ports": ports}]},
            "status": {"podIP": status["podIP"],
                       "podIPs": status.get("podIPs") or [{"ip": status["podIP"]}]}}


def state_of(items: Iterable[Obj]) -> dict[str, list[dict[str, Any]]]:
    """Namespaces, pods and NetworkPolicies of a `kubectl get -A -o json` list, reduced to
    what decides policy, in a stable order (so equal states compare equal)."""
    namespaces, pods, policies = [], [], []
    for item in items:
        kind, meta = item.get("kind"), item.get("metadata") or {}
        ns = meta.get("namespace") or meta.get("name")
        if ns in SYSTEM_NAMESPACES:
            continue
        if kind == "Namespace":
            namespaces.append({"apiVersion": "v1", "kind": "Namespace",
                               "metadata": {"name": meta.get("name"),
                                            "labels": dict(meta.get("labels") or {})}})
        elif kind == "Pod":
            view = _pod_view(item)
            if view is not None:
                pods.append(view)
        elif kind == "NetworkPolicy":
            policies.append({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                             "metadata": {"name": meta.get("name"), "namespace": ns},
                             "spec": item.get("spec") or {}})

    def key(o: Obj) -> tuple[str, str]:
        return (o["metadata"].get("namespace") or "", o["metadata"]["name"])

    return {"namespaces": sorted(namespaces, key=key), "pods": sorted(pods, key=key),
            "policies": sorted(policies, key=key)}


def digest(state: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


@dataclass
class Window:
    """One state and when it held for sure: [start, end] in epoch seconds."""

    state: dict[str, list[dict[str, Any]]]
    first_poll_end: float
    last_poll_start: float


def windows_of(polls: Sequence[tuple[float, float, dict[str, Any] | None]]) -> list[Window]:
    """Samples (start, end, state), in time order -> one window per run of equal states;
    a sample without a state (None: the watch resyncing) ends a run."""
    out: list[Window] = []
    last = None
    for start, end, state in polls:
        if state is None:
            last = None
            continue
        d = digest(state)
        if out and d == last:
            out[-1].last_poll_start = start
        else:
            out.append(Window(state, end, start))
            last = d
    return out


# -- the kernel ------------------------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    """One outcome the kernel gave a pod-to-pod attempt."""

    time: float
    source: str  # ns/pod
    destination: str
    source_ip: str
    destination_ip: str
    protocol: str
    port: int
    admitted: bool


def attempt_of(flow: Obj) -> tuple[Attempt | None, str]:
    """An attempt of one Hubble flow, or None and why it is not one."""
    if "flow" in flow and isinstance(flow["flow"], Mapping):
        flow = flow["flow"]
    if flow.get("is_reply") is True:
        return None, "reply"
    when = flow_time(flow.get("time")) or None
    verdict = str(flow.get("verdict") or "").upper()
    if verdict == "DROPPED":
        drop = str(flow.get("drop_reason_desc") or flow.get("drop_reason") or "")
        if drop not in POLICY_DROPS:
            return None, "dropped, not by policy"
        admitted = False
    elif verdict in PASSED:
        if str(flow.get("traffic_direction") or "").upper() != "INGRESS":
            return None, "egress verdict of an admitted attempt (its ingress one decides)"
        admitted = True
    else:
        return None, "not a policy verdict"
    l4 = flow.get("l4") or {}
    proto = next((p for p in PROTOCOLS if isinstance(l4.get(p), Mapping)), None)
    if proto is None:
        return None, "not TCP, UDP or SCTP"
    if proto == "TCP":
        flags = (l4["TCP"].get("flags") or {})
        if flags and not flags.get("SYN"):
            return None, "TCP segment after the handshake"
    ip = flow.get("IP") or {}
    src, dst = flow.get("source") or {}, flow.get("destination") or {}
    if not (src.get("pod_name") and dst.get("pod_name")):
        return None, "not pod to pod"
    if when is None:
        return None, "no time"
    return Attempt(when, f"{src.get('namespace')}/{src['pod_name']}",
                   f"{dst.get('namespace')}/{dst['pod_name']}", str(ip.get("source")),
                   str(ip.get("destination")), proto,
                   int(l4[proto].get("destination_port") or 0), admitted), ""


# -- recording -------------------------------------------------------------------------

@dataclass
class Recorder:
    """The two recorders of the module doc, as threads around the e2e run."""

    kubectl: list[str]  # kubectl and its --kubeconfig
    work: Path
    # the nodes whose agents' flows are recorded (each to flows-<node>.ndjson); empty: the
    # one agent of a single-node cluster (ds/axoneme, to flows.ndjson)
    nodes: list[str] = field(default_factory=list)
    polls: list[tuple[float, float, dict[str, Any] | None]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _procs: list[subprocess.Popen[str]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = field(default_factory=dict)
    _resync_until: float = 0.0
    _state: dict[str, Any] | None = None

    @property
    def flows_file(self) -> Path:
        return self.work / "flows.ndjson"

    @property
    def flows_files(self) -> list[Path]:
        """Every node's flows (an attempt across nodes has its ingress verdict on the
        destination's node, a policy drop on either)."""
        if not self.nodes:
            return [self.flows_file]
        return [self.work / f"flows-{node}.ndjson" for node in self.nodes]

    def flows(self) -> list[Obj]:
        return [f for path in self.flows_files for f in load_flows(path)]

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        for path in self.flows_files:
            path.write_text("")
        self._resync_until = time.time() + RESYNC_S
        observers = ([lambda node=node: self._observe(node) for node in self.nodes]
                     if self.nodes else [lambda: self._observe(None)])
        targets = [*observers, self._sample] + [
            (lambda kind=kind: self._watch(kind)) for kind in KINDS]
        for target in targets:
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        self._stop.wait(RESYNC_S)  # the watches' lists are in before the tests start

    def stop(self) -> None:
        self._stop.set()
        for proc in list(self._procs):
            if proc.poll() is None:
                proc.terminate()
        for t in self._threads:
            t.join(timeout=30)

    def _record(self, now: float) -> None:
        """One sample (under the lock)."""
        self.polls.append((now, now, None if now < self._resync_until else self._state))

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            with self._lock:
                self._record(time.time())

    def _event(self, kind: str, event: Mapping[str, Any]) -> None:
        obj = event.get("object") or {}
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace") or "", meta.get("name") or "")
        with self._lock:
            objs = self._objects.setdefault(kind, {})
            if event.get("type") == "DELETED":
                objs.pop(key, None)
            elif event.get("type") in ("ADDED", "MODIFIED"):
                objs[key] = obj
            else:
                return
            self._state = state_of([o for per in self._objects.values() for o in per.values()])
            self._record(time.time())

    def _spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, text=True, **kw)
        self._procs.append(proc)
        return proc

    def _watch(self, kind: str) -> None:
        decoder = json.JSONDecoder()
        while not self._stop.is_set():
            proc = self._spawn([*self.kubectl, "get", kind, "-A", "--watch",
                                "--output-watch-events", "-o", "json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert proc.stdout is not None
            buf = ""
            while True:
                chunk = proc.stdout.readline()  # kubectl writes each event indented, line by line
                if not chunk:
                    break
                buf += chunk
                while True:
                    buf = buf.lstrip()
                    try:
                        event, end = decoder.raw_decode(buf)
                    except json.JSONDecodeError:
                        break  # an incomplete object: read more
                    buf = buf[end:]
                    if isinstance(event, dict):
                        self._event(kind, event)
            proc.wait()
            if self._stop.is_set():
                return
            err = proc.stderr.read() if proc.stderr else ""
            self.errors.append(f"watch {kind} ended ({proc.returncode}): {err.strip()[:200]}; "
                               f"restarted")
            with self._lock:  # its list replays: no state until it is in again
                self._objects.pop(kind, None)
                self._resync_until = time.time() + RESYNC_S
                self._record(time.time())

    def _agent_pod(self, node: str | None) -> str:
        """ds/axoneme, or the agent pod on ``node`` (looked up at each start: it may change)."""
        if node is None:
            return "ds/axoneme"
        res = subprocess.run([*self.kubectl, "-n", "kube-system", "get", "pods", "-l",
                              "k8s-app=axoneme", "--field-selector", f"spec.nodeName={node}",
                              "-o", "name"], capture_output=True, text=True, timeout=30)
        return (res.stdout.split() or ["ds/axoneme"])[0]

    def _observe(self, node: str | None) -> None:
        # the stream ends if the exec is cut: start it again (a gap shows as fewer attempts)
        path = self.flows_file if node is None else self.work / f"flows-{node}.ndjson"
        with open(path, "a") as out:
            while not self._stop.is_set():
                proc = self._spawn([*self.kubectl, "-n", "kube-system", "exec",
                                    self._agent_pod(node), "--",
                                    "axoneme", "observe", "-f", "-o", "json"],
                                   stdout=out, stderr=subprocess.PIPE)
                _, err = proc.communicate()
                if not self._stop.is_set():
                    self.errors.append(f"observe{'' if node is None else ' on ' + node} ended "
                                       f"({proc.returncode}): {err.strip()[:200]}; restarted")
                    self._stop.wait(1.0)


# -- deciding --------------------------------------------------------------------------

@dataclass
class Disagreement:
    window: int
    attempt: Attempt
    engine: str  # ALLOWED / DENIED (the engine's verdict)
    reproduce: str

    def to_json(self) -> dict[str, Any]:
        a = self.attempt
        return {"state": self.window, "time": a.time, "from": a.source, "to": a.destination,
                "source_ip": a.source_ip, "destination_ip": a.destination_ip,
                "protocol": a.protocol, "port": a.port,
                "kernel": "admitted" if a.admitted else "dropped", "engine": self.engine,
                "reproduce": self.reproduce}


@dataclass
class Result:
    states: int = 0  # windows with at least one decided attempt
    windows: int = 0
    attempts: int = 0
    connections: int = 0  # distinct (state, from, to, protocol, port) decided
    disagreements: list[Disagreement] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str, n: int = 1) -> None:
        if n:
            self.skipped[why] = self.skipped.get(why, 0) + n

    def to_json(self) -> dict[str, Any]:
        return {"windows": self.windows, "states_with_attempts": self.states,
                "attempts": self.attempts, "connections": self.connections,
                "disagreements": [d.to_json() for d in self.disagreements],
                "skipped": dict(sorted(self.skipped.items()))}

    def summary(self) -> str:
        return (f"differential: {self.connections} connections ({self.attempts} attempts) in "
                f"{self.states} cluster states decided offline, "
                f"{len(self.disagreements)} disagreements with the kernel")


class _Index:
    """One state's objects by key, for the part of it an attempt depends on."""

    def __init__(self, state: Mapping[str, list[dict[str, Any]]]) -> None:
        self.state = state
        self.digest = digest(state)
        self.namespaces = {n["metadata"]["name"]: n for n in state["namespaces"]}
        self.pods = {f"{p['metadata']['namespace']}/{p['metadata']['name']}": p
                     for p in state["pods"]}
        self.policies: dict[str, list[dict[str, Any]]] = {}
        for pol in state["policies"]:
            self.policies.setdefault(pol["metadata"]["namespace"], []).append(pol)

    def relevant(self, src: str, dst: str) -> str:
        """What decides src -> dst under NetworkPolicy: both pods (labels, address,
        ports), their namespaces' labels, and the policies of those namespaces (a
        NetworkPolicy selects pods of its own namespace only)."""
        nss = sorted({src.split("/")[0], dst.split("/")[0]})
        return json.dumps([self.pods.get(src), self.pods.get(dst),
                           [self.namespaces.get(n) for n in nss],
                           [self.policies.get(n) for n in nss]], sort_keys=True)


def decide(polls: Sequence[tuple[float, float, dict[str, Any] | None]], flows: Iterable[Obj],
           work: Path, settle: float = SETTLE_S) -> Result:
    """Every attempt whose part of the state (_Index.relevant) held from ``settle``
    seconds before it until it, decided by the offline engine of the state then.

    The samples are the recorder's (time, time, state); changes elsewhere in the
    cluster (another test's namespace going away) leave an attempt decidable."""
    times = [end for _, end, _ in polls]
    indexes: dict[int, _Index] = {}

    def index(state: dict[str, Any]) -> _Index:
        if id(state) not in indexes:
            indexes[id(state)] = _Index(state)
        return indexes[id(state)]

    result = Result(windows=len(windows_of(polls)))
    by_state: dict[str, tuple[_Index, list[Attempt]]] = {}
    for flow in flows:
        attempt, why = attempt_of(flow)
        if attempt is None:
            result.skip(why)
            continue
        last = bisect.bisect_right(times, attempt.time) - 1
        first = bisect.bisect_right(times, attempt.time - settle) - 1
        span = [polls[i][2] for i in range(max(first, 0), last + 1)]
        if first < 0 or any(st is None for st in span):
            result.skip("around a change of the cluster's state (no settled state)")
            continue
        seen = {index(st).relevant(attempt.source, attempt.destination)  # type: ignore[arg-type]
                for st in span}
        if len(seen) != 1:
            result.skip("around a change of the cluster's state (no settled state)")
            continue
        ix = index(span[-1])  # type: ignore[arg-type]
        src, dst = ix.pods.get(attempt.source), ix.pods.get(attempt.destination)
        if src is None or dst is None or src["status"]["podIP"] != attempt.source_ip \
                or dst["status"]["podIP"] != attempt.destination_ip:
            result.skip("a pod (or its address) not in the recorded state")
            continue
        by_state.setdefault(ix.digest, (ix, []))[1].append(attempt)
    for i, (ix, attempts) in enumerate(by_state.values()):
        state = ix.state
        d = work / f"state-{i}"
        d.mkdir(parents=True, exist_ok=True)
        cluster_file, policy_file = d / "cluster.json", d / "policies.json"
        cluster_file.write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                            "items": state["namespaces"] + state["pods"]}, indent=1))
        policy_file.write_text(json.dumps({"apiVersion": "v1", "kind": "List",
                                           "items": state["policies"]}, indent=1))
        env = OfflineCluster.build(Cluster.load([str(cluster_file)]),
                                   parse_policies([str(policy_file)]) if state["policies"] else [],
                                   EngineOptions())
        result.states += 1
        verdicts: dict[tuple[str, str, str, int], str] = {}
        for a in attempts:
            key = (a.source, a.destination, a.protocol, a.port)
            if key not in verdicts:
                r = trace(env, resolve_peer(env, a.source, "from"),
                          resolve_peer(env, a.destination, "to"), Protocol[a.protocol], a.port)
                verdicts[key] = "DENIED" if r.verdict == DENIED else "ALLOWED"
            result.attempts += 1
            if (verdicts[key] == "ALLOWED") != a.admitted:
                result.disagreements.append(Disagreement(
                    i, a, verdicts[key],
                    f"axoneme policy trace --cluster {cluster_file} -f {policy_file} "
                    f"--from {a.source} --to {a.destination} --port {a.port}/{a.protocol}"))
        result.connections += len(verdicts)
    return result


def load_flows(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
