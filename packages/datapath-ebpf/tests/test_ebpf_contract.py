"""The ebpf datapath's side of the Datapath contract, without root: the
capabilities it declares (each proven by a named test of this package), the
options it declares (checked by build_datapath, read by the datapath)."""

from __future__ import annotations

from pathlib import Path

import pytest
from axoneme.core.datapath import DatapathConfig, build_datapath, check_options
from axoneme.core.errors import ConfigError
from axoneme.datapath.ebpf import EbpfDatapath

# capability -> the test (file::function) that exercises it on a real kernel
PROOF = {
    "host_policy": "test_ebpf_hostfw.py::test_host_ingress_policy_on_the_device",
    "l7_redirect": "test_ebpf_progrun.py::test_proxy_redirect_mark",
    "events": "test_ebpf_datapath.py::test_events_drop_and_verdict",
    "ipv6": "test_ebpf_progrun.py::test_ipv4_and_ipv6_decided_by_policy",
    "fail_closed": "test_ebpf_failclosed.py::test_fail_closed_overrides_the_policy_map_per_direction",
    "ipcache_dump": "test_ebpf_maps.py::test_ipcache_roundtrip_v4_v6",
    "tunnel_identity": "test_ebpf_tunnel.py::test_vni_carries_the_source_identity",
    "proxy_identity_mark": "test_ebpf_progrun.py::test_the_redirect_mark_carries_the_source_identity",
}


def test_each_capability_is_proven_by_a_kernel_test() -> None:
    # known names and backing methods: the conformance kit's offline part
    assert set(PROOF) == EbpfDatapath.capabilities
    for cap, where in PROOF.items():
        fname, func = where.split("::")
        assert f"\ndef {func}(" in (Path(__file__).parent / fname).read_text(), (cap, where)


def test_config_field_options_default_as_the_field() -> None:
    # well-formedness: the conformance kit's offline part
    config = DatapathConfig()
    for opt in EbpfDatapath.options:
        assert getattr(config, opt.name, opt.default) == opt.default, opt.name


def test_build_datapath_checks_and_passes_the_options() -> None:
    dp = build_datapath("ebpf", state_dir="/tmp/x", pod_cidr="10.244.0.0/16",
                        options={"bpffs_root": "/sys/fs/bpf/axq", "policy_map_max": "100",
                                 "max_endpoints": "8", "ringbuf_pages": 16})
    assert isinstance(dp, EbpfDatapath)
    assert dp.config.bpffs_root == "/sys/fs/bpf/axq" and dp.config.policy_map_max == 100
    assert dp._defines()["AX_EP_MAX"] == 8 and dp._defines()["AX_RINGBUF_PAGES"] == 16
    assert dp._defines()["AX_POLICY_MAX"] == 800  # policy_map_total 0: per endpoint x endpoints
    assert dp._defines()["AX_PIN_ROOT"] == '"/sys/fs/bpf/axq"'
    with pytest.raises(ConfigError, match="'nflog_group'.*'ebpf'"):
        build_datapath("ebpf", state_dir="/tmp/x", pod_cidr="10.244.0.0/16",
                       options={"nflog_group": 5})
    with pytest.raises(ConfigError, match="max_endpoints.*expected int"):
        check_options(EbpfDatapath, {"max_endpoints": "many"})


def test_a_config_built_by_hand_keeps_working() -> None:
    """Tests and benchmarks build DatapathConfig directly, sometimes with the
    options of several datapaths at once: the declared ones are read, typed."""
    dp = EbpfDatapath(DatapathConfig(policy_map_max=10, options={
        "max_endpoints": "4", "policy_map_total": 7, "nflog_group": 6001}))
    assert dp._defines()["AX_EP_MAX"] == 4 and dp._defines()["AX_POLICY_MAX"] == 7
    assert EbpfDatapath()._defines()["AX_EP_MAX"] == 256
