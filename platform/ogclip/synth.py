"""Synthetic target world: deterministic renders of targets whose look follows their graph attributes.

A class is a set of visual attributes (silhouette, colour scheme, apparent size, paint pattern, accent colour),
the same ones the knowledge graph stores as facts. A render draws the target's silhouette at a random pose, scale
and lighting on a cluttered background (sky, sea or land, plus distractor shapes that may occlude it), sometimes
small and far away (under 5% of the image, as for ships in the paper), and returns the image, its exact mask
(occluded parts excluded) and the class. A scene draws several targets on one background with a label map of
who is visible where (for dense evaluation). The same (classes, seed, size) always gives the same pixels.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

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

PATTERNS = ("plain", "two-tone", "striped", "camouflage")

BACKGROUNDS: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "sky": ((120, 170, 225), (205, 225, 245)),
    "sea": ((24, 70, 110), (60, 110, 140)),
    "land": ((90, 110, 60), (150, 140, 100)),
}

DISTANT_PROBABILITY = 0.15  # renders drawn far away, the target under 5% of the image
OCCLUSION_PROBABILITY = 0.2


@dataclass(frozen=True)
class TargetClass:
    """A target type and the visual attributes its renders follow."""

    name: str
    super_category: str
    silhouette: str
    colour: str
    size: str = "medium"
    pattern: str = "plain"
    accent: str = "black"
    backgrounds: tuple[str, ...] = ("sky", "land")

    def __post_init__(self) -> None:
        for value, allowed in ((self.silhouette, SILHOUETTES), (self.colour, COLOURS), (self.accent, COLOURS),
                               (self.size, SIZES), (self.pattern, PATTERNS)):
            if value not in allowed:
                raise ValueError(f"{self.name}: {value!r} is not one of {sorted(allowed)}")
        unknown = set(self.backgrounds) - set(BACKGROUNDS)
        if unknown or not self.backgrounds:
            raise ValueError(f"{self.name}: backgrounds must be among {sorted(BACKGROUNDS)}")

    @classmethod
    def from_facts(cls, row: dict[str, Any]) -> TargetClass:
        """The class as the knowledge graph describes it (a row of ``ogclip_kg``'s class facts)."""
        facts = {f["attribute"]: f["value"] for f in row["facts"]}
        silhouette = facts["silhouette"]
        return cls(
            name=row["name"],
            super_category=row["super_category"],
            silhouette=silhouette,
            colour=facts["colour"],
            size=facts.get("size_class", "medium"),
            pattern=facts.get("pattern", "plain"),
            accent=facts.get("accent", "black"),
            backgrounds=("sea",) if silhouette.endswith("hull") else ("sky", "land"),
        )

    def look(self) -> tuple[str, str, str, str, str]:
        return (self.silhouette, self.colour, self.size, self.pattern, self.accent)

    def description(self) -> str:
        """A description built only from the visual attributes (what zero-shot must rely on)."""
        paint = f"{self.pattern} {self.colour} and {self.accent}" if self.pattern != "plain" else f"plain {self.colour}"
        return f"a {self.size} {self.super_category} with a {self.silhouette} silhouette, painted {paint}"


def spread_classes(targets: Mapping[str, TargetClass], count: int | None, seed: int = 0) -> list[str]:
    """``count`` class keys (all if ``None``) chosen to cover the visual attributes as evenly as possible.

    Zero-shot on unseen classes needs every silhouette, colour, size, pattern and accent seen in training, but a
    class set is far from balanced (most seed classes are small straight-wing aircraft; the first N keys in order
    hold no ship at all). Greedy: each pick is the class whose attribute values have been picked least so far
    (summing 1/(1+n) over its five attributes), ties broken by a hash of ``seed`` and the key. Deterministic.
    """
    order = sorted(targets, key=lambda key: hashlib.sha256(f"{seed}:{key}".encode()).hexdigest())
    if count is None or count >= len(order):
        return sorted(order)
    seen: Counter[tuple[int, str]] = Counter()
    chosen: list[str] = []
    for _ in range(count):
        best = max(order, key=lambda key: sum(1.0 / (1 + seen[i, v]) for i, v in enumerate(targets[key].look())))
        order.remove(best)
        chosen.append(best)
        seen.update(enumerate(targets[best].look()))
    return sorted(chosen)


@dataclass(frozen=True)
class Render:
    image: Image.Image  # RGB
    mask: np.ndarray  # uint8 {0, 255}: visible target pixels, same height and width as the image
    target: TargetClass
    background: str
    area: float  # visible target pixels / image pixels
    occluded: bool


def _background(rng: np.random.Generator, kind: str, size: int) -> Image.Image:
    top, bottom = (np.array(c, dtype=np.float32) for c in BACKGROUNDS[kind])
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    pixels = top + (bottom - top) * ramp + rng.normal(0.0, 10.0, (size, size, 3)).astype(np.float32)
    image = Image.fromarray(np.clip(np.broadcast_to(pixels, (size, size, 3)), 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(radius=max(size / 128, 0.5)))


def _blob(rng: np.random.Generator, size: int) -> tuple[list[float], tuple[int, int, int]]:
    x, y = rng.uniform(0, size, 2)
    rx, ry = rng.uniform(size * 0.03, size * 0.12, 2)
    return [x - rx, y - ry, x + rx, y + ry], tuple(int(v) for v in rng.integers(40, 230, 3))


def _paint(target: TargetClass, rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the accent colour goes, in the target's own unit coordinates (u across, v nose to tail)."""
    if target.pattern == "two-tone":
        return v > 0.1
    if target.pattern == "striped":
        return (np.floor((v + 1.0) * 3.0) % 2) == 1
    if target.pattern == "camouflage":
        field = np.zeros_like(u)
        for cu, cv in rng.uniform(-0.8, 0.8, (5, 2)):
            field += np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / 0.08)
        return field > 0.6
    return np.zeros_like(u, dtype=bool)


def _draw_target(image: Image.Image, target: TargetClass, rng: np.random.Generator, centre: tuple[float, float],
                 scale: float, angle: float) -> tuple[Image.Image, np.ndarray]:
    """``image`` with ``target`` painted at ``centre`` (pixels), ``scale`` (half its length, pixels) and ``angle``
    (radians), and the boolean mask of the pixels it covers: body colour with the pattern in the accent colour,
    both under one lighting factor."""
    size = image.size[0]
    cx, cy = centre
    cos, sin = math.cos(angle), math.sin(angle)
    polygon = [(cx + scale * (x * cos - y * sin), cy + scale * (x * sin + y * cos))
               for x, y in SILHOUETTES[target.silhouette]]
    silhouette = Image.new("L", (size, size), 0)
    ImageDraw.Draw(silhouette).polygon(polygon, fill=255)
    inside = np.asarray(silhouette) > 0
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u = ((xs - cx) * cos + (ys - cy) * sin) / scale
    v = (-(xs - cx) * sin + (ys - cy) * cos) / scale
    accent = _paint(target, rng, u, v)
    shade = rng.uniform(0.8, 1.1)
    body = np.array(COLOURS[target.colour], dtype=np.float32) * shade
    trim = np.array(COLOURS[target.accent], dtype=np.float32) * shade
    pixels = np.asarray(image).astype(np.float32)
    pixels[inside] = np.where(accent[inside][:, None], trim, body)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), inside


def _cluttered_background(rng: np.random.Generator, kind: str, size: int) -> Image.Image:
    """A background of ``kind`` with one to three distractor blobs."""
    image = _background(rng, kind, size)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        box, shade = _blob(rng, size)
        draw.ellipse(box, fill=shade)
    return image


def _half_length(target: TargetClass, rng: np.random.Generator, size: int) -> float:
    """A target's drawn half-length in pixels: its size class, ±15%, and sometimes far away (×0.4)."""
    distant = rng.random() < DISTANT_PROBABILITY
    return SIZES[target.size] * size * rng.uniform(0.85, 1.15) / 2 * (0.4 if distant else 1.0)


def render(target: TargetClass, seed: int, size: int = 64) -> Render:
    """Draw one image of ``target``; deterministic in (target, seed, size)."""
    rng = np.random.default_rng(seed)
    background = target.backgrounds[int(rng.integers(len(target.backgrounds)))]
    image = _cluttered_background(rng, background, size)
    scale = _half_length(target, rng, size)
    angle = rng.uniform(0, 2 * math.pi)
    cx, cy = rng.uniform(size * 0.3, size * 0.7, 2)
    image, inside = _draw_target(image, target, rng, (cx, cy), scale, angle)
    mask, occluded = inside, False
    if rng.random() < OCCLUSION_PROBABILITY:
        # A distractor over part of the target; the mask keeps only what stays visible. An occluder that would
        # hide most of the target is left out: the class must stay recognisable.
        box, shade_rgb = _blob(rng, size)
        centre = np.array([cx, cy]) + rng.uniform(-scale, scale, 2)
        half = np.array([box[2] - box[0], box[3] - box[1]]) / 2
        box = [centre[0] - half[0], centre[1] - half[1], centre[0] + half[0], centre[1] + half[1]]
        cover = Image.new("L", (size, size), 0)
        ImageDraw.Draw(cover).ellipse(box, fill=255)
        visible = inside & (np.asarray(cover) == 0)
        if visible.sum() >= 0.5 * inside.sum():
            ImageDraw.Draw(image).ellipse(box, fill=shade_rgb)
            mask, occluded = visible, True
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.25))
    mask_u8 = (mask * 255).astype(np.uint8)
    return Render(image=image, mask=mask_u8, target=target, background=background,
                  area=float(mask.mean()), occluded=occluded)


@dataclass(frozen=True)
class Scene:
    """Several targets in one image. ``labels`` (H, W) int16 holds 0 for background and ``i + 1`` where target
    ``i`` is visible (later targets are drawn over earlier ones); ``areas[i]`` is target i's visible share of the
    image and ``centres[i]`` where it was placed, (x, y) as fractions of the image side from the top left."""

    image: Image.Image
    labels: np.ndarray
    targets: tuple[TargetClass, ...]
    background: str
    areas: tuple[float, ...]
    centres: tuple[tuple[float, float], ...]



def render_scene(targets: Sequence[TargetClass], seed: int, size: int = 64, background: str | None = None) -> Scene:
    """Draw ``targets`` together on one background (``background``, else one of the first target's); deterministic
    in (targets, seed, size, background). Each target gets a random pose and a scale like a single render's
    (sometimes far away); centres are drawn until the target's circle keeps clear of the ones placed before it (at
    most 20 tries, then it may overlap and hide part of them, as in a crowded scene)."""
    if not targets:
        raise ValueError("a scene needs at least one target")
    rng = np.random.default_rng(seed)
    first = targets[0]
    drawn = first.backgrounds[int(rng.integers(len(first.backgrounds)))]
    background = background or drawn
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {sorted(BACKGROUNDS)}")
    image = _cluttered_background(rng, background, size)
    labels = np.zeros((size, size), dtype=np.int16)
    placed: list[tuple[float, float, float]] = []
    for index, target in enumerate(targets, start=1):
        scale = _half_length(target, rng, size)
        angle = rng.uniform(0, 2 * math.pi)
        for _ in range(20):
            cx, cy = rng.uniform(scale, size - scale, 2) if scale < size / 2 else (size / 2, size / 2)
            if all(math.hypot(cx - x, cy - y) >= scale + r for x, y, r in placed):
                break
        placed.append((cx, cy, scale))
        image, inside = _draw_target(image, target, rng, (cx, cy), scale, angle)
        labels[inside] = index
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.75, 1.25))
    areas = tuple(float((labels == i).mean()) for i in range(1, len(targets) + 1))
    centres = tuple((float(x / size), float(y / size)) for x, y, _ in placed)
    return Scene(image=image, labels=labels, targets=tuple(targets), background=background, areas=areas,
                 centres=centres)
