"""Hubble's flow filters (server side) and `axoneme observe`'s filter flags (client side)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from axoneme.agent._flowstore import FlowFilter, FlowStore
from axoneme.agent._hubblefilter import FilterError, compile_filter, compile_filters, fqdn_pattern
from axoneme.agent.cli import UsageError, build_parser
from axoneme.agent.cli._observe import _Printer, hubble_filters, parse_time
from axoneme.core.flow import DropReason, Flow, FlowEndpoint, FlowVerdict


def _flow(i: int, verdict: FlowVerdict = FlowVerdict.FORWARDED, *, src: str = "10.244.0.2",
          dst: str = "10.244.0.3", src_ns: str = "default", dst_ns: str = "prod",
          direction: str = "INGRESS", http: dict[str, Any] | None = None,
          dst_names: tuple[str, ...] = ()) -> Flow:
    return Flow(time=1_700_000_000.0 + i, verdict=verdict, ip_source=src, ip_destination=dst,
                source=FlowEndpoint(300 + i, src_ns, f"a{i}", ("k8s:app=a",), 1),
                destination=FlowEndpoint(400, dst_ns, "web-1", ("k8s:app=web",), 2),
                traffic_direction=direction,
                drop_reason=DropReason.POLICY_DENIED if verdict is FlowVerdict.DROPPED else None,
                type="L7" if http else "L3_L4",
                event_type="drop" if verdict is FlowVerdict.DROPPED else "policy-verdict",
                l4={"TCP": {"source_port": 40000 + i, "destination_port": 80}},
                l7={"type": "RESPONSE", "http": http} if http else None,
                destination_names=dst_names)


def _match(ff: dict[str, Any], flow: Flow) -> bool:
    return compile_filter(ff)(flow)


def test_ip_fqdn_identity_and_pod_filters() -> None:
    f = _flow(1, dst_names=("api.example.com",))
    assert _match({"source_ip": ["10.244.0.2"]}, f)
    assert _match({"source_ip": ["10.244.0.0/24", "1.2.3.4"]}, f)
    assert not _match({"source_ip": ["10.244.1.0/24"]}, f)
    assert not _match({"destination_ip": ["::1/128"]}, f)  # another family never matches
    assert _match({"destination_fqdn": ["*.example.com"]}, f)
    assert _match({"destination_fqdn": ["API.example.com."]}, f)  # case, one trailing dot
    assert not _match({"destination_fqdn": ["example.com"]}, f)
    assert not _match({"source_fqdn": ["*"]}, f)  # no names: no match
    assert _match({"source_identity": [301]}, f) and not _match({"destination_identity": [301]}, f)
    assert _match({"destination_pod": ["prod/web"]}, f)  # a prefix of the pod's name
    assert _match({"destination_pod": ["prod/"]}, f) and not _match({"destination_pod": ["dev/"]}, f)
    assert _match({"source_label": ["app=a"]}, f) and _match({"source_label": ["k8s:app=a"]}, f)
    assert not _match({"source_label": ["app=web"]}, f)
    assert _match({"source_label": ["app!=web"]}, f) and _match({"destination_label": ["app"]}, f)
    # fields AND, values OR
    assert _match({"source_ip": ["10.244.0.2"], "verdict": ["DROPPED", "FORWARDED"]}, f)
    assert not _match({"source_ip": ["10.244.0.2"], "verdict": ["DROPPED"]}, f)
    for bad in ({"source_ip": ["10.0.0.300"]}, {"destination_fqdn": ["a b"]},
                {"http_status_code": ["600"]}, {"http_path": ["("]}, {"cel_expression": ["x"]}):
        with pytest.raises(FilterError):
            compile_filter(bad)
    with pytest.raises(FilterError):
        fqdn_pattern(["a.."])


def test_http_and_direction_filters() -> None:
    ok = _flow(1, http={"code": 200, "method": "GET", "url": "http://web/api/v1?q=1"})
    err = _flow(2, http={"code": 503, "method": "post", "url": "http://web/health"})
    plain = _flow(3)
    assert [_match({"http_status_code": ["5+"]}, f) for f in (ok, err, plain)] == [False, True, False]
    assert [_match({"http_status_code": ["200", "50+"]}, f) for f in (ok, err)] == [True, True]
    assert _match({"http_method": ["POST"]}, err) and not _match({"http_method": ["GET"]}, err)
    assert _match({"http_path": ["^/api/"]}, ok) and not _match({"http_path": ["^/api/"]}, err)
    assert not _match({"http_path": ["q=1"]}, ok)  # the path only, not the query
    assert _match({"traffic_direction": ["INGRESS"]}, ok)
    assert not _match({"traffic_direction": ["EGRESS"]}, ok)


def test_whitelist_blacklist_and_store_window() -> None:
    store = FlowStore()
    for i in range(6):
        store.add(_flow(i, FlowVerdict.DROPPED if i % 2 else FlowVerdict.FORWARDED))
    drops = compile_filters([{"verdict": ["DROPPED"]}])
    assert [f.time % 100 for f in store.last(None, FlowFilter(hubble=drops))] == [1, 3, 5]
    no_a3 = compile_filters([], [{"source_pod": ["default/a3"]}])
    assert len(store.last(None, FlowFilter(hubble=no_a3))) == 5
    window = FlowFilter(since=1_700_000_002.0, until=1_700_000_004.0)
    assert [f.time % 100 for f in store.last(None, window)] == [2, 3, 4]
    assert [f.time % 100 for f in store.last(2, None, first=True)] == [0, 1]
    assert [f.time % 100 for f in store.last(2)] == [4, 5]
    spec = json.dumps({"whitelist": [{"verdict": ["DROPPED"]}], "blacklist": []})
    assert len(store.last(None, FlowFilter.from_query({"filters": spec}))) == 3
    with pytest.raises(ValueError):
        FlowFilter.from_query({"filters": json.dumps({"whitelist": [{"nope": [1]}]})})


def _args(*argv: str) -> Any:
    parser, _ = build_parser()
    return parser.parse_args(["observe", *argv])


def test_observe_flags_build_hubbles_filters() -> None:
    a = _args("--verdict", "DROPPED", "--verdict", "forwarded", "--http-method", "GET",
              "--not", "--to-ip", "10.0.0.2", "-n", "prod", "--identity", "host")
    got = hubble_filters(a.hubble_filters)
    # either-side flags make a (source, destination) pair, as the hubble CLI does
    assert got["whitelist"] == [
        {"verdict": ["DROPPED", "FORWARDED"], "http_method": ["GET"],
         "source_identity": [1], "source_pod": ["prod/"]},
        {"verdict": ["DROPPED", "FORWARDED"], "http_method": ["GET"],
         "destination_identity": [1], "destination_pod": ["prod/"]}]
    assert got["blacklist"] == [{"destination_ip": ["10.0.0.2"]}]
    http = hubble_filters(_args("--http-status", "5+", "--http-method", "GET", "--http-path",
                                "^/a", "--traffic-direction", "egress").hubble_filters)
    assert http["whitelist"] == [{"http_status_code": ["5+"], "http_method": ["GET"],
                                  "http_path": ["^/a"], "traffic_direction": ["EGRESS"]}]
    for bad in (["--from-ip", "1.2.3.4", "--from-fqdn", "a.com"],  # Hubble: cannot combine
                ["--to-ip", "1.2.3.4", "-n", "prod"],
                ["--to-fqdn", "a b"], ["--identity", "nobody"], ["--http-status", "9"],
                ["--from-ip", "x"]):
        with pytest.raises(UsageError):
            hubble_filters(_args(*bad).hubble_filters)
    with pytest.raises(UsageError):
        _args("--not", "--not", "--from-ip", "1.2.3.4")


def test_times_and_outputs() -> None:
    now = 1_800_000_000.0
    assert parse_time("5m", "--since", now) == now - 300
    assert parse_time("1h30m", "--since", now) == now - 5400
    assert parse_time("2027-01-15T08:00:00Z", "--since") == 1_800_000_000.0
    assert parse_time("2027-01-15T09:00:00+01:00", "--until") == 1_800_000_000.0
    with pytest.raises(UsageError):
        parse_time("yesterday", "--since")
    drop = json.dumps(_flow(1, FlowVerdict.DROPPED).to_json())
    d = _Printer("dict")
    out = d.render(drop) + d.render(drop)
    assert "    VERDICT: DROPPED\n" in out and "------------\n" in out
    assert "DESTINATION: prod/web-1:80\n" in out
    t = _Printer("table")
    assert t.render(drop) == "" and t.render(drop) == ""
    table = t.finish().splitlines()
    assert table[0].split() == ["TIMESTAMP", "SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    assert len(table) == 3 and "Policy denied" in table[1] and "default/a1:40001" in table[1]
