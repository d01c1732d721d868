"""``ogclip index build``: embed a collection of images and their captions for ``/v1/retrieve``.

A Ray Data job over the curation pipeline's Parquet shards (``id``, ``image``, ``mask``, ``label``, ``caption``;
rows of a shard without ``id`` are named by their image's content hash): a pool of actors, each holding the
bundle's model, decodes every image with its mask (the ROI channel, as the service classifies it), embeds it and
its caption at full size, and the driver writes the result as a new revision of the collection
(``ogclip.collection``). A running service picks the new revision up on its next poll.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
import torch.nn.functional as F
from PIL import Image

from ogclip.collection import write_collection
from ogclip_jobs.config import IndexBuildConfig

_log = logging.getLogger(__name__)

COLUMNS = ("id", "image", "mask", "label", "caption")


class EncodeForIndex:
    """Ray Data stage (an actor: the model loads once): image, mask and caption → normalised full-size
    embeddings."""

    def __init__(self, bundle: str, threads: int = 1) -> None:
        from ogclip.bundle import load_bundle
        from ogclip.transforms import image_mask_transform

        torch.set_num_threads(threads)
        self.model, self.info = load_bundle(bundle, device="cpu")
        self.transform = image_mask_transform(self.info.preprocess)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from ogclip.decode import decode_image

        pairs = []
        for image, mask in zip(batch["image"], batch["mask"], strict=True):
            mask_image = Image.open(io.BytesIO(bytes(mask))).convert("L") if mask is not None and len(mask) else None
            pairs.append(self.transform(decode_image(bytes(image)), mask_image))
        images = torch.stack([image for image, _ in pairs])
        masks = torch.stack([mask for _, mask in pairs])
        vectors = F.normalize(self.model.image_features(images, masks).float(), dim=-1).numpy()
        captions = [str(c or "") for c in batch["caption"]]
        texts = np.zeros_like(vectors)
        written = [i for i, caption in enumerate(captions) if caption.strip()]
        if written:
            texts[written] = F.normalize(self.model.text_features([captions[i] for i in written]).float(),
                                         dim=-1).numpy()
        return {"id": batch["id"], "label": batch["label"], "caption": np.asarray(captions, dtype=object),
                "image_vector": vectors, "caption_vector": texts}


def _content_ids(batch: dict[str, Any]) -> dict[str, Any]:
    """Ids for rows of shards that have no ``id`` column: the image's content hash (what the pipeline's ids are)."""
    batch["id"] = np.asarray([hashlib.sha256(bytes(image)).hexdigest()[:24] for image in batch["image"]], dtype=object)
    return batch


def unique_ids(ids: list[str]) -> list[str]:
    """``ids`` with repeats told apart (``id#2``, ``id#3``, ... in order): a collection's ids are unique."""
    seen: dict[str, int] = {}
    out = []
    for item in ids:
        seen[item] = seen.get(item, 0) + 1
        out.append(item if seen[item] == 1 else f"{item}#{seen[item]}")
    return out


def run_index_build(cfg: IndexBuildConfig, log: Callable[[str], None] = _log.info) -> dict[str, Any]:
    """Embed every row of ``cfg.data`` with ``cfg.bundle`` and write the collection; returns what was written."""
    import pyarrow.parquet as pq

    from ogclip.bundle import read_bundle_info
    from ogclip_jobs.runtime import ensure_ray

    files = sorted(Path(cfg.data).rglob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no Parquet shards under {cfg.data}; run `ogclip data pipeline` first")
    info = read_bundle_info(cfg.bundle)
    available = set(pq.read_schema(files[0]).names)
    missing = {"image", "label", "caption"} - available
    if missing:
        raise ValueError(f"shards under {cfg.data} lack the columns {sorted(missing)}")
    ensure_ray(cfg.ray_num_cpus)
    started = time.perf_counter()
    columns = [c for c in COLUMNS if c in available]
    ds = ray.data.read_parquet(str(cfg.data), columns=columns, num_cpus=0.25)
    if "id" not in available:
        ds = ds.map_batches(_content_ids, batch_format="numpy", num_cpus=0.25)
    if "mask" not in available:
        ds = ds.map_batches(lambda b: {**b, "mask": np.full(len(b["image"]), None, dtype=object)},
                            batch_format="numpy", num_cpus=0.25)
    ds = ds.map_batches(EncodeForIndex, fn_constructor_kwargs={"bundle": str(cfg.bundle),
                                                               "threads": max(1, int(cfg.cpus_per_encoder))},
                        compute=ray.data.ActorPoolStrategy(size=cfg.encoders), num_cpus=cfg.cpus_per_encoder,
                        batch_size=cfg.batch_size, batch_format="numpy")
    parts: dict[str, list[Any]] = {k: [] for k in ("id", "label", "caption", "image_vector", "caption_vector")}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key in parts:
            parts[key].append(batch[key])
    if not parts["id"]:
        raise ValueError(f"no rows under {cfg.data}")
    ids = unique_ids([str(v) for v in np.concatenate(parts["id"])])
    images = np.concatenate(parts["image_vector"])
    seconds = time.perf_counter() - started
    revision = write_collection(cfg.output_dir, info.model_version, ids,
                                [str(v) for v in np.concatenate(parts["label"])],
                                [str(v) for v in np.concatenate(parts["caption"])], images,
                                np.concatenate(parts["caption_vector"]))
    result = {"collection": str(cfg.output_dir), "revision": revision, "model_version": info.model_version,
              "items": len(ids), "dim": int(images.shape[1]), "seconds": round(seconds, 1),
              "images_per_s": round(len(ids) / seconds, 1)}
    log(f"indexed {len(ids)} images and their captions with {info.model_version} in {seconds:.1f}s "
        f"({result['images_per_s']} images/s): {cfg.output_dir} revision {revision}")
    return result
