"""Shared fixtures and helpers, and marker handling: ``gpu`` tests skip without CUDA, ``neo4j`` tests without a
server URI."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import ogclip
from ogclip.synth import TargetClass, render
from ogclip_jobs.data.images import png_bytes


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_neo4j = pytest.mark.skip(reason="needs OGCLIP_NEO4J_URI pointing at a Neo4j server")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "neo4j" in item.keywords and not os.environ.get("OGCLIP_NEO4J_URI"):
            item.add_marker(skip_neo4j)


# Small versions of the shipped architectures: same code paths, CPU-fast.
MICRO_OPENCLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
MICRO_MINILM = {"vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8}}


@pytest.fixture(scope="session", autouse=True)
def _stop_local_ray():
    """Shut down the local Ray of :func:`local_ray` when the session ends."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray (2 CPUs) in this test process, started at first use and then kept for the next modules that
    need one (a start costs ~10 s on 2 cores); a test that needs a Ray of its own shuts it down first."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().use_datasource_v2 = False
    yield


@pytest.fixture(scope="session")
def micro_openclip() -> ogclip.OGCLIP:
    """OG-CLIP with an open_clip text transformer (the ViT-L/14 layout, shrunk)."""
    torch.manual_seed(0)
    return ogclip.create_model("og-clip-vit-l-14", device="cpu", **MICRO_OPENCLIP)


@pytest.fixture(scope="session")
def micro_minilm() -> ogclip.OGCLIP:
    """OG-CLIP with the pretrained MiniLM text tower (the og-clip-tiny layout, shrunk)."""
    torch.manual_seed(0)
    return ogclip.create_model("og-clip-tiny", device="cpu", **MICRO_MINILM)


@pytest.fixture(params=["micro_openclip", "micro_minilm"])
def model(request: pytest.FixtureRequest) -> ogclip.OGCLIP:
    """Each text-tower family in turn; tests must not leave the shared model modified."""
    return request.getfixturevalue(request.param)


def images_and_masks(batch: int = 3, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=generator)
    masks = (torch.rand(batch, 1, size, size, generator=generator) > 0.5).float()
    return images, masks


@pytest.fixture(scope="session")
def kg_settings(tmp_path_factory: pytest.TempPathFactory):
    """Settings for an embedded graph server of the test session's own (own folder, free ports), started once."""
    from ogclip.settings import Settings, free_ports
    from ogclip_kg import server

    bolt_port, http_port = free_ports(2)
    settings = Settings(home=tmp_path_factory.mktemp("ogclip-home"), kg_bolt_port=bolt_port,
                        kg_http_port=http_port, neo4j_uri=None, neo4j_password=None)
    server.up(settings)
    yield settings
    server.down(settings)


@pytest.fixture(scope="session", params=["embedded", pytest.param("neo4j", marks=pytest.mark.neo4j)])
def graph(request: pytest.FixtureRequest):
    """A seeded graph: the embedded server always, and Neo4j when OGCLIP_NEO4J_URI is set (a scratch database:
    the contract tests clear and reseed it)."""
    from ogclip.settings import Settings
    from ogclip_kg.seeds import seed_graph
    from ogclip_kg.store import GraphStore

    settings = request.getfixturevalue("kg_settings") if request.param == "embedded" else Settings()
    store = GraphStore.from_settings(settings)
    if request.param == "neo4j":
        store.clear()
    store.seed_summary = seed_graph(store)
    yield store
    store.close()


@pytest.fixture
def job_settings(kg_settings, monkeypatch: pytest.MonkeyPatch):
    """Point the jobs' settings (read from the environment) at the test session's graph server."""
    from ogclip.settings import get_settings

    for name, value in {"OGCLIP_HOME": kg_settings.home, "OGCLIP_KG_BOLT_PORT": kg_settings.kg_bolt_port,
                        "OGCLIP_KG_HTTP_PORT": kg_settings.kg_http_port}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("OGCLIP_NEO4J_URI", raising=False)
    get_settings.cache_clear()
    yield kg_settings
    get_settings.cache_clear()


def write_shards(graph, folder: Path, classes: int = 6, per_class: int = 8) -> list[str]:
    """Rendered training rows of the first ``classes`` train classes as a Parquet shard, like the pipeline's."""
    from ogclip_kg import cypher
    from ogclip_kg.prompts import fetch_class_facts

    keys = sorted(r["key"] for r in graph.read(cypher.CLASS_SET_KEYS, key="train"))[:classes]
    rows = {"image": [], "mask": [], "label": [], "caption": []}
    for fact_row in fetch_class_facts(graph, keys):
        target = TargetClass.from_facts(fact_row)
        for i in range(per_class):
            sample = render(target, seed=i, size=64)
            rows["image"].append(png_bytes(sample.image))
            rows["mask"].append(png_bytes(sample.mask))
            rows["label"].append(fact_row["key"])
            rows["caption"].append(f"A photo of {fact_row['name']}.")
    folder.mkdir(parents=True)
    pq.write_table(pa.table(rows), folder / "part-0.parquet")
    return keys
