"""Dense evaluation (``ogclip eval dense``): scenes, the pixel-level probe, its metrics, the command end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ogclip.synth import TargetClass, render_scene
from ogclip_jobs.config import DenseConfig
from ogclip_jobs.dense import (
    dense_scores,
    fit_linear_probe,
    instance_ious,
    iou_scores,
    predict_pixels,
    sample_pixels,
    scene_plan,
)

TARGETS = {
    "a": TargetClass("a", "military aircraft", "delta wing", "white", "large"),
    "b": TargetClass("b", "military aircraft", "swept wing", "red", "large"),
    "c": TargetClass("c", "warship", "cargo hull", "black", "large", backgrounds=("sea",)),
    "d": TargetClass("d", "warship", "destroyer hull", "orange", "medium", backgrounds=("sea",)),
}


def test_scenes_are_deterministic_and_label_each_visible_target() -> None:
    targets = [TARGETS["a"], TARGETS["c"], TARGETS["d"]]
    one, two = render_scene(targets, seed=3, size=96), render_scene(targets, seed=3, size=96)
    assert np.array_equal(np.asarray(one.image), np.asarray(two.image)) and np.array_equal(one.labels, two.labels)
    assert not np.array_equal(render_scene(targets, seed=4, size=96).labels, one.labels)
    complete = 0
    for seed in range(30):
        scene = render_scene(targets, seed=seed, size=96)
        assert scene.labels.shape == (96, 96) and set(np.unique(scene.labels)) <= {0, 1, 2, 3}
        assert scene.background in TARGETS["a"].backgrounds
        assert scene.areas == tuple(pytest.approx((scene.labels == i).mean()) for i in (1, 2, 3))
        pixels = [np.asarray(scene.image)[scene.labels == i].astype(float) for i in (1, 2, 3)]
        for inside in pixels:  # plain paint: one flat colour inside each target's label
            assert len(inside) < 20 or inside.std(axis=0).max() < 12
        if all(len(inside) > 20 for inside in pixels):  # white, black and orange targets, in that order
            complete += 1
            white, black, orange = (inside.mean() for inside in pixels)
            assert white > orange > black
    assert complete > 20
    with pytest.raises(ValueError, match="at least one target"):
        render_scene([], seed=0)


def test_patch_features_keep_each_patch_in_its_place(micro_minilm) -> None:
    torch.manual_seed(0)
    image = torch.randn(1, 3, 32, 32)
    features = micro_minilm.patch_features(image)
    assert features.shape == (1, 4, 4, 64)
    assert torch.equal(features, micro_minilm.patch_features(image, torch.ones(1, 1, 32, 32)))
    changed = image.clone()
    changed[:, :, 8:16, 24:32] = 3.0  # the patch in row 1, column 3
    moved = (micro_minilm.patch_features(changed) - features).norm(dim=-1)[0]
    assert moved.argmax() == 1 * 4 + 3


def test_scene_plan_is_deterministic_with_distinct_targets_and_split_seeds() -> None:
    keys = sorted(TARGETS)
    fit = scene_plan(keys, 50, (2, 3), seed=0, split="fit")
    assert fit == scene_plan(keys, 50, (2, 3), seed=0, split="fit")
    assert all(2 <= len(chosen) <= 3 and len(set(chosen)) == len(chosen) for chosen, _ in fit)
    assert {len(chosen) for chosen, _ in fit} == {2, 3}
    held_out = scene_plan(keys, 50, (2, 3), seed=0, split="eval")
    assert not {s for _, s in fit} & {s for _, s in held_out}
    assert scene_plan(keys, 5, (4, 9), seed=0, split="fit")[0][0].__len__() == 4, "never more than the classes"


def test_sampled_pixels_are_the_upsampled_features_there() -> None:
    torch.manual_seed(0)
    features = torch.randn(3, 4, 4, 5)
    labels = torch.randint(0, 7, (3, 32, 32))
    rows, row_labels = sample_pixels(features, labels, per_image=50, seed=1)
    upsampled = F.interpolate(features.permute(0, 3, 1, 2), size=(32, 32), mode="bilinear", align_corners=False)
    flat = upsampled.permute(0, 2, 3, 1).reshape(3, 32 * 32, 5)
    # each sampled row is the upsampled feature of a pixel of its image that carries the sampled label (pixels
    # near the border share their upsampled value, hence "a pixel")
    for image in range(3):
        for row, label in zip(rows[image * 50:(image + 1) * 50], row_labels[image * 50:(image + 1) * 50],
                              strict=True):
            same = (flat[image] - row).abs().amax(dim=-1) < 1e-5
            assert same.any() and (labels[image].reshape(-1)[same] == label).any()
    again = sample_pixels(features, labels, per_image=50, seed=1)
    assert torch.equal(again[0], rows) and torch.equal(again[1], row_labels)


def test_iou_by_hand() -> None:
    truth = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 1]])
    predicted = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 2]])
    scores = iou_scores(predicted, truth, classes=4)
    # background: TP 2, FP 1, FN 1 → 2/4; class 1: TP 2, FP 1, FN 1 → 2/4; class 2: TP 1, FP 1, FN 1 → 1/3;
    # class 3 in neither: left out of the mean
    assert scores["per_label"][:3] == pytest.approx([0.5, 0.5, 1 / 3]) and np.isnan(scores["per_label"][3])
    assert scores["miou"] == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(5 / 8)
    mask = np.array([[False, False, True, True], [False, False, False, True]])
    assert instance_ious(predicted.unsqueeze(0), [(0, 1, mask)]) == [pytest.approx(2 / 4)]


def test_the_probe_segments_what_the_features_carry_and_not_noise() -> None:
    """Features that are each patch's label shares give a high mIoU; features of noise stay near background-only."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.zeros(60, 32, 32, dtype=torch.long)
    for image in range(60):  # one or two 8-16 px squares per image, classes 1..3
        for _ in range(2):
            top, left, side = (int(v) for v in torch.randint(0, 20, (3,), generator=generator))
            labels[image, top:top + 8 + side % 9, left:left + 8 + side % 9] = int(torch.randint(1, 4, (1,),
                                                                                                generator=generator))
    shares = F.one_hot(labels, 4).float().reshape(60, 4, 8, 4, 8, 4).mean(dim=(2, 4))  # (B, 4, 4, classes)
    fit, held_out = slice(0, 40), slice(40, 60)
    informative = fit_linear_probe(*sample_pixels(shares[fit], labels[fit], 200, seed=0), 4, 1e-4)
    good = iou_scores(predict_pixels(informative, shares[held_out], 32), labels[held_out], 4)
    noise = torch.randn(60, 4, 4, 4, generator=generator)
    blind = fit_linear_probe(*sample_pixels(noise[fit], labels[fit], 200, seed=0), 4, 1e-4)
    bad = iou_scores(predict_pixels(blind, noise[held_out], 32), labels[held_out], 4)
    assert good["miou"] > 0.6 and bad["miou"] < 0.35 and good["miou"] > bad["miou"] + 0.3


def test_dense_scores_on_a_model(micro_minilm) -> None:
    cfg = DenseConfig(classes=None, fit_scenes=12, eval_scenes=6, targets_per_scene=(2, 3), pixels_per_scene=32,
                      zero_shot=None)
    out = dense_scores(micro_minilm, TARGETS, cfg)
    assert out["grid"] == 4 and out["width"] == 64 and out["image_size"] == 32
    assert out["class"]["labels"] == ["background", "a", "b", "c", "d"]
    assert out["super_category"]["labels"] == ["background", "military aircraft", "warship"]
    for level in ("class", "super_category"):
        assert 0.0 <= out[level]["miou"] <= 1.0 and len(out[level]["per_label"]) == len(out[level]["labels"])
    instances = out["class"]["instances"]
    assert 12 <= instances["small"] + instances["other"] <= 18
    assert out == dense_scores(micro_minilm, TARGETS, cfg), "deterministic"


def test_dense_config_rejects_an_empty_scene_range() -> None:
    with pytest.raises(ValueError, match="targets_per_scene"):
        DenseConfig(targets_per_scene=(3, 2))
    with pytest.raises(ValueError, match="targets_per_scene"):
        DenseConfig(targets_per_scene=(0, 2))


def test_dense_command_writes_its_table(tmp_path: Path, micro_minilm, graph, job_settings, capsys) -> None:
    from ogclip.bundle import export_bundle
    from ogclip_jobs.cli import main

    bundle = export_bundle(micro_minilm, tmp_path / "bundle")
    config = tmp_path / "dense.yaml"
    config.write_text(json.dumps({"classes": 6, "fit_scenes": 10, "eval_scenes": 5, "pixels_per_scene": 16,
                                  "zero_shot": None}))
    assert main(["eval", "dense", "--config", str(config), "--bundle", str(bundle.path),
                 "--output-dir", str(tmp_path / "dense")]) == 0
    printed = capsys.readouterr().err
    assert "| bundle | class mIoU | super-category mIoU | small-target IoU | other-target IoU | zero-shot mAcc |" \
        in printed
    result = json.loads((tmp_path / "dense" / "dense.json").read_text())
    assert result["model_version"] == bundle.model_version and result["counts"]["classes"] == 6
    assert "zero_shot_macc" not in result and DenseConfig.model_validate(result["config"]).fit_scenes == 10
    assert "not measured" in (tmp_path / "dense" / "dense.md").read_text()
    missing = tmp_path / "missing.yaml"
    missing.write_text(json.dumps({"zero_shot": {"data": str(tmp_path / "nowhere")}}))
    assert main(["eval", "dense", "--config", str(missing), "--bundle", str(bundle.path)]) != 0
    assert "no zero-shot test shards" in capsys.readouterr().err
