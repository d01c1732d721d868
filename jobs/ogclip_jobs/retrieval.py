"""Image–text retrieval (``ogclip eval retrieval``): Recall@K in both directions and mR on an overhead world.

The retrieval proxy of the remote-sensing sets MPS-CLIP reports on (RSICD, RSITMD): overhead scenes of 2–5 targets
of a graph class set (aircraft on an apron, ships in a harbour, both together; ``ogclip.synth.render_scene``), each
captioned five times from its targets' graph facts and the layout (:func:`ogclip_kg.prompts.scene_captions`). The
scenes are deterministic in (class set, seed, split); the evaluation uses the ``test`` split of the unseen test
classes by default.

Metrics as the retrieval literature reports them: image→text Recall@K counts an image as found when any of its five
captions ranks in the top K, text→image Recall@K when the caption's one image does, and mR is the mean of the six
recalls (K = 1, 5, 10). Ranking is by cosine similarity of the full-size embeddings.

Image embeddings come from the image alone, under each configured sub-perspective: ``none`` is the whole image
(no mask, no ROI zoom); ``targets`` also reads every visible target through its exact mask (the renderer's, i.e. a
perfect detector) and ``segmenter`` every region the weight-free CPU segmenter finds (``CpuSegmenter.regions``),
and each fuses the mean of those embeddings with the whole image's as MPS-CLIP's inference does, normalize(g + r);
a scene where nothing is found keeps g. Nothing is derived from the captions. Every recipe's bundle is scored the
same way, so OG-CLIP, DetailCLIP and MPS-CLIP share one table.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ogclip.bundle import load_bundle
from ogclip.models import OGCLIP
from ogclip.synth import Scene, TargetClass, render_scene
from ogclip.transforms import image_mask_transform
from ogclip_jobs.config import RetrievalConfig

_log = logging.getLogger(__name__)

KS = (1, 5, 10)
# (what the scene holds, its background): aircraft on an apron, ships in a harbour, both in a harbour
SCENE_KINDS = (("aircraft", "land"), ("ship", "sea"), ("mixed", "sea"))


def overhead_scenes(rows: Mapping[str, Mapping[str, Any]], count: int, per_scene: tuple[int, int], seed: int,
                    split: str, size: int) -> list[tuple[Scene, list[str]]]:
    """``count`` scenes of ``rows``' classes (class key → graph facts) with five captions each; scene ``i`` is of
    kind ``SCENE_KINDS[i % 3]`` (a kind the class set has too few targets for draws from all of them). Deterministic in
    (rows, count, per_scene, seed, split, size); the splits never share a render seed."""
    from ogclip_kg.prompts import scene_captions

    keys = sorted(rows)
    targets = {key: TargetClass.from_facts(dict(rows[key])) for key in keys}
    ships = [k for k in keys if targets[k].silhouette.endswith("hull")]
    pools = {"aircraft": [k for k in keys if k not in ships], "ship": ships, "mixed": keys}
    out: list[tuple[Scene, list[str]]] = []
    index = 0
    while len(out) < count:
        digest = hashlib.sha256(f"retrieval:{seed}:{split}:{index}".encode()).digest()
        index += 1
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        kind, background = SCENE_KINDS[len(out) % len(SCENE_KINDS)]
        pool = pools[kind] if len(pools[kind]) >= per_scene[0] else keys
        chosen = [pool[i] for i in rng.choice(len(pool), size=min(int(rng.integers(per_scene[0], per_scene[1] + 1)),
                                                                   len(pool)), replace=False)]
        scene = render_scene([targets[k] for k in chosen], int.from_bytes(digest[8:16], "little"), size, background)
        if any(scene.areas):  # every target hidden (vanishingly rare): nothing to caption, the next draw replaces it
            out.append((scene, scene_captions([rows[k] for k in chosen], scene.centres, scene.areas, background)))
    return out


def sub_perspective_masks(scene: Scene, sub_perspective: str) -> list[np.ndarray]:
    """The boolean masks a scene is also read through under ``sub_perspective`` (none for ``none``)."""
    if sub_perspective == "none":
        return []
    if sub_perspective == "targets":
        return [scene.labels == i + 1 for i in range(len(scene.targets)) if scene.areas[i] > 0]
    if sub_perspective == "segmenter":
        from ogclip.segment import CpuSegmenter

        return CpuSegmenter().regions(scene.image)
    raise ValueError(f"unknown sub-perspective {sub_perspective!r}; expected 'none', 'targets' or 'segmenter'")


@torch.no_grad()
def scene_embeddings(model: OGCLIP, scenes: Sequence[Scene], sub_perspective: str, batch_size: int = 256) -> Tensor:
    """L2-normalised full-size image embeddings of ``scenes`` under ``sub_perspective`` (see the module docstring),
    (len(scenes), D)."""
    transform = image_mask_transform(model.cfg.preprocess)
    model.eval()

    def encode(items: list[tuple[Any, np.ndarray | None]]) -> Tensor:
        out = []
        for start in range(0, len(items), batch_size):
            pairs = [transform(image, mask) for image, mask in items[start:start + batch_size]]
            images = torch.stack([image for image, _ in pairs]).to(model.device)
            masks = None if items[start][1] is None else torch.stack([mask for _, mask in pairs]).to(model.device)
            out.append(F.normalize(model.image_features(images, masks).float(), dim=-1).cpu())
        return torch.cat(out)

    masks = [sub_perspective_masks(scene, sub_perspective) for scene in scenes]
    whole = encode([(scene.image, None) for scene in scenes])
    items = [(scene.image, (mask * 255).astype(np.uint8)) for scene, found in zip(scenes, masks, strict=True)
             for mask in found]
    if not items:
        return whole
    owner = torch.tensor([s for s, found in enumerate(masks) for _ in found])
    mean = torch.zeros_like(whole).index_add_(0, owner, encode(items))  # zero where nothing was found: g alone
    return F.normalize(whole + F.normalize(mean, dim=-1), dim=-1)


@torch.no_grad()
def caption_embeddings(model: OGCLIP, captions: Sequence[str], batch_size: int = 256) -> Tensor:
    """L2-normalised full-size text embeddings of ``captions``, (len(captions), D)."""
    model.eval()
    return torch.cat([F.normalize(model.encode_text(model.tokenize(list(captions[i:i + batch_size]))).float(),
                                  dim=-1).cpu() for i in range(0, len(captions), batch_size)])


def recalls(similarity: Tensor, text_image: Tensor, ks: Sequence[int] = KS) -> dict[str, float]:
    """Recall@K (%) of image→text (``i2t_r{k}``: any of the image's captions in the top K) and text→image
    (``t2i_r{k}``: the caption's image in the top K), and mR, their mean, from ``similarity`` (images × texts) and
    ``text_image`` (the image index of each text). A rank counts the items scored strictly higher."""
    images, texts = similarity.shape
    if text_image.shape != (texts,) or not 0 <= int(text_image.min()) <= int(text_image.max()) < images:
        raise ValueError("text_image must give one image index in [0, images) per text")
    own = torch.zeros(images, texts, dtype=torch.bool)
    own[text_image, torch.arange(texts)] = True
    # image→text: the best-ranked of the image's own captions
    best_own = similarity.masked_fill(~own, float("-inf")).max(dim=1).values
    i2t_rank = (similarity > best_own[:, None]).sum(dim=1)
    # text→image: its one image
    t2i_rank = (similarity > similarity[text_image, torch.arange(texts)][None, :]).sum(dim=0)
    out = {f"i2t_r{k}": 100.0 * float((i2t_rank < k).float().mean()) for k in ks}
    out.update({f"t2i_r{k}": 100.0 * float((t2i_rank < k).float().mean()) for k in ks})
    out["mR"] = float(np.mean(list(out.values())))
    return out


def retrieval_markdown(name: str, result: dict[str, Any]) -> str:
    """The retrieval table: one row per sub-perspective, and how it was made."""
    counts = result["counts"]
    columns = [f"i2t_r{k}" for k in KS] + [f"t2i_r{k}" for k in KS] + ["mR"]
    lines = ["| image embedding | " + " | ".join(["I→T R@1", "I→T R@5", "I→T R@10", "T→I R@1", "T→I R@5",
                                                 "T→I R@10", "mR"]) + " |", "|---" * (len(columns) + 1) + "|"]
    for mode, scores in result["sub_perspectives"].items():
        lines.append(f"| {mode} | " + " | ".join(f"{scores[c]:.1f}" for c in columns) + " |")
    return (f"# Image–text retrieval: {name}\n\n"
            f"{counts['images']} overhead scenes ({counts['targets_per_scene'][0]}–{counts['targets_per_scene'][1]} "
            f"targets of {counts['classes']} classes of class set '{counts['class_set']}', {counts['image_size']} px; "
            f"aircraft on an apron, ships in a harbour, both), {counts['texts']} captions (five per scene, from the "
            "graph facts and the layout). Recall@K in %; I→T: any of the image's captions in the top K, T→I: the "
            f"caption's image in the top K; mR: the mean of the six. Chance: R@1 ≈ {100 / counts['images']:.1f}% "
            "(T→I). `none`: the whole image; `targets`: fused with every visible target read through its exact "
            "mask; `segmenter`: with every region the CPU segmenter finds.\n\n" + "\n".join(lines) + "\n")


def run_retrieval(cfg: RetrievalConfig, log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """``ogclip eval retrieval``: load the bundle, render and caption the scenes, rank, write
    ``retrieval.{md,json}``."""
    from ogclip_jobs.evaluate import class_set_rows, write_report
    from ogclip_jobs.runtime import open_graph

    started = time.perf_counter()
    model, info = load_bundle(cfg.bundle)
    with open_graph() as store:
        rows = {row["key"]: row for row in class_set_rows(store, cfg.class_set)}
    size = cfg.image_size or model.cfg.image_size
    scenes = overhead_scenes(rows, cfg.scenes, cfg.targets_per_scene, cfg.seed, cfg.split, size)
    captions = [caption for _, texts in scenes for caption in texts]
    text_image = torch.tensor([s for s, (_, texts) in enumerate(scenes) for _ in texts])
    texts = caption_embeddings(model, captions, cfg.batch_size)
    result: dict[str, Any] = {"model_version": info.model_version, "bundle": str(cfg.bundle), "sub_perspectives": {}}
    for mode in cfg.sub_perspectives:
        images = scene_embeddings(model, [scene for scene, _ in scenes], mode, cfg.batch_size)
        result["sub_perspectives"][mode] = recalls(images @ texts.T, text_image)
    result["counts"] = {"images": len(scenes), "texts": len(captions), "classes": len(rows), "class_set": cfg.class_set,
                        "image_size": size, "targets_per_scene": list(cfg.targets_per_scene)}
    result["examples"] = {"captions": scenes[0][1]}
    result["config"] = cfg.model_dump(mode="json")
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_report(cfg.output_dir, "retrieval", result, retrieval_markdown(info.model_version, result), log,
                 "retrieval")
    return result
