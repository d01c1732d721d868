"""Turning untrusted request bytes into model inputs, within limits, with a 4xx for anything unusable.

Sizes are checked before work: the encoded length before base64 decoding, the byte count before image decoding,
the pixel count from the image header before its pixels are decompressed (``ogclip.transforms.decode_image``,
shared with the curation pipeline), so no request can make a replica allocate more than the limits allow.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from torch import Tensor

from ogclip.config import ServeLimitsConfig
from ogclip.segment import box_mask, box_pixels
from ogclip.transforms import ImageDecodeError, ImageTooLargeError, decode_image
from ogclip_serve.errors import BadRequest, PayloadTooLarge

Segmenter = Callable[[Image.Image, Sequence[float] | None], np.ndarray]


@dataclass(frozen=True)
class RawImage:
    """One image of a request as bytes, before decoding."""

    image: bytes
    mask: bytes | None = None
    box: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class PreparedImage:
    image: Tensor  # (3, S, S), normalised
    mask: Tensor  # (1, S, S) in [0, 1]
    mask_source: str


def decode_base64(data: str, what: str, max_bytes: int) -> bytes:
    """Bytes of a base64 string or a ``data:...;base64,`` URL; 413 over ``max_bytes``, 400 if not base64."""
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or not header.endswith(";base64"):
            raise BadRequest(f"{what}: a data URL must be base64 encoded (data:<type>;base64,...)")
    data = data.strip()
    if len(data) > 4 * math.ceil(max_bytes / 3) + 4:
        raise PayloadTooLarge(f"{what} is larger than the limit of {max_bytes} bytes")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{what} is not valid base64 ({exc})") from exc
    if not raw:
        raise BadRequest(f"{what} is empty")
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"{what} is {len(raw)} bytes; the limit is {max_bytes}")
    return raw


def open_image(data: bytes, what: str, limits: ServeLimitsConfig) -> Image.Image:
    """Decode an image safely: 413 when too large (bytes or pixels, decompression bombs), 400 when unusable."""
    if len(data) > limits.max_image_bytes:
        raise PayloadTooLarge(f"{what} is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    try:
        return decode_image(data, max_pixels=limits.max_pixels)
    except ImageTooLargeError as exc:
        raise PayloadTooLarge(f"{what}: {exc}") from exc
    except ImageDecodeError as exc:
        raise BadRequest(f"{what}: {exc}") from exc


def open_mask(data: bytes, what: str, size: tuple[int, int], limits: ServeLimitsConfig) -> np.ndarray:
    """A mask image as floats in [0, 1] (grey levels / 255), which must match the image's size."""
    mask = open_image(data, what, limits).convert("L")
    if mask.size != size:
        raise BadRequest(f"{what} is {mask.size[0]}×{mask.size[1]}, its image is {size[0]}×{size[1]}")
    return np.asarray(mask, dtype=np.float32) / 255.0


def prepare(raw: RawImage, index: int, limits: ServeLimitsConfig,
            transform: Callable[[Image.Image, np.ndarray | None], tuple[Tensor, Tensor]],
            segmenter: Segmenter | None, segmenter_name: str, use_segmenter: bool) -> PreparedImage:
    """Decode one image and settle its ROI mask: the request's mask, else a box (refined by the segmenter when one
    is used), else the segmenter's mask, else none (an all-ones ROI channel, the plain-CLIP reading)."""
    what = f"images[{index}]"
    image = open_image(raw.image, f"{what}.image", limits)
    width, height = image.size
    if raw.mask is not None and raw.box is not None:
        raise BadRequest(f"{what}: give a mask or a box, not both")
    mask: np.ndarray | None
    if raw.mask is not None:
        mask, source = open_mask(raw.mask, f"{what}.mask", image.size, limits), "mask"
    elif raw.box is not None:
        try:
            box_pixels(raw.box, width, height)
        except ValueError as exc:
            raise BadRequest(f"{what}.box: {exc}") from exc
        if use_segmenter and segmenter is not None:
            mask, source = segmenter(image, raw.box).astype(np.float32), segmenter_name
        else:
            mask, source = box_mask(raw.box, width, height).astype(np.float32), "box"
    elif use_segmenter and segmenter is not None:
        mask, source = segmenter(image, None).astype(np.float32), segmenter_name
        if not mask.any():  # nothing found: fall back to "no specific region" rather than an empty ROI
            mask, source = None, "none"
    else:
        mask, source = None, "none"
    image_t, mask_t = transform(image, mask)
    return PreparedImage(image=image_t, mask=mask_t, mask_source=source)
