"""Evaluation under several ROI mask modes (exact, predicted, box) and the seen-look / new-look split."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ogclip.models import create_model
from ogclip.segment import mask_box
from ogclip.synth import TargetClass, render
from ogclip_jobs.cli import build_parser, main
from ogclip_jobs.config import EvalConfig, EvalSegmenterConfig
from ogclip_jobs.data.images import mask_iou, png_bytes
from ogclip_jobs.evaluate import (
    DecodeTestImages,
    encode_test_images,
    evaluate_model,
    look_split,
    report_markdown,
    resolve_segmenter,
    roi_mask,
    seen_looks,
    summary_line,
)

LOOK = ("silhouette", "colour", "size_class", "pattern", "accent")


def _row(key: str, silhouette: str = "delta wing", colour: str = "grey", size: str = "large",
         pattern: str = "striped", accent: str = "red", super_category: str = "military aircraft") -> dict:
    values = (silhouette, colour, size, pattern, accent)
    return {"key": key, "name": key.title(), "super_category": super_category, "aliases": [],
            "categories": ["fighter"], "operators": [], "manufacturers": [], "equipment": [],
            "facts": [{"attribute": a, "value": v} for a, v in zip(LOOK, values, strict=True)]}


# -- the box mode and the look split, on hand-made inputs ----------------------------------------------------------


def test_box_mode_is_the_filled_tight_box_of_the_exact_mask() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        exact = np.zeros((20, 24), dtype=bool)
        exact[rng.integers(0, 20, 6), rng.integers(0, 24, 6)] = True  # scattered pixels: the box must span them
        box = roi_mask("box", None, exact)
        ys, xs = np.nonzero(exact)
        expected = np.zeros_like(exact)
        expected[ys.min():ys.max() + 1, xs.min():xs.max() + 1] = True
        assert np.array_equal(box, expected)
        assert (box | exact).sum() == box.sum()  # it holds the whole target
        assert mask_iou(box, exact) == pytest.approx(exact.sum() / box.sum())
    assert mask_box(np.zeros((5, 5), dtype=bool)) is None
    assert roi_mask("box", None, np.zeros((5, 7), dtype=bool)).all(), "no visible target: the whole frame"
    exact = np.ones((4, 4), dtype=bool)
    assert roi_mask("exact", None, exact) is exact
    with pytest.raises(ValueError, match="unknown mask mode"):
        roi_mask("ellipse", None, exact)  # type: ignore[arg-type]


def test_a_look_is_seen_only_if_all_five_attributes_match_one_training_class() -> None:
    train = [_row("t1"), _row("t2", silhouette="swept wing", colour="white", pattern="plain")]
    test = [_row("same"),  # t1's look exactly
            _row("mixed", silhouette="swept wing"),  # every value seen, but never together: new
            _row("plain", silhouette="swept wing", colour="white", pattern="plain"),  # t2's look
            _row("accent", accent="orange")]  # one attribute differs: new
    assert seen_looks(test, train) == [True, False, True, False]
    assert seen_looks(test, []) == [False] * 4


def test_look_split_averages_each_group_over_classes_with_images() -> None:
    split = look_split([1.0, 0.0, 0.5, float("nan"), 0.25], [True, False, True, True, False])
    assert split == {"seen_look": pytest.approx(0.75), "seen_look_classes": 2,
                     "new_look": pytest.approx(0.125), "new_look_classes": 2}
    only_seen = look_split([1.0, float("nan")], [True, False])
    assert only_seen["new_look"] is None and only_seen["new_look_classes"] == 0


def test_sam2_falls_back_to_the_cpu_segmenter_when_unavailable(tmp_path: Path) -> None:
    cfg = EvalSegmenterConfig(method="sam2", sam2_checkpoint=tmp_path / "missing.pt")
    used, note = resolve_segmenter(cfg)
    assert used.method == "cpu" and "CPU segmenter stands in" in note
    assert resolve_segmenter(EvalSegmenterConfig()) == (EvalSegmenterConfig(), None)
    with pytest.raises(ValueError, match="sam2_checkpoint"):
        EvalSegmenterConfig(method="sam2")


def test_mask_modes_are_validated() -> None:
    assert EvalConfig().mask_modes == ["exact", "predicted", "box"]
    with pytest.raises(ValueError, match="repeats"):
        EvalConfig(mask_modes=["exact", "exact"])
    with pytest.raises(ValueError):
        EvalConfig(mask_modes=[])
    with pytest.raises(ValueError):
        EvalConfig(mask_modes=["exact", "ellipse"])


# -- one code path for every mode, on rendered test rows ---------------------------------------------------------

CLASSES = [_row("alpha"), _row("bravo", silhouette="rotorcraft", colour="dark green", pattern="plain"),
           _row("charlie", silhouette="cargo hull", colour="navy blue", pattern="two-tone",
                super_category="ship")]


def _parquet(folder: Path, per_class: int = 3) -> Path:
    images, masks, labels = [], [], []
    for row in CLASSES:
        target = TargetClass.from_facts(row)
        for seed in range(per_class):
            sample = render(target, seed=seed, size=64)
            images.append(png_bytes(sample.image))
            masks.append(png_bytes(sample.mask))
            labels.append(row["key"])
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"image": images, "mask": masks, "label": labels, "caption": [""] * len(labels)}),
                   folder / "test.parquet")
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _parquet(tmp_path_factory.mktemp("eval-modes") / "shards")


@pytest.fixture(scope="module")
def masked_model():
    """A fresh og-clip-tiny whose ROI conv is switched on (fresh, it is zero and every mask gives the same
    features), so the mask modes must show in the features."""
    torch.manual_seed(0)
    model = create_model("og-clip-tiny", device="cpu").eval()
    with torch.no_grad():
        model.visual.conv1.roi.weight.normal_(0.0, 0.5)
    return model


def test_the_decode_stage_gives_every_mode_its_mask_and_iou(data: Path, masked_model) -> None:
    batch = pq.read_table(data).to_pandas().to_dict("list")
    batch = {k: np.asarray(v, dtype=object) for k, v in batch.items()}
    stage = DecodeTestImages(masked_model.cfg.preprocess.model_dump(mode="json"), [r["key"] for r in CLASSES[:2]],
                             ["exact", "predicted", "box"], EvalSegmenterConfig().model_dump(mode="json"))
    out = stage(batch)
    assert list(out["label"]) == [0, 0, 0, 1, 1, 1]  # charlie not a class
    for mode in ("exact", "predicted", "box"):
        assert out[f"image_{mode}"].shape == (6, 3, 64, 64) and out[f"mask_{mode}"].shape == (6, 1, 64, 64)
    assert np.isnan(out["iou_exact"]).all(), "the exact mask is the reference, not scored against itself"
    assert (out["mask_box"] >= out["mask_exact"]).all(), "the box holds the exact mask"
    assert (out["iou_box"] > 0).all() and (out["iou_box"] < 1).all()
    assert (out["iou_predicted"] >= 0).all() and (out["iou_predicted"] <= 1).all()
    assert out["iou_predicted"].mean() > 0.3, "the CPU segmenter finds the rendered targets"


def test_every_mode_is_encoded_in_one_pass(data: Path, masked_model, local_ray) -> None:
    keys = [r["key"] for r in CLASSES]
    encoded = encode_test_images(masked_model, data, keys, "roi", batch_size=4, modes=["exact", "predicted", "box"])
    assert encoded.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert set(encoded.features) == {"exact", "predicted", "box"}
    assert all(f.shape == (9, 128) for f in encoded.features.values())
    assert not torch.allclose(encoded.features["exact"], encoded.features["box"]), "the modes differ by their mask"
    assert encoded.mask_iou["exact"] is None and 0 < encoded.mask_iou["box"] < 1
    with torch.no_grad():  # one image, by hand: its features under a mode are the model's on that mode's mask
        row = pq.read_table(data).slice(4, 1).to_pandas().to_dict("list")
        stage = DecodeTestImages(masked_model.cfg.preprocess.model_dump(mode="json"), keys, ["box"],
                                 EvalSegmenterConfig().model_dump(mode="json"))
        one = stage({k: np.asarray(v, dtype=object) for k, v in row.items()})
        expected = masked_model.image_features(torch.tensor(one["image_box"]), torch.tensor(one["mask_box"]))
    assert torch.allclose(encoded.features["box"][4], expected[0], atol=1e-5)


def test_scores_report_and_log_line_show_every_mode_and_the_look_split(data: Path, masked_model, local_ray) -> None:
    cfg = EvalConfig(data=data, mask_modes=["box", "exact", "predicted"], batch_size=4)
    scores = evaluate_model(masked_model, CLASSES, cfg, seen=[True, False, False])
    assert scores["mask_mode"] == "box" and list(scores["mask_modes"]) == ["box", "exact", "predicted"]
    assert scores["macc"] == scores["mask_modes"]["box"]["macc"], "the first mode is the headline"
    assert scores["segmenter"] == "cpu" and scores["segmenter_note"] is None
    for mode in scores["mask_modes"].values():
        looks = mode["looks"]
        assert looks["seen_look_classes"] == 1 and looks["new_look_classes"] == 2
        assert looks["seen_look"] == mode["per_class"][0]
        assert looks["new_look"] == pytest.approx(np.mean(mode["per_class"][1:]))
        assert 0.0 <= mode["macc"] <= 1.0 and mode["images"] == 9
    costs = {"params_M": 1.0, "trainable_M": 1.0, "gflops_per_image": 0.01, "images_per_s": 100.0}
    markdown = report_markdown("ogc-test", scores, CLASSES, costs)
    assert "| mask mode | mAcc % | seen-look mAcc % | new-look mAcc % | mask IoU vs exact |" in markdown
    assert "| predicted (cpu) |" in markdown and "| box |" in markdown and "| exact |" in markdown
    assert "| Alpha | military aircraft | seen |" in markdown and "| Bravo | military aircraft | new |" in markdown
    line = summary_line(scores, len(CLASSES))
    assert "predicted (cpu) " in line and "box " in line and "(mask IoU " in line and "exact " in line
    assert "seen looks (1 classes)" in line and "new looks (2)" in line
    assert not math.isnan(scores["mask_modes"]["predicted"]["mask_iou"])


def test_other_prompts_are_scored_on_the_same_features_as_their_own_evaluation(data: Path, masked_model,
                                                                            local_ray) -> None:
    compared = evaluate_model(masked_model, CLASSES, EvalConfig(data=data, mask_modes=["exact", "box"], batch_size=4,
                                                                compare_prompts=["label"]))
    alone = evaluate_model(masked_model, CLASSES, EvalConfig(data=data, mask_modes=["exact"], batch_size=4,
                                                             prompts="label"))
    assert compared["prompts"] == "kg" and list(compared["by_prompts"]) == ["label"]
    assert compared["by_prompts"]["label"]["per_class"] == alone["per_class"]
    assert compared["by_prompts"]["label"]["macc_by_dim"] == alone["macc_by_dim"]
    assert compared["per_class"] != alone["per_class"] or compared["macc_by_dim"] != alone["macc_by_dim"]
    costs = {"params_M": 1.0, "trainable_M": 1.0, "gflops_per_image": 0.01, "images_per_s": 100.0}
    assert "| label |" in report_markdown("ogc-test", compared, CLASSES, costs)
    assert "exact masks with label prompts instead of kg: " in summary_line(compared, len(CLASSES))


def test_eval_command_line_options() -> None:
    args = build_parser().parse_args(["eval", "probe", "--bundle", "b", "--output-dir", "o"])
    assert args.eval_command == "probe" and str(args.bundle) == "b" and str(args.output_dir) == "o"
    args = build_parser().parse_args(["eval", "--mask-modes", "exact,box"])
    assert args.eval_command is None and args.mask_modes == "exact,box"
    assert main(["eval", "probe", "--mask-modes", "exact"]) == 2  # an `eval` option only
