"""Image and mask preprocessing, applied jointly so a mask stays aligned with its image (decoding untrusted bytes is
:mod:`ogclip.decode`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from ogclip.config import PreprocessConfig
from ogclip.segment import mask_box

ROI_MARGIN = 1.15  # the zoom window is at least this much larger than the object's box: the outline stays in view


def roi_window(mask: Tensor, zoom: float) -> tuple[int, int, int] | None:
    """The square ``(top, left, side)`` that zooms ``zoom``× onto the object of ``mask`` (…,H,W), or None.

    The window is ``1/zoom`` of the short side, or ``ROI_MARGIN`` × the object's box where that is larger (an object
    is never cut), centred on the box and moved inside the image. A fixed fraction of the frame rather than the box
    itself, so an object's apparent size still says how large it is. None (nothing to cut) without zoom, without an
    object, or when the window would be the whole image.
    """
    box = mask_box(mask.reshape(mask.shape[-2:]).numpy() > 0.5) if zoom > 1.0 else None
    if box is None:
        return None
    left, top, right, bottom = box
    height, width = mask.shape[-2:]
    short = min(height, width)
    side = min(short, max(round(short / zoom), math.ceil(ROI_MARGIN * max(bottom - top, right - left))))
    if side == height == width:  # the window would be the whole image
        return None
    row = min(max(round((top + bottom - side) / 2), 0), height - side)
    col = min(max(round((left + right - side) / 2), 0), width - side)
    return row, col, side


def upright_window(mask: Tensor, zoom: float) -> tuple[float, float, int, float] | None:
    """``(x, y, side, angle)``: the window :func:`roi_window` would cut around the object of ``mask`` (…,H,W) were
    the object upright — its centre in the image (pixels, the top-left corner at 0), its side, and the anticlockwise
    turn in degrees that makes the object upright about that centre. None for an empty mask or one that covers the
    whole image (no object to turn).

    Upright means the long axis of the mask (its second moments) is vertical, the way up chosen by the skewness
    (third moment) along whichever of the two axes is the more lopsided; for an outline more lopsided than it is
    elongated, the direction of its third moments is up. The same outline at any rotation comes out in the same
    pose, whatever its colours; its apparent size is kept as the zoom keeps it (the window measured on the upright
    object's box), and the object sits in the middle of the window.
    """
    inside = mask.reshape(mask.shape[-2:]).numpy() > 0.5
    if not inside.any() or inside.all():
        return None
    ys, xs = (c + 0.5 for c in np.nonzero(inside))
    x, y = xs.mean(), ys.mean()
    dx, dy = xs - x, ys - y
    spread, axes = np.linalg.eigh(np.cov(dx, dy, bias=True))
    axis = axes[:, 1]  # the eigenvector of the larger eigenvalue: the long axis
    along, across = dx * axis[0] + dy * axis[1], dy * axis[0] - dx * axis[1]
    skew = [(t ** 3).mean() / max((t ** 2).mean(), 1e-12) ** 1.5 for t in (along, across)]
    if max(skew, key=abs) < 0:  # the more lopsided axis decides which way is up (a wide wing: the fuselage)
        axis = -axis
    # Where the outline is about as long as it is wide the long axis is a coin toss; its third moments then point
    # the way (the r²-weighted mean offset, in units of the spread: 0 for a shape symmetric about its centroid).
    radial = dx * dx + dy * dy
    lopsided = np.array([(dx * radial).mean(), (dy * radial).mean()]) / max(radial.mean(), 1e-12) ** 1.5
    if np.linalg.norm(lopsided) > (spread[1] - spread[0]) / max(spread.sum(), 1e-12):
        axis = lopsided / np.linalg.norm(lopsided)
    # The axis as drawn (rows grow downwards) points atan2(-y, x) anticlockwise from the right; up is 90°.
    angle = 90.0 - math.degrees(math.atan2(-axis[1], axis[0]))
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    right, down = dx * cos + dy * sin, dy * cos - dx * sin  # the pixels' offsets once turned upright
    extent = max(right.max() - right.min(), down.max() - down.min()) + 1.0
    short = min(mask.shape[-2:])
    side = min(short, max(round(short / zoom), math.ceil(ROI_MARGIN * extent)))
    across_mid, down_mid = (right.min() + right.max()) / 2, (down.min() + down.max()) / 2
    return (float(x + across_mid * cos - down_mid * sin), float(y + across_mid * sin + down_mid * cos), side,
            float(angle))


def central_part(img: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``img`` and ``mask`` (…,H,W) cut along their long side to what a centre crop of the short side keeps, plus a
    margin of the short side (at least 8 pixels) on each end for the resampling filter; unchanged when the long side
    is within that. Resizing a 1×100,000 strip's short side to the model's size would build a 64×6.4M image to keep
    its middle 64×64; cut first, it costs what a square does, and the centre crop sees the same pixels."""
    height, width = img.shape[-2:]
    short = min(height, width)
    keep = short + 2 * max(short, 8)
    if max(height, width) <= keep:
        return img, mask
    if height > width:
        top = (height - keep) // 2
        return img[..., top:top + keep, :], mask[..., top:top + keep, :]
    left = (width - keep) // 2
    return img[..., left:left + keep], mask[..., left:left + keep]


def _cut_upright(img: Tensor, mask: Tensor, window: tuple[float, float, int, float]) -> tuple[Tensor, Tensor]:
    """The :func:`upright_window` of ``img`` and ``mask``: a square that holds the window at any angle is cut about
    its centre (the frame's edge pixels stand in beyond the image, an empty mask), turned, and the window taken from
    its middle, so no corner of the window is left blank."""
    x, y, side, angle = window
    half = math.ceil(side / math.sqrt(2)) + 1
    top, left = round(y) - half, round(x) - half
    height, width = img.shape[-2:]
    pad = [max(0, -left), max(0, -top), max(0, left + 2 * half - width), max(0, top + 2 * half - height)]
    if any(pad):
        img, mask = TF.pad_image(img, pad, padding_mode="edge"), TF.pad_mask(mask, pad, fill=0.0)
    rows, cols = slice(top + pad[1], top + pad[1] + 2 * half), slice(left + pad[0], left + pad[0] + 2 * half)
    img, mask = img[..., rows, cols], mask[..., rows, cols]
    centre = [x - left, y - top]
    img = TF.rotate_image(img, angle, InterpolationMode.BILINEAR, center=centre)
    mask = TF.rotate_mask(mask, angle, center=centre, fill=[0.0])
    row, col = round(centre[1] - side / 2), round(centre[0] - side / 2)
    return img[..., row:row + side, col:col + side], mask[..., row:row + side, col:col + side]


def image_mask_transform(
    cfg: PreprocessConfig, train: bool = False
) -> Callable[[Image.Image | Tensor, np.ndarray | Tensor | Image.Image | None], tuple[Tensor, Tensor]]:
    """Return ``f(image, mask) -> (image (3,S,S) normalised, mask (1,S,S) in [0,1])``.

    With ``cfg.roi_zoom`` > 1 the image and mask are first cut to the :func:`roi_window` around the mask's object;
    with ``cfg.roi_orient``, to its :func:`upright_window`, the object turned upright.
    Evaluation then resizes the short side to S and centre-crops (a long image cut to its :func:`central_part`
    first); training takes a random resized crop and a
    horizontal flip, drawn once and applied to image and mask alike. A missing mask becomes all ones ("no specific
    region").

    Evaluation (what rendering for training, the evaluation, the probes and the service run per image) calls
    torchvision's kernels directly rather than through ``v2.Compose``: the same kernels, so the same output to the
    bit, without the per-call dispatch over tensor subclasses that took ~70% of the time of a 64-px image.
    """
    interpolation = InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else InterpolationMode.BILINEAR
    size = cfg.image_size
    mean, std = list(cfg.mean), list(cfg.std)
    augment = T.Compose([
        T.RandomResizedCrop(size, scale=(0.7, 1.0), interpolation=interpolation, antialias=True),
        T.RandomHorizontalFlip(),
    ]) if train else None

    def geometry(img: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        if augment is not None:  # image and mask as tv_tensors: one random draw for both, nearest for the mask
            out_image, out_mask = augment(tv_tensors.Image(img), tv_tensors.Mask(mask))
            return out_image.as_subclass(Tensor), out_mask.as_subclass(Tensor)
        img, mask = central_part(img, mask)
        img = TF.center_crop_image(TF.resize_image(img, [size], interpolation, antialias=True), [size, size])
        return img, TF.center_crop_mask(TF.resize_mask(mask, [size]), [size, size])  # masks: nearest neighbour

    def apply(image: Image.Image | Tensor, mask: np.ndarray | Tensor | Image.Image | None) -> tuple[Tensor, Tensor]:
        img = TF.pil_to_tensor(image) if isinstance(image, Image.Image) else image.as_subclass(Tensor)
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
        upright = upright_window(mask_t, cfg.roi_zoom) if cfg.roi_orient else None
        if upright is not None:
            img, mask_t = _cut_upright(img, mask_t, upright)
        elif (window := roi_window(mask_t, cfg.roi_zoom)) is not None:
            row, col, side = window
            img = img[..., row:row + side, col:col + side]
            mask_t = mask_t[..., row:row + side, col:col + side]
        img, mask_t = geometry(img, mask_t.clamp(0.0, 1.0))
        return TF.normalize_image(TF.to_dtype_image(img, torch.float32, scale=True), mean, std), mask_t

    return apply


VisualPrompt = Literal["roi", "none", "red_circle", "background_mask"]


def apply_visual_prompt(images: Tensor, masks: Tensor, kind: VisualPrompt, cfg: PreprocessConfig
                        ) -> tuple[Tensor, Tensor]:
    """How the object region reaches the model, for a normalised batch ``images`` (B,3,S,S), ``masks`` (B,1,S,S).

    - ``roi``: OG-CLIP; the mask goes to the ROI channel, the image is untouched.
    - ``none``: plain CLIP; the mask is dropped (all ones).
    - ``red_circle``: the Red-Circle visual prompt; a red ellipse drawn around the mask's bounding box, in pixels.
    - ``background_mask``: mask-adapted CLIP; pixels outside the mask set to the mean colour (0 after
      normalisation), as MaskCLIP-style region recognition does.
    The last three give the model an all-ones ROI channel, so they run on the same OG-CLIP architecture.
    """
    if kind == "roi":
        return images, masks
    ones = torch.ones_like(masks)
    if kind == "none":
        return images, ones
    if kind == "background_mask":
        return images * (masks > 0.5), ones
    if kind != "red_circle":
        raise ValueError(f"unknown visual prompt {kind!r}")
    size = images.shape[-1]
    ys = torch.arange(size, device=images.device, dtype=torch.float32).view(1, size, 1)
    xs = torch.arange(size, device=images.device, dtype=torch.float32).view(1, 1, size)
    inside = masks[:, 0] > 0.5
    rows, cols = inside.any(dim=2), inside.any(dim=1)
    big = torch.tensor(float(size), device=images.device)
    top = torch.where(rows, ys.view(1, size), big).amin(dim=1)
    bottom = torch.where(rows, ys.view(1, size), -big).amax(dim=1)
    left = torch.where(cols, xs.view(1, size), big).amin(dim=1)
    right = torch.where(cols, xs.view(1, size), -big).amax(dim=1)
    empty = ~rows.any(dim=1)  # no object: circle the whole frame
    top, left = torch.where(empty, 0.0, top), torch.where(empty, 0.0, left)
    bottom, right = torch.where(empty, size - 1.0, bottom), torch.where(empty, size - 1.0, right)
    # The ellipse through the box's corners (semi-axes √2 × half the box) so the whole object sits inside it.
    cy, cx = ((top + bottom) / 2).view(-1, 1, 1), ((left + right) / 2).view(-1, 1, 1)
    ry = ((bottom - top + 1) / 2 * 2**0.5).clamp_min(2.0).view(-1, 1, 1)
    rx = ((right - left + 1) / 2 * 2**0.5).clamp_min(2.0).view(-1, 1, 1)
    radius = torch.sqrt(((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2)
    thickness = max(1.0, size / 64) / torch.minimum(rx, ry)
    ring = ((radius - 1.0).abs() <= thickness).unsqueeze(1)
    mean = torch.tensor(cfg.mean, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=images.device).view(1, 3, 1, 1)
    red = ((torch.tensor([1.0, 0.0, 0.0], device=images.device).view(1, 3, 1, 1) - mean) / std).to(images.dtype)
    return torch.where(ring, red, images), ones
