"""Probe suite: hostile analyst Cypher against the real embedded graph server.

Every case runs twice: through the platform (``GraphStore.analyst_query``: the text check, then the analyst account)
and straight to the server as the analyst, the text check skipped, in auto-commit mode, so each case also shows what
the server enforces by itself. After every run the graph must be unchanged: nodes, relationships, labels and
relationship types (the schema's types), indexes, constraints, users, and a digest of every property.

The module starts a server of its own with a 2 s analyst time limit and a 300-record scan cap, on a small graph:
400 targets in 20 categories, with the platform's schema (its constraints and indexes).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from neo4j import GraphDatabase
from neo4j.exceptions import DriverError, Forbidden, Neo4jError

from ogclip.settings import Settings, free_ports
from ogclip_kg import cypher, server
from ogclip_kg.schema import migrate
from ogclip_kg.store import GraphError, GraphStore, QueryTimeout, ReadOnlyViolation

pytestmark = pytest.mark.slow

TIMEOUT_S, MAX_ROWS, TARGETS = 2.0, 300, 400
PRODUCT = "MATCH (a:Target), (b:Target), (c:Target) WHERE a.key + b.key + c.key = 'x' RETURN count(*) AS n"

# (id, query, parameters, through the platform, straight to the server). Outcomes: refused (by the text check on the
# platform path, by the server's permissions on the other), stopped (at the time limit), error (the server would not
# run it: a syntax error, an unknown procedure, a range over its size limit), ran (read-only, rows within the cap).
CASES = [
    # the reproducers
    ("cr-comment-call-in-transactions",
     "// x\rUNWIND [1] AS i CALL { WITH i CREATE (:Probe {key: 'p'}) } IN TRANSACTIONS", None, "refused", "refused"),
    ("cr-comment-create-user",
     "// x\rCREATE USER probe SET PASSWORD 'probe-password-1234' CHANGE NOT REQUIRED", None, "refused", "refused"),
    ("backticked-do-when-param-write",
     'WITH {labels: true} AS db CALL `do.when`(db.labels, $q, "RETURN 1 AS x", {}) YIELD value RETURN value',
     {"q": 'UNWIND [1] AS i CALL { WITH i CREATE (:Probe {key: "p2"}) } IN TRANSACTIONS RETURN 1 AS ok'},
     "refused", "refused"),
    ("merge-node", "CALL merge.node(['Probe'], {key: 'm'}, {}, {}) YIELD node RETURN node", None, "refused", "refused"),
    ("apoc-merge-node", "CALL apoc.merge.node(['Probe'], {key: 'm'}) YIELD node RETURN node", None,
     "refused", "refused"),
    ("backticked-create-index", "CREATE INDEX `probe index` FOR (t:Target) ON (t.probe)", None, "refused", "refused"),
    ("gql-insert", "INSERT (:Probe {key: 'g'})", None, "refused", "refused"),
    ("cr-comment-load-csv-local-file", "// x\rLOAD CSV FROM 'file:///etc/hostname' AS row RETURN row", None,
     "refused", "refused"),
    ("util-sleep", "RETURN util.sleep(1000) AS x", None, "refused", "ran"),
    ("cartesian-product", PRODUCT, None, "stopped", "stopped"),
    ("show-transactions", "SHOW TRANSACTIONS", None, "refused", "ran"),
    ("show-users", "SHOW USERS", None, "refused", "refused"),
    # line breaks that end a // comment, for the server or for the check
    ("lf-comment-create", "// x\nCREATE (:Probe {key: 'p'})", None, "refused", "refused"),
    ("crlf-comment-merge", "// x\r\nMERGE (:Probe {key: 'p'})", None, "refused", "refused"),
    ("u2028-comment-create", "// x\u2028CREATE (:Probe {key: 'p'})", None, "refused", "error"),
    ("u2029-comment-create", "// x\u2029CREATE (:Probe {key: 'p'})", None, "refused", "error"),
    ("nel-comment-create", "// x\u0085CREATE (:Probe {key: 'p'})", None, "refused", "error"),
    ("cr-comment-detach-delete", "MATCH (t:Target {key: 't-1'}) // x\rDETACH DELETE t", None, "refused", "refused"),
    ("cr-comment-drop-constraint", "// nothing here\rDROP CONSTRAINT target_key", None, "refused", "refused"),
    # block comments
    ("nested-block-comment", "/* /* */ CREATE (:Probe {key: 'p'}) */", None, "refused", "error"),
    ("block-comments-around-write", "/* read */ CREATE (:Probe {key: 'p'}) /* only */", None, "refused", "refused"),
    ("unterminated-block-comment", "MATCH (n) RETURN n /* CREATE (:Probe)", None, "refused", "error"),
    # case and white-space variants
    ("mixed-case-create", "cReAtE (:Probe {key: 'p'})", None, "refused", "refused"),
    ("lower-case-merge", "merge (:Probe {key: 'p'})", None, "refused", "refused"),
    ("mixed-case-set", "MATCH (t:Target {key: 't-1'}) sEt t.name = 'pwned'", None, "refused", "refused"),
    ("lower-case-remove", "match (t:Target {key: 't-1'}) remove t.name", None, "refused", "refused"),
    ("title-case-detach-delete", "Match (n) Detach Delete n", None, "refused", "refused"),
    ("nbsp-create", "CREATE\u00a0(:Probe {key: 'p'})", None, "refused", "refused"),
    ("ideographic-space-create", "CREATE\u3000(:Probe {key: 'p'})", None, "refused", "refused"),
    # strings, escapes and quoted names
    ("escaped-quote-then-create", "RETURN 'x\\' // ' AS s\rCREATE (:Probe {key: 'p'})", None, "refused", "refused"),
    ("unicode-escape-then-create", "RETURN 'a\\u0027' AS s CREATE (:Probe {key: 'p'})", None, "refused", "refused"),
    ("unterminated-string", "RETURN 'x AS s CREATE (:Probe)", None, "refused", "error"),
    ("quoted-property-then-set", "MATCH (t:Target) WHERE t.`CREATE` IS NULL SET t.x = 1 RETURN count(t) AS n", None,
     "refused", "refused"),
    # parameters that carry writes
    ("injection-in-a-parameter-is-data", "MATCH (t:Target {key: $k}) RETURN t.key AS key",
     {"k": "x'}) DETACH DELETE t //"}, "ran", "ran"),
    ("apoc-cypher-do-it-param", "CALL apoc.cypher.doIt($q, {}) YIELD value RETURN value",
     {"q": "CREATE (:Probe {key: 'p'})"}, "refused", "error"),
    ("do-case-param", "CALL do.case([true, $q], 'RETURN 1 AS x', {}) YIELD value RETURN value",
     {"q": "CREATE (:Probe {key: 'p'}) RETURN 1 AS x"}, "refused", "error"),
    ("do-when-param", "CALL do.when(true, $q, '', {}) YIELD value RETURN value",
     {"q": "MATCH (n) DETACH DELETE n RETURN 1 AS x"}, "refused", "refused"),
    # procedures outside the allow-list, however spelt
    ("backticked-dotted-merge-node", "CALL `apoc`.`merge`.`node`(['Probe'], {key: 'm'}) YIELD node RETURN node", None,
     "refused", "refused"),
    ("backticked-merge-node", "CALL `merge.node`(['Probe'], {key: 'm'}, {}, {}) YIELD node RETURN node", None,
     "refused", "refused"),
    ("apoc-create-node", "CALL apoc.create.node(['Probe'], {key: 'a'}) YIELD node RETURN node", None,
     "refused", "error"),
    ("apoc-periodic-iterate", "CALL apoc.periodic.iterate('MATCH (n) RETURN n', 'DETACH DELETE n', {})", None,
     "refused", "error"),
    ("refactor-rename-label", "CALL refactor.rename.label('Target', 'Probe')", None, "refused", "error"),
    ("db-create-label", "CALL db.createLabel('Probe')", None, "refused", "error"),
    ("dbms-create-user", "CALL dbms.security.createUser('probe', 'probe-password-1234', false)", None,
     "refused", "error"),
    ("algo-pagerank", "CALL algo.pagerank() YIELD node RETURN count(node) AS n", None, "refused", "ran"),
    ("optional-call-do-when", "OPTIONAL CALL do.when(true, 'CREATE (:Probe)', '', {}) YIELD value RETURN value", None,
     "refused", "ran"),
    # GQL words
    ("gql-insert-lower-case", "insert (:Target {key: 'g'})", None, "refused", "refused"),
    ("gql-insert-relationship", "MATCH (t:Target {key: 't-1'}) INSERT (t)-[:PROBE]->(:Probe {key: 'g'})", None,
     "refused", "refused"),
    ("use-system", "USE system SHOW USERS", None, "refused", "error"),
    # LOAD CSV
    ("load-csv-local-file", "LOAD CSV FROM 'file:///etc/hostname' AS row RETURN row", None, "refused", "refused"),
    ("load-csv-with-headers", "LOAD CSV WITH HEADERS FROM 'file:///etc/passwd' AS row RETURN row", None,
     "refused", "refused"),
    ("load-csv-remote", "load csv from 'http://127.0.0.1:9/x.csv' as row return row", None, "refused", "refused"),
    # sleeping
    ("backticked-util-sleep", "RETURN `util.sleep`(1000) AS x", None, "refused", "error"),
    ("commented-util-sleep", "RETURN util /* */ . sleep (1000) AS x", None, "refused", "ran"),
    ("apoc-util-sleep", "CALL apoc.util.sleep(1000)", None, "refused", "ran"),
    # a function as a map's value: after `:`, yet not a label
    ("map-value-util-sleep", "RETURN {a: util.sleep(100)} AS m", None, "refused", "ran"),
    ("map-value-sleep-in-a-list", "RETURN [x IN range(1, 2) | {a: util.sleep(50)}] AS m", None, "refused", "ran"),
    ("map-value-backticked-sleep", "WITH {a: `util.sleep`(1)} AS m RETURN m", None, "refused", "error"),
    ("map-value-apoc-sleep", "RETURN {a: apoc.util.sleep(50)} AS m", None, "refused", "ran"),
    ("map-value-sql-version", "RETURN {v: sql.version()} AS m", None, "refused", "ran"),
    ("map-value-virtual-node", "RETURN {a: create.vNode(['Probe'], {key: 'v'})} AS m", None, "refused", "ran"),
    # generators without a size cap (the server caps ranges, padding and format widths)
    ("text-random", "RETURN size(text.random(1000)) AS n", None, "refused", "ran"),
    ("geo-buffer-segments", "RETURN size(geo.buffer('POINT (1 2)', 1.0, {quadrantSegments: 100})) AS n", None,
     "refused", "ran"),
    # quadratic in its strings' lengths, uncapped (the Levenshtein functions stop at 10,000 characters)
    ("jaro-winkler", "RETURN text.jaroWinklerDistance('martha', 'marhta') AS d", None, "refused", "ran"),
    # values nested deeper than a recursive reader goes: the driver's (a Python RecursionError) or the server's
    # own JSON writer (its thread's stack; the connection drops, the server stays up)
    ("deep-nested-result", "RETURN reduce(l = [], i IN range(1, 2000) | [l]) AS l", None, "error", "error"),
    ("deep-nested-json", "WITH reduce(l = [], i IN range(1, 100000) | [l]) AS l RETURN size(convert.toJson(l)) AS n",
     None, "error", "error"),
    # huge products, streams and scans: stopped at the time limit, refused, or capped
    ("collect-unwind-product", "MATCH (a:Target) WITH collect(a) AS l UNWIND l AS x UNWIND l AS y UNWIND l AS z "
     "WITH x, y, z WHERE x.key + y.key + z.key = 'q' RETURN count(*) AS n", None, "stopped", "stopped"),
    # Sized to outlast the time limit on any machine (billions of rows), so only the limit can end them.
    ("unwind-range-product", "UNWIND range(1, 3000) AS a UNWIND range(1, 3000) AS b UNWIND range(1, 3000) AS c "
     "RETURN count(*) AS n", None, "stopped", "stopped"),
    ("unwind-range-filter", "UNWIND range(1, 3000000) AS x UNWIND range(1, 1000) AS y WITH x, y "
     "WHERE toString(x + y) = 'q' RETURN count(x) AS n", None, "stopped", "stopped"),
    ("product-streamed", "MATCH (a:Target), (b:Target), (c:Target) RETURN a.key AS a, b.key AS b, c.key AS c", None,
     "stopped", "stopped"),
    ("huge-range", "UNWIND range(1, 100000000) AS x RETURN count(x) AS n", None, "error", "error"),
    ("scan-over-the-row-cap", "MATCH (t:Target) RETURN t.key AS key", None, "ran", "ran"),
    # SHOW and other administration
    ("show-transactions-yield", "show transactions yield *", None, "refused", "ran"),
    ("show-current-user", "SHOW CURRENT USER", None, "refused", "ran"),
    ("show-roles", "SHOW ROLES", None, "refused", "error"),
    ("terminate-transactions", "TERMINATE TRANSACTIONS 'neo4j-transaction-1'", None, "refused", "ran"),
    # users
    ("create-user", "CREATE USER probe SET PASSWORD 'probe-password-1234' CHANGE NOT REQUIRED", None,
     "refused", "refused"),
    ("create-user-quoted", "create user `probe` set password 'probe-password-1234'", None, "refused", "refused"),
    ("alter-user-password", "ALTER USER analyst SET PASSWORD 'another-password-1234'", None, "refused", "refused"),
    ("drop-user", "DROP USER root", None, "refused", "refused"),
    ("grant-role", "GRANT ROLE admin TO analyst", None, "refused", "error"),
    # index and constraint DDL
    ("create-index", "CREATE INDEX probe_index FOR (t:Target) ON (t.probe)", None, "refused", "refused"),
    ("drop-index", "DROP INDEX target_normalized_name", None, "refused", "refused"),
    ("drop-constraint", "DROP CONSTRAINT target_key", None, "refused", "refused"),
    ("create-constraint", "CREATE CONSTRAINT probe_key FOR (n:Target) REQUIRE n.name IS UNIQUE", None,
     "refused", "refused"),
    ("create-fulltext-index", "CREATE FULLTEXT INDEX probe_text FOR (n:Target) ON EACH [n.name]", None,
     "refused", "error"),
    # plain writes
    ("create-node-new-label", "CREATE (:Probe {key: 'p'})", None, "refused", "refused"),
    ("create-node-existing-label", "CREATE (:Target {key: 'p'})", None, "refused", "refused"),
    ("set-property", "MATCH (t:Target {key: 't-1'}) SET t.name = 'pwned'", None, "refused", "refused"),
    ("set-label", "MATCH (t:Target {key: 't-1'}) SET t:Probe", None, "refused", "refused"),
    ("remove-label", "MATCH (t:Target {key: 't-1'}) REMOVE t:Target", None, "refused", "refused"),
    ("detach-delete-all", "MATCH (n) DETACH DELETE n", None, "refused", "refused"),
    ("merge-on-match-set", "MERGE (t:Target {key: 't-1'}) ON MATCH SET t.name = 'x'", None, "refused", "refused"),
    ("create-relationship", "MATCH (a:Target {key: 't-1'}), (b:Target {key: 't-2'}) CREATE (a)-[:IS_A]->(b)", None,
     "refused", "refused"),
    ("foreach-create", "FOREACH (x IN [1] | CREATE (:Probe))", None, "refused", "refused"),
    ("delete-in-transactions", "MATCH (n) CALL { WITH n DETACH DELETE n } IN TRANSACTIONS OF 10 ROWS", None,
     "refused", "refused"),
    ("two-statements", "MATCH (n) RETURN count(n) AS n; CREATE (:Probe)", None, "refused", "error"),
    ("explain-create", "EXPLAIN CREATE (:Probe {key: 'p'})", None, "refused", "ran"),
    ("profile-merge", "PROFILE MERGE (:Target {key: 'p'})", None, "refused", "ran"),
]

# The analyst examples of the README: the check must let them through, and the analyst account must run them.
README_QUERIES = [
    "// The category path of every warship in the unseen test set\n"
    "MATCH (t:Target)-[:IN_CLASS_SET]->(:ClassSet {key: 'test'}), (t)-[:IS_A*]->(c:Category)\n"
    "WHERE t.super_category = 'warship'\nRETURN t.name AS target, collect(c.name) AS path ORDER BY target",
    "MATCH (t:Target {key: $key})-[h:HAS_ATTRIBUTE]->(a:Attribute)\n"
    "RETURN a.name AS attribute, h.value AS value, h.unit AS unit, h.source AS source",
    "MATCH (t:Target)-[:OPERATED_BY]->(o:Organization)\nWHERE t.super_category = 'military aircraft'\n"
    "RETURN o.name AS operator, count(t) AS types ORDER BY types DESC LIMIT 10",
    "MATCH (t:Target)-[h:HAS_ATTRIBUTE]->(:Attribute {key: 'engine_count'}) WHERE h.value = 4\n"
    "OPTIONAL MATCH (t)-[:MANUFACTURED_BY]->(m:Organization)\nRETURN t.name AS target, m.name AS manufacturer LIMIT 20",
    "CALL db.labels() YIELD label RETURN label",
    "CALL `db.relationshipTypes`()",
    "SHOW INDEXES",
    "RETURN date.truncate('month', date('2024-05-17')) AS month, toUpper('create') AS word",
    "MATCH (t:Target) WHERE t.name CONTAINS 'SET' RETURN t {.key, .name} AS target LIMIT 3",
]

OUTCOMES: dict[str, Counter] = {"platform": Counter(), "server": Counter(), "graph": Counter()}
STOPPED_AFTER: list[float] = []  # seconds from sending a query to the platform to its QueryTimeout


@pytest.fixture(scope="module")
def probe_settings(tmp_path_factory: pytest.TempPathFactory):
    bolt_port, http_port = free_ports(2)
    settings = Settings(home=tmp_path_factory.mktemp("probe-home"), kg_bolt_port=bolt_port, kg_http_port=http_port,
                        neo4j_uri=None, neo4j_password=None, neo4j_analyst_user=None, neo4j_analyst_password=None,
                        kg_query_timeout_s=TIMEOUT_S, kg_query_max_rows=MAX_ROWS)
    server.up(settings)
    yield settings
    server.down(settings)


@pytest.fixture(scope="module")
def store(probe_settings: Settings):
    with GraphStore.from_settings(probe_settings) as store:
        migrate(store)
        store.upsert("Category", [{"key": f"c-{i}", "props": {"name": f"category {i}"}} for i in range(20)])
        store.upsert("Target", [{"key": f"t-{i}", "props": {"name": f"target {i}", "super_category": "probe"}}
                                for i in range(TARGETS)])
        store.link("Target", "IS_A", "Category",
                   [{"from": f"t-{i}", "to": f"c-{i % 20}", "props": {"source": "probe"}} for i in range(TARGETS)])
        yield store


def snapshot(store: GraphStore) -> dict:
    """What must never change, read as root: counts and names of everything, and a digest of every property."""
    nodes = store.read("MATCH (n) RETURN labels(n) AS labels, properties(n) AS props")
    rels = store.read("MATCH (a)-[r]->(b) RETURN type(r) AS type, a.key AS a, b.key AS b, properties(r) AS props")
    content = sorted(json.dumps(row, sort_keys=True, default=str) for row in nodes + rels)
    return {
        "nodes": len(nodes), "relationships": len(rels),
        "labels": sorted(r["label"] for r in store.read("CALL db.labels()")),
        "relationship_types": sorted(r["relationshipType"] for r in store.read("CALL db.relationshipTypes()")),
        "indexes": sorted(r["name"] for r in store.read("SHOW INDEXES")),
        "constraints": sorted(r["name"] for r in store.read("SHOW CONSTRAINTS")),
        "users": sorted(r["user"] for r in store.read("SHOW USERS")),
        "digest": hashlib.sha256("\n".join(content).encode()).hexdigest(),
    }


@pytest.fixture(scope="module")
def baseline(store: GraphStore) -> dict:
    state = snapshot(store)
    assert state["nodes"] == TARGETS + 20 + 1 and state["relationships"] == TARGETS, "the migration is a node too"
    assert state["users"] == ["analyst", "root"] and len(state["indexes"]) > 8 and len(state["constraints"]) == 8
    return state


@pytest.fixture(scope="module")
def analyst_driver(probe_settings: Settings):
    """The analyst account with nothing of the platform in front of it."""
    driver = GraphDatabase.driver(server.bolt_uri(probe_settings),
                                  auth=(server.ANALYST_USER, server.analyst_password(probe_settings)))
    yield driver
    driver.close()


def through_platform(store: GraphStore, query: str, params: dict | None) -> tuple[str, list]:
    try:
        return "ran", store.analyst_query(query, params, limit=100_000)
    except ReadOnlyViolation as exc:
        assert str(exc).startswith("refused: "), "the text check, not the server, refuses hostile text first"
        return "refused", []
    except QueryTimeout:
        return "stopped", []
    except GraphError:
        return "error", []


def straight_to_server(driver, query: str, params: dict | None) -> tuple[str, list]:
    try:
        with driver.session(database="neo4j") as session:
            return "ran", session.run(query, params or {}).data()
    except Forbidden:
        return "refused", []
    except Neo4jError as exc:
        stopped = server.TIME_LIMIT in (exc.message or "") or "Timeout" in (exc.message or "")
        return ("stopped" if stopped else "error"), []
    except (DriverError, RecursionError):  # the connection dropped, or an answer the driver cannot read
        return "error", []


def test_the_suite_is_the_size_it_claims() -> None:
    assert len(CASES) == len({case[0] for case in CASES}) >= 75


@pytest.mark.parametrize(("query", "params", "platform", "direct"), [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_hostile_query(store: GraphStore, baseline: dict, analyst_driver, query: str, params: dict | None,
                       platform: str, direct: str) -> None:
    started = time.monotonic()
    outcome, rows = through_platform(store, query, params)
    took = time.monotonic() - started
    OUTCOMES["platform"][outcome] += 1
    STOPPED_AFTER.extend([round(took, 1)] if outcome == "stopped" else [])
    assert outcome == platform and len(rows) <= MAX_ROWS
    assert took < TIMEOUT_S + 8, "the time limit holds"
    assert snapshot(store) == baseline
    OUTCOMES["graph"]["unchanged"] += 1

    outcome, rows = straight_to_server(analyst_driver, query, params)
    OUTCOMES["server"][outcome] += 1
    assert outcome == direct and len(rows) <= MAX_ROWS
    assert snapshot(store) == baseline
    OUTCOMES["graph"]["unchanged"] += 1


def test_the_figures() -> None:
    """The totals the README quotes, from the table (and from this run when the whole table ran before)."""
    expected = {"platform": Counter(c[3] for c in CASES), "server": Counter(c[4] for c in CASES),
                "graph": Counter(unchanged=2 * len(CASES))}
    assert expected["platform"] == {"refused": 89, "stopped": 5, "ran": 2, "error": 3}
    assert expected["server"] == {"refused": 50, "error": 23, "ran": 21, "stopped": 5}
    if sum(OUTCOMES["graph"].values()) == 2 * len(CASES):
        assert expected == OUTCOMES
    print(json.dumps({"cases": len(CASES), **{k: dict(v) for k, v in OUTCOMES.items()},
                      "stopped_after_s": sorted(STOPPED_AFTER)}))


@pytest.mark.parametrize("query", README_QUERIES)
def test_analyst_reads_pass(store: GraphStore, baseline: dict, query: str) -> None:
    assert cypher.read_only_violation(query) is None
    store.analyst_query(query, {"key": "t-1"})
    assert snapshot(store) == baseline


def test_the_analyst_is_a_separate_account(probe_settings: Settings, store: GraphStore) -> None:
    path = probe_settings.kg_dir / server.ANALYST_CREDENTIALS_FILE
    assert path.stat().st_mode & 0o077 == 0, "the analyst's generated password is private to its owner"
    assert json.loads(path.read_text())["user"] == "analyst"
    assert server.analyst_password(probe_settings) != server.embedded_password(probe_settings)
    # The scan cap is the analyst's alone: root reads every target, the analyst at most MAX_ROWS per scan.
    assert len(store.read("MATCH (t:Target) RETURN t.key AS key")) == TARGETS
    assert len(store.analyst_query("MATCH (t:Target) RETURN t.key AS key", limit=10_000)) == MAX_ROWS


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_product_stops_when_its_client_is_killed(probe_settings: Settings, store: GraphStore) -> None:
    """The analyst's client dies mid-query; the server still stops the query at its time limit and goes idle."""
    client = (f"import neo4j; d = neo4j.GraphDatabase.driver({server.bolt_uri(probe_settings)!r}, "
              f"auth=({server.ANALYST_USER!r}, {server.analyst_password(probe_settings)!r})); "
              f"print('sending', flush=True); d.session(database='neo4j').run({PRODUCT!r}).consume()")
    process = subprocess.Popen([sys.executable, "-c", client], stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "sending"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not _analyst_queries(store):
            time.sleep(0.1)
        assert _analyst_queries(store), "the product runs on the server"
    finally:
        process.kill()
        process.wait()
    deadline = time.monotonic() + TIMEOUT_S + 5
    while time.monotonic() < deadline and _analyst_queries(store):
        time.sleep(0.1)
    assert not _analyst_queries(store), "the server stopped the query"
    pid = server.status(probe_settings).pid
    before = _cpu_seconds(pid)
    time.sleep(1.0)
    assert _cpu_seconds(pid) - before < 0.5, "no server core is left busy"


def test_queries_that_die_of_a_stack_overflow_neither_block_the_server_nor_stay_listed(store: GraphStore,
                                                                                       analyst_driver) -> None:
    """A value nested 10,000 deep overflows the server thread's stack in convert.toJson; ArcadeDB 26.10 then
    never closes the query. With its admission gate on, six of them (it admits four at once on two cores) made it
    refuse every later query, root's too."""
    deep = "WITH reduce(l = [], i IN range(1, 10000) | [l]) AS l RETURN size(convert.toJson(l)) AS n"
    for _ in range(6):
        assert straight_to_server(analyst_driver, deep, None)[0] == "error"
    started = time.monotonic()
    assert store.read("MATCH (t:Target) RETURN count(t) AS n") == [{"n": TARGETS}]
    assert time.monotonic() - started < 5, "not queued behind dead queries"
    deadline = time.monotonic() + 2 * TIMEOUT_S + 5
    while time.monotonic() < deadline and _analyst_queries(store):
        time.sleep(0.2)
    assert not _analyst_queries(store), "the watchdog takes dead queries off the registry"


def _analyst_queries(store: GraphStore) -> list[dict]:
    """The analyst's queries the server is running (root sees every user's)."""
    return [row for row in store.read("SHOW TRANSACTIONS") if row.get("username") == server.ANALYST_USER]


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OGCLIP_HOME": str(settings.home), "OGCLIP_KG_BOLT_PORT": str(settings.kg_bolt_port),
           "OGCLIP_KG_HTTP_PORT": str(settings.kg_http_port), "OGCLIP_KG_QUERY_TIMEOUT_S": str(TIMEOUT_S)}
    for name in ("URI", "PASSWORD", "ANALYST_USER", "ANALYST_PASSWORD"):
        env.pop(f"OGCLIP_NEO4J_{name}", None)
    return subprocess.run([sys.executable, "-m", "ogclip_jobs.cli", "kg", "query", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_the_reproducers_through_the_cli(probe_settings: Settings, store: GraphStore, baseline: dict) -> None:
    for args in (
        ["// x\rUNWIND [1] AS i CALL { WITH i CREATE (:Probe {key: 'p'}) } IN TRANSACTIONS"],
        ["// x\rCREATE USER probe SET PASSWORD 'probe-password-1234' CHANGE NOT REQUIRED"],
        ['WITH {labels: true} AS db CALL `do.when`(db.labels, $q, "RETURN 1 AS x", {}) YIELD value RETURN value',
         "--param", 'q=UNWIND [1] AS i CALL { WITH i CREATE (:Probe {key: "p2"}) } IN TRANSACTIONS RETURN 1 AS ok'],
    ):
        started = time.monotonic()
        result = _cli(probe_settings, *args)
        assert result.returncode == 2 and "refused" in result.stderr and "Traceback" not in result.stderr
        assert time.monotonic() - started < 60
        assert snapshot(store) == baseline
    capped = _cli(probe_settings, "MATCH (t:Target) RETURN t.key AS key", "--limit", "10000", "--json")
    assert capped.returncode == 0 and len(json.loads(capped.stdout)) == MAX_ROWS, "the CLI runs as the analyst"
