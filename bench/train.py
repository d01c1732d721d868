"""Training throughput per recipe: samples/s of each recipe's step in a plain torch loop and under Ray Train with 1
and 2 workers on the same data, in one run (Ray Train's overhead = the ratio to the plain loop; a recipe's extra
cost = its plain-loop rate against OG-CLIP's: DetailCLIP's teacher, second view and decoder); with CUDA,
og-clip-vit-l-14 in bf16 against the FLOP-bound limit of the GPU.

The CPU work: og-clip-tiny, rendered 64 px synthetic targets with their masks, the same prompts, the same
per-worker batch. Ray Train figures are read off the workers' progress lines (the steps after the first logged
one) and also given end to end.
The data are 8 classes × ``--per-class`` renders; with few rows an epoch is a few steps long, and every epoch of a
Ray Train dataset shard starts with a round trip to its split coordinator (``--per-class 24``: an epoch of 6 steps).
DetailCLIP runs with the CPU head of ``infra/configs/detailclip-cpu.yaml``.

    python bench/train.py [--steps 60] [--batch 32] [--recipes og-clip,detail-clip] [--gpu-steps 20]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

from ogclip.config import DetailCLIPRecipeConfig, OGCLIPRecipeConfig
from ogclip.metrics import image_flops
from ogclip.models import create_model
from ogclip.recipes import TrainBatch, create_recipe
from ogclip.synth import PATTERNS, TargetClass, render
from ogclip_jobs.config import TrainConfig, TrainJobConfig
from ogclip_jobs.data.images import png_bytes
from ogclip_jobs.train import (
    DecodeForTraining,
    build_model_config_preprocess,
    build_optimizer,
    fit,
    train_batch,
    train_step,
)

SILHOUETTES = ("delta wing", "swept wing", "straight wing", "rotorcraft")
# Each benchmarked recipe's settings: the defaults, DetailCLIP with the CPU head its shipped config uses.
RECIPES = {"og-clip": OGCLIPRecipeConfig(),
           "detail-clip": DetailCLIPRecipeConfig.model_validate(
               {"head": {"head_hidden": 512, "head_bottleneck": 64, "prototypes": 1024, "decoder_heads": 4}})}


def write_data(folder: Path, per_class: int) -> dict[str, list[str]]:
    """A Parquet shard of rendered targets; returns each class's prompts."""
    rows = {"image": [], "mask": [], "label": [], "caption": []}
    prompts = {}
    for s in SILHOUETTES:
        for pattern in PATTERNS[:2]:
            key = f"{s}-{pattern}".replace(" ", "-")
            target = TargetClass(name=key, super_category="military aircraft", silhouette=s, colour="grey",
                                 pattern=pattern)
            prompts[key] = [f"a photo of a {target.description()}", f"a {key}"]
            for i in range(per_class):
                sample = render(target, seed=i, size=64)
                rows["image"].append(png_bytes(sample.image))
                rows["mask"].append(png_bytes(sample.mask))
                rows["label"].append(key)
                rows["caption"].append(prompts[key][0])
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), folder / "part-0.parquet")
    return prompts


def plain_loop(cfg: TrainJobConfig, prompts: dict[str, list[str]], steps: int) -> float:
    """samples/s of the same step in one process, data decoded up front (no Ray): the batches and texts of the Ray
    Train loop (:func:`train_batch`), from rows drawn at random."""
    classes = sorted(prompts)
    decoded = DecodeForTraining(build_model_config_preprocess(cfg), classes)(
        pq.read_table(next(Path(cfg.data).glob("*.parquet"))).to_pydict())
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker * cfg.num_workers)))
    recipe = create_recipe(cfg.recipe)
    model = recipe.build_model(cfg.model, device="cpu")
    optimizer = build_optimizer(model, cfg.train)
    generator, rng = torch.Generator().manual_seed(0), random.Random(0)
    started = None
    for step in range(steps + 3):
        if step == 3:  # the first steps warm caches and allocators; Ray Train's timer starts later too
            started = time.perf_counter()
        index = torch.randint(len(decoded["label"]), (cfg.train.batch_size,), generator=generator).numpy()
        inputs = train_batch({name: column[index] for name, column in decoded.items()}, model, cfg, prompts, rng)
        train_step(model, recipe, optimizer, step, cfg.train, inputs, generator)
    return steps * cfg.train.batch_size / (time.perf_counter() - started)


def ray_train(cfg: TrainJobConfig, prompts: dict[str, list[str]]) -> tuple[float, float]:
    """(samples/s of the steps after the first logged one, samples/s end to end including start-up) under Ray
    Train. The first rate is read off rank 0's progress lines (``metrics.jsonl``), so it leaves out start-up and
    the first batch's wait, as the plain loop leaves out its first steps."""
    started = time.perf_counter()
    fit(cfg, prompts, sorted(prompts))
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (cfg.output_dir / cfg.name / "metrics.jsonl").read_text().splitlines()]
    logged = [row for row in rows if "samples_per_s" in row]
    first, last = logged[0], logged[-1]
    steps = last["step"] - first["step"]
    return (steps * cfg.train.batch_size * cfg.num_workers / (last["time"] - first["time"]),
            cfg.train.steps * cfg.train.batch_size * cfg.num_workers / wall)


def gpu_figures(steps: int) -> None:
    """og-clip-vit-l-14, bf16 autocast, batch 32 on one GPU: images/s of the train step vs the FLOP bound."""
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device("cuda")
    n = 8192
    a, b = torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device,
                                                                               dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    peak = 20 * 2 * n**3 / (time.perf_counter() - t)
    model = create_model("og-clip-vit-l-14", device=device)
    cfg = TrainConfig(lr=5e-5, warmup_steps=1, steps=steps + 3, batch_size=32)
    optimizer = build_optimizer(model, cfg)
    size = model.cfg.image_size
    images = torch.randn(32, 3, size, size, device=device)
    masks = (torch.rand(32, 1, size, size, device=device) > 0.5).float()
    texts = model.tokenize([f"a photo of target {i}" for i in range(32)])
    labels = torch.arange(32, device=device)
    batch = TrainBatch(images=images, masks=masks, texts=texts, text_owner=labels, labels=labels)
    recipe = create_recipe(OGCLIPRecipeConfig())
    generator = torch.Generator().manual_seed(0)
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, recipe, optimizer, 0, cfg, batch, generator, torch.bfloat16)
    flops = counter.get_total_flops()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for step in range(1, steps + 1):
        train_step(model, recipe, optimizer, step, cfg, batch, generator, torch.bfloat16)
    torch.cuda.synchronize()
    rate = steps * 32 / (time.perf_counter() - t)
    bound = peak / (flops / 32)
    print(f"\nGPU {torch.cuda.get_device_name()}: og-clip-vit-l-14 bf16 train step, batch 32: {rate:.1f} images/s; "
          f"{flops / 32 / 1e9:.0f} GFLOP/image (fwd+bwd, measured), bf16 matmul peak {peak / 1e12:.0f} TFLOP/s → "
          f"FLOP bound {bound:.0f} images/s; ratio {rate / bound:.2f}; forward-only "
          f"{image_flops(model, size) / 1e9:.0f} GFLOP/image")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=256,
                        help="renders per class (8 classes); 256: one worker's epoch outlasts the default 60 steps")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, among {list(RECIPES)}")
    parser.add_argument("--gpu-steps", type=int, default=20)
    args = parser.parse_args()
    recipes = args.recipes.split(",")
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipes {unknown}; known: {list(RECIPES)}")
    figures: dict[str, tuple[float, tuple[float, float], tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "shards"
        prompts = write_data(data, args.per_class)
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)  # 2 for workers, 1 for Ray Data
        ray.data.DataContext.get_current().use_datasource_v2 = False
        try:
            for kind in recipes:
                base = TrainJobConfig(name=f"bench-{kind}", model="og-clip-tiny", data=data, recipe=RECIPES[kind],
                                      output_dir=Path(tmp) / "runs",
                                      train=TrainConfig(lr=5e-4, min_lr=5e-5, warmup_steps=5, steps=args.steps,
                                                        batch_size=args.batch),
                                      num_workers=1, cpus_per_worker=2.0, checkpoint_every=10**6, log_every=10,
                                      export=False, cache_decoded=True, use_gpu=False)
                plain = plain_loop(base, prompts, args.steps)
                one = ray_train(base.model_copy(update={"name": f"{base.name}-one"}), prompts)
                two = ray_train(base.model_copy(update={"name": f"{base.name}-two", "num_workers": 2,
                                                        "cpus_per_worker": 1.0}), prompts)
                figures[kind] = (plain, one, two)
        finally:
            ray.shutdown()
    print(f"og-clip-tiny, 64 px, batch {args.batch} per worker, {args.steps} steps, {torch.get_num_threads()} "
          "CPU threads available")
    print(f"{'recipe':<13}{'run':<30}{'samples/s':>10}{'per worker':>12}{'end to end':>12}{'vs plain':>10}"
          f"{'vs og-clip':>12}")
    reference = figures["og-clip"][0] if "og-clip" in figures else None
    for kind, (plain, one, two) in figures.items():
        cost = f"{plain / reference:>12.2f}" if reference else f"{'':>12}"
        print(f"{kind:<13}{'plain torch loop (2 threads)':<30}{plain:>10.1f}{plain:>12.1f}{'':>12}{1.0:>10.2f}{cost}")
        print(f"{kind:<13}{'Ray Train, 1 worker × 2 CPUs':<30}{one[0]:>10.1f}{one[0]:>12.1f}{one[1]:>12.1f}"
              f"{one[0] / plain:>10.2f}")
        print(f"{kind:<13}{'Ray Train, 2 workers × 1 CPU':<30}{two[0]:>10.1f}{two[0] / 2:>12.1f}{two[1]:>12.1f}"
              f"{two[0] / plain:>10.2f}")
    if torch.cuda.is_available():
        gpu_figures(args.gpu_steps)
    else:
        print("no CUDA device: the og-clip-vit-l-14 bf16 figures need a GPU")


if __name__ == "__main__":
    main()
