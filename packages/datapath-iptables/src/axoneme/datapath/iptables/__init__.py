"""axoneme iptables datapath."""

from axoneme.datapath.iptables._datapath import IptablesDatapath

__all__ = ["IptablesDatapath"]
