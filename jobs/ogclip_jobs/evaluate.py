"""Zero-shot evaluation on the unseen test classes, and the building-block ablation (paper Tables 1–4).

Only test-set classes are candidates and only their images are scored, so every figure is true zero-shot: the
model never saw these classes, only their graph descriptions. Reports: per-class top-1, mAcc, mAcc per
super-category, mAcc at every embedding size, the cost table (parameters, FLOPs, images/s); Markdown, JSON, PNG.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from ogclip.bundle import load_bundle
from ogclip.config import AblationConfig, EvalConfig, PromptMode, TrainJobConfig, VisualPromptName
from ogclip.metrics import image_flops, per_class_accuracy, zero_shot_predict
from ogclip.models import OGCLIP, truncate
from ogclip.transforms import apply_visual_prompt
from ogclip.zeroshot import class_embeddings
from ogclip_jobs.train import DecodeForTraining, data_labels, prompts_for, run_training

# The ablation: (prompts, visual prompt, MRL) per variant, in the paper's Table 3 order, then the baselines.
VARIANTS: dict[str, tuple[PromptMode, VisualPromptName, str]] = {
    "CLIP": ("label", "none", "none"),
    "+KG-Aug": ("kg", "none", "none"),
    "+ROI": ("kg", "roi", "none"),
    "+Adaptive MRL (OG-CLIP)": ("kg", "roi", "adaptive"),
    "plain MRL": ("kg", "roi", "uniform"),
    "Red-Circle": ("kg", "red_circle", "none"),
    "Mask-adapted CLIP": ("kg", "background_mask", "none"),
}
# Which ablation runs give the accuracy-vs-dimension curves.
DIM_CURVES = {"Adaptive MRL": "+Adaptive MRL (OG-CLIP)", "plain MRL": "plain MRL", "naive truncation": "+ROI"}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


@torch.no_grad()
def encode_test_images(model: OGCLIP, data: Path, classes: list[str], visual_prompt: VisualPromptName,
                       batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-size image features and class indices of every test image (decoded by Ray Data, encoded here)."""
    from ogclip_jobs.runtime import ensure_ray

    ensure_ray()
    preprocess = model.cfg.preprocess.model_dump(mode="json")
    ds = ray.data.read_parquet(str(data), columns=["image", "mask", "label", "caption"], num_cpus=0.25).map_batches(
        DecodeForTraining, fn_constructor_kwargs={"preprocess": preprocess, "classes": classes, "train": False},
        batch_size=batch_size, num_cpus=0.25, concurrency=1, batch_format="numpy")
    model.eval()
    features, labels = [], []
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        images, masks = torch.from_numpy(batch["image"]), torch.from_numpy(batch["mask"])
        images, masks = apply_visual_prompt(images, masks, visual_prompt, model.cfg.preprocess)
        features.append(model.image_features(images.to(model.device), masks.to(model.device)).float().cpu())
        labels.append(torch.from_numpy(batch["label"]))
    if not features:
        raise ValueError(f"no test images of the {len(classes)} test classes under {data}")
    return torch.cat(features), torch.cat(labels)


def zero_shot_scores(image_features: torch.Tensor, labels: torch.Tensor, class_vectors: torch.Tensor,
                     dims: list[int], super_categories: list[str]) -> dict[str, Any]:
    """Per-class top-1 at D, mAcc at every size in ``dims`` and per super-category at D (NaN classes skipped)."""
    by_dim, per_class = {}, None
    for dim in dims:
        predictions = zero_shot_predict(truncate(image_features, dim), truncate(class_vectors, dim))
        accuracy = per_class_accuracy(predictions, labels, len(class_vectors))
        by_dim[dim] = float(accuracy.nanmean())
        per_class = accuracy
    groups: dict[str, list[float]] = {}
    for category, acc in zip(super_categories, per_class.tolist(), strict=True):
        if not np.isnan(acc):
            groups.setdefault(category, []).append(acc)
    return {"macc": by_dim[dims[-1]], "macc_by_dim": by_dim, "per_class": per_class.tolist(),
            "per_super_category": {k: float(np.mean(v)) for k, v in sorted(groups.items())},
            "images": int(len(labels))}


def cost(model: OGCLIP, batch: int = 8, min_seconds: float = 2.0) -> dict[str, float]:
    """Parameters, GFLOPs per image and measured images/s of the image encoder with its mask (paper Table 4)."""
    size = model.cfg.image_size
    images = torch.randn(batch, 3, size, size, device=model.device)
    masks = torch.ones(batch, 1, size, size, device=model.device)
    model.eval()
    with torch.no_grad():
        model.encode_image(images, masks)  # warm-up
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < min_seconds:
            model.encode_image(images, masks)
            done += batch
        rate = done / (time.perf_counter() - started)
    return {"params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "trainable_M": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
            "gflops_per_image": image_flops(model, size) / 1e9, "images_per_s": rate}


def eval_classes(store: Any, cfg: EvalConfig) -> list[dict[str, Any]]:
    """The fact rows of the evaluation class set's classes that have test images."""
    from ogclip_kg import cypher
    from ogclip_kg.prompts import fetch_class_facts

    keys = {r["key"] for r in store.read(cypher.CLASS_SET_KEYS, key=cfg.class_set)}
    if not keys:
        raise ValueError(f"class set {cfg.class_set!r} is empty or unknown")
    present = sorted(keys & set(data_labels(cfg.data)))
    if not present:
        raise ValueError(f"none of the {len(keys)} classes of {cfg.class_set!r} has images under {cfg.data}")
    return sorted(fetch_class_facts(store, present), key=lambda r: r["key"])


def evaluate_model(model: OGCLIP, rows: list[dict[str, Any]], cfg: EvalConfig) -> dict[str, Any]:
    """Zero-shot scores of ``model`` on ``cfg.data`` with ``rows``' classes as the only candidates."""
    classes = [r["key"] for r in rows]
    prompts = prompts_for(rows, cfg.prompts, cfg.seed)
    vectors = class_embeddings(model, prompts).cpu()
    features, labels = encode_test_images(model, cfg.data, classes, cfg.visual_prompt, cfg.batch_size)
    scores = zero_shot_scores(features, labels, vectors, model.dims, [r["super_category"] for r in rows])
    scores["classes"] = classes
    return scores


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _plot(curves: dict[str, dict[int, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_dim in curves.items():
        dims = sorted(by_dim)
        ax.plot(dims, [100 * by_dim[d] for d in dims], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding dimension")
    ax.set_ylabel("zero-shot mAcc on unseen classes (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_markdown(name: str, scores: dict[str, Any], rows: list[dict[str, Any]], costs: dict[str, float]) -> str:
    """The evaluation report: mAcc per super-category (Tables 1–2), by dimension, cost (Table 4), per class."""
    chance = 100.0 / len(rows)
    parts = [f"# Zero-shot evaluation: {name}", "",
             f"{len(rows)} unseen test classes, {scores['images']} images; chance {chance:.1f}%.", "",
             _table(["super-category", "mAcc %"], [[k, 100 * v] for k, v in scores["per_super_category"].items()]
                    + [["all (mAcc)", 100 * scores["macc"]]]), "",
             _table(["dim", *map(str, scores["macc_by_dim"])], [["mAcc %", *(100 * v for v in
                                                                            scores["macc_by_dim"].values())]]), "",
             _table(["params (M)", "trainable (M)", "GFLOPs/image", "images/s"],
                    [[costs["params_M"], costs["trainable_M"], f"{costs['gflops_per_image']:.3f}",
                      costs["images_per_s"]]]), "",
             _table(["class", "super-category", "top-1 %"],
                    [[r["name"], r["super_category"], "–" if np.isnan(a) else 100 * a]
                     for r, a in zip(rows, scores["per_class"], strict=True)])]
    return "\n".join(parts) + "\n"


def run_evaluation(cfg: EvalConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``ogclip eval``: load the bundle, score it, write ``report.{md,json}`` and ``macc_by_dim.png``."""
    from ogclip_jobs.runtime import open_graph

    model, info = load_bundle(cfg.bundle)
    with open_graph() as store:
        rows = eval_classes(store, cfg)
    scores = evaluate_model(model, rows, cfg)
    costs = cost(model, cfg.cost_batch)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    report = {"model_version": info.model_version, "bundle": str(cfg.bundle), **scores, "cost": costs,
              "config": cfg.model_dump(mode="json")}
    (cfg.output_dir / "report.json").write_text(json.dumps(report, indent=2))
    (cfg.output_dir / "report.md").write_text(report_markdown(info.model_version, scores, rows, costs))
    _plot({info.model_version: scores["macc_by_dim"]}, cfg.output_dir / "macc_by_dim.png",
          "accuracy vs embedding dimension")
    log(f"zero-shot mAcc on {len(rows)} unseen classes: {100 * scores['macc']:.1f}% (chance {100 / len(rows):.1f}%); "
        + ", ".join(f"{k} {100 * v:.1f}%" for k, v in scores["per_super_category"].items()))
    log(f"report in {cfg.output_dir / 'report.md'}")
    return report


def variant_config(train: TrainJobConfig, name: str) -> TrainJobConfig:
    """The training config of one ablation variant: the shared budget, the variant's components, no export."""
    prompts, visual, mrl = VARIANTS[name]
    return train.model_copy(update={"name": f"{train.name}-{_slug(name)}", "prompts": prompts,
                                    "visual_prompt": visual, "mrl": mrl, "export": False})


def run_ablation(cfg: AblationConfig, log: Callable[[str], None] = print,
                 trained: dict[str, OGCLIP] | None = None) -> dict[str, Any]:
    """Train every variant with the same budget and score each zero-shot on the unseen classes.

    ``trained`` holds variants already trained by the caller with this budget (the demo's main run is OG-CLIP).
    """
    from ogclip_jobs.runtime import open_graph

    names = cfg.variants or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown ablation variants {unknown}; known: {list(VARIANTS)}")
    with open_graph() as store:
        rows = eval_classes(store, cfg.eval)
    results: dict[str, dict[str, Any]] = {}
    models = dict(trained or {})
    for i, name in enumerate(names, 1):
        prompts, visual, mrl = VARIANTS[name]
        if name not in models:
            log(f"[ablation {i}/{len(names)}] training {name}")
            models[name], _ = run_training(variant_config(cfg.train, name), log)
        scores = evaluate_model(models[name], rows, cfg.eval.model_copy(update={"prompts": prompts,
                                                                               "visual_prompt": visual}))
        results[name] = {"prompts": prompts, "visual_prompt": visual, "mrl": mrl, **scores}
        log(f"[ablation {i}/{len(names)}] {name}: mAcc {100 * scores['macc']:.1f}%")
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    categories = sorted({k for r in results.values() for k in r["per_super_category"]})
    table = _table(["model", "prompts", "visual prompt", "MRL", *categories, "mAcc %", "mAcc % at D/8"],
                   [[name, r["prompts"], r["visual_prompt"], r["mrl"],
                     *(100 * r["per_super_category"].get(c, float("nan")) for c in categories), 100 * r["macc"],
                     100 * r["macc_by_dim"][min(r["macc_by_dim"])]] for name, r in results.items()])
    curves = {label: results[name]["macc_by_dim"] for label, name in DIM_CURVES.items() if name in results}
    dims = sorted({d for c in curves.values() for d in c})
    dim_table = _table(["", *map(str, dims)], [[label, *(100 * c[d] for d in dims)] for label, c in curves.items()])
    budget = cfg.train.train
    text = (f"# Ablation on {len(rows)} unseen classes (chance {100 / len(rows):.1f}%)\n\n"
            f"Every model: {cfg.train.model}, {budget.steps} steps × {cfg.train.num_workers} worker(s) × "
            f"{budget.batch_size}, the same data and seed.\n\n{table}\n\n## mAcc % vs embedding dimension\n\n"
            f"{dim_table}\n")
    (cfg.output_dir / "ablation.md").write_text(text)
    (cfg.output_dir / "ablation.json").write_text(json.dumps(results, indent=2))
    if curves:
        _plot(curves, cfg.output_dir / "macc_by_dim.png", "Adaptive MRL vs plain MRL vs naive truncation")
    log(text)
    return results
