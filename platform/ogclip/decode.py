"""Decoding untrusted image bytes within a pixel budget: PIL only, so the processes that only decode (Ray Data's
workers, the crawler) never import torch."""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000  # ~6300×6300: well above real photos, far below decompression bombs
# A JPEG's segments (tables, metadata, scans) and scans, counted before it is opened: a photo has a few dozen
# segments and a progressive one about ten scans, but each scan is a pass over the whole image and each segment a
# parser record, so a 373 KB progressive JPEG repeating a tiny scan 10,000 times took 10 s of CPU to decode and
# 8 MB of empty APP markers 0.2 GB of memory.
JPEG_MAX_SEGMENTS, JPEG_MAX_SCANS = 1_000, 100
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # a marker: not byte stuffing, a restart marker or fill


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image: undecodable, truncated, or too large to decode safely."""


class ImageTooLargeError(ImageDecodeError):
    """An image whose pixel count is over the limit (a decompression bomb, or simply too big to take)."""


def jpeg_segments(data: bytes, most: int) -> tuple[int, int]:
    """(segments, scans) of the JPEG ``data`` up to its end of image, counting stops past ``most`` segments. Each
    segment is skipped by its length; after a scan's header, its entropy-coded data up to the next marker."""
    position, segments, scans = 2, 0, 0
    while segments <= most and (found := _JPEG_MARKER.search(data, position)) is not None:
        start = found.start()
        if data[start + 1] == 0xD9 or start + 4 > len(data):  # end of image (or of the bytes)
            break
        segments += 1
        scans += data[start + 1] == 0xDA
        position = start + 2 + int.from_bytes(data[start + 2:start + 4], "big")
    return segments, scans


def check_structure(data: bytes) -> None:
    """Raise :class:`ImageDecodeError` for a JPEG of more segments or scans than any encoder writes
    (:data:`JPEG_MAX_SEGMENTS`, :data:`JPEG_MAX_SCANS`), before anything opens it."""
    if data.startswith(b"\xff\xd8"):
        segments, scans = jpeg_segments(data, JPEG_MAX_SEGMENTS)
        if segments > JPEG_MAX_SEGMENTS or scans > JPEG_MAX_SCANS:
            raise ImageDecodeError(f"a JPEG of more than {JPEG_MAX_SEGMENTS} segments or {JPEG_MAX_SCANS} scans, "
                                   "which no encoder writes")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to RGB, refusing anything over ``max_pixels`` before its pixels are decompressed.

    PIL reads the header first, so the size check runs before any large allocation (decompression bombs); the
    full decode then catches truncated or corrupt files. A JPEG's structure is checked before that
    (:func:`check_structure`).
    """
    try:
        check_structure(data)
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
