"""axoneme http L7 parser."""

from axoneme.l7.http._parser import HttpParser

__all__ = ["HttpParser"]
