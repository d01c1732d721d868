"""Knowledge graph of target types over Bolt: schema, Cypher, store, seeds, prompts."""
