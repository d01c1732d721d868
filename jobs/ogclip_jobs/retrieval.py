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
perfect detector), ``segmenter`` every region the weight-free CPU segmenter finds (``CpuSegmenter.regions``) and
``noisy`` the targets' masks with a detector's mistakes (:func:`noisy_masks`: 30% missed, the rest dilated or
eroded, sometimes a false one); each fuses the mean of those embeddings with the whole image's as MPS-CLIP's
inference does, normalize(g + r), and a scene where nothing is found keeps g. Nothing is derived from the
captions, unless ``captions`` is asked for: the authors' evaluation, which cuts one sub-perspective per noun of the
image's own five test captions (:func:`keyword_masks`) and so leaks them into the image side; it is labelled as
such and reported apart. Every recipe's bundle is scored the same way, so OG-CLIP, DetailCLIP and MPS-CLIP share
one table.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

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


class SceneDraw(NamedTuple):
    """One captioned scene: the picture, its five captions, and its targets' class keys (in drawing order)."""

    scene: Scene
    captions: list[str]
    keys: list[str]


class SceneWorld:
    """The captioned overhead scenes of ``rows``' classes (class key → graph facts): scene ``index`` of a split is
    of kind ``SCENE_KINDS[kind]`` (a kind the class set has too few targets for draws from all of them), holds
    ``per_scene`` targets (fewest, most) and is deterministic in (rows, seed, split, index, size); the splits never
    share a render seed. Used by the evaluation (:func:`overhead_scenes`) and by training on scenes."""

    def __init__(self, rows: Mapping[str, Mapping[str, Any]], per_scene: tuple[int, int], seed: int, size: int) -> None:
        self.rows = {key: dict(rows[key]) for key in sorted(rows)}
        keys = list(self.rows)
        self.targets = {key: TargetClass.from_facts(row) for key, row in self.rows.items()}
        ships = [k for k in keys if self.targets[k].silhouette.endswith("hull")]
        self.pools = {"aircraft": [k for k in keys if k not in ships], "ship": ships, "mixed": keys}
        self.per_scene, self.seed, self.size = per_scene, seed, size

    def draw(self, split: str, index: int | str, kind: int) -> SceneDraw | None:
        """Draw ``index`` of ``split``: the scene, its five captions and its targets' class keys (None in the
        vanishingly rare draw whose targets are all hidden: nothing to caption)."""
        from ogclip_kg.prompts import scene_captions

        digest = hashlib.sha256(f"retrieval:{self.seed}:{split}:{index}".encode()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        name, background = SCENE_KINDS[kind % len(SCENE_KINDS)]
        low, high = self.per_scene
        pool = self.pools[name] if len(self.pools[name]) >= low else self.pools["mixed"]
        chosen = [pool[i] for i in rng.choice(len(pool), size=min(int(rng.integers(low, high + 1)), len(pool)),
                                              replace=False)]
        scene = render_scene([self.targets[k] for k in chosen], int.from_bytes(digest[8:16], "little"), self.size,
                             background)
        if not any(scene.areas):
            return None
        return SceneDraw(scene, scene_captions([self.rows[k] for k in chosen], scene.centres, scene.areas, background),
                         chosen)


def overhead_scenes(rows: Mapping[str, Mapping[str, Any]], count: int, per_scene: tuple[int, int], seed: int,
                    split: str, size: int) -> list[SceneDraw]:
    """``count`` scenes of ``split`` with five captions each (:class:`SceneWorld`); scene ``i`` is of kind
    ``SCENE_KINDS[i % 3]``, and a draw whose targets are all hidden is replaced by the next one."""
    world = SceneWorld(rows, per_scene, seed, size)
    out: list[SceneDraw] = []
    index = 0
    while len(out) < count:
        drawn = world.draw(split, index, len(out))
        index += 1
        if drawn is not None:
            out.append(drawn)
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
    if sub_perspective == "noisy":
        return noisy_masks(scene, sub_perspective_masks(scene, "targets"))
    raise ValueError(f"unknown sub-perspective {sub_perspective!r}; expected 'none', 'targets', 'segmenter' or "
                     "'noisy'")


def noisy_masks(scene: Scene, masks: Sequence[np.ndarray], drop: float = 0.3, spurious: float = 0.5
                ) -> list[np.ndarray]:
    """A detector's mistakes on ``masks`` (deterministic per scene): each mask is missed with probability ``drop``,
    else dilated or eroded by 1 or 2 pixels (a mask eroded away is missed too), and with probability ``spurious``
    one false detection joins them (an ellipse where the scene may hold anything)."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(scene.labels.tobytes()).digest()[:8], "little"))
    height, width = scene.labels.shape
    out = []
    for mask in masks:
        if rng.random() < drop:
            continue
        size = 3 if rng.random() < 0.5 else 5
        grow = ImageFilter.MaxFilter(size) if rng.random() < 0.5 else ImageFilter.MinFilter(size)
        changed = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).filter(grow)) > 0
        if changed.any():
            out.append(changed)
    if rng.random() < spurious:
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(0.05, 0.2, 2) * np.array([width, height])
        blob = Image.new("L", (width, height), 0)
        ImageDraw.Draw(blob).ellipse([x - rx, y - ry, x + rx, y + ry], fill=255)
        out.append(np.asarray(blob) > 0)
    return out


def keyword_masks(draw: SceneDraw, rows: Mapping[str, Mapping[str, Any]], vocabulary: Sequence[str]
                  ) -> list[np.ndarray]:
    """The authors' test-time sub-perspectives, which LEAK the test captions into the image side: one mask per
    noun of the scene's own five captions (:func:`ogclip_kg.prompts.caption_keywords`), the union of its visible
    targets of that category or kind (a noun that names none is skipped)."""
    from ogclip_kg.prompts import caption_keywords, target_nouns

    names = [target_nouns(rows[key]) for key in draw.keys]
    out = []
    for word in dict.fromkeys(w for caption in draw.captions for w in caption_keywords(caption, vocabulary)):
        mask = np.zeros(draw.scene.labels.shape, dtype=bool)
        for i, words in enumerate(names):
            if word in words:
                mask |= draw.scene.labels == i + 1
        if mask.any():
            out.append(mask)
    return out


@torch.no_grad()
def scene_embeddings(model: OGCLIP, scenes: Sequence[Scene], sub_perspective: str, batch_size: int = 256) -> Tensor:
    """L2-normalised full-size image embeddings of ``scenes`` under an image-only ``sub_perspective`` (see the
    module docstring), (len(scenes), D)."""
    return fused_embeddings(model, scenes, [sub_perspective_masks(scene, sub_perspective) for scene in scenes],
                            batch_size)


@torch.no_grad()
def fused_embeddings(model: OGCLIP, scenes: Sequence[Scene], masks: Sequence[Sequence[np.ndarray]],
                     batch_size: int = 256) -> Tensor:
    """normalize(g + r) per scene: g the whole image's embedding, r the normalised mean of the embeddings of the
    image read through each of its ``masks`` (g alone where it has none), (len(scenes), D)."""
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


def image_embeddings(model: OGCLIP, draws: Sequence[SceneDraw], sub_perspective: str,
                     rows: Mapping[str, Mapping[str, Any]] | None = None, batch_size: int = 256) -> Tensor:
    """The scenes' image embeddings under ``sub_perspective``: from the image alone (``none``, ``targets``,
    ``segmenter``), or, for ``captions``, with masks chosen by the nouns of each scene's own captions (the leak of
    the authors' evaluation, reported apart; needs ``rows``, the classes' graph facts)."""
    scenes = [draw.scene for draw in draws]
    if sub_perspective != "captions":
        return scene_embeddings(model, scenes, sub_perspective, batch_size)
    if rows is None:
        raise ValueError("caption-derived sub-perspectives need the classes' graph facts")
    from ogclip_kg.prompts import keyword_vocabulary

    vocabulary = keyword_vocabulary(rows.values())
    return fused_embeddings(model, scenes, [keyword_masks(draw, rows, vocabulary) for draw in draws], batch_size)


def retrieval_scores(model: OGCLIP, draws: Sequence[SceneDraw], sub_perspectives: Sequence[str],
                     rows: Mapping[str, Mapping[str, Any]] | None = None, batch_size: int = 256
                     ) -> dict[str, dict[str, float]]:
    """The recalls and mR of ``model`` on captioned scenes, under each sub-perspective."""
    captions = [caption for draw in draws for caption in draw.captions]
    text_image = torch.tensor([s for s, draw in enumerate(draws) for _ in draw.captions])
    texts = caption_embeddings(model, captions, batch_size)
    return {mode: recalls(image_embeddings(model, draws, mode, rows, batch_size) @ texts.T, text_image)
            for mode in sub_perspectives}


def retrieval_markdown(name: str, result: dict[str, Any]) -> str:
    """The retrieval table: one row per sub-perspective, and how it was made."""
    counts = result["counts"]
    columns = [f"i2t_r{k}" for k in KS] + [f"t2i_r{k}" for k in KS] + ["mR"]
    lines = ["| image embedding | " + " | ".join(["I→T R@1", "I→T R@5", "I→T R@10", "T→I R@1", "T→I R@5",
                                                 "T→I R@10", "mR"]) + " |", "|---" * (len(columns) + 1) + "|"]
    for mode, scores in result["sub_perspectives"].items():
        label = "captions (LEAKS the test captions)" if mode == "captions" else mode
        lines.append(f"| {label} | " + " | ".join(f"{scores[c]:.1f}" for c in columns) + " |")
    return (f"# Image–text retrieval: {name}\n\n"
            f"{counts['images']} overhead scenes ({counts['targets_per_scene'][0]}–{counts['targets_per_scene'][1]} "
            f"targets of {counts['classes']} classes of class set '{counts['class_set']}', {counts['image_size']} px; "
            f"aircraft on an apron, ships in a harbour, both), {counts['texts']} captions (five per scene, from the "
            "graph facts and the layout). Recall@K in %; I→T: any of the image's captions in the top K, T→I: the "
            f"caption's image in the top K; mR: the mean of the six. Chance: R@1 ≈ {100 / counts['images']:.1f}% "
            "(T→I). `none`: the whole image; `targets`: fused with every visible target read through its exact "
            "mask; `segmenter`: with every region the CPU segmenter finds"
            + ("; `noisy`: with the exact masks after a detector's mistakes (30% missed, the rest dilated or eroded, "
               "sometimes a false one)" if "noisy" in result["sub_perspectives"] else "")
            + ("; `captions`: with the targets the scene's own captions name, which leaks the test captions into "
               "the image side (the authors' evaluation; not comparable with the rows above)"
               if "captions" in result["sub_perspectives"] else "") + ".\n\n" + "\n".join(lines) + "\n")


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
    captions = [caption for draw in scenes for caption in draw.captions]
    result: dict[str, Any] = {"model_version": info.model_version, "bundle": str(cfg.bundle),
                              "sub_perspectives": retrieval_scores(model, scenes, cfg.sub_perspectives, rows,
                                                                   cfg.batch_size)}
    result["counts"] = {"images": len(scenes), "texts": len(captions), "classes": len(rows), "class_set": cfg.class_set,
                        "image_size": size, "targets_per_scene": list(cfg.targets_per_scene)}
    result["examples"] = {"captions": scenes[0].captions}
    result["config"] = cfg.model_dump(mode="json")
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_report(cfg.output_dir, "retrieval", result, retrieval_markdown(info.model_version, result), log,
                 "retrieval")
    return result
