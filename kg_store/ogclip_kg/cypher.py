"""Every Cypher statement the platform runs: named, parameterised, kept to what Neo4j 5 and ArcadeDB both accept.

Values always travel as parameters; nothing a user or a data source supplies is spliced into query text. The
schema's labels and relationship types are the allow-lists below: code that needs a label or type chosen at run
time (JSON-lines import) must take it from them. Analysts' free-form queries go through
:func:`read_only_violation` and run as the read-only analyst account, in a transaction that is always rolled back.
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
# class added to the set, removed from it, or (re-)embedded changes the rows. The embeddings are matched by their
# indexed model version: a pattern comprehension filtered by it instead visits every embedding of every version
# (on the embedded server, 6 s for 99 classes and 258 s for 3,144 with 29k embeddings stored, against 0.1 s and
# 0.5 s).
CLASS_SET_STATE = """MATCH (t:Target)-[:IN_CLASS_SET]->(:ClassSet {key: $key})
OPTIONAL MATCH (e:TextEmbedding {model_version: $model_version})-[:EMBEDS]->(t)
WITH t, collect(CASE WHEN e IS NULL THEN null ELSE [e.dim, e.vector[0]] END) AS embedding
RETURN t.key AS key, t.name AS name, t.super_category AS super_category, embedding
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

CATEGORY_CONFIDENCE = """MATCH (t:Target)-[r:IS_A]->(c:Category)
RETURN r.confidence AS confidence, count(t) AS targets ORDER BY confidence"""

CONTRADICTED_CATEGORIES = """MATCH (t:Target)-[r:IS_A]->(c:Category) WHERE size(coalesce(r.conflicts, [])) > 0
RETURN t.key AS target, t.name AS name, c.key AS category, r.conflicts AS conflicts ORDER BY target"""

TARGETS_WITHOUT_CATEGORY = """MATCH (t:Target) WHERE NOT EXISTS { (t)-[:IS_A]->(:Category) }
RETURN t.key AS target ORDER BY target"""

CLASS_SET_OVERLAP = """MATCH (:ClassSet {key: 'train'})<-[:IN_CLASS_SET]-(t:Target)
MATCH (t)-[:IN_CLASS_SET]->(:ClassSet {key: 'test'})
RETURN t.key AS target ORDER BY target"""

NON_NUMERIC_QUANTITIES = """MATCH (t:Target)-[h:HAS_ATTRIBUTE]->(a:Attribute)
WHERE a.unit IS NOT NULL AND (toFloat(h.value) IS NULL OR toFloat(h.value) < 0)
RETURN t.key AS target, a.key AS attribute, h.value AS value ORDER BY target"""

# -- analysts' queries ------------------------------------------------------------------------------------------
#
# The server keeps analysts read-only (their own account; see ogclip_kg.server). This text check is a second layer in
# front of it: it refuses what the account may still do but an analyst must not (SHOW TRANSACTIONS, TERMINATE,
# procedures, sleeping functions) and writes before they reach the server. It reads the query the way the server's
# lexer does, and where the two could differ it errs towards seeing more code: a `//` comment ends at any line break
# Python knows (\r, \n, \u2028, \u2029, ...), a `/*` comment at the first `*/`, a string at its first unescaped
# quote, and words are ASCII only, so an unusual character splits a word rather than joining two.

# Words that begin a write, a schema or administration command, or work outside the query's own transaction.
REFUSED_WORDS = frozenset({
    "CREATE", "MERGE", "SET", "DELETE", "DETACH", "NODETACH", "REMOVE", "FOREACH", "INSERT", "LOAD", "DROP", "ALTER",
    "RENAME", "GRANT", "DENY", "REVOKE", "TERMINATE", "START", "STOP", "ENABLE", "USE", "SESSION", "TRANSACTION",
    "TRANSACTIONS", "COMMIT", "ROLLBACK",
})
# Procedures an analyst may CALL: read-only catalogue procedures both servers provide (compared in lower case).
READ_PROCEDURES = ("db.labels", "db.relationshipTypes", "db.propertyKeys", "db.schema.visualization")
# Namespaces of functions an analyst may call (`date.truncate`, `vector.similarity.cosine`, ...); names without a
# namespace are Cypher's own. Not util (util.sleep), apoc, do, create, cypher, db or any other.
FUNCTION_NAMESPACES = frozenset({
    "agg", "coll", "convert", "date", "datetime", "duration", "geo", "localdatetime", "localtime", "map", "math",
    "node", "number", "path", "point", "rel", "string", "temporal", "text", "time", "vector",
})
# Functions of those namespaces an analyst may not call: ArcadeDB caps what its other generators build (ranges,
# padding, format widths) but not text.random's length nor geo.buffer's quadrantSegments, and one call with a small
# argument can fill the server's heap; it caps the Levenshtein functions' strings at 10,000 characters but not
# text.jaroWinklerDistance's, whose time grows with the product of the lengths and no time limit interrupts.
REFUSED_FUNCTIONS = frozenset({"text.random", "geo.buffer", "text.jarowinklerdistance"})
SHOWABLE = frozenset({"INDEX", "INDEXES", "CONSTRAINT", "CONSTRAINTS"})

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>//[^\n\r\v\f\x1c-\x1e\x85\u2028\u2029]*|/\*.*?\*/)
  | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<quoted>`(?:[^`]|``)*`)
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>[0-9]+)
  | (?P<unterminated>/\*|['"`])
  | (?P<symbol>.)
""", re.VERBOSE | re.DOTALL)


def tokens(query: str) -> list[tuple[str, str]]:
    """``query`` as (kind, text) tokens, spaces and comments left out. Kinds: name, quoted (a backticked name, given
    without its backticks), string, number, unterminated (the start of a string, quoted name or comment that never
    ends) and symbol (any other single character)."""
    out = []
    for match in _TOKEN.finditer(query):
        kind, text = match.lastgroup, match.group()
        if kind == "quoted":
            out.append((kind, text[1:-1].replace("``", "`")))
        elif kind not in ("space", "comment"):
            out.append((kind, text))
    return out


def _dotted_name(toks: list[tuple[str, str]], i: int) -> tuple[str, int]:
    """The name ``a.b.c`` that starts at token ``i`` (names, backticked or not, joined by dots) and the index after
    it."""
    parts = [toks[i][1]]
    i += 1
    while i + 1 < len(toks) and toks[i] == ("symbol", ".") and toks[i + 1][0] in ("name", "quoted"):
        parts.append(toks[i + 1][1])
        i += 2
    return ".".join(parts), i


def read_only_violation(query: str) -> str | None:
    """Why ``query`` may not run as an analyst's query, or None when it may.

    Refused: write clauses (GQL INSERT included), schema and administration commands, LOAD CSV, USE, CALL ... IN
    TRANSACTIONS, SHOW other than SHOW INDEXES/CONSTRAINTS, procedures outside :data:`READ_PROCEDURES` (a backticked
    name is still that name), namespaced functions outside :data:`FUNCTION_NAMESPACES`, more than one statement, and
    an unterminated string, quoted name or comment. A word is a keyword only where the server reads one: not inside
    a string, a comment or backticks, nor right after `.`, `:` or `$` (a property key, label or parameter). A name
    followed by `(` is a function wherever it stands: after `:` it is a map's value (``{a: util.sleep(1)}``), not a
    label.
    """
    toks = tokens(query)
    if not toks:
        return "empty query"
    allowed = {name.lower() for name in READ_PROCEDURES}
    for i, (kind, text) in enumerate(toks):
        if kind == "unterminated":
            return f"an unterminated {'comment' if text == '/*' else 'string or quoted name'}"
        if (kind, text) == ("symbol", ";") and i + 1 < len(toks):
            return "one statement at a time"
        before = toks[i - 1] if i else ("", "")
        if kind not in ("name", "quoted") or before in (("symbol", "."), ("symbol", "$")):
            continue
        name, end = _dotted_name(toks, i)
        function = toks[end:end + 1] == [("symbol", "(")]
        if before == ("symbol", ":") and not function:
            continue  # a label or relationship type
        word = text.upper() if kind == "name" else ""
        after = toks[i + 1] if i + 1 < len(toks) else ("", "")
        if word in REFUSED_WORDS:
            return f"{word} is not allowed in a read-only query"
        if word == "SHOW" and (after[0] != "name" or after[1].upper() not in SHOWABLE):
            return "SHOW is allowed for SHOW INDEXES and SHOW CONSTRAINTS only"
        if word == "CALL" and after[0] in ("name", "quoted"):
            procedure, _ = _dotted_name(toks, i + 1)
            if procedure.lower() not in allowed:
                return f"CALL {procedure} is not allowed; read-only procedures: {', '.join(READ_PROCEDURES)}"
        # A dotted name followed by `(` is a namespaced function, unless CALL made it the procedure checked above.
        called = before[0] == "name" and before[1].upper() == "CALL"
        if function and "." in name and not called:
            if name.split(".")[0].lower() not in FUNCTION_NAMESPACES:
                namespaces = ", ".join(sorted(FUNCTION_NAMESPACES))
                return f"the function {name} is not allowed; allowed namespaces: {namespaces}"
            if name.lower() in REFUSED_FUNCTIONS:
                return f"the function {name} is not allowed (unbounded in what it builds or how long it runs)"
    return None
