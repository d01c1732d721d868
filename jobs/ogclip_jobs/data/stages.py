"""The pipeline's per-batch work, as callable classes for Ray Data's ``map_batches``: models load in
``__init__`` (once per actor), ``__call__`` transforms a batch (a dict of column arrays).

Rows carry: ``id``, ``image`` (encoded bytes), ``mask`` (PNG bytes, 255 = target, or None), ``mask_truth`` (the
ground-truth mask when the source has one and another method predicts ``mask``), ``label`` (class key),
``class_name``, ``super_category``, ``caption``, ``provenance`` (JSON).
"""

from __future__ import annotations

import base64
import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ogclip import segment
from ogclip.decode import decode_image
from ogclip.synth import TargetClass, render
from ogclip_jobs.data.images import decode_mask, dhash, mask_iou, png_bytes, sha256

_log = logging.getLogger(__name__)

Batch = dict[str, Any]


def _rows(batch: Batch) -> list[dict[str, Any]]:
    keys = list(batch)
    return [dict(zip(keys, values, strict=True)) for values in zip(*(batch[k] for k in keys), strict=True)]


def present(value: Any) -> bool:
    """Whether an optional bytes cell holds data (Arrow hands a missing value back as None, NaN or empty bytes)."""
    return isinstance(value, (bytes, bytearray, np.bytes_)) and len(value) > 0


def _columns(rows: list[dict[str, Any]], keys: list[str]) -> Batch:
    return {k: [row.get(k) for row in rows] for k in keys}


ROW_COLUMNS = ["id", "image", "mask", "mask_truth", "label", "class_name", "super_category", "caption",
               "provenance"]


def synth_id(label: str, index: int) -> str:
    """The id of the ``index``-th render of class ``label`` (known before rendering: a resumed run skips it)."""
    return f"synth-{label}-{index}"


def crawl_id(url: str) -> str:
    """The id of a crawled URL's image (known before fetching: a resumed run skips it)."""
    return f"web-{sha256(url.encode())[:16]}"


class RenderTargets:
    """Render the synthetic world: a batch of (label, index) becomes images with their exact masks."""

    def __init__(self, targets: dict[str, TargetClass], image_size: int, seed: int) -> None:
        # The targets, not the graph rows they come from: a few fields per class, small enough for Ray to pass
        # inline rather than through the object store.
        self.targets = dict(targets)
        self.image_size, self.seed = image_size, seed

    def __call__(self, batch: Batch) -> Batch:
        rows = []
        for label, index in zip(batch["label"], batch["index"], strict=True):
            target = self.targets[label]
            seed = int(sha256(f"{self.seed}:{label}:{index}".encode())[:15], 16)
            sample = render(target, seed=seed, size=self.image_size)
            rows.append({
                "id": synth_id(label, index), "image": png_bytes(sample.image), "mask": png_bytes(sample.mask),
                "mask_truth": None, "label": label, "class_name": target.name,
                "super_category": target.super_category, "caption": None,
                "provenance": json.dumps({"source": "synth", "seed": seed, "background": sample.background,
                                          "area": round(sample.area, 4), "occluded": sample.occluded}),
            })
        return _columns(rows, ROW_COLUMNS)


class DecodeCheck:
    """Drop rows whose bytes are not a safely decodable image, recording why in ``rejected``."""

    def __init__(self, max_pixels: int = 40_000_000) -> None:
        self.max_pixels = max_pixels

    def __call__(self, batch: Batch) -> Batch:
        keep, rejected = [], []
        for row in _rows(batch):
            try:
                decode_image(row["image"], self.max_pixels)
                keep.append(row)
            except ValueError as exc:
                rejected.append(f"{row['id']}: {exc}")
        out = _columns(keep, list(batch))
        if rejected:
            _log.warning("decode check rejected %d: %s", len(rejected), "; ".join(rejected[:3]))
        return out


class HashImages:
    """Content hash (exact duplicates) and perceptual dHash (near duplicates) of each image."""

    def __call__(self, batch: Batch) -> Batch:
        batch["sha256"] = [sha256(data) for data in batch["image"]]
        batch["dhash"] = [dhash(decode_image(data)) for data in batch["image"]]
        return batch


class EmbedImages:
    """Image embeddings of a trained model (an export bundle) for the quality filter.

    Only a bundle: a registry architecture would have fresh random weights, and clusters of their embeddings say
    nothing about content (the pipeline's quality stage passes rows through instead, and says so).
    """

    def __init__(self, model: str | Path, device: str = "auto") -> None:
        import torch

        from ogclip.bundle import load_bundle
        from ogclip.transforms import image_mask_transform

        if not Path(model).is_dir():
            raise ValueError(f"the quality filter embeds with a trained export bundle; {str(model)!r} is not one")
        self.model, _ = load_bundle(model, device=device)
        self.transform = image_mask_transform(self.model.cfg.preprocess)
        self.torch = torch

    def __call__(self, batch: Batch) -> Batch:
        images, masks = [], []
        for data, mask in zip(batch["image"], batch["mask"], strict=True):
            image, mask_t = self.transform(decode_image(data), decode_mask(mask) if present(mask) else None)
            images.append(image)
            masks.append(mask_t)
        with self.torch.no_grad():
            device = self.model.device
            emb = self.model.encode_image(self.torch.stack(images).to(device), self.torch.stack(masks).to(device))
        batch["embedding"] = [row.astype(np.float32) for row in emb.cpu().numpy()]
        return batch


class CpuSegmenter(segment.CpuSegmenter):
    """The weight-free segmenter (:class:`ogclip.segment.CpuSegmenter`) as a pipeline stage."""

    def __call__(self, batch: Batch) -> Batch:
        return _predict_masks(batch, lambda row: self.segment(decode_image(row["image"])))


def _predict_masks(batch: Batch, predict) -> Batch:
    """Replace ``mask`` by a prediction, keeping the source's mask as ``mask_truth`` and scoring the IoU."""
    truths, masks, ious = [], [], []
    for row in _rows(batch):
        truth = row["mask_truth"] if present(row["mask_truth"]) else row["mask"]
        predicted = predict(row)
        truths.append(truth if present(truth) else None)
        masks.append(png_bytes((predicted * 255).astype(np.uint8)))
        ious.append(mask_iou(predicted, decode_mask(truth)) if present(truth) else None)
    batch["mask_truth"], batch["mask"], batch["mask_iou"] = truths, masks, ious
    return batch


class Sam2Masker(segment.Sam2Segmenter):
    """SAM2 masks from a local checkpoint (:class:`ogclip.segment.Sam2Segmenter`; GPU actor pool in production)."""

    def __call__(self, batch: Batch) -> Batch:
        return _predict_masks(batch, lambda row: self.segment(decode_image(row["image"])))


_BACKGROUND_PHRASES = {"sky": "Seen in the sky.", "sea": "Seen at sea.", "land": "Seen over land."}


class TemplateCaptioner:
    """Knowledge-template captions: the class's graph facts rendered as text (no model), plus the scene when the
    source knows it."""

    def __init__(self, classes: dict[str, dict[str, Any]], seed: int = 0) -> None:
        from ogclip_kg.prompts import description

        self.descriptions = {key: description(row, seed) for key, row in classes.items()}

    def __call__(self, batch: Batch) -> Batch:
        captions = []
        for row in _rows(batch):
            background = json.loads(row["provenance"] or "{}").get("background")
            given = row["caption"] if isinstance(row["caption"], str) and row["caption"] else None
            text = self.descriptions.get(row["label"]) or given or f"A photo of {row['class_name']}."
            captions.append(" ".join(p for p in (text, _BACKGROUND_PHRASES.get(background, "")) if p))
        batch["caption"] = captions
        return batch


class VlmCaptioner:
    """Captions from a vision-language model (e.g. Qwen2.5-VL) served by vLLM from a local path, prompted with
    the class's graph facts (the same facts as the template captioner; ``vllm`` imported lazily, GPU)."""

    def __init__(self, model_path: str, classes: dict[str, dict[str, Any]], max_tokens: int = 96) -> None:
        from vllm import LLM, SamplingParams

        from ogclip_kg.prompts import vlm_prompt

        self.llm = LLM(model=model_path, limit_mm_per_prompt={"image": 1})
        self.sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        self.prompts = {key: vlm_prompt(row) for key, row in classes.items()}

    def __call__(self, batch: Batch) -> Batch:
        conversations = []
        for row in _rows(batch):
            data_url = "data:image/png;base64," + base64.b64encode(png_bytes(decode_image(row["image"]))).decode()
            prompt = self.prompts.get(row["label"], f"Describe the {row['class_name']} in this image.")
            conversations.append([{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": prompt}]}])
        outputs = self.llm.chat(conversations, self.sampling, use_tqdm=False)
        batch["caption"] = [out.outputs[0].text.strip() for out in outputs]
        return batch


def read_folder_rows(batch: Batch) -> Batch:
    """``read_binary_files`` rows (path, bytes) of ``root/<class>/<file>`` into pipeline rows."""
    rows = []
    for path, data in zip(batch["path"], batch["bytes"], strict=True):
        label = Path(path).parent.name
        rows.append({"id": f"file-{sha256(path.encode())[:16]}", "image": data, "mask": None, "mask_truth": None,
                     "label": label, "class_name": label, "super_category": None, "caption": None,
                     "provenance": json.dumps({"source": "folder", "path": path})})
    return _columns(rows, ROW_COLUMNS)


def read_tar_rows(batch: Batch) -> Batch:
    """WebDataset tars (as ``read_binary_files`` rows) into pipeline rows: ``key.png|jpg``, ``.txt``, ``.json``."""
    import tarfile

    rows = []
    for path, data in zip(batch["path"], batch["bytes"], strict=True):
        samples: dict[str, dict[str, bytes]] = {}
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                key, _, ext = Path(member.name).name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
        for key, parts in sorted(samples.items()):
            image = parts.get("png") or parts.get("jpg") or parts.get("jpeg") or parts.get("webp")
            if image is None:
                continue
            meta = json.loads(parts["json"]) if "json" in parts else {}
            label = meta.get("label") or (parts["cls"].decode().strip() if "cls" in parts else "unknown")
            rows.append({"id": meta.get("id") or f"wds-{sha256(f'{path}:{key}'.encode())[:16]}", "image": image,
                         "mask": parts.get("mask.png"), "mask_truth": None, "label": label,
                         "class_name": meta.get("class_name", label), "super_category": meta.get("super_category"),
                         "caption": parts["txt"].decode() if "txt" in parts else None,
                         "provenance": json.dumps({"source": "webdataset", "tar": path, "key": key})})
    return _columns(rows, ROW_COLUMNS)


def read_manifest(path: Path) -> list[dict[str, str]]:
    """``url<TAB>label`` lines of a crawl manifest (blank lines and ``#`` comments skipped), with their hosts."""
    from urllib.parse import urlsplit

    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        url, _, label = line.partition("\t")
        if not label.strip():
            raise ValueError(f"{path}:{number}: expected 'url<TAB>label'")
        entries.append({"url": url.strip(), "label": label.strip(), "host": (urlsplit(url.strip()).hostname or "")})
    return entries


def crawl_host_rows(group: Batch, config: Any, log_dir: str) -> Batch:
    """Fetch one host's URLs with one polite crawler (so per-host rate limits hold across the cluster); every URL
    gets a line in the host's fetch log, and only images that passed every check become rows."""
    from ogclip_jobs.crawl import Crawler, FetchLog

    host = str(group["host"][0]) or "invalid-host"
    rows = []
    with FetchLog(Path(log_dir) / f"{sha256(host.encode())[:12]}.jsonl") as log, Crawler(config, log) as crawler:
        for url, label in zip(group["url"], group["label"], strict=True):
            result = crawler.fetch(str(url))
            if result.ok:
                rows.append({"id": crawl_id(str(url)), "image": result.data, "mask": None,
                             "mask_truth": None, "label": str(label), "class_name": str(label),
                             "super_category": None, "caption": None,
                             "provenance": json.dumps({"source": "crawl", "url": str(url),
                                                       "final_url": result.final_url})})
    return _columns(rows, ROW_COLUMNS)
