"""Retrieval collections: the embeddings of an indexed set of images and of their captions, the contract between
``ogclip index build`` (which writes one) and the service's ``/v1/retrieve`` (which searches it).

A collection is a folder of revisions::

    CURRENT                 the revision in use (replaced atomically: readers never see half a collection)
    <revision>/items.json      the items' ids, labels and captions (three lists in item order)
    <revision>/images.npy      (N, D) float32: the items' full-size image embeddings, L2-normalised
    <revision>/captions.npy    (N, D) float32: their captions' full-size text embeddings (zero where none)
    <revision>/collection.json model_version, items, dim, revision

``revision`` is a content hash of the three payload files; the embeddings are those of one bundle
(``model_version``), and a service whose bundle differs refuses the collection. Writing a new revision and then
``CURRENT`` is how a collection is replaced while a service reads it (it polls ``CURRENT``); the two newest
revisions are kept, older ones removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CURRENT = "CURRENT"
PAYLOAD = ("items.json", "images.npy", "captions.npy")
KEEP = 2


class CollectionError(ValueError):
    """A collection that cannot be used: missing, incomplete, damaged, or made by another model."""


@dataclass(frozen=True)
class Collection:
    revision: str
    model_version: str
    ids: list[str]
    labels: list[str]
    captions: list[str]
    images: np.ndarray  # (N, D) float32, unit rows
    caption_vectors: np.ndarray  # (N, D) float32, unit rows or zero

    def __len__(self) -> int:
        return len(self.ids)


def write_collection(folder: str | Path, model_version: str, ids: list[str], labels: list[str], captions: list[str],
                     images: np.ndarray, caption_vectors: np.ndarray) -> str:
    """Write a new revision of the collection at ``folder`` and make it current; returns the revision."""
    count = len(ids)
    images = np.ascontiguousarray(images, dtype=np.float32)
    caption_vectors = np.ascontiguousarray(caption_vectors, dtype=np.float32)
    if not (len(labels) == len(captions) == count and images.shape[0] == caption_vectors.shape[0] == count):
        raise CollectionError("ids, labels, captions and both embedding arrays must have one row per item")
    if images.ndim != 2 or caption_vectors.shape != images.shape:
        raise CollectionError(f"image and caption embeddings must be (N, D) alike, got {images.shape} and "
                              f"{caption_vectors.shape}")
    if len(set(ids)) != count:
        raise CollectionError("item ids must be unique")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        (staging / "items.json").write_text(json.dumps({"id": ids, "label": labels, "caption": captions}))
        np.save(staging / "images.npy", images)
        np.save(staging / "captions.npy", caption_vectors)
        digest = hashlib.sha256()
        for name in PAYLOAD:
            digest.update(hashlib.sha256((staging / name).read_bytes()).digest())
        revision = f"col-{digest.hexdigest()[:16]}"
        (staging / "collection.json").write_text(json.dumps(
            {"model_version": model_version, "items": count, "dim": int(images.shape[1]), "revision": revision}))
        target = folder / revision
        if target.exists():
            shutil.rmtree(staging)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    pointer = folder / f".{CURRENT}.tmp"
    pointer.write_text(revision + "\n")
    os.replace(pointer, folder / CURRENT)
    revisions = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.startswith("col-")),
                       key=lambda p: p.stat().st_mtime, reverse=True)
    for old in revisions[KEEP:]:
        if old.name != revision:
            shutil.rmtree(old, ignore_errors=True)
    return revision


def current_revision(folder: str | Path) -> str | None:
    """The revision ``CURRENT`` names (a cheap poll), or None when nothing has been written yet."""
    try:
        return (Path(folder) / CURRENT).read_text().strip() or None
    except FileNotFoundError:
        return None


def read_collection(folder: str | Path, expected_version: str | None = None) -> Collection:
    """The current revision of the collection at ``folder``; refused when it was embedded by a model other than
    ``expected_version``."""
    folder = Path(folder)
    revision = current_revision(folder)
    if revision is None:
        raise CollectionError(f"{folder} holds no collection (no {CURRENT}): build one with `ogclip index build`")
    path = folder / revision
    try:
        meta = json.loads((path / "collection.json").read_text())
        items = json.loads((path / "items.json").read_text())
        ids, labels, captions = items["id"], items["label"], items["caption"]
        images = np.load(path / "images.npy", allow_pickle=False)
        caption_vectors = np.load(path / "captions.npy", allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CollectionError(f"collection {path} cannot be read: {exc}") from exc
    if expected_version is not None and meta["model_version"] != expected_version:
        raise CollectionError(f"collection {path} was embedded by model {meta['model_version']}, not "
                              f"{expected_version}: rebuild it with this bundle (`ogclip index build`)")
    if not (len(ids) == len(labels) == len(captions) == meta["items"] == len(images) == len(caption_vectors)):
        raise CollectionError(f"collection {path} is incomplete: {len(ids)} items, {len(images)} image and "
                              f"{len(caption_vectors)} caption embeddings, {meta['items']} expected")
    return Collection(revision=revision, model_version=meta["model_version"],
                      ids=[str(v) for v in ids], labels=[str(v) for v in labels],
                      captions=[str(v) for v in captions],
                      images=np.asarray(images, np.float32), caption_vectors=np.asarray(caption_vectors, np.float32))
