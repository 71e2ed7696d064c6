"""The iptables datapath's side of the Datapath contract, without root: the
capabilities it declares (each proven by a named test of this package), the
options it declares (checked by build_datapath, read by the datapath)."""

from __future__ import annotations

from pathlib import Path

import pytest
from axoneme.core.datapath import DatapathConfig, build_datapath
from axoneme.core.errors import ConfigError
from axoneme.datapath.iptables import IptablesDatapath
from axoneme.datapath.iptables import _datapath as dpm

# capability -> the test (file::function) that exercises it on a real kernel
PROOF = {
    "host_policy": "test_iptables_hostfw.py::test_host_endpoint_enforces_input_and_reports_drops",
    "l7_redirect": "test_iptables_kernel.py::test_redirect_entries_mark_packets_before_routing",
    "events": "test_iptables_kernel.py::test_events",
    "ipv6": "test_iptables_kernel.py::test_ipv6",
    "fail_closed": "test_iptables_kernel.py::test_endpoint_fail_closed",
    "ipcache_dump": "test_iptables_kernel.py::test_restart_adopts_state",
}


def test_each_capability_is_proven_by_a_kernel_test() -> None:
    # known names and backing methods: the conformance kit's offline part
    assert set(PROOF) == IptablesDatapath.capabilities
    for cap, where in PROOF.items():
        fname, func = where.split("::")
        assert f"\ndef {func}(" in (Path(__file__).parent / fname).read_text(), (cap, where)


def test_config_field_options_default_as_the_field() -> None:
    # well-formedness: the conformance kit's offline part. The mode field's
    # "" means this datapath's default mode.
    assert DatapathConfig().mode == "" and IptablesDatapath().mode == "ipset"
    assert DatapathConfig().ipcache_max == {o.name: o for o in dpm.OPTIONS}["ipcache_max"].default


def test_build_datapath_checks_and_passes_the_options(tmp_path: Path) -> None:
    dp = build_datapath("iptables", state_dir=str(tmp_path), pod_cidr="10.244.0.0/16",
                        options={"mode": "plain", "nflog_group": "6001", "events": "off",
                                 "host_ifname_prefix": "axq", "lock_dir": str(tmp_path),
                                 "ipcache_max": 2048})
    assert isinstance(dp, IptablesDatapath)
    assert (dp.mode, dp.nflog_group, dp._events_enabled, dp.host_ifname_prefix) == (
        "plain", 6001, False, "axq")
    assert dp.config.ipcache_max == 2048
    assert dp._lock_dir == str(tmp_path)
    assert dpm.host_lock_path(dp._lock_dir).startswith(str(tmp_path))
    with pytest.raises(ConfigError, match="mode.*'iptables'.*plain, ipset"):
        build_datapath("iptables", state_dir="/tmp/x", pod_cidr="10.244.0.0/16",
                       options={"mode": "nft"})
    with pytest.raises(ConfigError, match="'policy_map_max'.*'iptables'"):
        build_datapath("iptables", state_dir="/tmp/x", pod_cidr="10.244.0.0/16",
                       options={"policy_map_max": 5})


def test_a_config_built_by_hand_keeps_working() -> None:
    """Tests and benchmarks build DatapathConfig directly, sometimes with the
    options of several datapaths at once: the declared ones are read, typed."""
    dp = IptablesDatapath(DatapathConfig(mode="plain", options={
        "nflog_group": 6002, "max_endpoints": 8, "host_ifname_prefix": "axc1"}))
    assert (dp.mode, dp.nflog_group, dp.host_ifname_prefix) == ("plain", 6002, "axc1")
    assert dp._events_enabled and dp._lock_dir == dpm.HOST_LOCK_DIR
