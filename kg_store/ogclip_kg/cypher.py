"""Every Cypher statement the platform runs: named, parameterised, kept to what Neo4j 5 and ArcadeDB both accept.

Values always travel as parameters; nothing a user or a data source supplies is spliced into query text. The
schema's labels and relationship types are the allow-lists below: code that needs a label or type chosen at run
time (JSON-lines import) must take it from them. Analysts' free-form queries go through
:func:`read_only_violation` and run in a transaction that is always rolled back.
"""

from __future__ import annotations

import re

LABELS = ("Category", "Target", "Attribute", "Organization", "Equipment", "ClassSet", "TextEmbedding")
RELATIONSHIPS = (
    "IS_A", "HAS_ATTRIBUTE", "OPERATED_BY", "MANUFACTURED_BY", "CAN_BE_EQUIPPED_WITH", "IN_CLASS_SET", "EMBEDS"
)


def label(name: str) -> str:
    """``name`` if it is one of the schema's node labels, else ValueError (never reaches query text otherwise)."""
    if name not in LABELS:
        raise ValueError(f"unknown node label {name!r}; the schema has {', '.join(LABELS)}")
    return name


def relationship(name: str) -> str:
    """``name`` if it is one of the schema's relationship types, else ValueError."""
    if name not in RELATIONSHIPS:
        raise ValueError(f"unknown relationship type {name!r}; the schema has {', '.join(RELATIONSHIPS)}")
    return name


# -- schema (migrations) ----------------------------------------------------------------------------------------

SCHEMA_STATEMENTS = [
    *(f"CREATE CONSTRAINT {lab.lower()}_key IF NOT EXISTS FOR (n:{lab}) REQUIRE n.key IS UNIQUE" for lab in LABELS),
    "CREATE CONSTRAINT migration_version IF NOT EXISTS FOR (m:Migration) REQUIRE m.version IS UNIQUE",
    "CREATE INDEX target_normalized_name IF NOT EXISTS FOR (t:Target) ON (t.normalized_name)",
    "CREATE INDEX target_super_category IF NOT EXISTS FOR (t:Target) ON (t.super_category)",
    "CREATE INDEX embedding_model_version IF NOT EXISTS FOR (e:TextEmbedding) ON (e.model_version)",
]

APPLIED_MIGRATIONS = "MATCH (m:Migration) RETURN m.version AS version ORDER BY version"
RECORD_MIGRATION = "MERGE (m:Migration {version: $version}) SET m.name = $name, m.applied_at = $applied_at"

# -- writes (batched with UNWIND) -------------------------------------------------------------------------------

def upsert(node_label: str) -> str:
    """MERGE nodes of one label by key and set their properties: rows of {key, props}."""
    return f"UNWIND $rows AS row MERGE (n:{label(node_label)} {{key: row.key}}) SET n += row.props"


def link(from_label: str, rel: str, to_label: str) -> str:
    """MERGE relationships of one type between keyed nodes: rows of {from, to, props}.

    Both labels are named so the key lookups use the unique indexes; all three names come from the allow-lists.
    """
    return f"""UNWIND $rows AS row
MATCH (a:{label(from_label)} {{key: row.from}})
MATCH (b:{label(to_label)} {{key: row.to}})
MERGE (a)-[r:{relationship(rel)}]->(b) SET r += row.props"""


CLEAR_CLASS_SET = "MATCH (:Target)-[r:IN_CLASS_SET]->(:ClassSet {key: $key}) DELETE r"

WRITE_EMBEDDINGS = """UNWIND $rows AS row
MATCH (t:Target {key: row.target_key})
MERGE (e:TextEmbedding {key: row.key})
SET e.model_version = row.model_version, e.target_key = row.target_key, e.dim = row.dim, e.vector = row.vector,
    e.prompts = row.prompts
MERGE (e)-[:EMBEDS]->(t)
RETURN count(e) AS written"""

DELETE_ALL = "MATCH (n) DETACH DELETE n"

# -- reads ------------------------------------------------------------------------------------------------------

# One query serves one class or thousands: $keys is a list either way (the benchmark compares the two uses).
CLASS_FACTS = """UNWIND $keys AS key
MATCH (t:Target {key: key})
RETURN t.key AS key, t.name AS name, t.super_category AS super_category, t.aliases AS aliases,
       [(t)-[:IS_A]->(c:Category) | c.name] AS categories,
       [(t)-[h:HAS_ATTRIBUTE]->(a:Attribute) |
            {attribute: a.key, name: a.name, value: h.value, unit: h.unit, source: h.source}] AS facts,
       [(t)-[:OPERATED_BY]->(o:Organization) | o.name] AS operators,
       [(t)-[:MANUFACTURED_BY]->(m:Organization) | m.name] AS manufacturers,
       [(t)-[:CAN_BE_EQUIPPED_WITH]->(e:Equipment) | e.name] AS equipment"""

CATEGORY_TREE = """MATCH (c:Category)
RETURN c.key AS key, c.name AS name, c.level AS level, [(c)-[:IS_A]->(p:Category) | p.key] AS parents"""

CLASS_SET_KEYS = """MATCH (t:Target)-[:IN_CLASS_SET]->(:ClassSet {key: $key})
RETURN t.key AS key, t.super_category AS super_category ORDER BY key"""

EXISTING_TARGETS = "MATCH (t:Target) WHERE t.key IN $keys RETURN t.key AS key"

TARGET_NAMES = """MATCH (t:Target)
RETURN t.key AS key, t.name AS name, t.normalized_name AS normalized_name, t.super_category AS super_category"""

COUNT_LABEL = {lab: f"MATCH (n:{lab}) RETURN count(n) AS n" for lab in LABELS}

READ_EMBEDDINGS = """MATCH (e:TextEmbedding {model_version: $model_version})
RETURN e.target_key AS target_key, e.dim AS dim, e.vector AS vector ORDER BY target_key"""

EMBEDDING_DIM = "MATCH (e:TextEmbedding {model_version: $model_version}) RETURN e.dim AS dim LIMIT 1"

# -- serving: class sets and the embeddings of one model version (ogclip_serve) -------------------------------------

CLASS_SETS = "MATCH (s:ClassSet) RETURN s.key AS key, s.size AS size ORDER BY key"

# What a replica polls to notice a change without reading vectors: the members of a class set and, per member, the
# signature (dimension and first component) of its embedding under the model version, empty when it has none. A
# class added to the set, removed from it, or (re-)embedded changes the rows.
CLASS_SET_STATE = """MATCH (t:Target)-[:IN_CLASS_SET]->(:ClassSet {key: $key})
RETURN t.key AS key, t.name AS name, t.super_category AS super_category,
       [(e:TextEmbedding)-[:EMBEDS]->(t) WHERE e.model_version = $model_version | [e.dim, e.vector[0]]] AS embedding
ORDER BY key"""

READ_EMBEDDINGS_FOR_KEYS = """MATCH (e:TextEmbedding {model_version: $model_version}) WHERE e.target_key IN $keys
RETURN e.target_key AS target_key, e.dim AS dim, e.vector AS vector ORDER BY target_key"""

EMBEDDING_COUNT = "MATCH (e:TextEmbedding {model_version: $model_version}) RETURN count(e) AS n"

EMBEDDING_VERSIONS = """MATCH (e:TextEmbedding)
RETURN e.model_version AS model_version, count(e) AS classes ORDER BY model_version"""

TARGET_SUMMARIES = """MATCH (t:Target) WHERE t.key IN $keys
RETURN t.key AS key, t.name AS name, t.super_category AS super_category ORDER BY key"""

UNLINK_CLASS_SET_MEMBERS = """UNWIND $keys AS key
MATCH (:Target {key: key})-[r:IN_CLASS_SET]->(:ClassSet {key: $class_set})
DELETE r"""

DELETE_CLASS_SET = "MATCH (s:ClassSet {key: $key}) DETACH DELETE s"

# Retiring a model version: its class embeddings go, the targets stay.
DELETE_EMBEDDINGS = "MATCH (e:TextEmbedding {model_version: $model_version}) DETACH DELETE e"

EXPORT_NODES = {lab: f"MATCH (n:{lab}) RETURN n.key AS key, properties(n) AS props ORDER BY key" for lab in LABELS}

EXPORT_RELATIONSHIPS = {
    rel: f"""MATCH (a)-[r:{rel}]->(b)
RETURN labels(a) AS from_labels, a.key AS from, labels(b) AS to_labels, b.key AS to, properties(r) AS props"""
    for rel in RELATIONSHIPS
}

# -- quality control --------------------------------------------------------------------------------------------

# An attribute that does not apply to the target's kind (a "tank" with a wingspan).
INAPPLICABLE_ATTRIBUTES = """MATCH (t:Target)-[h:HAS_ATTRIBUTE]->(a:Attribute)
WHERE a.applies_to IS NOT NULL AND NOT t.kind IN a.applies_to
RETURN t.key AS target, t.kind AS kind, a.key AS attribute, h.value AS value ORDER BY target"""

TARGETS_WITHOUT_CATEGORY = """MATCH (t:Target) WHERE NOT EXISTS { (t)-[:IS_A]->(:Category) }
RETURN t.key AS target ORDER BY target"""

CLASS_SET_OVERLAP = """MATCH (:ClassSet {key: 'train'})<-[:IN_CLASS_SET]-(t:Target)
MATCH (t)-[:IN_CLASS_SET]->(:ClassSet {key: 'test'})
RETURN t.key AS target ORDER BY target"""

NON_NUMERIC_QUANTITIES = """MATCH (t:Target)-[h:HAS_ATTRIBUTE]->(a:Attribute)
WHERE a.unit IS NOT NULL AND (toFloat(h.value) IS NULL OR toFloat(h.value) < 0)
RETURN t.key AS target, a.key AS attribute, h.value AS value ORDER BY target"""

# -- analysts' queries ------------------------------------------------------------------------------------------

_WRITE_WORDS = ("CREATE", "MERGE", "SET", "DELETE", "DETACH", "REMOVE", "DROP", "LOAD", "FOREACH", "ALTER", "GRANT",
                "DENY", "REVOKE", "RENAME", "TERMINATE", "START", "STOP", "USE")
# Procedures an analyst may CALL: read-only catalogue procedures both servers provide.
READ_PROCEDURES = ("db.labels", "db.relationshipTypes", "db.propertyKeys", "db.schema.visualization")

_STRIP = re.compile(
    r"""//[^\n]*|/\*.*?\*/|'(?:\\.|[^'\\])*'|"(?:\\.|[^"\\])*"|`(?:``|[^`])*`""",
    re.DOTALL,
)


def read_only_violation(query: str) -> str | None:
    """Why ``query`` is not a read-only query, or None when it is.

    Comments, string literals and quoted identifiers are blanked first so that words inside them do not count;
    then any write clause, administration command or procedure call outside :data:`READ_PROCEDURES` is refused.
    This is the first of two guards: the query also runs in a transaction that is rolled back, never committed.
    """
    if not query.strip():
        return "empty query"
    code = _STRIP.sub(" ", query)
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_.]*", code)
    upper = [w.upper() for w in words]
    for word in _WRITE_WORDS:
        if word in upper:
            return f"{word} is not allowed in a read-only query"
    for i, word in enumerate(upper):
        if word == "CALL":
            target = words[i + 1] if i + 1 < len(words) else ""
            if target not in READ_PROCEDURES:
                return f"CALL {target or '{…}'} is not allowed; read-only procedures: {', '.join(READ_PROCEDURES)}"
    if ";" in code.strip().rstrip(";"):
        return "one statement at a time"
    return None
