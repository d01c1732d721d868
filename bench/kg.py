"""Knowledge-graph throughput: seed load time, and prompt generation for 5,000 classes with batched UNWIND reads
versus one query per class, measured in the same run on the same server.

Uses Neo4j when OGCLIP_NEO4J_URI is set (a scratch database: it is cleared and reseeded), else starts an embedded
server of its own in a temporary folder on free ports.

    python bench/kg.py [--classes 5000] [--batch 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import ExitStack
from itertools import cycle, islice
from pathlib import Path

from ogclip.settings import Settings, free_ports
from ogclip_kg import cypher, server
from ogclip_kg.prompts import class_prompts, fetch_class_facts
from ogclip_kg.seeds import seed_graph
from ogclip_kg.store import GraphStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=5000, help="class lookups (cycling over the seed's classes)")
    parser.add_argument("--batch", type=int, default=1000, help="keys per UNWIND query")
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


if __name__ == "__main__":
    main()
