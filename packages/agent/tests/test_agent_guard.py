"""The forwarding guard: per-owner DROP rules for the pod CIDR on the uplink."""

from __future__ import annotations

import os
import secrets
import shutil

import pytest
from axoneme.agent import guard

pytestmark = [pytest.mark.privileged]


@pytest.fixture
def owners() -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root (iptables)")
    if shutil.which("iptables") is None:
        pytest.skip("iptables is not installed")
    if not guard.uplinks():
        pytest.skip("no default route: nothing to guard")
    made = [f"test-{secrets.token_hex(4)}", f"test-{secrets.token_hex(4)}"]
    yield made
    for owner in made:
        guard.remove(owner)


def test_install_is_idempotent_and_remove_only_touches_its_owner(owners: list[str]) -> None:
    a, b = owners
    rules = guard.install("10.244.0.0/16", a)
    assert rules and all(r.cidr == "10.244.0.0/16" for r in rules)
    guard.install("10.244.0.0/16", a)
    guard.install("10.244.7.0/24", b)
    mine = [r for r in guard.installed_rules() if guard.owner_tag(a) in r]
    assert len(mine) == len(rules)  # idempotent: no duplicates
    assert all("-j DROP" in r and "-s 10.244.0.0/16" in r for r in mine)
    uplink = rules[0].uplink
    assert any(f"-o {uplink}" in r for r in mine)
    assert guard.remove(a) == len(rules)
    left = guard.installed_rules()
    assert not any(guard.owner_tag(a) in r for r in left)
    assert any(guard.owner_tag(b) in r for r in left)
    assert guard.remove(b) >= 1
    assert guard.remove(b) == 0  # idempotent
