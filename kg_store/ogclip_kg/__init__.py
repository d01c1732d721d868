"""Knowledge graph of target types over Bolt: schema, Cypher, store, embedded server, seeds, prompts, checks."""

from ogclip_kg.store import GraphConnectionError, GraphError, GraphStore, QueryTimeout, ReadOnlyViolation

__all__ = ["GraphConnectionError", "GraphError", "GraphStore", "QueryTimeout", "ReadOnlyViolation"]
