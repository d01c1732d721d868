"""The main job on the embedded defaults, end to end: the knowledge graph, the synthetic world through the curation
pipeline, OG-CLIP on Ray Train, zero-shot evaluation on unseen classes, the ablation, and the export to serving."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ogclip.models import create_model
from ogclip_jobs.ablation import VARIANTS, run_ablation
from ogclip_jobs.config import AblationConfig, DemoConfig
from ogclip_jobs.data.pipeline import run_pipeline
from ogclip_jobs.evaluate import run_evaluation
from ogclip_jobs.probe import run_probe
from ogclip_jobs.runtime import ensure_ray, open_graph, ray_log_folder, verbose
from ogclip_jobs.train import run_training

_log = logging.getLogger(__name__)

SHARDS = Path("stages/shards/parquet")


def plug_and_play_gap(model_name: str) -> float:
    """Max |Δ| between a fresh OG-CLIP's embeddings with and without a mask: 0 because the ROI conv starts at 0."""
    model = create_model(model_name, device="cpu").eval()
    size = model.cfg.image_size
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    masks = (torch.rand(4, 1, size, size, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    with torch.no_grad():
        return float((model.encode_image(images, masks) - model.encode_image(images)).abs().max())


def wire(cfg: DemoConfig) -> DemoConfig:
    """Point every stage's inputs and outputs at folders under ``output_dir``."""
    out = cfg.output_dir
    train_data = cfg.train_data and cfg.train_data.model_copy(update={"output_dir": out / "data-train"})
    test_data = cfg.test_data.model_copy(update={"output_dir": out / "data-test"})
    train = cfg.train.model_copy(update={"data": train_data.output_dir / SHARDS if train_data else cfg.train.data,
                                         "output_dir": out / "train", "prompts": "kg", "visual_prompt": "roi"})
    evaluation = cfg.eval.model_copy(update={"bundle": out / "train" / train.name / "bundle",
                                             "data": test_data.output_dir / SHARDS, "output_dir": out / "eval",
                                             "prompts": "kg", "visual_prompt": "roi", "compare_prompts": ["label"]})
    probe = cfg.probe.model_copy(update={"bundle": evaluation.bundle, "output_dir": out / "probe"})
    return cfg.model_copy(update={"train_data": train_data, "test_data": test_data, "train": train,
                                  "eval": evaluation, "probe": probe})


def evaluate_bundle(cfg: DemoConfig, log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """Step 4 on a wired config: zero-shot mAcc under every mask mode and by look, against class embeddings from
    the graph's prompts and from the class names alone, and the attribute probes; the figures for ``demo.json``
    (keys ``eval`` and ``probe``)."""
    report = run_evaluation(cfg.eval, log)
    figures = {k: report[k] for k in ("model_version", "macc", "mask_mode", "macc_by_dim", "per_super_category",
                                      "looks", "cost")}
    figures["macc_by_mask_mode"] = {mode: s["macc"] for mode, s in report["mask_modes"].items()}
    figures["mask_iou"] = {mode: s["mask_iou"] for mode, s in report["mask_modes"].items()
                           if s["mask_iou"] is not None}
    figures["macc_label_prompts"] = report["by_prompts"]["label"]["macc"]
    probe = run_probe(cfg.probe, lambda line: log(f"      {line}"))
    return {"eval": figures, "probe": probe["rows"]}


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """Run every step, print what it does, and return the figures (also in ``output_dir/demo.json``)."""
    cfg = wire(cfg)
    started = time.perf_counter()
    summary: dict[str, Any] = {}
    steps = 6 if cfg.ablation else 5

    def step(i: int, text: str) -> None:
        log(f"\n[{i}/{steps}] {text}  (t+{time.perf_counter() - started:.0f}s)")

    step(1, "knowledge graph: start the embedded server if needed, seed it if empty")
    with open_graph() as store:
        counts = store.counts()
    log("      " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    ensure_ray(cfg.ray_num_cpus)
    gap = plug_and_play_gap(cfg.train.model)
    log(f"      plug-and-play: a fresh {cfg.train.model} with vs without a mask differs by {gap:.1e} (ROI starts at 0)")
    summary.update(graph=counts, fresh_mask_gap=gap)

    curated = {"train": cfg.train_data, "test": cfg.test_data} if cfg.train_data else {"test": cfg.test_data}
    step(2, "curation pipeline on Ray Data: " + " and ".join(f"the synthetic world's {name} classes"
                                                             for name in curated))
    for name, data in curated.items():
        records = run_pipeline(data, log=lambda line: log(f"      {line}"))
        summary[f"data_{name}"] = {stage: {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
                                   for stage, r in records.items()}

    step(3, f"OG-CLIP on Ray Train: {cfg.train.train.steps} steps, then export the bundle and class embeddings")
    model, trained = run_training(cfg.train, log)
    summary["train"] = trained

    step(4, f"zero-shot evaluation of the exported bundle on the unseen test classes ({', '.join(cfg.eval.mask_modes)} "
            "masks; seen and new looks), with the graph's prompts and, on the same features, the class names alone; "
            "attribute probes of its image and text features")
    summary.update(evaluate_bundle(cfg, log))

    if cfg.ablation:
        step(5, f"ablation: {len(VARIANTS) - 1} more models with the same budget (the OG-CLIP row is step 3's)")
        ablation = run_ablation(AblationConfig(train=cfg.train, eval=cfg.eval, output_dir=cfg.output_dir / "ablation"),
                                log, trained={"+Adaptive MRL (OG-CLIP)": model})
        summary["ablation"] = {name: {"macc": r["macc"], "macc_by_dim": r["macc_by_dim"]}
                               for name, r in ablation.items()}

    step(steps, "the serving contract: the bundle and its class embeddings, read back from the graph")
    with open_graph() as store:
        stored = store.read_embeddings(trained["model_version"])
    log(f"      model version {trained['model_version']}: {len(stored)} class embeddings of "
        f"{len(next(iter(stored.values())))} dims in the graph; bundle at {trained['bundle']}")
    summary["seconds"] = round(time.perf_counter() - started, 1)
    (cfg.output_dir / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    log(f"\ndone in {summary['seconds']:.0f}s. Outputs under {cfg.output_dir}/: "
        + " ".join(f"data-{name}/" for name in curated) + " (shards), "
        f"train/{cfg.train.name}/ (checkpoints, metrics.jsonl, bundle/), eval/report.md, "
        "probe/probe.md"
        + (", ablation/ablation.md" if cfg.ablation else "") + ", demo.json"
        + (f". Ray's logs: {ray_log_folder()}" if not verbose() and ray_log_folder() else ""))
    return summary
