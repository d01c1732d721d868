"""Curation pipeline throughput: images/s end to end and per stage on local Ray with 1 and with 2 CPUs, and the
same work in a plain single-process loop (the baseline), all in one run.

The work: render N synthetic images, dedup hashes, embeddings for the quality filter (an og-clip-tiny bundle
with fresh weights, exported here: the filter embeds with a bundle), CPU mask prediction, template captions,
Parquet shards. Ray runs the pipeline twice per CPU count: as a full run (the row stages in one streaming
execution, then the shards) and stage by stage (``--stage``: each stage its own execution, Parquet in between),
which gives the per-stage figures. Ray's figures include its real overheads (actor start-up, writes).

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


def ray_run(images: int, size: int, cpus: int, bundle: Path, alone: bool) -> dict[str, float]:
    """Seconds on local Ray with ``cpus`` CPUs (every stage runs up to ``cpus`` tasks or actors at once): per stage,
    each run alone, or of the streamed row stages (``stream``) and the shards of a full run."""
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
            pipeline = Pipeline(cfg, classes(), log=lambda _: None)
            if alone:
                return {name: pipeline.run(only=name)[name]["seconds"] for name in STAGES}
            records = pipeline.run()
        return {"stream": records["ingest"]["streamed"], "shards": records["shards"]["seconds"]}
    finally:
        ray.shutdown()


def plain_run(images: int, size: int, bundle: Path) -> tuple[dict[str, float], float]:
    """The same stage code called in one process, batch by batch, no Ray and no Parquet in between: seconds per
    stage, and how many of the quality stage's were its embedder's start."""
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
    render, check = stages.RenderTargets(targets, size, 0), stages.DecodeCheck()
    batch = timed("ingest", lambda part: check(render(part)), items)  # the ingest stage: render, then the check
    batch = timed("dedup", stages.HashImages(), batch)
    started = time.perf_counter()
    embedder = stages.EmbedImages(bundle)  # on the clock, as the Ray runs start their quality actors on theirs
    embedder_start = time.perf_counter() - started
    batch = timed("quality", embedder, batch)
    seconds["quality"] += embedder_start
    started = time.perf_counter()
    find_outliers([{"id": i, "label": lab, "embedding": e} for i, lab, e in
                   zip(batch["id"], batch["label"], batch["embedding"], strict=True)], 0.15, 3)
    seconds["quality"] += time.perf_counter() - started
    batch = timed("masks", stages.CpuSegmenter(), batch)
    batch = timed("captions", stages.TemplateCaptioner(classes()), batch)
    seconds["shards"] = 0.0
    return seconds, embedder_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    images = args.images // len(classes()) * len(classes())

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        bundle = export_bundle(create_model("og-clip-tiny", device="cpu"), Path(folder) / "bundle").path
        plain, embedder_start = plain_run(images, args.size, bundle)
        streamed = {cpus: ray_run(images, args.size, cpus, bundle, alone=False) for cpus in (1, 2)}
        alone = {cpus: ray_run(images, args.size, cpus, bundle, alone=True) for cpus in (1, 2)}
    print(f"{images} images of {args.size}px; images/s (higher is better)")
    runs = {"plain loop": plain, "ray 1 cpu": alone[1], "ray 2 cpus": alone[2]}
    print(f"{'stage':<10}" + "".join(f"{name:>14}" for name in runs) + "   (ray: each stage run alone)")
    for stage in STAGES:
        cells = [images / runs[name][stage] if runs[name][stage] else float("nan") for name in runs]
        print(f"{stage:<10}" + "".join(f"{c:>14.1f}" for c in cells))
    totals = {"plain loop": sum(plain.values()), **{f"ray {c} cpu{'s' if c > 1 else ''}, streamed": sum(r.values())
                                                    for c, r in streamed.items()},
              **{f"ray {c} cpu{'s' if c > 1 else ''}, stage by stage": sum(r.values()) for c, r in alone.items()}}
    for name, seconds in totals.items():
        print(f"end to end, {name:<28} {images / seconds:>8.1f} images/s ({seconds:.1f}s)")
    for cpus, run in streamed.items():
        print(f"  streamed on {cpus} cpu{'s' if cpus > 1 else ''}: row stages {run['stream']:.1f}s, "
              f"shards {run['shards']:.1f}s")
    plain_s, one, two = totals["plain loop"], sum(streamed[1].values()), sum(streamed[2].values())
    print(f"streamed: ray 2 cpus / plain loop {plain_s / two:.2f}x, 2 cpus / 1 cpu {one / two:.2f}x; "
          f"stage by stage: ray 2 cpus / plain loop {plain_s / sum(alone[2].values()):.2f}x "
          f"(the plain loop writes no shards)")
    print(f"the plain loop's embedder started in {embedder_start:.1f}s (in its quality stage and end to end); "
          f"without it: ray 2 cpus / plain loop {(plain_s - embedder_start) / two:.2f}x streamed")


if __name__ == "__main__":
    main()
