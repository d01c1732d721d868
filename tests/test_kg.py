"""Contract tests of the graph store over Bolt: the embedded server always, Neo4j when OGCLIP_NEO4J_URI is set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ogclip.settings import Settings, free_ports
from ogclip_kg import cypher, server
from ogclip_kg.prompts import class_prompts, fetch_class_facts
from ogclip_kg.quality import check
from ogclip_kg.schema import migrate
from ogclip_kg.seeds import seed_graph
from ogclip_kg.store import GraphConnectionError, GraphError, GraphStore, ReadOnlyViolation


def test_seed_loads_real_facts_and_is_idempotent(graph: GraphStore) -> None:
    counts = graph.counts()
    assert counts["Target"] == graph.seed_summary["targets"] > 3000
    assert counts["Category"] > 30 and counts["Attribute"] >= 10 and counts["ClassSet"] == 2
    assert seed_graph(graph)["targets"] == graph.seed_summary["targets"]
    assert graph.counts() == counts
    assert migrate(graph) == [], "migrations already applied are not run again"


def test_hierarchy_and_facts_answer_analyst_questions(graph: GraphStore) -> None:
    rows = graph.analyst_query(
        "MATCH (t:Target)-[:IS_A*]->(c:Category) WHERE t.key = $key RETURN collect(c.name) AS chain",
        {"key": "arleigh-burke-class-destroyer"})
    assert set(rows[0]["chain"]) == {"destroyer", "warship", "ship"}
    rows = graph.analyst_query(
        "MATCH (t:Target)-[h:HAS_ATTRIBUTE]->(a:Attribute {key: 'engine_count'}) "
        "WHERE h.value = 4 RETURN t.name AS name, h.source AS source LIMIT 3")
    assert len(rows) == 3 and all("ICAO" in r["source"] for r in rows)
    rows = graph.analyst_query("MATCH (t:Target)-[r:OPERATED_BY]->(o:Organization) WHERE r.source CONTAINS 'CC-BY-SA' "
                               "RETURN count(t) AS n")
    assert rows[0]["n"] > 100, "aircot facts keep their CC-BY-SA attribution"


def test_class_sets_in_the_graph(graph: GraphStore) -> None:
    test = graph.read(cypher.CLASS_SET_KEYS, key="test")
    train = graph.read(cypher.CLASS_SET_KEYS, key="train")
    assert len(test) == 99 and len(train) > 3000
    assert not {r["key"] for r in test} & {r["key"] for r in train}
    assert {r["super_category"] for r in test} == {"military aircraft", "warship", "civilian/other"}


@pytest.mark.parametrize("query", [
    "MATCH (n) DETACH DELETE n",
    "CREATE (:Target {key: 'intruder'})",
    "MATCH (t:Target) SET t.name = 'pwned'",
    "MATCH (t:Target {key: 'f-16'}) WITH t MERGE (t)-[:IS_A]->(:Category {key: 'x'})",
    "DROP CONSTRAINT target_key",
])
def test_analyst_writes_are_refused_and_change_nothing(graph: GraphStore, query: str) -> None:
    before = graph.counts()
    with pytest.raises(ReadOnlyViolation, match="refused"):
        graph.analyst_query(query)
    assert graph.counts() == before


def test_analyst_query_rolls_back_what_slips_past_the_guard(graph: GraphStore) -> None:
    """Belt and braces: even a write sent straight to the analyst transaction path is never committed."""
    before = graph.counts()
    with graph._driver.session(database=graph.database) as session:
        tx = session.begin_transaction()
        tx.run("CREATE (:Target {key: 'rolled-back'})").consume()
        tx.rollback()
    assert graph.counts() == before


def test_injection_strings_are_data(graph: GraphStore) -> None:
    hostile = "x'}) DETACH DELETE n WITH 1 AS x MATCH (m) DETACH DELETE m //"
    before = graph.counts()
    graph.upsert("Target", [{"key": "hostile", "props": {"name": hostile, "kind": "aircraft"}}])
    try:
        rows = graph.analyst_query("MATCH (t:Target {key: $key}) RETURN t.name AS name", {"key": "hostile"})
        assert rows == [{"name": hostile}]
        assert graph.counts()["Target"] == before["Target"] + 1
        assert graph.analyst_query("MATCH (t:Target {name: $n}) RETURN count(t) AS n", {"n": hostile})[0]["n"] == 1
    finally:
        graph.write("MATCH (t:Target {key: 'hostile'}) DETACH DELETE t")
    assert graph.counts() == before
    with pytest.raises(ValueError, match="unknown node label"):
        graph.upsert("Target {key: 'x'}) DETACH DELETE (n", [{"key": "x", "props": {}}])


def test_bad_queries_are_clear_errors(graph: GraphStore) -> None:
    with pytest.raises(GraphError, match="query failed"):
        graph.analyst_query("MATCH (n RETURN n")
    assert len(graph.analyst_query("MATCH (t:Target) RETURN t.key AS key", limit=7)) == 7


def test_wrong_credentials_are_refused(kg_settings: Settings) -> None:
    with pytest.raises(GraphConnectionError, match="authentication failed"):
        GraphStore(server.bolt_uri(kg_settings), server.EMBEDDED_USER, "wrong-password", "neo4j")
    with pytest.raises(GraphConnectionError, match="no graph server"):
        GraphStore("bolt://127.0.0.1:9", "root", "x", "neo4j")


def test_unique_keys_are_enforced(graph: GraphStore) -> None:
    key = "arleigh-burke-class-destroyer"
    with pytest.raises(GraphError):
        graph.write("CREATE (:Target {key: $key})", key=key)
    assert graph.analyst_query("MATCH (t:Target {key: $key}) RETURN count(t) AS n", {"key": key})[0]["n"] == 1


def test_export_import_round_trip(graph: GraphStore, tmp_path: Path) -> None:
    before = graph.counts()
    path = tmp_path / "graph.jsonl"
    lines = graph.export_jsonl(path)
    assert lines > 40_000
    graph.clear()
    assert graph.counts()["Target"] == 0
    assert graph.import_jsonl(path) == lines
    assert graph.counts() == before
    again = tmp_path / "again.jsonl"
    graph.export_jsonl(again)
    assert sorted(path.read_text().splitlines()) == sorted(again.read_text().splitlines())


def test_import_validates_every_line_before_writing(graph: GraphStore, tmp_path: Path) -> None:
    before = graph.counts()
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"node": "Target", "key": "new-one", "props": {}}) + "\n"
                    + json.dumps({"node": "Secret", "key": "x", "props": {}}) + "\n")
    with pytest.raises(GraphError, match=":2: invalid graph line"):
        graph.import_jsonl(path)
    assert graph.counts() == before


def test_quality_checks_flag_inconsistent_facts(graph: GraphStore) -> None:
    assert check(graph).errors == 0
    graph.upsert("Target", [{"key": "test-tank", "props": {"name": "Test Tank", "kind": "land-vehicle"}}])
    graph.link("Target", "IS_A", "Category", [{"from": "test-tank", "to": "armoured-vehicle", "props": {}}])
    graph.link("Target", "HAS_ATTRIBUTE", "Attribute", [
        {"from": "test-tank", "to": "wingspan", "props": {"value": 11.0, "unit": "m", "source": "test"}},
        {"from": "test-tank", "to": "length", "props": {"value": "very long", "unit": "m", "source": "test"}}])
    graph.upsert("Target", [{"key": "test-orphan", "props": {"name": "Orphan", "kind": "aircraft"}}])
    graph.link("Target", "IN_CLASS_SET", "ClassSet", [{"from": "test-tank", "to": "train", "props": {}},
                                                      {"from": "test-tank", "to": "test", "props": {}}])
    try:
        report = check(graph)
        assert [(r["target"], r["attribute"]) for r in report.inapplicable_attributes] == [("test-tank", "wingspan")]
        assert [(r["target"], r["attribute"]) for r in report.invalid_quantities] == [("test-tank", "length")]
        assert report.targets_without_category == ["test-orphan"]
        assert report.class_set_overlap == ["test-tank"]
        assert report.errors == 4
    finally:
        graph.write("MATCH (t:Target) WHERE t.key IN ['test-tank', 'test-orphan'] DETACH DELETE t")
    assert check(graph).errors == 0


def test_prompts_from_the_graph(graph: GraphStore) -> None:
    keys = [r["key"] for r in graph.read(cypher.CLASS_SET_KEYS, key="test")]
    batched = fetch_class_facts(graph, keys)
    single = [fetch_class_facts(graph, [k])[0] for k in keys[:5]]
    assert [r["key"] for r in batched] == keys and batched[:5] == single
    for row in batched:
        prompts = class_prompts(row)
        assert row["name"] in prompts["label"] and row["categories"][0] in prompts["label_category"]
        assert len(prompts["description"]) > len(prompts["label_attributes"]) > len(prompts["label"])
    with pytest.raises(KeyError, match="unknown classes: no-such-class"):
        fetch_class_facts(graph, ["no-such-class"])


def test_embeddings_per_model_version(graph: GraphStore) -> None:
    keys = [r["key"] for r in graph.read(cypher.CLASS_SET_KEYS, key="test")][:4]
    vectors = {k: [float(i), 0.5, -1.0] for i, k in enumerate(keys)}
    assert graph.write_embeddings("ogc-test-1", vectors, {k: ["a prompt"] for k in keys}) == 4
    assert graph.read_embeddings("ogc-test-1") == vectors
    assert graph.read_embeddings("ogc-other") == {}
    with pytest.raises(ValueError, match="share one dimension"):
        graph.write_embeddings("ogc-test-1", {keys[0]: [1.0, 2.0]})
    with pytest.raises(ValueError, match="unknown classes: nope"):
        graph.write_embeddings("ogc-test-2", {"nope": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="finite"):
        graph.write_embeddings("ogc-test-2", {keys[0]: [float("nan"), 1.0, 2.0]})
    assert graph.read_embeddings("ogc-test-2") == {}
    graph.write("MATCH (e:TextEmbedding) WHERE e.model_version STARTS WITH 'ogc-test' DETACH DELETE e")


def _cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OGCLIP_HOME": str(settings.home), "OGCLIP_KG_BOLT_PORT": str(settings.kg_bolt_port),
           "OGCLIP_KG_HTTP_PORT": str(settings.kg_http_port)}
    env.pop("OGCLIP_NEO4J_URI", None)
    return subprocess.run([sys.executable, "-m", "ogclip_jobs.cli", "kg", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_as_a_new_user_types_it(kg_settings: Settings, graph: GraphStore) -> None:
    if graph.uri != server.bolt_uri(kg_settings):
        pytest.skip("the CLI test drives the embedded server")
    assert "running" in _cli(kg_settings, "up").stdout
    state = json.loads(_cli(kg_settings, "status", "--json").stdout)
    assert state["running"] and state["uri"] == server.bolt_uri(kg_settings)
    result = _cli(kg_settings, "query",
                  "MATCH (t:Target)-[:IS_A*]->(c:Category) RETURN t.name AS target, collect(c.name) AS path LIMIT 5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "target\tpath" and len(result.stdout.splitlines()) == 6
    refused = _cli(kg_settings, "query", "MATCH (n) DETACH DELETE n")
    assert refused.returncode == 2 and "refused" in refused.stderr and "Traceback" not in refused.stderr
    checked = _cli(kg_settings, "check")
    assert checked.returncode == 0 and "errors: 0" in checked.stdout
    contradicted = next(line for line in checked.stdout.splitlines() if line.startswith("derived categories"))
    assert int(contradicted.rsplit(": ", 1)[1]) >= 1
    assert "category confidence (IS_A.confidence): high " in checked.stdout
    prompts = json.loads(_cli(kg_settings, "prompts", "--limit", "3", "--vlm").stdout)
    assert len(prompts) == 3 and all("vlm" in p and "description" in p["prompts"] for p in prompts)


def _reaped(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie counts: it has exited, only not yet been waited for)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_server_lifecycle(tmp_path: Path) -> None:
    bolt_port, http_port = free_ports(2)
    settings = Settings(home=tmp_path, kg_bolt_port=bolt_port, kg_http_port=http_port, neo4j_uri=None,
                        neo4j_password=None)
    assert not server.status(settings).running
    started = server.up(settings)
    assert started.running and server.up(settings).pid == started.pid, "up is idempotent"
    credentials = settings.kg_dir / "credentials.json"
    assert credentials.stat().st_mode & 0o077 == 0, "the generated password is private to its owner"
    with GraphStore.from_settings(settings) as store:
        assert store.read("RETURN 1 AS one") == [{"one": 1}]
        # A client still connected does not keep the stopped server's process alive.
        assert not server.down(settings).running
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _reaped(started.pid):
            time.sleep(0.2)
        assert _reaped(started.pid), "the server process ended"
    with pytest.raises(GraphConnectionError, match="ogclip kg up"):
        GraphStore.from_settings(settings)
