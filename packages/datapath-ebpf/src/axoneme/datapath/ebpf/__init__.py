"""axoneme ebpf datapath."""

from axoneme.datapath.ebpf._datapath import EbpfDatapath

__all__ = ["EbpfDatapath"]
