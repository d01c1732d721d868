"""The synthetic target world: deterministic renders whose look follows the attributes."""

from __future__ import annotations

import numpy as np

from ogclip.synth import COLOURS, TargetClass, render

FIGHTER = TargetClass("grey delta", "military aircraft", "delta wing", "grey", "large")


def test_render_is_deterministic() -> None:
    a, b = render(FIGHTER, seed=7, size=64), render(FIGHTER, seed=7, size=64)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and np.array_equal(a.mask, b.mask)
    c = render(FIGHTER, seed=8, size=64)
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_mask_is_exact_and_target_has_its_colour() -> None:
    sample = render(FIGHTER, seed=3, size=96)
    assert sample.mask.shape == (96, 96) and set(np.unique(sample.mask)) <= {0, 255}
    inside = np.asarray(sample.image)[sample.mask > 0].astype(float)
    assert 0.02 < (sample.mask > 0).mean() < 0.5
    assert np.abs(inside.mean(axis=0) - np.array(COLOURS["grey"])).max() < 40


def test_attributes_drive_the_look() -> None:
    white = TargetClass("white delta", "military aircraft", "delta wing", "white", "large")
    ship = TargetClass("grey carrier", "warship", "carrier hull", "grey", "large", backgrounds=("sea",))
    areas = {}
    for target in (FIGHTER, white, ship):
        sample = render(target, seed=5, size=96)
        areas[target.name] = np.asarray(sample.image)[sample.mask > 0].mean(axis=0)
    assert np.abs(areas["grey delta"] - areas["white delta"]).max() > 60  # colour follows the attribute
    silhouettes = [render(t, seed=5, size=96).mask for t in (FIGHTER, ship)]
    assert (silhouettes[0] != silhouettes[1]).mean() > 0.02  # the silhouette follows the attribute
