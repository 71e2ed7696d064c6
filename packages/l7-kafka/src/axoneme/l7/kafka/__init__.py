"""axoneme kafka L7 parser."""

from axoneme.l7.kafka._parser import KafkaParser

__all__ = ["KafkaParser"]
