"""Versioned, idempotent schema migrations.

Each migration is a list of statements that can run any number of times (``IF NOT EXISTS``); the versions applied
are recorded as ``(:Migration {version})`` nodes so ``migrate`` only runs what is new.

The graph, as an analyst sees it::

    (:Target {key, name, normalized_name, aliases, kind, super_category, source})
        -[:IS_A]->(:Category {key, name, level})-[:IS_A]->(:Category)         aircraft › military aircraft › fighter
    (:Target)-[:HAS_ATTRIBUTE {value, unit, source}]->(:Attribute {key, name, unit, applies_to, visual})
    (:Target)-[:OPERATED_BY {source}]->(:Organization {key, name, kind})
    (:Target)-[:MANUFACTURED_BY {source}]->(:Organization)
    (:Target)-[:CAN_BE_EQUIPPED_WITH {source}]->(:Equipment {key, name})
    (:Target)-[:IN_CLASS_SET]->(:ClassSet {key: 'train' | 'test', seed, size})
    (:TextEmbedding {key, model_version, target_key, dim, vector, prompts})-[:EMBEDS]->(:Target)
"""

from __future__ import annotations

from datetime import datetime, timezone

from ogclip_kg import cypher
from ogclip_kg.store import GraphStore

MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "keys, lookups and embedding versions", cypher.SCHEMA_STATEMENTS),
]


def migrate(store: GraphStore) -> list[int]:
    """Apply the migrations this graph has not seen; returns the versions applied now."""
    applied = {row["version"] for row in store.read(cypher.APPLIED_MIGRATIONS)}
    done = []
    for version, name, statements in MIGRATIONS:
        if version in applied:
            continue
        for statement in statements:
            store.write(statement)
        store.write(cypher.RECORD_MIGRATION, version=version, name=name,
                    applied_at=datetime.now(timezone.utc).isoformat())
        done.append(version)
    return done
