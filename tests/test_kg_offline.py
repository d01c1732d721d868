"""Graph logic that needs no server: the read-only guard, name normalisation, the seed, class sets, prompts."""

from __future__ import annotations

import collections

import pytest
import torch

from ogclip.synth import COLOURS, PATTERNS, SILHOUETTES, SIZES
from ogclip_kg import cypher
from ogclip_kg.prompts import class_prompts, description, embed_classes, prompt_texts, prompts_for, vlm_prompt
from ogclip_kg.quality import near_duplicates
from ogclip_kg.seeds import (
    build_seed,
    category_conflicts,
    look,
    military_role,
    normalized_name,
    select_class_sets,
)


@pytest.fixture(scope="module")
def records():
    return build_seed()


@pytest.mark.parametrize("query", [
    "MATCH (n) RETURN n LIMIT 5",
    "MATCH (t:Target {name: 'CREATE'}) RETURN t",
    "MATCH (t:Target) WHERE t.name STARTS WITH $p RETURN t.name  // DELETE everything",
    "MATCH (t:`SET`) RETURN t",
    "MATCH (t:Target) RETURN {key: t.key, name: toUpper(t.name), month: date.truncate('month', date())} AS row",
    "CALL db.labels() YIELD label RETURN label",
    "MATCH (t:Target)-[:IS_A*]->(c) RETURN t.name, collect(c.name) LIMIT 5",
])
def test_read_queries_pass_the_guard(query: str) -> None:
    assert cypher.read_only_violation(query) is None


@pytest.mark.parametrize("query", [
    "CREATE (n:Target {key: 'x'})",
    "match (n) detach delete n",
    "MATCH (n:Target) SET n.name = 'x' RETURN n",
    "MERGE (n:Target {key: 'x'}) RETURN n",
    "MATCH (n) REMOVE n.name",
    "DROP CONSTRAINT target_key",
    "LOAD CSV FROM 'file:///etc/passwd' AS line RETURN line",
    "CALL apoc.periodic.iterate('MATCH (n) RETURN n', 'DELETE n', {})",
    "MATCH (n) CALL { WITH n DELETE n } RETURN 1",
    "MATCH (n) RETURN n; MATCH (m) RETURN m",
    "MATCH (n) FOREACH (x IN [1] | CREATE (:Target))",
    "/* harmless */ MATCH (n) WITH n DELETE n",
    "RETURN {a: util.sleep(8000)} AS m",
    "WITH {a: `util.sleep`(1)} AS m RETURN m",
    "RETURN [x IN range(1, 4) | {a: sql.version()}] AS m",
    "RETURN size(TEXT.random(2000000000)) AS n",
    "RETURN geo.buffer('POINT (1 2)', 1.0, {quadrantSegments: 10000000}) AS g",
    "WITH reduce(s = 'ab', i IN range(1, 19) | s + s) AS s RETURN text.JaroWinklerDistance(s, reverse(s)) AS d",
    "",
])
def test_writes_and_admin_are_refused(query: str) -> None:
    assert cypher.read_only_violation(query)


def test_labels_and_relationships_come_from_allow_lists() -> None:
    assert cypher.label("Target") == "Target"
    for bad in ("Target) DETACH DELETE (n", "target", "Secret"):
        with pytest.raises(ValueError, match="unknown node label"):
            cypher.upsert(bad)
    with pytest.raises(ValueError, match="unknown relationship type"):
        cypher.link("Target", "IS_A]->() DELETE r //", "Category")


def test_designations_are_reduced_to_their_base() -> None:
    assert normalized_name("KC-135R") == normalized_name("KC-135") == "kc135"
    assert normalized_name("F-16C") == "f16" and normalized_name("C-130J-30") == "c130"
    assert normalized_name("A330 202MRTT") == "a330202mrtt"
    assert military_role("F-35A", helicopter=False) == ("fighter", "designation")
    assert military_role("KC-46A", helicopter=False) == ("tanker-aircraft", "designation")
    assert military_role("Tu-160", helicopter=False) == ("bomber", "designation")
    assert military_role("Falcon 7X", helicopter=False) == ("military-transport", "fallback")
    assert military_role("AW-101", helicopter=True) == ("military-helicopter", "stated")


def test_seed_merges_sources_and_derives_renderable_looks(records) -> None:
    by_key = {r.key: r for r in records}
    assert len(records) > 3000 and len(by_key) == len(records)
    supers = collections.Counter(r.super_category for r in records)
    assert supers["military aircraft"] > 300 and supers["warship"] >= 50 and supers["civilian/other"] > 2000
    merged = [r for r in records if any("aircot" in s for s in r.sources) and any("ICAO" in s for s in r.sources)]
    assert len(merged) > 50, "military types must merge with their ICAO entries"
    for record in records:
        facts = {k: v[0] for k, v in record.facts.items()}
        assert facts["silhouette"] in SILHOUETTES and facts["colour"] in COLOURS
        assert facts["size_class"] in SIZES and facts["pattern"] in PATTERNS and facts["accent"] in COLOURS
        assert facts["accent"] != facts["colour"]
        assert all(source for _, _, source in record.facts.values())
    assert records == build_seed(), "the seed is deterministic"


def test_each_category_says_how_it_was_reached_and_what_contradicts_it(records) -> None:
    by_name = {r.name: r for r in records}
    # Stated by a source: a curated warship's role, an AIS ship type, aircot's rotorcraft.
    assert {r.category_confidence for r in records if r.super_category == "warship"} == {"high"}
    assert by_name["cargo ship"].basis == "stated" and by_name["cargo ship"].category_confidence == "high"
    # Read from a designation, and consistent with ICAO's facts where the type has them.
    fighter = next(r for r in records if "F-16" in r.aliases)
    assert fighter.category == "fighter" and fighter.basis == "designation" and not fighter.category_conflicts
    assert fighter.category_confidence == "medium"
    # Contradicted: a turboprop "fighter" (F-27), a piston light "early-warning aircraft", an airliner's model number.
    assert by_name["Conair F-27 Firefighter"].category_conflicts == ["engine_type=Turboprop/Turboshaft"]
    assert by_name["E-7 Group E-7 Bush Hog"].category_conflicts == ["engine_type=Piston", "wake_category=L"]
    assert by_name["B-747-8B5"].category_confidence == "low"
    # The fallback for a military type without a designation is the least certain of all.
    assert by_name["Citation 560 XL"].basis == "fallback" and by_name["Citation 560 XL"].category_confidence == "low"
    assert category_conflicts("military-helicopter", {"aircraft_description": "LandPlane"}) == [
        "aircraft_description=LandPlane"]
    assert category_conflicts("airliner", {"aircraft_description": "LandPlane", "engine_type": "Jet"}) == []
    confidence = collections.Counter(r.category_confidence for r in records)
    assert set(confidence) == {"high", "medium", "low"} and confidence["low"] < 0.15 * len(records)


def test_class_sets_mirror_the_paper_and_are_disjoint(records) -> None:
    by_key = {r.key: r for r in records}
    sets = select_class_sets(records, seed=0)
    assert not set(sets["train"]) & set(sets["test"])
    assert len(sets["train"]) + len(sets["test"]) == len(records)
    counts = collections.Counter(by_key[k].super_category for k in sets["test"])
    assert counts == {"military aircraft": 51, "warship": 29, "civilian/other": 19}
    assert len({look(by_key[k]) for k in sets["test"]}) == 99, "test classes must look different"
    assert len({by_key[k].category for k in sets["test"]}) > 20
    train_categories = {by_key[k].category for k in sets["train"]}
    assert {by_key[k].category for k in sets["test"]} <= train_categories
    small = select_class_sets(records, seed=0, test_scale=0.2)
    assert collections.Counter(by_key[k].super_category for k in small["test"]) == {
        "military aircraft": 10, "warship": 6, "civilian/other": 4}
    assert select_class_sets(records, seed=1)["test"] != sets["test"]


ROW = {
    "key": "f-16", "name": "F-16", "super_category": "military aircraft", "aliases": ["F-16C"],
    "categories": ["fighter"], "operators": ["USAF", "DEU Air Force"], "manufacturers": ["Lockheed Martin"],
    "equipment": ["cannon", "air-to-air missiles"],
    "facts": [{"attribute": "silhouette", "value": "delta wing"}, {"attribute": "colour", "value": "grey"},
              {"attribute": "size_class", "value": "small"}, {"attribute": "pattern", "value": "two-tone"},
              {"attribute": "accent", "value": "black"}, {"attribute": "engine_count", "value": 1},
              {"attribute": "engine_type", "value": "Jet"}],
}


def test_prompts_carry_the_facts_and_are_deterministic() -> None:
    prompts = class_prompts(ROW, seed=0)
    assert set(prompts) == {"label", "label_category", "label_attributes", "description", "appearance"}
    assert prompts == class_prompts(ROW, seed=0)
    assert "F-16" in prompts["label"] and "fighter" in prompts["label_category"]
    assert "delta wing" in prompts["label_attributes"] and "grey" in prompts["label_attributes"]
    assert "F-16" not in prompts["appearance"] and "delta wing" in prompts["appearance"]
    text = description(ROW)
    for fact in ("fighter", "Lockheed Martin", "USAF", "1 jet engine", "delta wing", "two-tone", "black accents"):
        assert fact in text
    assert {description(ROW, seed=s) for s in range(8)} != {text}, "the seed varies the wording"
    vlm = vlm_prompt(ROW)
    assert "F-16" in vlm and "USAF" in vlm and "silhouette" in vlm


def test_graph_facts_become_class_embeddings_through_one_function(micro_minilm) -> None:
    from ogclip.zeroshot import class_embeddings

    facts = [f if f["attribute"] != "colour" else {"attribute": "colour", "value": "white"} for f in ROW["facts"]]
    other = {**ROW, "key": "other", "facts": facts}
    prompts, vectors = embed_classes(micro_minilm, [ROW, other], "kg", seed=0)
    assert prompts == prompts_for([ROW, other]) and prompts[ROW["key"]] == prompt_texts(ROW, "kg")
    assert vectors.shape == (2, micro_minilm.cfg.embed_dim)
    assert torch.allclose(vectors, class_embeddings(micro_minilm, prompts), atol=1e-6)
    assert not torch.allclose(vectors[0], vectors[1]), "another body colour, another class vector"


def test_near_duplicates_by_trigram_similarity() -> None:
    rows = [{"key": "a", "name": "Gulfstream G550", "super_category": "x"},
            {"key": "b", "name": "Gulfstream G-550", "super_category": "x"},
            {"key": "c", "name": "Arleigh Burke-class destroyer", "super_category": "x"},
            {"key": "d", "name": "Gulfstream G550", "super_category": "y"}]
    pairs = near_duplicates(rows, threshold=0.8)
    assert [(a, b) for a, b, _ in pairs] == [("a", "b")]
