"""axoneme dns L7 parser."""

from axoneme.l7.dns._parser import DnsParser

__all__ = ["DnsParser"]
