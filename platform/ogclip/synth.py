"""Synthetic target world: deterministic renders of targets whose look follows their attributes.

Each class is a set of visual attributes (silhouette, colour, size); a render draws the target's silhouette at a
random pose and scale on a cluttered background (sky, sea or land, plus distractor shapes) and returns the image,
its exact mask and the class. The same seed always gives the same pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Silhouettes as polygons in unit coordinates (x right, y down, nose towards -y), roughly within [-1, 1]².
SILHOUETTES: dict[str, list[tuple[float, float]]] = {
    "delta wing": [(0, -1), (0.75, 0.7), (0.2, 0.55), (0, 0.8), (-0.2, 0.55), (-0.75, 0.7)],
    "swept wing": [(0, -1), (0.12, -0.2), (0.9, 0.35), (0.9, 0.5), (0.12, 0.25), (0.1, 0.7), (0.35, 0.95),
                   (-0.35, 0.95), (-0.1, 0.7), (-0.12, 0.25), (-0.9, 0.5), (-0.9, 0.35), (-0.12, -0.2)],
    "straight wing": [(0, -1), (0.1, -0.3), (1, -0.25), (1, 0), (0.1, 0.05), (0.08, 0.75), (0.35, 0.85),
                      (0.35, 1), (-0.35, 1), (-0.35, 0.85), (-0.08, 0.75), (-0.1, 0.05), (-1, 0), (-1, -0.25),
                      (-0.1, -0.3)],
    "flying wing": [(0, -0.45), (1, 0.35), (0.7, 0.5), (0.45, 0.35), (0.2, 0.5), (0, 0.35), (-0.2, 0.5),
                    (-0.45, 0.35), (-0.7, 0.5), (-1, 0.35)],
    "rotorcraft": [(0.05, -1), (0.05, -0.1), (0.9, -0.05), (0.9, 0.05), (0.22, 0.1), (0.2, 0.55), (0.05, 0.6),
                   (0.05, 1), (-0.05, 1), (-0.05, 0.6), (-0.2, 0.55), (-0.22, 0.1), (-0.9, 0.05), (-0.9, -0.05),
                   (-0.05, -0.1), (-0.05, -1)],
    "carrier hull": [(0, -1), (0.3, -0.75), (0.38, 0.95), (-0.3, 1), (-0.38, -0.6)],
    "destroyer hull": [(0, -1), (0.16, -0.55), (0.18, 0.9), (0, 1), (-0.18, 0.9), (-0.16, -0.55)],
    "cargo hull": [(0, -1), (0.28, -0.7), (0.28, 1), (-0.28, 1), (-0.28, -0.7)],
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "grey": (128, 132, 138),
    "dark green": (48, 84, 52),
    "desert tan": (196, 170, 120),
    "white": (236, 236, 236),
    "navy blue": (30, 46, 96),
    "black": (24, 24, 28),
    "red": (178, 38, 34),
    "orange": (232, 128, 36),
}

SIZES: dict[str, float] = {"small": 0.22, "medium": 0.33, "large": 0.44}  # target length / image side

BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "sky": ((120, 170, 225), (205, 225, 245)),
    "sea": ((24, 70, 110), (60, 110, 140)),
    "land": ((90, 110, 60), (150, 140, 100)),
}


@dataclass(frozen=True)
class TargetClass:
    """A target type and the visual attributes its renders follow."""

    name: str
    super_category: str
    silhouette: str
    colour: str
    size: str = "medium"
    backgrounds: tuple[str, ...] = ("sky", "land")

    def description(self) -> str:
        """A natural-language description built only from the attributes (what zero-shot must rely on)."""
        return f"a {self.size} {self.colour} {self.super_category} with a {self.silhouette} silhouette"


@dataclass(frozen=True)
class Render:
    image: Image.Image  # RGB
    mask: np.ndarray  # uint8 {0, 255}, same height and width as the image
    target: TargetClass


def _background(rng: np.random.Generator, kind: str, size: int) -> Image.Image:
    top, bottom = (np.array(c, dtype=np.float32) for c in BACKGROUNDS[kind])
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    pixels = top + (bottom - top) * ramp + rng.normal(0.0, 10.0, (size, size, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(np.broadcast_to(pixels, (size, size, 3)), 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(radius=max(size / 128, 0.5)))


def _distractors(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
    for _ in range(int(rng.integers(1, 5))):
        x, y = rng.uniform(0, size, 2)
        rx, ry = rng.uniform(size * 0.02, size * 0.12, 2)
        shade = tuple(int(v) for v in rng.integers(40, 230, 3))
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=shade)


def render(target: TargetClass, seed: int, size: int = 64) -> Render:
    """Draw one image of ``target``; deterministic in (target, seed, size)."""
    rng = np.random.default_rng(seed)
    image = _background(rng, target.backgrounds[int(rng.integers(len(target.backgrounds)))], size)
    draw = ImageDraw.Draw(image)
    _distractors(rng, draw, size)
    scale = SIZES[target.size] * size * rng.uniform(0.85, 1.15) / 2
    angle = rng.uniform(0, 2 * math.pi)
    cx, cy = rng.uniform(size * 0.3, size * 0.7, 2)
    cos, sin = math.cos(angle), math.sin(angle)
    polygon = [(cx + scale * (x * cos - y * sin), cy + scale * (x * sin + y * cos)) for x, y in
               SILHOUETTES[target.silhouette]]
    base = np.array(COLOURS[target.colour], dtype=np.float32) * rng.uniform(0.8, 1.1)
    draw.polygon(polygon, fill=tuple(int(v) for v in np.clip(base, 0, 255)))
    mask_image = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask_image).polygon(polygon, fill=255)
    return Render(image=image, mask=np.asarray(mask_image), target=target)
