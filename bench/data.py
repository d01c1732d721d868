"""Curation pipeline throughput: images/s per stage and end to end on local Ray with 1 and with 2 CPUs, and the
same work in a plain single-process loop (the baseline), all in one run.

The work: render N synthetic images, dedup hashes, embeddings for the quality filter (an og-clip-tiny bundle
with fresh weights, exported here: the filter embeds with a bundle), CPU mask prediction, template captions,
Parquet shards. Ray's figures include its real overheads (actor start-up,
Parquet between stages).

    python bench/data.py [--images 400] [--size 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray
import torch

from ogclip.bundle import export_bundle
from ogclip.models import create_model
from ogclip.synth import TargetClass
from ogclip_jobs.config import (
    CaptionConfig,
    DataPipelineConfig,
    DedupConfig,
    MaskConfig,
    StageResources,
    SynthSourceConfig,
)
from ogclip_jobs.data import stages
from ogclip_jobs.data.pipeline import STAGES, Pipeline, find_outliers

SILHOUETTES = ("delta wing", "swept wing", "straight wing", "rotorcraft", "flying wing")
COLOURS = ("grey", "white")


def classes() -> dict[str, dict]:
    out = {}
    for s in SILHOUETTES:
        for c in COLOURS:
            key = f"{c}-{s}".replace(" ", "-")
            out[key] = {"key": key, "name": key, "super_category": "military aircraft", "aliases": [],
                        "categories": ["fighter"], "operators": [], "manufacturers": [], "equipment": [],
                        "facts": [{"attribute": "silhouette", "value": s}, {"attribute": "colour", "value": c}]}
    return out


def ray_run(images: int, size: int, cpus: int, bundle: Path) -> dict[str, float]:
    """Seconds per stage on local Ray with ``cpus`` CPUs (every stage runs ``cpus`` tasks or actors at once)."""
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        per_class = images // len(classes())
        pool = StageResources(num_cpus=0.5, concurrency=cpus, batch_size=32)
        with tempfile.TemporaryDirectory() as out:
            cfg = DataPipelineConfig(output_dir=Path(out), source=SynthSourceConfig(per_class=per_class,
                                     image_size=size, resources=pool.model_copy(update={"batch_size": 16})),
                                     dedup=DedupConfig(resources=pool.model_copy(update={"batch_size": 64})),
                                     masks=MaskConfig(method="cpu", resources=pool),
                                     captions=CaptionConfig(resources=pool))
            cfg.quality.resources, cfg.quality.model = pool, str(bundle)
            records = Pipeline(cfg, classes(), log=lambda _: None).run()
        return {name: records[name]["seconds"] for name in STAGES}
    finally:
        ray.shutdown()


def plain_run(images: int, size: int, bundle: Path) -> dict[str, float]:
    """The same stage code called in one process, batch by batch, no Ray and no Parquet in between."""
    per_class = images // len(classes())
    items = {"label": [k for k in classes() for _ in range(per_class)],
             "index": [i for _ in classes() for i in range(per_class)]}
    seconds: dict[str, float] = {}

    def timed(name, fn, batch):
        started = time.perf_counter()
        out = {}
        for start in range(0, len(batch["id"] if "id" in batch else batch["label"]), 32):
            part = fn({k: list(v[start:start + 32]) for k, v in batch.items()})
            for k, v in part.items():
                out.setdefault(k, []).extend(v)
        seconds[name] = time.perf_counter() - started
        return out

    targets = {key: TargetClass.from_facts(row) for key, row in classes().items()}
    batch = timed("ingest", stages.RenderTargets(targets, size, 0), items)
    batch = timed("dedup", stages.HashImages(), batch)
    batch = timed("quality", stages.EmbedImages(bundle), batch)
    started = time.perf_counter()
    find_outliers([{"id": i, "label": lab, "embedding": e} for i, lab, e in
                   zip(batch["id"], batch["label"], batch["embedding"], strict=True)], 0.15, 3)
    seconds["quality"] += time.perf_counter() - started
    batch = timed("masks", stages.CpuSegmenter(), batch)
    batch = timed("captions", stages.TemplateCaptioner(classes()), batch)
    seconds["shards"] = 0.0
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    images = args.images // len(classes()) * len(classes())

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        bundle = export_bundle(create_model("og-clip-tiny", device="cpu"), Path(folder) / "bundle").path
        runs = {"plain loop": plain_run(images, args.size, bundle), "ray 1 cpu": ray_run(images, args.size, 1, bundle),
                "ray 2 cpus": ray_run(images, args.size, 2, bundle)}
    print(f"{images} images of {args.size}px; images/s per stage (higher is better)")
    print(f"{'stage':<10}" + "".join(f"{name:>14}" for name in runs))
    for stage in STAGES:
        cells = [images / runs[name][stage] if runs[name][stage] else float("nan") for name in runs]
        print(f"{stage:<10}" + "".join(f"{c:>14.1f}" for c in cells))
    totals = {name: sum(run.values()) for name, run in runs.items()}
    print(f"{'pipeline':<10}" + "".join(f"{images / totals[name]:>14.1f}" for name in runs))
    print(f"scaling ray 2 cpus / 1 cpu: {totals['ray 1 cpu'] / totals['ray 2 cpus']:.2f}x; "
          f"ray 2 cpus / plain loop: {totals['plain loop'] / totals['ray 2 cpus']:.2f}x "
          f"(the plain loop writes no shards)")


if __name__ == "__main__":
    main()
