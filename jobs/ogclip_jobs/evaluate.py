"""Zero-shot evaluation on the unseen test classes (paper Tables 1, 2 and 4; the ablation is :mod:`.ablation`).

Only test-set classes are candidates and only their images are scored, so every figure is true zero-shot: the
model never saw these classes, only their graph descriptions. Reports: per-class top-1, mAcc, mAcc per
super-category, mAcc at every embedding size, the cost table (parameters, FLOPs, images/s); Markdown, JSON, PNG.

Two splits make the figure honest about what it measures:

* **Mask modes.** The renderer's exact mask is a luxury inference does not have: the paper segments at inference.
  Every configured mode (``exact``: the data's mask; ``predicted``: a segmenter's; ``box``: the filled bounding box
  a client would send) is scored on the same images through one encoding pass, with the predicted masks' IoU
  against the exact ones.
* **Seen vs new looks.** A test class is a new name, but its look (silhouette, colour, size, pattern, accent) may be
  one some training class already has; only the classes whose look is new are compositional zero-shot.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from PIL import Image

from ogclip.bundle import load_bundle
from ogclip.config import PreprocessConfig, VisualPromptName
from ogclip.decode import decode_image
from ogclip.metrics import image_flops, per_class_accuracy, zero_shot_predict
from ogclip.models import OGCLIP, truncate
from ogclip.segment import CpuSegmenter, Sam2Segmenter, box_mask, mask_box
from ogclip.synth import TargetClass
from ogclip.transforms import apply_visual_prompt, image_mask_transform
from ogclip_jobs.config import EvalConfig, EvalSegmenterConfig, MaskMode
from ogclip_jobs.data.images import decode_mask, mask_iou
from ogclip_jobs.data.stages import present
from ogclip_jobs.train import data_labels

_log = logging.getLogger(__name__)


def slug(name: str) -> str:
    """A name as a file-name part, ASCII letters and digits only: 'CLIP + ROI' → 'clip-roi', 'G²A' → 'g-a'."""
    return "".join(c if c.isascii() and c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def roi_mask(mode: MaskMode, image: Any, exact: np.ndarray, segmenter: Any = None) -> np.ndarray:
    """The boolean ROI mask of one test image under ``mode`` (``exact``: the data's mask, as given)."""
    if mode == "exact":
        return exact
    if mode == "box":
        box = mask_box(exact)
        height, width = exact.shape
        # No visible target: a client could only send the whole frame.
        return box_mask(box or (0, 0, width, height), width, height)
    if mode == "predicted":
        return np.asarray(segmenter.segment(image), dtype=bool)
    raise ValueError(f"unknown mask mode {mode!r}")


def resolve_segmenter(cfg: EvalSegmenterConfig) -> tuple[EvalSegmenterConfig, str | None]:
    """The segmenter the ``predicted`` mode will use, and why it differs from the configured one (or None).

    SAM2 is used when configured and available (package installed, checkpoint present); otherwise the CPU segmenter
    stands in, so a machine without SAM2 still reports predicted-mask figures, labelled with what made them.
    """
    if cfg.method != "sam2":
        return cfg, None
    if importlib.util.find_spec("sam2") is None:
        reason = "the sam2 package is not installed"
    elif not Path(cfg.sam2_checkpoint).is_file():
        reason = f"the SAM2 checkpoint {cfg.sam2_checkpoint} does not exist"
    else:
        return cfg, None
    return cfg.model_copy(update={"method": "cpu"}), f"SAM2 configured but {reason}: the CPU segmenter stands in"


class DecodeTestImages:
    """Ray Data stage: test rows → the evaluation transform of each image and of its ROI mask under every mode (the
    image's own too: a ROI zoom centres on the mode's mask), and each mode's mask IoU against the exact mask
    (computed at the image's own resolution)."""

    def __init__(self, preprocess: dict[str, Any], classes: Sequence[str], modes: Sequence[MaskMode],
                 segmenter: dict[str, Any]) -> None:
        self.transform = image_mask_transform(PreprocessConfig.model_validate(preprocess), train=False)
        self.size = int(preprocess["image_size"])
        self.index = {key: i for i, key in enumerate(classes)}
        self.modes = list(modes)
        self.segmenter = None
        if "predicted" in self.modes:
            seg = EvalSegmenterConfig.model_validate(segmenter)
            self.segmenter = CpuSegmenter() if seg.method == "cpu" else Sam2Segmenter(
                str(seg.sam2_checkpoint), seg.sam2_config, prompt=seg.prompt, device=seg.device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        labels = []
        images: dict[str, list[np.ndarray]] = {mode: [] for mode in self.modes}
        masks: dict[str, list[np.ndarray]] = {mode: [] for mode in self.modes}
        ious: dict[str, list[float]] = {mode: [] for mode in self.modes}
        for i, label in enumerate(batch["label"]):
            if str(label) not in self.index:
                continue
            image = decode_image(bytes(batch["image"][i]))
            given = present(batch["mask"][i])
            # Data without masks: the exact mode is the all-ones ROI ("no specific region"), and no IoU is scored.
            exact = decode_mask(bytes(batch["mask"][i])) if given else np.ones(image.size[::-1], dtype=bool)
            for mode in self.modes:
                mask = roi_mask(mode, image, exact, self.segmenter)
                image_t, mask_t = self.transform(image, Image.fromarray((mask * 255).astype(np.uint8)))
                images[mode].append(image_t.numpy())
                masks[mode].append(mask_t.numpy())
                ious[mode].append(mask_iou(mask, exact) if given and mode != "exact" else np.nan)
            labels.append(self.index[str(label)])

        def stack(arrays: list[np.ndarray], channels: int) -> np.ndarray:
            return np.stack(arrays) if arrays else np.zeros((0, channels, self.size, self.size), np.float32)

        out = {"label": np.asarray(labels, dtype=np.int64)}
        for mode in self.modes:
            out[f"image_{mode}"] = stack(images[mode], 3)
            out[f"mask_{mode}"] = stack(masks[mode], 1)
            out[f"iou_{mode}"] = np.asarray(ious[mode], dtype=np.float64)
        return out


@dataclass
class EncodedTestSet:
    """Full-size image features of every test image under each mask mode, their class indices, and the mean mask
    IoU against the exact mask per mode (None where the data has no masks)."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    mask_iou: dict[str, float | None]


@torch.no_grad()
def encode_test_images(model: OGCLIP, data: Path, classes: list[str], visual_prompt: VisualPromptName,
                       batch_size: int = 128, modes: Sequence[MaskMode] = ("exact",),
                       segmenter: EvalSegmenterConfig | None = None) -> EncodedTestSet:
    """Every test image encoded once per mask mode (decoded and masked by Ray Data, encoded here), in the data's
    order: one pass, one code path for all modes, so the modes differ only in the ROI mask."""
    from ogclip_jobs.runtime import ensure_ray

    ensure_ray()
    segmenter = segmenter or EvalSegmenterConfig()
    preprocess = model.cfg.preprocess
    decode = {"preprocess": preprocess.model_dump(mode="json"), "classes": classes, "modes": list(modes),
              "segmenter": segmenter.model_dump(mode="json")}
    if "predicted" in modes and segmenter.method == "sam2":
        # SAM2's weights are worth loading once: one actor, on the GPU it is given.
        stage: dict[str, Any] = {"fn": DecodeTestImages, "fn_constructor_kwargs": decode, "num_cpus": 0.25,
                                 "num_gpus": segmenter.num_gpus or None, "compute": ray.data.ActorPoolStrategy(size=1)}
    else:
        # Tasks: they run in the worker processes Ray keeps warm, where an actor pool would start (and import torch
        # in) a new process for every dataset, i.e. every evaluation.
        stage = {"fn": DecodeTestImages(**decode), "num_cpus": 0.25}
    ds = ray.data.read_parquet(str(data), columns=["image", "mask", "label"], num_cpus=0.25).map_batches(
        batch_size=batch_size, batch_format="numpy", **stage)
    ds.context.execution_options.preserve_order = True  # features in the data's order, whatever the blocks' timing
    model.eval()
    features: dict[str, list[torch.Tensor]] = {mode: [] for mode in modes}
    ious: dict[str, list[np.ndarray]] = {mode: [] for mode in modes}
    labels = []
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        for mode in modes:  # torch.tensor copies: Ray's batch arrays are read-only
            x, m = apply_visual_prompt(torch.tensor(batch[f"image_{mode}"]), torch.tensor(batch[f"mask_{mode}"]),
                                       visual_prompt, preprocess)
            features[mode].append(model.image_features(x.to(model.device), m.to(model.device)).float().cpu())
            ious[mode].append(batch[f"iou_{mode}"])
        labels.append(torch.tensor(batch["label"]))
    if not labels:
        raise ValueError(f"no test images of the {len(classes)} test classes under {data}")
    iou = {mode: np.concatenate(values) for mode, values in ious.items()}
    return EncodedTestSet(features={mode: torch.cat(f) for mode, f in features.items()}, labels=torch.cat(labels),
                        mask_iou={mode: None if np.isnan(v).all() else float(np.nanmean(v)) for mode, v in iou.items()})


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


def class_set_rows(store: Any, class_set: str) -> list[dict[str, Any]]:
    """The fact rows of every class of a graph class set (ValueError if it is empty or unknown)."""
    from ogclip_kg import cypher
    from ogclip_kg.prompts import fetch_class_facts

    keys = sorted({r["key"] for r in store.read(cypher.CLASS_SET_KEYS, key=class_set)})
    if not keys:
        raise ValueError(f"class set {class_set!r} is empty or unknown")
    return fetch_class_facts(store, keys)


def seen_looks(rows: Sequence[dict[str, Any]], reference: Sequence[dict[str, Any]]) -> list[bool]:
    """For each class of ``rows``, whether some class of ``reference`` has the same look (all five attributes).

    The look is what the renderer draws (``TargetClass.look``), so a test class with a seen look is, to the image
    tower, a training class under a new name; only the others test composing known attribute values anew.
    """
    known = {TargetClass.from_facts(row).look() for row in reference}
    return [TargetClass.from_facts(row).look() in known for row in rows]


def look_split(per_class: Sequence[float], seen: Sequence[bool]) -> dict[str, Any]:
    """mAcc over the seen-look classes and over the new-look ones, with each group's class count (classes without
    images left out; None for an empty group)."""
    out: dict[str, Any] = {}
    for name, flag in (("seen_look", True), ("new_look", False)):
        accuracies = [a for a, s in zip(per_class, seen, strict=True) if s == flag and not np.isnan(a)]
        out[name] = float(np.mean(accuracies)) if accuracies else None
        out[f"{name}_classes"] = len(accuracies)
    return out


def evaluate_model(model: OGCLIP, rows: list[dict[str, Any]], cfg: EvalConfig,
                   seen: Sequence[bool] | None = None) -> dict[str, Any]:
    """Zero-shot scores of ``model`` on ``cfg.data`` with ``rows``' classes as the only candidates, under every mask
    mode (``mask_modes``); the top-level figures are the first mode's. ``seen``: each row's look is a training
    class's (:func:`seen_looks`), which adds the seen-look / new-look split."""
    classes = [r["key"] for r in rows]
    from ogclip_kg.prompts import embed_classes

    _, vectors = embed_classes(model, rows, cfg.prompts, cfg.seed)
    vectors = vectors.cpu()
    segmenter, note = resolve_segmenter(cfg.segmenter)
    encoded = encode_test_images(model, cfg.data, classes, cfg.visual_prompt, cfg.batch_size, cfg.mask_modes,
                                 segmenter)
    super_categories = [r["super_category"] for r in rows]
    by_mode = {}
    for mode in cfg.mask_modes:
        scores = zero_shot_scores(encoded.features[mode], encoded.labels, vectors, model.dims, super_categories)
        scores["mask_iou"] = encoded.mask_iou[mode]
        if seen is not None:
            scores["looks"] = look_split(scores["per_class"], seen)
        by_mode[mode] = scores
    first = cfg.mask_modes[0]
    by_prompts = {prompts: zero_shot_scores(encoded.features[first], encoded.labels,
                                            embed_classes(model, rows, prompts, cfg.seed)[1].cpu(), model.dims,
                                            super_categories)
                  for prompts in cfg.compare_prompts}
    return {**by_mode[first], "mask_mode": first, "mask_modes": by_mode, "prompts": cfg.prompts,
            "by_prompts": by_prompts,
            "segmenter": segmenter.method, "segmenter_note": note, "classes": classes,
            "seen_look": None if seen is None else [bool(v) for v in seen]}


def mode_label(mode: str, segmenter: str) -> str:
    """'predicted (cpu)' names the segmenter behind the predicted masks; the other modes are their own name."""
    return f"predicted ({segmenter})" if mode == "predicted" else mode


def _pct(value: float | None) -> float | str:
    return "–" if value is None or np.isnan(value) else 100 * value


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{c:.1f}" if isinstance(c, float) else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_curves(curves: dict[str, dict[int, float]], path: Path, title: str) -> None:
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
    """The evaluation report: mAcc by mask mode with the seen/new-look split and mask IoU, per super-category
    (Tables 1–2), by dimension and cost (Table 4) for the first mode, and per class under every mode."""
    chance = 100.0 / len(rows)
    modes = scores["mask_modes"]
    labels = [mode_label(m, scores["segmenter"]) for m in modes]
    looks = [m.get("looks") or {} for m in modes.values()]
    seen_n, new_n = (looks[0].get("seen_look_classes", "?"), looks[0].get("new_look_classes", "?"))
    categories = sorted({k for m in modes.values() for k in m["per_super_category"]})
    parts = [f"# Zero-shot evaluation: {name}", "",
             f"{len(rows)} unseen test classes, {scores['images']} images; chance {chance:.1f}%. Mask modes: the "
             "data's exact mask, a segmenter's prediction, the target's filled bounding box. Seen look: some "
             f"training class has the same silhouette, colour, size, pattern and accent ({seen_n} classes); new "
             f"look: none has ({new_n} classes), true compositional zero-shot.", ""]
    if scores.get("segmenter_note"):
        parts += [f"Note: {scores['segmenter_note']}.", ""]
    parts += [markdown_table(["mask mode", "mAcc %", "seen-look mAcc %", "new-look mAcc %", "mask IoU vs exact"],
                     [[label, 100 * m["macc"], _pct(lk.get("seen_look")), _pct(lk.get("new_look")),
                       "–" if m["mask_iou"] is None else f"{m['mask_iou']:.3f}"]
                      for label, m, lk in zip(labels, modes.values(), looks, strict=True)]), "",
              markdown_table(["super-category", *(f"{label} mAcc %" for label in labels)],
                     [[c, *(_pct(m["per_super_category"].get(c)) for m in modes.values())] for c in categories]
                     + [["all (mAcc)", *(100 * m["macc"] for m in modes.values())]]), "",
              *([f"Class embeddings from other prompts ({labels[0]} masks, the same image features):", "",
                 markdown_table(["prompts", "mAcc %", *(f"mAcc % at {d}" for d in scores["macc_by_dim"])],
                                [[p, 100 * m["macc"], *(100 * v for v in m["macc_by_dim"].values())]
                                 for p, m in {scores["prompts"]: scores, **scores["by_prompts"]}.items()]), ""]
                if scores["by_prompts"] else []),
              f"By embedding size ({labels[0]} masks):", "",
              markdown_table(["dim", *map(str, scores["macc_by_dim"])], [["mAcc %", *(100 * v for v in
                                                                             scores["macc_by_dim"].values())]]), "",
              markdown_table(["params (M)", "trainable (M)", "GFLOPs/image (2 × MACs, forward)", "images/s"],
                     [[costs["params_M"], costs["trainable_M"], f"{costs['gflops_per_image']:.3f}",
                       costs["images_per_s"]]]), "",
              markdown_table(["class", "super-category", "look", *(f"{label} top-1 %" for label in labels)],
                     [[r["name"], r["super_category"],
                       "–" if scores["seen_look"] is None else ("seen" if scores["seen_look"][i] else "new"),
                       *(_pct(m["per_class"][i]) for m in modes.values())] for i, r in enumerate(rows)])]
    return "\n".join(parts) + "\n"


def summary_line(scores: dict[str, Any], classes: int) -> str:
    """The log line: mAcc under each mask mode (with the predicted masks' IoU), the first mode's seen/new-look
    split and per-super-category figures."""
    modes = []
    for mode, m in scores["mask_modes"].items():
        iou = f" (mask IoU {m['mask_iou']:.2f})" if m["mask_iou"] is not None else ""
        modes.append(f"{mode_label(mode, scores['segmenter'])} {100 * m['macc']:.1f}%{iou}")
    text = f"zero-shot mAcc on {classes} unseen classes (chance {100 / classes:.1f}%): " + ", ".join(modes)
    looks = scores.get("looks")
    if looks:
        text += (f"; {scores['mask_mode']} masks, seen looks ({looks['seen_look_classes']} classes) "
                 f"{_fmt(looks['seen_look'])}, new looks ({looks['new_look_classes']}) {_fmt(looks['new_look'])}")
    text += "; " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in scores["per_super_category"].items())
    return text + "".join(f"; {scores['mask_mode']} masks with {p} prompts instead of {scores['prompts']}: "
                          f"{100 * m['macc']:.1f}%" for p, m in scores["by_prompts"].items())


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def write_report(folder: Path, name: str, result: dict[str, Any], markdown: str, log: Callable[[str], None],
                 what: str) -> None:
    """``{name}.json`` (``result``) and ``{name}.md`` under ``folder``; the Markdown's table logged a line at a time
    (callers may indent each), then how long ``what`` took (``result["seconds"]``) and where its report is."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2))
    (folder / f"{name}.md").write_text(markdown)
    for line in markdown.splitlines():
        if line.startswith("|"):
            log(line)
    log(f"{what} in {result['seconds']:.0f}s; {folder / f'{name}.md'}")


def run_evaluation(cfg: EvalConfig, log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """``ogclip eval``: load the bundle, score it, write ``report.{md,json}`` and ``macc_by_dim.png``."""
    from ogclip_jobs.runtime import open_graph

    model, info = load_bundle(cfg.bundle)
    with open_graph() as store:
        rows = eval_classes(store, cfg)
        seen = seen_looks(rows, class_set_rows(store, cfg.look_class_set))
    scores = evaluate_model(model, rows, cfg, seen)
    if scores["segmenter_note"]:
        log(scores["segmenter_note"])
    costs = cost(model, cfg.cost_batch)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    report = {"model_version": info.model_version, "bundle": str(cfg.bundle), **scores, "cost": costs,
              "config": cfg.model_dump(mode="json")}
    (cfg.output_dir / "report.json").write_text(json.dumps(report, indent=2))
    (cfg.output_dir / "report.md").write_text(report_markdown(info.model_version, scores, rows, costs))
    plot_curves({mode_label(mode, scores["segmenter"]): m["macc_by_dim"] for mode, m in scores["mask_modes"].items()},
          cfg.output_dir / "macc_by_dim.png", "accuracy vs embedding dimension")
    log(summary_line(scores, len(rows)))
    log(f"report in {cfg.output_dir / 'report.md'}")
    return report
