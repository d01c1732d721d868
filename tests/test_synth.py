"""The synthetic target world: deterministic renders whose look follows the attributes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from ogclip.synth import COLOURS, SILHOUETTES, TargetClass, render, spread_classes

FIGHTER = TargetClass("grey delta", "military aircraft", "delta wing", "grey", "large")


def test_render_is_deterministic() -> None:
    a, b = render(FIGHTER, seed=7, size=64), render(FIGHTER, seed=7, size=64)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and np.array_equal(a.mask, b.mask)
    c = render(FIGHTER, seed=8, size=64)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_render_pixels_stay_the_same() -> None:
    """Stored shards, probes and the ablation's records were made from these pixels: a change to the renderer must
    be deliberate (and then this digest changes with it)."""
    looks = [("delta wing", "grey", "small", "camouflage"), ("cargo hull", "white", "large", "striped"),
             ("rotorcraft", "black", "medium", "two-tone")]
    digest = hashlib.sha256()
    for silhouette, colour, size, pattern in looks:
        target = TargetClass("a", "military aircraft", silhouette, colour, size, pattern, "red")
        for seed in range(40):
            sample = render(target, seed, 64)
            digest.update(np.asarray(sample.image).tobytes())
            digest.update(sample.mask.tobytes())
    assert digest.hexdigest() == "b4995ed5d75abf09cfa6e55973dc8e72f2989955d0949695c705677986fa402f"


def test_mask_is_exact() -> None:
    """A plain target is one flat colour inside its mask, and the mask's area is what the render reports."""
    for seed in range(20):
        sample = render(FIGHTER, seed=seed, size=96)
        assert sample.mask.shape == (96, 96) and set(np.unique(sample.mask)) <= {0, 255}
        assert sample.area == pytest.approx((sample.mask > 0).mean())
        inside = np.asarray(sample.image)[sample.mask > 0].astype(float)
        if len(inside) > 20:
            assert inside.std(axis=0).max() < 12, seed


def test_attributes_drive_the_look() -> None:
    white = TargetClass("white delta", "military aircraft", "delta wing", "white", "large")
    ship = TargetClass("grey carrier", "warship", "carrier hull", "grey", "large", backgrounds=("sea",))
    grey, light = render(FIGHTER, seed=5, size=96), render(white, seed=5, size=96)
    assert np.array_equal(grey.mask, light.mask)  # same seed, same pose: only the colour differs
    inside = grey.mask > 0
    assert (np.asarray(light.image)[inside].mean() - np.asarray(grey.image)[inside].mean()) > 60
    assert (render(ship, seed=5, size=96).mask != grey.mask).mean() > 0.02  # the silhouette follows the attribute
    assert render(ship, seed=5).background == "sea"


@pytest.mark.parametrize("pattern", ["two-tone", "striped", "camouflage"])
def test_patterns_paint_the_accent_inside_the_mask(pattern: str) -> None:
    target = TargetClass("patterned", "military aircraft", "straight wing", "white", "large", pattern, "black")
    found = False
    for seed in range(10):
        sample = render(target, seed=seed, size=96)
        inside = np.asarray(sample.image)[sample.mask > 0].astype(float).mean(axis=1)
        if len(inside) > 200:
            dark, bright = (inside < 100).mean(), (inside > 150).mean()
            found = found or (dark > 0.05 and bright > 0.05)
    assert found, f"{pattern} must show both body and accent colours"


def test_small_distant_targets_and_occlusion_occur() -> None:
    ship = TargetClass("cargo", "civilian/other", "cargo hull", "red", "small", backgrounds=("sea",))
    renders = [render(ship, seed=s, size=128) for s in range(80)]
    assert any(0 < r.area < 0.05 for r in renders), "some targets are under 5% of the image"
    assert any(r.occluded for r in renders) and all(r.area > 0 for r in renders)


def test_classes_come_from_graph_facts_and_bad_attributes_are_refused() -> None:
    row = {"name": "Type 45 destroyer", "super_category": "warship", "facts": [
        {"attribute": "silhouette", "value": "destroyer hull"}, {"attribute": "colour", "value": "grey"},
        {"attribute": "size_class", "value": "medium"}, {"attribute": "pattern", "value": "striped"},
        {"attribute": "accent", "value": "black"}, {"attribute": "length", "value": 152.0}]}
    target = TargetClass.from_facts(row)
    assert target.look() == ("destroyer hull", "grey", "medium", "striped", "black")
    assert target.backgrounds == ("sea",)
    with pytest.raises(ValueError, match="not one of"):
        TargetClass("bad", "x", "saucer", "grey")


def test_spread_classes_cover_every_attribute_value() -> None:
    # A skewed class set: many small plain grey straight-wing aircraft, one of each other silhouette and colour.
    targets = {f"common-{i}": TargetClass(f"common {i}", "civilian/other", "straight wing", "grey", "small")
               for i in range(50)}
    targets |= {f"{s}-{c}": TargetClass(f"{s} {c}", "civilian/other", s, c)
                for s, c in zip(SILHOUETTES, COLOURS, strict=True)}
    keys = spread_classes(targets, 10)
    assert keys == spread_classes(targets, 10) and len(set(keys)) == 10
    assert {targets[k].silhouette for k in keys} == set(SILHOUETTES)
    assert {targets[k].colour for k in keys} == set(COLOURS)
    assert spread_classes(targets, None) == sorted(targets)
