"""build_datapath: one builder, options checked against what a datapath declares."""

from __future__ import annotations

from typing import Any

import pytest
from axoneme.core.datapath import (
    CAPABILITIES,
    Datapath,
    DatapathOption,
    NoopDatapath,
    build_datapath,
    check_options,
)
from axoneme.core.errors import ConfigError, PluginError


class Declared(NoopDatapath):
    name = "declared"
    options = (
        DatapathOption("mode", str, "ipset", "rule layout", choices=("plain", "ipset")),
        DatapathOption("policy_map_max", int, 16384, "entries per endpoint"),
        DatapathOption("events", bool, True, "read verdict events"),
    )


def test_noop_is_built_by_name_with_the_agents_settings() -> None:
    dp = build_datapath("noop", state_dir="/tmp/x", pod_cidr="10.9.0.0/16", options={})
    assert isinstance(dp, NoopDatapath)
    assert (dp.config.state_dir, dp.config.pod_cidr) == ("/tmp/x", "10.9.0.0/16")
    assert dp.capabilities <= CAPABILITIES and "fail_closed" in dp.capabilities


def test_unknown_datapath_is_a_plugin_error() -> None:
    with pytest.raises(PluginError, match="nope"):
        build_datapath("nope", state_dir="/tmp/x", pod_cidr="10.9.0.0/16", options={})


def test_declared_options_get_defaults_and_converted_values() -> None:
    assert check_options(Declared, {}) == {"mode": "ipset", "policy_map_max": 16384,
                                           "events": True}
    got = check_options(Declared, {"mode": "plain", "policy_map_max": "8", "events": "false"})
    assert got == {"mode": "plain", "policy_map_max": 8, "events": False}


@pytest.mark.parametrize(("options", "message"), [
    ({"colour": "red"}, "unknown datapath option 'colour' for datapath 'declared'"),
    ({"mode": "fancy"}, "datapath option 'mode' of datapath 'declared': must be one of plain, ipset"),
    ({"policy_map_max": "many"}, "datapath option 'policy_map_max' of datapath 'declared': "
                                 "expected int"),
    ({"policy_map_max": True}, "expected int"),
    ({"events": "perhaps"}, "expected true or false"),
])
def test_unknown_option_or_bad_value_names_option_and_datapath(options: dict[str, Any],
                                                               message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        check_options(Declared, options)


def test_a_datapath_without_declarations_takes_options_as_before() -> None:
    class Legacy(NoopDatapath):
        name = "legacy"

    got = check_options(Legacy, {"max_endpoints": 4, "policy_map_max": "8"})
    assert got == {"max_endpoints": 4, "policy_map_max": 8}  # legacy field typed
    with pytest.raises(ConfigError, match="'policy_map_max' of datapath 'legacy'"):
        check_options(Legacy, {"policy_map_max": "lots"})


def test_legacy_option_names_also_set_the_config_fields() -> None:
    dp = build_datapath("noop", state_dir="/s", pod_cidr="10.9.0.0/16",
                        options={"policy_map_max": 8, "bpffs_root": "/sys/fs/bpf/t"})
    assert dp.config.policy_map_max == 8 and dp.config.bpffs_root == "/sys/fs/bpf/t"
    assert dp.config.options["policy_map_max"] == 8


def test_every_capability_and_option_is_well_formed() -> None:
    assert Datapath.capabilities == frozenset() and Datapath.options == ()
    for opt in Declared.options:
        assert opt.name and opt.help and isinstance(opt.default, opt.type)
