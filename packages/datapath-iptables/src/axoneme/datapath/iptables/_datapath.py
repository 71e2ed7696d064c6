"""The iptables datapath (not implemented yet: probe() says so)."""

from __future__ import annotations

from axoneme.core.datapath import Datapath
from axoneme.core.errors import DatapathUnavailable


class IptablesDatapath(Datapath):
    name = "iptables"

    def probe(self) -> None:
        raise DatapathUnavailable("the iptables datapath is not implemented yet")

    def start(self) -> None:
        self.probe()

    def stop(self) -> None:
        return None

    def endpoint_added(self, endpoint, enforce_ingress, enforce_egress):  # type: ignore[no-untyped-def]
        self.probe()

    def endpoint_removed(self, endpoint):  # type: ignore[no-untyped-def]
        self.probe()

    def ipcache_apply(self, changes):  # type: ignore[no-untyped-def]
        self.probe()

    def apply(self, endpoint, changes):  # type: ignore[no-untyped-def]
        self.probe()

    def sync(self, endpoint, state):  # type: ignore[no-untyped-def]
        self.probe()

    def dump(self, endpoint):  # type: ignore[no-untyped-def]
        self.probe()
