"""axoneme: the node agent, the standalone pod runtime and the CLI."""
