"""Image and mask preprocessing, applied jointly so a mask stays aligned with its image, and safe decoding."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ogclip.config import PreprocessConfig

DEFAULT_MAX_PIXELS = 40_000_000  # ~6300×6300: well above real photos, far below decompression bombs


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image: undecodable, truncated, or too large to decode safely."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to RGB, refusing anything over ``max_pixels`` before its pixels are decompressed.

    PIL reads the header first, so the size check runs before any large allocation (decompression bombs); the
    full decode then catches truncated or corrupt files.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image is {width}×{height} = {width * height} pixels; limit {max_pixels}")
            image.load()
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    return image.convert("RGB")


def image_mask_transform(
    cfg: PreprocessConfig, train: bool = False
) -> Callable[[Image.Image | Tensor, np.ndarray | Tensor | Image.Image | None], tuple[Tensor, Tensor]]:
    """Return ``f(image, mask) -> (image (3,S,S) normalised, mask (1,S,S) in [0,1])``.

    Evaluation resizes the short side to S and centre-crops; training takes a random resized crop and a horizontal
    flip, drawn once and applied to image and mask alike. A missing mask becomes all ones ("no specific region").
    """
    interpolation = InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else InterpolationMode.BILINEAR
    size = cfg.image_size
    geometry: list[T.Transform]
    if train:
        geometry = [
            T.RandomResizedCrop(size, scale=(0.7, 1.0), interpolation=interpolation, antialias=True),
            T.RandomHorizontalFlip(),
        ]
    else:
        geometry = [T.Resize(size, interpolation=interpolation, antialias=True), T.CenterCrop(size)]
    pipeline = T.Compose(
        [
            *geometry,
            T.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.float32, "others": None}, scale=True),
            T.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
        ]
    )

    def apply(image: Image.Image | Tensor, mask: np.ndarray | Tensor | Image.Image | None) -> tuple[Tensor, Tensor]:
        img = tv_tensors.Image(T.functional.pil_to_tensor(image) if isinstance(image, Image.Image) else image)
        height, width = img.shape[-2:]
        if mask is None:
            mask_t = torch.ones(1, height, width)
        else:
            mask_t = torch.tensor(np.array(mask), dtype=torch.float32)
            if mask_t.max() > 1.0:  # 8-bit masks (0..255)
                mask_t = mask_t / 255.0
            mask_t = mask_t.reshape(1, *mask_t.shape[-2:])
            if mask_t.shape[-2:] != (height, width):
                raise ValueError(f"mask is {tuple(mask_t.shape[-2:])}, image is {(height, width)}")
        # Masks are Mask tv_tensors, so resizing uses nearest neighbour and Normalize leaves them alone.
        out_image, out_mask = pipeline(img, tv_tensors.Mask(mask_t.clamp(0.0, 1.0)))
        return out_image.as_subclass(Tensor), out_mask.as_subclass(Tensor)

    return apply
