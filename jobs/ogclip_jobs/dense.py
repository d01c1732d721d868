"""Dense evaluation: what a bundle's frozen image tower knows per patch (``ogclip eval dense``).

DetailCLIP claims features better suited to segmentation than CLIP's. The synthetic world has exact masks, so this
measures it the way dense features are usually compared: scenes of several targets (``ogclip.synth.render_scene``)
are encoded by the frozen image tower (whole image as the region), a linear classifier per patch token is fitted on
one set of scenes (on the pixel-level loss: random pixels of each scene, labelled background or a target's class,
and once more with super-categories), and scored on held-out scenes by upsampling its patch logits bilinearly to pixels:
mean IoU over the labels (background included), and the IoU of each target instance, reported separately for small
targets. The zero-shot mAcc of the same bundle sits beside it, so that a gain in dense features that costs the
global embedding shows up in the same table.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ogclip.bundle import load_bundle
from ogclip.models import OGCLIP
from ogclip.synth import Scene, TargetClass, render_scene, spread_classes
from ogclip.transforms import image_mask_transform
from ogclip_jobs.config import DenseConfig
from ogclip_jobs.probe import fit_linear_probe

_log = logging.getLogger(__name__)

BACKGROUND = "background"


def scene_plan(keys: Sequence[str], count: int, per_scene: tuple[int, int], seed: int, split: str
               ) -> list[tuple[list[str], int]]:
    """``count`` scenes as (distinct class keys, render seed): each holds ``per_scene[0]``..``per_scene[1]``
    targets; deterministic in (keys, seed, split), and the splits never share a render seed."""
    plan = []
    for index in range(count):
        digest = hashlib.sha256(f"dense:{seed}:{split}:{index}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        size = int(rng.integers(per_scene[0], per_scene[1] + 1))
        chosen = rng.choice(len(keys), size=min(size, len(keys)), replace=False)
        plan.append(([keys[i] for i in chosen], int.from_bytes(digest[8:16], "little")))
    return plan


def sample_pixels(features: torch.Tensor, labels: torch.Tensor, per_image: int, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_image`` random pixels of each image (uniform, deterministic in ``seed``): the patch features
    interpolated bilinearly at each pixel centre (as ``F.interpolate(..., align_corners=False)`` places them) and
    the pixel's label. A linear map commutes with the interpolation, so a classifier fitted on these rows is the
    per-patch classifier whose upsampled logits are scored, trained on the pixel-level loss it is scored by.
    features (B, grid, grid, width), labels (B, H, W) → (B * per_image, width), (B * per_image,)."""
    batch, height, width = labels.shape
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, height, (batch, per_image), generator=generator)
    cols = torch.randint(0, width, (batch, per_image), generator=generator)
    where = torch.stack([(cols + 0.5) / width * 2 - 1, (rows + 0.5) / height * 2 - 1], dim=-1).unsqueeze(1)
    sampled = F.grid_sample(features.permute(0, 3, 1, 2), where, mode="bilinear", padding_mode="border",
                            align_corners=False)  # (B, width, 1, per_image)
    picked = labels.reshape(batch, -1).gather(1, rows * width + cols)
    return sampled.squeeze(2).permute(0, 2, 1).reshape(-1, features.shape[-1]), picked.reshape(-1)


@dataclass
class EncodedScenes:
    """Patch features (B, grid, grid, width) of scenes and their pixel labels (B, H, W) in class indices (0 is
    background, ``1 + i`` the i-th class), with each visible target instance as (scene, class index, visible mask)."""

    features: torch.Tensor
    labels: torch.Tensor
    instances: list[tuple[int, int, np.ndarray]]


@torch.no_grad()
def encode_scenes(model: OGCLIP, scenes: Sequence[Scene], classes: Sequence[Sequence[int]], batch_size: int = 256
                  ) -> EncodedScenes:
    """The frozen image tower's patch tokens for every scene (no ROI: the whole image is the region), with the
    scenes' label maps turned into class indices (``classes[s][i]``: the index of scene s's i-th target)."""
    transform = image_mask_transform(model.cfg.preprocess)
    model.eval()
    features, labels, instances = [], [], []
    for start in range(0, len(scenes), batch_size):
        chunk = scenes[start:start + batch_size]
        images = torch.stack([transform(scene.image, None)[0] for scene in chunk]).to(model.device)
        features.append(model.patch_features(images).float().cpu())
        for offset, scene in enumerate(chunk):
            lookup = np.array([0, *classes[start + offset]], dtype=np.int64)
            labels.append(torch.from_numpy(lookup[scene.labels]))
            instances.extend((start + offset, int(lookup[i + 1]), scene.labels == i + 1)
                             for i in range(len(scene.targets)) if scene.areas[i] > 0)
    size = model.cfg.image_size
    if labels[0].shape != (size, size):
        raise ValueError(f"scenes must be rendered at the model's input size {size}, got {tuple(labels[0].shape)}")
    return EncodedScenes(torch.cat(features), torch.stack(labels), instances)


def predict_pixels(logits: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, size: int,
                   batch_size: int = 256) -> torch.Tensor:
    """Per-pixel labels: the patch logits upsampled bilinearly to ``size``², then the argmax. (B, size, size)."""
    out = []
    for start in range(0, len(features), batch_size):
        chunk = features[start:start + batch_size]
        scores = logits(chunk.reshape(-1, chunk.shape[-1])).reshape(*chunk.shape[:3], -1).permute(0, 3, 1, 2)
        out.append(F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=False).argmax(dim=1))
    return torch.cat(out)


def iou_scores(predicted: torch.Tensor, truth: torch.Tensor, classes: int) -> dict[str, Any]:
    """Per-label IoU over all pixels (TP / (TP + FP + FN)) and their mean over the labels present in the truth or
    the prediction."""
    confusion = torch.bincount(truth.reshape(-1).long() * classes + predicted.reshape(-1).long(),
                               minlength=classes * classes).reshape(classes, classes).double()
    tp = confusion.diag()
    union = confusion.sum(dim=0) + confusion.sum(dim=1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.nan)
    return {"miou": float(iou.nanmean()), "per_label": iou.tolist(),
            "pixel_accuracy": float(tp.sum() / confusion.sum())}


def instance_ious(predicted: torch.Tensor, instances: Sequence[tuple[int, int, np.ndarray]]) -> list[float]:
    """For each (scene, class, visible mask): IoU of the pixels predicted as its class with its visible pixels (a
    scene never holds two targets of one class, so the class's pixels in that scene are the instance's)."""
    out = []
    for scene, label, mask in instances:
        hit = predicted[scene].numpy() == label
        out.append(float((hit & mask).sum() / (hit | mask).sum()))
    return out


def dense_scores(model: OGCLIP, targets: dict[str, TargetClass], cfg: DenseConfig) -> dict[str, Any]:
    """Fit the per-patch probes on ``cfg.fit_scenes`` scenes of ``targets`` and score them on ``cfg.eval_scenes``
    others: class and super-category mIoU, and the mean IoU of small (under ``cfg.small_area`` of the image) and
    other target instances."""
    keys = sorted(targets)
    index = {key: i + 1 for i, key in enumerate(keys)}
    size = model.cfg.image_size
    encoded = {}
    for split, count in (("fit", cfg.fit_scenes), ("eval", cfg.eval_scenes)):
        plan = scene_plan(keys, count, tuple(cfg.targets_per_scene), cfg.seed, split)
        scenes = [render_scene([targets[k] for k in chosen], seed, size) for chosen, seed in plan]
        encoded[split] = encode_scenes(model, scenes, [[index[k] for k in chosen] for chosen, _ in plan],
                                       cfg.batch_size)
    fit, held_out = encoded["fit"], encoded["eval"]
    grid, width = fit.features.shape[1], fit.features.shape[-1]

    super_names = sorted({t.super_category for t in targets.values()})
    to_super = torch.tensor([0] + [1 + super_names.index(targets[k].super_category) for k in keys])
    out: dict[str, Any] = {"grid": grid, "width": width, "image_size": size}
    names = [targets[k].name for k in keys]
    for level, label_names, mapping in (("class", names, None), ("super_category", super_names, to_super)):
        labels = [BACKGROUND, *label_names]
        fit_labels = fit.labels if mapping is None else mapping[fit.labels]
        eval_labels = held_out.labels if mapping is None else mapping[held_out.labels]
        rows, row_labels = sample_pixels(fit.features, fit_labels, cfg.pixels_per_scene, cfg.seed)
        probe = fit_linear_probe(rows, row_labels, len(labels), cfg.regularisation)
        predicted = predict_pixels(probe, held_out.features, size)
        scores = iou_scores(predicted, eval_labels, len(labels))
        scores["labels"] = labels
        if mapping is None:
            ious = instance_ious(predicted, held_out.instances)
            areas = np.array([mask.mean() for _, _, mask in held_out.instances])
            small = areas < cfg.small_area
            scores["instances"] = {
                "small_iou": float(np.mean(np.array(ious)[small])) if small.any() else None,
                "other_iou": float(np.mean(np.array(ious)[~small])) if (~small).any() else None,
                "small": int(small.sum()), "other": int((~small).sum())}
        out[level] = scores
    out["counts"] = {"classes": len(keys), "super_categories": len(super_names), "fit_scenes": len(fit.features),
                     "eval_scenes": len(held_out.features)}
    return out


def dense_markdown(name: str, result: dict[str, Any], cfg: DenseConfig) -> str:
    """The dense report: one row per label level, and how it was made."""
    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.1f}%"

    counts, cls, sup = result["counts"], result["class"], result["super_category"]
    zero_shot = result.get("zero_shot_macc")
    lines = ["| bundle | class mIoU | super-category mIoU | small-target IoU | other-target IoU | zero-shot mAcc |",
             "|---|---|---|---|---|---|",
             f"| {name} | {pct(cls['miou'])} | {pct(sup['miou'])} | {pct(cls['instances']['small_iou'])} "
             f"({cls['instances']['small']}) | {pct(cls['instances']['other_iou'])} ({cls['instances']['other']}) "
             f"| {pct(zero_shot)} |"]
    return (f"# Dense linear probe: {name}\n\n"
            f"Frozen image tower, patch tokens ({result['grid']}×{result['grid']} × {result['width']}) of "
            f"{result['image_size']} px scenes holding {cfg.targets_per_scene[0]}–{cfg.targets_per_scene[1]} "
            f"targets of {counts['classes']} classes ({counts['super_categories']} super-categories) of class set "
            f"'{cfg.class_set}'. Linear classifier per patch fitted on {counts['fit_scenes']} scenes "
            f"({cfg.pixels_per_scene} random pixels each, features interpolated there), scored on "
            f"{counts['eval_scenes']} other scenes with its logits upsampled bilinearly to pixels. mIoU over the "
            "labels with background; target IoU per visible instance, small = under "
            f"{100 * cfg.small_area:g}% of the image (counts in brackets). Zero-shot mAcc: "
            + ("not measured (`zero_shot: null`)" if zero_shot is None else
               f"`ogclip eval` on {cfg.zero_shot.data}, {cfg.zero_shot.mask_modes[0]} masks")
            + ".\n\n" + "\n".join(lines) + "\n")


def run_dense(cfg: DenseConfig, log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """``ogclip eval dense``: load the bundle, probe its patch features on scenes, score zero-shot beside them, write
    ``dense.{md,json}``."""
    from ogclip_jobs.evaluate import class_set_rows, eval_classes, evaluate_model, write_report
    from ogclip_jobs.runtime import open_graph

    started = time.perf_counter()
    if cfg.zero_shot is not None and not cfg.zero_shot.data.exists():
        raise ValueError(f"no zero-shot test shards at {cfg.zero_shot.data}: point zero_shot.data at test shards "
                         "(after `make demo`: outputs/demo/data-test/stages/shards/parquet) or set zero_shot: null")
    model, info = load_bundle(cfg.bundle)
    with open_graph() as store:
        rows = {row["key"]: row for row in class_set_rows(store, cfg.class_set)}
        zero_shot_rows = eval_classes(store, cfg.zero_shot) if cfg.zero_shot is not None else None
    every = {key: TargetClass.from_facts(row) for key, row in rows.items()}
    targets = {key: every[key] for key in spread_classes(every, cfg.classes, cfg.seed)}
    result: dict[str, Any] = {"model_version": info.model_version, "bundle": str(cfg.bundle),
                              **dense_scores(model, targets, cfg)}
    if zero_shot_rows is not None:
        result["zero_shot_macc"] = evaluate_model(model, zero_shot_rows, cfg.zero_shot)["macc"]
    result["config"] = cfg.model_dump(mode="json")
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_report(cfg.output_dir, "dense", result, dense_markdown(info.model_version, result, cfg), log, "dense probe")
    return result
