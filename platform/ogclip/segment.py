"""Object masks for the ROI channel when the data brings none: a weight-free CPU segmenter and SAM2.

Both answer ``segment(image, box=None) -> bool mask (H, W)``. A box (x0, y0, x1, y1 in pixels) says where the
target is: the CPU segmenter looks only inside it, SAM2 takes it as its box prompt. The curation pipeline
(``ogclip_jobs``) and the classification service (``ogclip_serve``) both use these classes, so there is one
implementation of each. ``sam2`` is imported only when a :class:`Sam2Segmenter` is built.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

Box = Sequence[float]


def box_pixels(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """A box clipped to the image as integer pixel bounds (x0, y0, x1, y1), x1/y1 exclusive; ValueError if empty."""
    x0, y0, x1, y1 = (float(v) for v in box)
    left, top = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
    right, bottom = min(width, int(np.ceil(x1))), min(height, int(np.ceil(y1)))
    if right <= left or bottom <= top:
        raise ValueError(f"box {list(box)} does not cover any pixel of a {width}×{height} image")
    return left, top, right, bottom


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The tight bounding box (x0, y0, x1, y1; x1/y1 exclusive, in pixels) of a boolean mask; None if it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def box_mask(box: Box, width: int, height: int) -> np.ndarray:
    """The box itself as a mask: the simplest real ROI when no segmenter is at hand."""
    left, top, right, bottom = box_pixels(box, width, height)
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def _otsu(values: np.ndarray, bins: int = 64) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    mean = np.cumsum(hist * centres)
    total, grand = weight[-1], mean[-1]
    between = (grand * weight - mean * total) ** 2 / np.maximum(weight * (total - weight), 1e-9)
    return float(centres[int(np.argmax(between[:-1]))])


BORDER_SAMPLES = 8192  # every border pixel of an image up to 1,024 px a side; evenly spaced ones beyond


def border_colours(pixels: np.ndarray, limit: int = BORDER_SAMPLES) -> np.ndarray:
    """The colours (N, 3) of the two outermost rows and columns of ``pixels`` (H, W, 3), at most ``limit`` of them
    evenly spaced: an image a few pixels wide is all border, and k-means over millions of points cost seconds."""
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    if len(border) <= limit:
        return border
    return border[np.linspace(0, len(border) - 1, limit).astype(int)]


class CpuSegmenter:
    """A weight-free segmenter: the target is what differs from the image border's colours, near the centre.

    Pixels far (in colour) from every border colour cluster are foreground candidates (Otsu threshold on that
    distance); of the connected components, the one nearest the image centre is the target, holes filled
    (:meth:`regions` keeps every large enough component instead: a detector of all the targets in a scene). No
    model, so it runs anywhere; its IoU against ground truth is reported by the pipeline.
    """

    def __init__(self, clusters: int = 6) -> None:
        self.clusters = clusters

    def segment(self, image: Image.Image, box: Box | None = None) -> np.ndarray:
        """The target's mask; with ``box`` only inside it (the whole box if nothing stands out there)."""
        if box is not None:
            width, height = image.size
            left, top, right, bottom = box_pixels(box, width, height)
            mask = np.zeros((height, width), dtype=bool)
            inner = self.segment(image.crop((left, top, right, bottom))) if min(right - left, bottom - top) >= 4 \
                else np.zeros((bottom - top, right - left), dtype=bool)
            mask[top:bottom, left:right] = inner if inner.any() else True
            return mask
        components, count = self._foreground(image)
        height, width = components.shape
        if count == 0:
            return np.zeros((height, width), dtype=bool)
        ys, xs = np.mgrid[0:height, 0:width]
        centre_distance = ndimage.minimum(np.hypot(ys - height / 2, xs - width / 2), components,
                                          index=np.arange(1, count + 1))
        sizes = ndimage.sum(np.ones(components.shape), components, index=np.arange(1, count + 1))
        score = np.asarray(centre_distance) - 0.05 * np.sqrt(np.asarray(sizes))
        chosen = int(np.argmin(score)) + 1
        return ndimage.binary_fill_holes(components == chosen)

    def regions(self, image: Image.Image, min_area: float = 0.005) -> list[np.ndarray]:
        """Every foreground region of at least ``min_area`` of the image, holes filled, largest first: the
        segmenter as a weight-free detector of all the targets in a scene."""
        components, count = self._foreground(image)
        sizes = np.asarray(ndimage.sum(np.ones(components.shape), components, index=np.arange(1, count + 1)))
        order = [int(i) + 1 for i in np.argsort(-sizes, kind="stable") if sizes[i] >= min_area * components.size]
        return [ndimage.binary_fill_holes(components == label) for label in order]

    def _foreground(self, image: Image.Image) -> tuple[np.ndarray, int]:
        """The connected components (label map, count) of the pixels far in colour from every border colour."""
        pixels = np.asarray(image, dtype=np.float32)
        border = border_colours(pixels)
        centres = border[np.linspace(0, len(border) - 1, self.clusters).astype(int)]
        for _ in range(8):  # a few k-means steps on the border colours
            nearest = ((border[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
            centres = np.stack([border[nearest == k].mean(0) if (nearest == k).any() else centres[k]
                                for k in range(len(centres))])
        distance = np.sqrt(((pixels[:, :, None] - centres[None, None]) ** 2).sum(-1)).min(-1)
        components, count = ndimage.label(distance > _otsu(distance))
        return components, int(count)


class Sam2Segmenter:
    """SAM2 masks from a local checkpoint (``sam2`` imported here, lazily; weights are never downloaded).

    With a box, SAM2 is prompted with it. Without one, ``prompt="centre"`` prompts a foreground point at the image
    centre (the synthetic world and crawled photos centre their target); ``"auto"`` runs the automatic mask
    generator and keeps the highest-scoring mask that touches the centre third.
    """

    def __init__(self, checkpoint: str, config: str, prompt: str = "centre", device: str = "auto") -> None:
        from sam2.build_sam import build_sam2
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        from ogclip.device import resolve_device

        model = build_sam2(config, checkpoint, device=str(resolve_device(device)))
        self.prompt = prompt
        self.predictor = SAM2ImagePredictor(model)
        if prompt == "auto":
            from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

            self.generator = SAM2AutomaticMaskGenerator(model)

    def segment(self, image: Image.Image, box: Box | None = None) -> np.ndarray:
        pixels = np.asarray(image)
        height, width = pixels.shape[:2]
        if box is None and self.prompt == "auto":
            candidates = self.generator.generate(pixels)
            centre = (slice(height // 3, 2 * height // 3), slice(width // 3, 2 * width // 3))
            central = [c for c in candidates if c["segmentation"][centre].any()]
            if not central:
                return np.zeros((height, width), dtype=bool)
            return max(central, key=lambda c: c["predicted_iou"])["segmentation"].astype(bool)
        self.predictor.set_image(pixels)
        if box is not None:
            masks, scores, _ = self.predictor.predict(box=np.array(box_pixels(box, width, height), dtype=np.float32),
                                                      multimask_output=False)
        else:
            masks, scores, _ = self.predictor.predict(point_coords=np.array([[width / 2, height / 2]]),
                                                      point_labels=np.array([1]), multimask_output=True)
        return masks[int(np.argmax(scores))].astype(bool)
