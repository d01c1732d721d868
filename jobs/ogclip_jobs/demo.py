"""The main job on embedded defaults: build a small OG-CLIP, check its plug-and-play property, train it on the
synthetic target world, evaluate zero-shot classification at every embedding size, export and re-load a bundle."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from itertools import product

import torch
from torch import Tensor

from ogclip.bundle import export_bundle, load_bundle
from ogclip.config import DemoConfig
from ogclip.device import resolve_device
from ogclip.metrics import mean_class_accuracy, zero_shot_predict
from ogclip.models import OGCLIP, create_model
from ogclip.synth import TargetClass, render
from ogclip.transforms import image_mask_transform
from ogclip_jobs.train import build_optimizer, train_step

DEMO_SILHOUETTES = {
    "delta wing": "military aircraft",
    "swept wing": "military aircraft",
    "flying wing": "military aircraft",
    "rotorcraft": "military aircraft",
    "straight wing": "civilian aircraft",
    "carrier hull": "warship",
    "destroyer hull": "warship",
    "cargo hull": "civilian ship",
}
DEMO_COLOURS = ("grey", "dark green", "white")


def demo_classes() -> list[TargetClass]:
    """Every demo silhouette in every demo colour; ships are drawn on sea, aircraft on sky or land."""
    return [
        TargetClass(
            name=f"{colour} {silhouette} {category}",
            super_category=category,
            silhouette=silhouette,
            colour=colour,
            backgrounds=("sea",) if "hull" in silhouette else ("sky", "land"),
        )
        for (silhouette, category), colour in product(DEMO_SILHOUETTES.items(), DEMO_COLOURS)
    ]


def render_set(model: OGCLIP, classes: list[TargetClass], per_class: int, seed: int, train: bool
               ) -> tuple[Tensor, Tensor, Tensor]:
    """Images, masks and labels for ``per_class`` renders of each class, preprocessed for ``model``."""
    transform = image_mask_transform(model.cfg.preprocess, train=train)
    size = model.cfg.image_size
    images, masks, labels = [], [], []
    for label, target in enumerate(classes):
        for i in range(per_class):
            sample = render(target, seed=seed * 1_000_003 + label * 10_007 + i, size=size)
            image, mask = transform(sample.image, sample.mask)
            images.append(image)
            masks.append(mask)
            labels.append(label)
    return torch.stack(images), torch.stack(masks), torch.tensor(labels)


@torch.no_grad()
def zero_shot_report(model: OGCLIP, prompts: list[str], images: Tensor, masks: Tensor, labels: Tensor
                     ) -> dict[int, float]:
    """mAcc of zero-shot classification against ``prompts`` at every granularity."""
    model.eval()
    device = model.device
    image_features = model.image_features(images.to(device), masks.to(device))
    text_features = model.text_features(prompts)
    report = {}
    for dim in model.dims:
        image_emb = torch.nn.functional.normalize(image_features[:, :dim], dim=-1)
        text_emb = torch.nn.functional.normalize(text_features[:, :dim], dim=-1)
        predictions = zero_shot_predict(image_emb, text_emb)
        report[dim] = mean_class_accuracy(predictions, labels.to(device), len(prompts))
    return report


def _format_report(report: dict[int, float]) -> str:
    return "  ".join(f"{dim}d {100 * acc:5.1f}%" for dim, acc in report.items())


def run_demo(cfg: DemoConfig, log: Callable[[str], None] = print) -> dict:
    """Run the demo and return its figures (also written to ``output_dir/demo.json``)."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    out_dir = cfg.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"model": cfg.model, "device": str(device)}

    log(f"[1/6] building {cfg.model} on {device}")
    model = create_model(cfg.model, device=device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"      {total / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable (text transformer frozen); "
        f"embedding sizes {model.dims}")
    summary.update(params=total, trainable_params=trainable)

    classes = demo_classes()
    prompts = [f"a photo of {target.description()}" for target in classes]
    log(f"[2/6] rendering {len(classes)} target classes × {cfg.images_per_class} training images "
        f"and × {cfg.eval_images_per_class} held-out images")
    started = time.perf_counter()
    train_images, train_masks, train_labels = render_set(model, classes, cfg.images_per_class, cfg.seed, True)
    eval_images, eval_masks, eval_labels = render_set(model, classes, cfg.eval_images_per_class, cfg.seed + 1, False)
    log(f"      {len(train_labels) + len(eval_labels)} images with exact masks in {time.perf_counter() - started:.1f}s")

    with torch.no_grad():
        model.eval()
        sample_images, sample_masks = eval_images[:8].to(device), eval_masks[:8].to(device)
        gap = (model.encode_image(sample_images, sample_masks) - model.encode_image(sample_images)).abs().max()
    log(f"[3/6] plug-and-play: fresh OG-CLIP with vs without masks, max |Δembedding| = {float(gap):.1e}")
    summary["fresh_mask_gap"] = float(gap)

    before = zero_shot_report(model, prompts, eval_images, eval_masks, eval_labels)
    log(f"[4/6] mAcc of held-out images against the class prompts before training "
        f"(chance {100 / len(classes):.1f}%): {_format_report(before)}")

    log(f"[5/6] training {cfg.train.steps} steps, batch {cfg.train.batch_size}, "
        f"lr {cfg.train.lr} (warm-up {cfg.train.warmup_steps}, cosine), r_s {cfg.train.hybrid_ratio}")
    optimizer = build_optimizer(model, cfg.train)
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens = model.tokenize(prompts)
    history = []
    started = time.perf_counter()
    for step in range(cfg.train.steps):
        index = torch.randint(len(train_labels), (cfg.train.batch_size,), generator=generator)
        labels = train_labels[index].to(device)
        terms = train_step(model, optimizer, step, cfg.train, train_images[index].to(device),
                           train_masks[index].to(device), tokens[labels], labels, generator)
        elapsed = time.perf_counter() - started
        rate = (step + 1) * cfg.train.batch_size / elapsed
        history.append({"step": step + 1, **terms.as_dict(), "samples_per_s": rate})
        if step % 10 == 0 or step + 1 == cfg.train.steps:
            eta = elapsed / (step + 1) * (cfg.train.steps - step - 1)
            logged = history[-1]
            log(f"      step {step + 1:4d}/{cfg.train.steps}  loss {logged['loss']:.3f} "
                f"(clip {logged['loss_clip']:.3f} mrl {logged['loss_mrl']:.3f} bpa {logged['loss_bpa']:.3f})  "
                f"{rate:.0f} samples/s  ETA {eta:.0f}s")
    summary.update(train_seconds=time.perf_counter() - started, history=history)

    after = zero_shot_report(model, prompts, eval_images, eval_masks, eval_labels)
    log(f"      mAcc after training: {_format_report(after)}")
    log(f"      dimension attention α: {[round(float(a), 3) for a in model.mrl.alpha]}")
    summary.update(macc_before=before, macc_after=after)

    bundle = export_bundle(model, out_dir / "bundle")
    reloaded, info = load_bundle(bundle.path, expected_version=bundle.model_version, device=device)
    with torch.no_grad():
        model.eval()
        same = torch.equal(model.encode_image(sample_images, sample_masks),
                           reloaded.encode_image(sample_images, sample_masks))
    log(f"[6/6] exported bundle {info.model_version} to {bundle.path}; re-loaded, identical embeddings: {same}")
    summary.update(model_version=info.model_version, bundle=str(bundle.path), reload_identical=same)
    (out_dir / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    log(f"      figures in {out_dir / 'demo.json'}")
    return summary
