"""What every job needs before it starts: a Ray to run on and the knowledge graph to read from."""

from __future__ import annotations

import os

import ray

from ogclip.settings import get_settings
from ogclip_kg.store import GraphStore


def ensure_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``), else start a local Ray of this process
    (``address="local"``: a ``ray start`` cluster elsewhere on the machine is not joined by accident)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    # Ray 2.60's V2 file readers list files in a task that asks for a whole CPU and cannot be told otherwise;
    # beside a stage actor or a training worker on a small Ray it never schedules and the job hangs.
    ray.data.DataContext.get_current().use_datasource_v2 = False


def open_graph(seed_if_empty: bool = True) -> GraphStore:
    """A store on the configured graph: Neo4j when ``OGCLIP_NEO4J_URI`` is set, else the embedded server (started
    if needed). An empty graph is seeded first, so a fresh machine runs any job without a separate step."""
    from ogclip_kg import server
    from ogclip_kg.seeds import seed_graph

    settings = get_settings()
    if not settings.neo4j_uri:
        server.up(settings)
    store = GraphStore.from_settings(settings)
    if seed_if_empty and store.counts()["Target"] == 0:
        seed_graph(store)
    return store
