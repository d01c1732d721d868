"""Knowledge-graph throughput: seed load time, prompt generation for 5,000 classes with batched UNWIND reads
versus one query per class, and the query a serving replica polls (a class set's members and embedding
signatures under one model version) against the pattern-comprehension form it replaced, with several model
versions' embeddings stored; each pair measured in the same run on the same server.

Uses Neo4j when OGCLIP_NEO4J_URI is set (a scratch database: it is cleared and reseeded), else starts an embedded
server of its own in a temporary folder on free ports.

    python bench/kg.py [--classes 5000] [--batch 1000] [--versions 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import ExitStack
from itertools import cycle, islice
from pathlib import Path

import numpy as np

from ogclip.settings import Settings, free_ports
from ogclip_kg import cypher, server
from ogclip_kg.prompts import class_prompts, fetch_class_facts
from ogclip_kg.seeds import seed_graph
from ogclip_kg.store import GraphStore

# The form of cypher.CLASS_SET_STATE before it matched embeddings by their indexed model version: the baseline.
COMPREHENSION_POLL = """MATCH (t:Target)-[:IN_CLASS_SET]->(:ClassSet {key: $key})
RETURN t.key AS key, t.name AS name, t.super_category AS super_category,
       [(e:TextEmbedding)-[:EMBEDS]->(t) WHERE e.model_version = $model_version | [e.dim, e.vector[0]]] AS embedding
ORDER BY key"""


def timed_read(store: GraphStore, query: str, repeats: int, **params) -> tuple[float, list]:
    """Median seconds of ``repeats`` runs of a read, and its rows."""
    seconds, rows = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        rows = store.read(query, **params)
        seconds.append(time.perf_counter() - started)
    return float(np.median(seconds)), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=5000, help="class lookups (cycling over the seed's classes)")
    parser.add_argument("--batch", type=int, default=1000, help="keys per UNWIND query")
    parser.add_argument("--versions", type=int, default=3, help="model versions of embeddings stored for the poll")
    args = parser.parse_args()

    with ExitStack() as stack:
        settings = Settings()
        if not settings.neo4j_uri:
            home = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            bolt_port, http_port = free_ports(2)
            settings = Settings(home=home, kg_bolt_port=bolt_port, kg_http_port=http_port)
            started = time.perf_counter()
            server.up(settings)
            stack.callback(server.down, settings)
            print(f"embedded server started in {time.perf_counter() - started:.1f}s")
        store = stack.enter_context(GraphStore.from_settings(settings))
        store.clear()
        summary = seed_graph(store)
        print(f"full seed: {summary['targets']} targets, {summary['facts']} facts in {summary['seconds']:.1f}s "
              f"(first load into an empty graph)")
        summary = seed_graph(store)
        print(f"reseed (idempotent MERGE, nothing changes): {summary['seconds']:.1f}s")

        all_keys = [r["key"] for r in store.read("MATCH (t:Target) RETURN t.key AS key ORDER BY key")]
        keys = list(islice(cycle(all_keys), args.classes))

        started = time.perf_counter()
        batched = [class_prompts(row) for row in fetch_class_facts(store, keys, batch_size=args.batch)]
        batched_s = time.perf_counter() - started

        started = time.perf_counter()
        single = [class_prompts(store.read(cypher.CLASS_FACTS, keys=[key])[0]) for key in keys]
        single_s = time.perf_counter() - started
        assert batched == single, "both ways must give the same prompts"

        print(f"prompts for {len(keys)} classes ({len(all_keys)} distinct), 4 templates each:")
        print(f"  batched UNWIND ({args.batch} keys/query): {batched_s:6.2f}s  {len(keys) / batched_s:8.0f} classes/s")
        print(f"  one query per class:                {single_s:6.2f}s  {len(keys) / single_s:8.0f} classes/s")
        print(f"  speed-up of batching: {single_s / batched_s:.1f}x")

        rng = np.random.default_rng(0)
        started = time.perf_counter()
        for v in range(args.versions):
            store.write_embeddings(f"bench-{v}", dict(zip(all_keys, rng.standard_normal((len(all_keys), 128)).tolist(),
                                                          strict=True)))
        print(f"{args.versions} model versions x {len(all_keys)} embeddings written in "
              f"{time.perf_counter() - started:.1f}s")
        members = len(store.read(cypher.CLASS_SET_KEYS, key="test"))
        indexed_s, indexed = timed_read(store, cypher.CLASS_SET_STATE, 5, key="test", model_version="bench-0")
        baseline_s, baseline = timed_read(store, COMPREHENSION_POLL, 3, key="test", model_version="bench-0")
        assert indexed == baseline, "both forms must give the same state"
        print(f"a replica's poll of the {members}-class test set (median):")
        print(f"  embeddings matched by model version:         {1000 * indexed_s:8.1f} ms")
        print(f"  pattern comprehension filtered by version:   {1000 * baseline_s:8.1f} ms")
        print(f"  speed-up: {baseline_s / indexed_s:.0f}x")


if __name__ == "__main__":
    main()
