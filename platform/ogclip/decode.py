"""Decoding untrusted image bytes within a pixel budget: PIL only, so the processes that only decode (Ray Data's
workers, the crawler) never import torch."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # ~6300×6300: well above real photos, far below decompression bombs


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image: undecodable, truncated, or too large to decode safely."""


class ImageTooLargeError(ImageDecodeError):
    """An image whose pixel count is over the limit (a decompression bomb, or simply too big to take)."""


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
                raise ImageTooLargeError(f"image is {width}×{height} = {width * height} pixels; limit {max_pixels}")
            image.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLargeError(f"image refused as a decompression bomb: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
    return image.convert("RGB")
