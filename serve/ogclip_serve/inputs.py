"""Turning untrusted request bytes into model inputs, within limits, with a 4xx for anything unusable.

Sizes are checked before work: the body's JSON for non-finite numbers, strings that are not Unicode and nesting
too deep for the parser; the encoded length before base64 decoding; the byte count before image decoding; and, from
each image's header before any pixel is decompressed, its pixel count (``limits.max_pixels``) and the decoded
pixels of the whole request (``limits.max_request_pixels``). JPEGs are decoded at a reduced scale (PIL's draft
mode) when they are larger than the working size, and every decoded image is reduced to about
``limits.working_pixels`` before segmentation and preprocessing, so the work one request causes is bounded by the
limits, not by what it sends.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ogclip.decode import ImageDecodeError, check_structure
from ogclip.segment import box_mask, box_pixels
from ogclip_serve.config import ServeLimitsConfig
from ogclip_serve.errors import BadRequest, PayloadTooLarge, printable

Segmenter = Callable[[Image.Image, Sequence[float] | None], np.ndarray]

# What the service decodes (a multi-picture JPEG opens as JPEG, then is an "MPO"). Everything else PIL could open
# (EPS through Ghostscript, PSD, ICNS, ...) is refused.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


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


# -- JSON ----------------------------------------------------------------------------------------------------------

def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise BadRequest(f"request JSON has the number {shown}, which is out of range: numbers must be finite",
                         code="invalid_json")
    return value


def _integer(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > 18:  # past any limit, count or size the API has, and past int64
        raise BadRequest(f"request JSON has an integer of {digits} digits, which is out of range", code="invalid_json")
    return int(text)


def _constant(name: str) -> Any:
    raise BadRequest(f"request JSON has {name}, which is not JSON: numbers must be finite", code="invalid_json")


def parse_json(body: bytes) -> Any:
    """The request body as JSON, or 400: not UTF-8, not JSON, NaN/Infinity, a number out of float range or an
    integer of more than 18 digits (echoed whole by a range error, and past int64), nesting
    too deep for the parser, or a string with a lone surrogate escape (``"\\ud800"``: not Unicode, so nothing
    downstream could encode it). Linear in the body's size; nothing here recurses into the value."""
    try:
        text = body.decode("utf-8-sig")  # strict: the UTF-8 bytes of a surrogate are refused here
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                         code="invalid_json") from None
    try:
        data = json.loads(text, parse_float=_finite, parse_int=_integer, parse_constant=_constant)
    except RecursionError:  # the parser's own guard, near 1,000 levels (the request schemas nest 3)
        raise BadRequest("request JSON nests too deeply", code="invalid_json") from None
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON ({printable(str(exc))[:200]})", code="invalid_json") \
            from exc
    if _SURROGATE_ESCAPE.search(body) is not None:  # only then can a string hold a lone surrogate
        check_unicode(data)
    return data


def _where(path: tuple[Any, ...]) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    return printable(text or "body")[:120]


def check_unicode(data: Any) -> None:
    """400 when a parsed JSON value has a string or key that is not valid Unicode (a lone surrogate). Iterative: no
    recursion however deep the value."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not _unicode(key):
                    raise BadRequest(f"request JSON has a key at {_where(path)} that is not valid Unicode (it has a "
                                     "lone surrogate)", code="invalid_unicode")
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(value))
        elif isinstance(value, str) and not _unicode(value):
            raise BadRequest(f"request JSON has a string at {_where(path)} that is not valid Unicode (it has a lone "
                             "surrogate, such as \\ud800)", param=_where(path), code="invalid_unicode")


def _unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- base64 --------------------------------------------------------------------------------------------------------

def decode_base64(data: str, what: str, max_bytes: int) -> bytes:
    """Bytes of a base64 string or a ``data:...;base64,`` URL; 413 over ``max_bytes``, 400 if not base64."""
    if data.startswith("data:"):
        header, sep, data = data.partition(",")
        if not sep or not header.endswith(";base64"):
            raise BadRequest(f"{what}: a data URL must be base64 encoded (data:<type>;base64,...)")
    data = data.strip()
    if len(data) > 4 * math.ceil(max_bytes / 3) + 4:
        raise PayloadTooLarge(f"{what} is larger than the limit of {max_bytes} bytes")
    if not data.isascii():
        raise BadRequest(f"{what} is not valid base64 (non-ASCII characters)")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest(f"{what} is not valid base64 ({exc})") from exc
    if not raw:
        raise BadRequest(f"{what} is empty")
    if len(raw) > max_bytes:
        raise PayloadTooLarge(f"{what} is {len(raw)} bytes; the limit is {max_bytes}")
    return raw


# -- images --------------------------------------------------------------------------------------------------------

def working_size(width: int, height: int, pixels: int) -> tuple[int, int]:
    """``width``×``height`` scaled down, aspect kept, to about ``pixels`` (unchanged when already smaller). A strip
    whose short side would fall below one pixel keeps one pixel across and ``pixels`` along (1×16,000,000 works at
    1×262,144, not at 1×2,048,000)."""
    if width * height <= pixels:
        return width, height
    scale = math.sqrt(pixels / (width * height))
    across, along = round(width * scale), round(height * scale)
    if across < 1:
        return 1, min(height, pixels)
    if along < 1:
        return min(width, pixels), 1
    return across, along


def open_header(data: bytes, what: str, limits: ServeLimitsConfig) -> Image.Image:
    """An image opened from its header only (no pixel decoded yet): 413 over ``limits.max_pixels`` or bytes,
    400 for anything that is not an image in :data:`IMAGE_FORMATS` and for a JPEG of more segments or scans than
    any encoder writes (:func:`ogclip.decode.check_structure`)."""
    if len(data) > limits.max_image_bytes:
        raise PayloadTooLarge(f"{what} is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    try:
        check_structure(data)
    except ImageDecodeError as exc:
        raise BadRequest(f"{what}: cannot decode image: {exc}") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise PayloadTooLarge(f"{what}: image refused as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise BadRequest(f"{what}: cannot decode image: not a {', '.join(IMAGE_FORMATS)} image") from exc
    except Exception as exc:  # a malformed header: whatever the format's parser raised, it is the client's bytes
        raise BadRequest(f"{what}: cannot decode image: {type(exc).__name__}: {printable(str(exc))[:200]}") \
            from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise BadRequest(f"{what}: cannot decode image: it is {width}×{height}")
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(f"{what}: image is {width}×{height} = {width * height} pixels; the limit is "
                              f"{limits.max_pixels}", code="too_many_pixels")
    return image


def reduce_on_decode(image: Image.Image, size: tuple[int, int]) -> None:
    """Ask the decoder for a smaller image when the format can give one (JPEG: 1/2, 1/4 or 1/8 scale, never
    smaller than ``size``); ``image.size`` is then the size it will decode to."""
    if image.format in ("JPEG", "MPO") and (size[0] < image.size[0] or size[1] < image.size[1]):
        with contextlib.suppress(Exception):  # no draft: it decodes at full size, which the budget then counts
            image.draft("RGB" if image.mode == "RGB" else None, size)


def decode(image: Image.Image, what: str, mode: str) -> Image.Image:
    """Decode an opened image's pixels in ``mode``; 400 when they do not decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            return image.convert(mode)
    except Exception as exc:  # truncated or corrupt data: whatever the decoder raised, it is the client's bytes
        raise BadRequest(f"{what}: cannot decode image: {type(exc).__name__}: {printable(str(exc))[:200]}") \
            from exc


@dataclass
class _Opened:
    what: str  # how messages name it: images[0], input[3]
    image_what: str  # and its image: images[0].image, input[3]
    image: Image.Image
    mask: Image.Image | None
    size: tuple[int, int]  # as sent (boxes and masks are in these pixels)
    work: tuple[int, int]  # what segmentation and preprocessing see


def open_request(raws: Sequence[RawImage], limits: ServeLimitsConfig, names: Sequence[str] | None = None,
                 image_suffix: str = ".image") -> list[_Opened]:
    """Open every image and mask of a request from its header, and refuse the request (413) when together they
    would decode to more than ``limits.max_request_pixels``: nothing is decoded before that check. ``names``
    (default ``images[i]``) name the images in messages; an image itself is ``<name><image_suffix>``."""
    opened, total = [], 0
    for i, raw in enumerate(raws):
        what = names[i] if names is not None else f"images[{i}]"
        if raw.mask is not None and raw.box is not None:
            raise BadRequest(f"{what}: give a mask or a box, not both")
        image = open_header(raw.image, what + image_suffix, limits)
        size = image.size
        work = working_size(*size, limits.working_pixels)
        reduce_on_decode(image, work)
        total += image.size[0] * image.size[1]
        mask = None
        if raw.mask is not None:
            mask = open_header(raw.mask, f"{what}.mask", limits)
            if mask.size != size:
                raise BadRequest(f"{what}.mask is {mask.size[0]}×{mask.size[1]}, its image is {size[0]}×{size[1]}")
            reduce_on_decode(mask, work)
            total += mask.size[0] * mask.size[1]
        opened.append(_Opened(what, what + image_suffix, image, mask, size, work))
    if total > limits.max_request_pixels:
        raise PayloadTooLarge(f"the request's images decode to {total} pixels; the limit per request is "
                              f"{limits.max_request_pixels}: send fewer or smaller images",
                              param="images", code="pixel_budget_exceeded")
    return opened


def _scaled_box(box: Sequence[float], size: tuple[int, int], work: tuple[int, int]) -> tuple[float, ...]:
    if size == work:
        return tuple(box)
    sx, sy = work[0] / size[0], work[1] / size[1]
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def prepare_opened(item: _Opened, box: Sequence[float] | None,
                   transform: Callable[[Image.Image, np.ndarray | None], tuple[Tensor, Tensor]],
                   segmenter: Segmenter | None, segmenter_name: str, use_segmenter: bool) -> PreparedImage:
    """Decode one opened image at its working size and settle its ROI mask: the request's mask, else a box
    (refined by the segmenter when one is used), else the segmenter's mask, else none (an all-ones ROI channel,
    the plain-CLIP reading)."""
    if box is not None:
        try:
            box_pixels(box, *item.size)  # checked in the pixels the client sent
        except ValueError as exc:
            raise BadRequest(f"{item.what}.box: {exc}") from exc
    image = decode(item.image, item.image_what, "RGB")
    if image.size != item.work:
        image = image.resize(item.work, Image.Resampling.BICUBIC, reducing_gap=2.0)
    width, height = image.size
    mask: np.ndarray | None
    if item.mask is not None:
        mask_image = decode(item.mask, f"{item.what}.mask", "L")
        if mask_image.size != item.work:
            mask_image = mask_image.resize(item.work, Image.Resampling.NEAREST)
        mask, source = np.asarray(mask_image, dtype=np.float32) / 255.0, "mask"
    elif box is not None:
        work_box = _scaled_box(box, item.size, item.work)
        try:
            box_pixels(work_box, width, height)
        except ValueError:  # a sliver of a box that vanished in the reduction: keep its nearest pixel
            x0, y0 = max(0, min(int(work_box[0]), width - 1)), max(0, min(int(work_box[1]), height - 1))
            work_box = (x0, y0, x0 + 1, y0 + 1)
        if use_segmenter and segmenter is not None:
            mask, source = segmenter(image, work_box).astype(np.float32), segmenter_name
        else:
            mask, source = box_mask(work_box, width, height).astype(np.float32), "box"
    elif use_segmenter and segmenter is not None:
        mask, source = segmenter(image, None).astype(np.float32), segmenter_name
        if not mask.any():  # nothing found: fall back to "no specific region" rather than an empty ROI
            mask, source = None, "none"
    else:
        mask, source = None, "none"
    image_t, mask_t = transform(image, mask)
    return PreparedImage(image=image_t, mask=mask_t, mask_source=source)


def prepare_all(raws: Sequence[RawImage], limits: ServeLimitsConfig,
                transform: Callable[[Image.Image, np.ndarray | None], tuple[Tensor, Tensor]],
                segmenter: Segmenter | None, segmenter_name: str, use_segmenter: bool,
                names: Sequence[str] | None = None, image_suffix: str = ".image") -> list[PreparedImage]:
    """A request's images as model inputs: headers and the pixel budget checked for all of them first, then each
    decoded (at its working size) and prepared."""
    opened = open_request(raws, limits, names, image_suffix)
    return [prepare_opened(item, raw.box, transform, segmenter, segmenter_name, use_segmenter)
            for item, raw in zip(opened, raws, strict=True)]


def prepare(raw: RawImage, index: int, limits: ServeLimitsConfig,
            transform: Callable[[Image.Image, np.ndarray | None], tuple[Tensor, Tensor]],
            segmenter: Segmenter | None, segmenter_name: str, use_segmenter: bool) -> PreparedImage:
    """One image as a model input: :func:`prepare_all` for a request of one."""
    (item,) = open_request([raw], limits, [f"images[{index}]"])
    return prepare_opened(item, raw.box, transform, segmenter, segmenter_name, use_segmenter)
