"""Image encoding and hashing shared by the pipeline's stages."""

from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """Lossless PNG bytes of an image or of a uint8 mask array."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_mask(data: bytes) -> np.ndarray:
    """A stored mask as a boolean array."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L")) > 127


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dhash(image: Image.Image, bits: int = 8) -> int:
    """64-bit difference hash: near-identical images (re-encoded, resized, slightly recoloured) get near-equal hashes.

    Returned as a signed 64-bit integer so it fits Arrow's int64.
    """
    small = np.asarray(image.convert("L").resize((bits + 1, bits), Image.Resampling.LANCZOS), dtype=np.int16)
    value = 0
    for bit in (small[:, 1:] > small[:, :-1]).flatten():
        value = (value << 1) | int(bit)
    return value - (1 << 64) if value >= (1 << 63) else value


def hamming(a: int, b: int) -> int:
    return bin((a ^ b) & ((1 << 64) - 1)).count("1")


def mask_iou(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(predicted, truth).sum()
    return 1.0 if union == 0 else float(np.logical_and(predicted, truth).sum() / union)
