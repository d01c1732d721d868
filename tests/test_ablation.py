"""The ablation (``ogclip eval ablation``): each recipe's arms, the records that let it resume, and its table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import write_shards

from ogclip_jobs.ablation import (
    ABLATIONS,
    VARIANTS,
    RetrievalScoring,
    ZeroShotScoring,
    _int_dims,
    ablation_markdown,
    arm_settings,
    dense_record,
    retrieval_record,
    run_means,
    variant_config,
    variant_eval,
    zero_shot_record,
)
from ogclip_jobs.config import (
    AblationConfig,
    DenseConfig,
    EvalConfig,
    RetrievalConfig,
    SynthStreamConfig,
    TrainConfig,
    TrainJobConfig,
)
from ogclip_jobs.train import build_model_config_preprocess


def test_ablation_variants_share_the_budget() -> None:
    base = TrainJobConfig(name="demo", model="og-clip-tiny", train=TrainConfig(steps=77, batch_size=5))
    configs = {name: variant_config(base, name) for name in VARIANTS}
    assert len({c.name for c in configs.values()}) == len(VARIANTS)
    assert all(c.train == base.train and c.model == base.model and not c.export for c in configs.values())
    assert configs["CLIP"].recipe.prompts == "label" and configs["CLIP"].recipe.visual_prompt == "none"
    assert configs["+Adaptive MRL (OG-CLIP)"].recipe.mrl == "adaptive" and configs["plain MRL"].recipe.mrl == "uniform"
    # The variants that read no mask do not zoom onto the object either; the others keep the architecture's zoom.
    zooms = {name: build_model_config_preprocess(c)["roi_zoom"] for name, c in configs.items()}
    assert zooms["CLIP"] == zooms["+KG-Aug"] == 1.0
    assert {zooms[name] for name in VARIANTS if configs[name].recipe.visual_prompt != "none"} == {2.0}
    with pytest.raises(ValueError, match="not an arm of the detail-clip ablation"):
        variant_config(TrainJobConfig.model_validate({"recipe": {"kind": "detail-clip"}}), "+ROI")
    stream = base.model_copy(update={"data": SynthStreamConfig(seed=10)})
    seeded = [variant_config(stream, "+ROI", seed) for seed in (0, 1, 2)]
    assert len({c.name for c in seeded}) == 3 and [c.seed for c in seeded] == [0, 1, 2]
    assert [c.data.seed for c in seeded] == [10, 11, 12], "each seed renders its own pictures"
    assert all(c.train == base.train for c in seeded)


def test_an_ablation_run_is_reused_only_for_the_same_budget_and_data(tmp_path: Path) -> None:
    data = tmp_path / "shards"
    data.mkdir()
    (data / "part-0.parquet").write_bytes(b"rows")
    base = TrainJobConfig(name="demo", model="og-clip-tiny", train=TrainConfig(steps=77, batch_size=5))
    eval_cfg = EvalConfig(data=data)
    runs = tmp_path / "runs"
    scores = {"macc": 0.5, "macc_by_dim": {16: 0.25, 128: 0.5}, "per_class": [0.5, float("nan")],
              "mask_modes": {"exact": {"macc": 0.5, "macc_by_dim": {16: 0.25, 128: 0.5}}}}
    roi = variant_config(base, "+ROI", 0)
    record = zero_shot_record(runs, "+ROI", 0, roi, eval_cfg)
    assert record.path == runs / "roi-s0.json" and record.load() is None, "nothing stored yet"
    record.save(scores)
    loaded = _int_dims(record.load())
    assert loaded["macc_by_dim"] == {16: 0.25, 128: 0.5} and loaded["mask_modes"]["exact"]["macc_by_dim"][16] == 0.25
    assert loaded["per_class"][0] == 0.5 and math.isnan(loaded["per_class"][1])
    other_seed = zero_shot_record(runs, "+ROI", 0, variant_config(base, "+ROI", 1), eval_cfg)
    other_budget = zero_shot_record(runs, "+ROI", 0, variant_config(base.model_copy(
        update={"train": TrainConfig(steps=78, batch_size=5)}), "+ROI", 0), eval_cfg)
    other_eval = zero_shot_record(runs, "+ROI", 0, roi, eval_cfg.model_copy(update={"batch_size": 7}))
    assert other_seed.load() is None and other_budget.load() is None and other_eval.load() is None
    compared = zero_shot_record(runs, "+ROI", 0, roi, eval_cfg.model_copy(update={"compare_prompts": ["label"]}))
    assert compared.load() is not None, "other prompt sources are extra figures: the arm's record still holds"
    # the dense probe's scores live apart: adding the probe keeps the zero-shot scores, changing it rescores it
    dense = dense_record(runs, "+ROI", 0, roi, DenseConfig())
    assert dense.path == runs / "roi-s0-dense.json" and dense.load() is None and record.load() is not None
    dense.save({"class": {"miou": 0.1}})
    assert dense.load() == {"class": {"miou": 0.1}}
    assert dense_record(runs, "+ROI", 0, roi, DenseConfig(fit_scenes=7)).load() is None
    (data / "part-0.parquet").write_bytes(b"other rows")  # the test shards were rebuilt
    assert zero_shot_record(runs, "+ROI", 0, roi, eval_cfg).load() is None
    record.path.write_text("{not json")
    assert record.load() is None, "an unreadable record is retrained, not an error"


def test_detail_clip_arms_turn_its_terms_on_one_at_a_time_then_change_the_removal() -> None:
    base = TrainJobConfig.model_validate({"name": "dc", "model": "og-clip-tiny", "recipe": {"kind": "detail-clip"},
                                          "train": {"steps": 77, "batch_size": 5}})
    configs = {name: variant_config(base, name) for name in ABLATIONS["detail-clip"]}
    assert len({c.name for c in configs.values()}) == 7 and all(c.train == base.train for c in configs.values())
    arms = {name: (c.recipe.alpha_cls, c.recipe.alpha_patch, c.recipe.alpha_rec, c.recipe.removal,
                   c.recipe.removal_mode) for name, c in configs.items()}
    assert arms == {
        "CLIP": (0.0, 0.0, 0.0, 0.0, "attention"),
        "+reconstruction, random removal": (0.0, 0.0, 1.0, 0.5, "random"),
        "+reconstruction, attention removal": (0.0, 0.0, 1.0, 0.5, "attention"),
        "+L_CLS": (1.0, 0.0, 1.0, 0.5, "attention"),
        "+L_Patch (DetailCLIP)": (1.0, 1.0, 1.0, 0.5, "attention"),
        "DetailCLIP, random removal": (1.0, 1.0, 1.0, 0.5, "random"),
        "DetailCLIP, inverted removal": (1.0, 1.0, 1.0, 0.5, "inverted"),
    }
    # DetailCLIP never reads the mask: its zero-shot evaluation gives none, with the recipe's prompts
    scored = variant_eval(EvalConfig(visual_prompt="roi"), configs["CLIP"])
    assert scored.visual_prompt == "none" and scored.prompts == base.recipe.prompts
    assert variant_eval(EvalConfig(compare_prompts=["label"]), configs["CLIP"]).compare_prompts == []
    assert variant_eval(EvalConfig(), variant_config(TrainJobConfig(), "Red-Circle")).visual_prompt == "red_circle"


def test_every_detail_clip_arm_trains_a_step_with_a_finite_loss() -> None:
    """The arms switch terms off with zero weights and the CLIP arm removes nothing: each must still give a finite
    loss and a gradient to every trainable parameter (data-parallel training refuses a parameter left out)."""
    import torch
    from conftest import MICRO_MINILM, images_and_masks

    import ogclip
    from ogclip.recipes import TrainBatch, create_recipe
    from ogclip_jobs.train import build_optimizer, train_step

    base = TrainJobConfig.model_validate({"recipe": {"kind": "detail-clip", "head": {
        "head_hidden": 32, "head_bottleneck": 16, "prototypes": 64, "decoder_heads": 4}}})
    images, masks = images_and_masks(batch=4)
    for name in ABLATIONS["detail-clip"]:
        recipe = create_recipe(variant_config(base, name).recipe)
        torch.manual_seed(0)
        model = ogclip.create_model("og-clip-tiny", device="cpu", **MICRO_MINILM, **recipe.model_overrides())
        train = TrainConfig(lr=1e-3, warmup_steps=1, steps=2)
        batch = TrainBatch(images=images, masks=masks, texts=model.tokenize([f"target {i}" for i in range(4)]),
                           text_owner=torch.arange(4), labels=torch.arange(4))
        terms = train_step(model, recipe, build_optimizer(model, train), 0, train, batch,
                           torch.Generator().manual_seed(0))
        assert torch.isfinite(terms["loss"]), name
        assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == [], name


def test_run_means_average_what_the_run_logged(tmp_path: Path) -> None:
    rows = [{"step": 1, "kept_on_target": 0.2, "target_share": 0.1}, {"step": 2, "kept_on_target": 0.4},
            {"step": 3, "loss": 1.0, "target_share": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert run_means(tmp_path) == {"kept_on_target": pytest.approx(0.3), "target_share": pytest.approx(0.2)}
    assert run_means(tmp_path / "missing") == {}


def _run(macc: float, dense: float | None = None, kept: float | None = None) -> dict:
    run = {"macc": macc, "macc_by_dim": {16: macc / 2, 32: macc, 128: macc}, "segmenter": "cpu",
           "per_super_category": {"warship": macc}, "looks": {"new_look": macc / 2},
           "mask_modes": {"exact": {"macc": macc}}, "training": {} if kept is None else
           {"kept_on_target": kept, "target_share": 0.1}}
    if dense is not None:
        run["dense"] = {"class": {"miou": dense, "instances": {"small_iou": dense / 4, "other_iou": dense}},
                        "super_category": {"miou": 2 * dense}}
    return run


def test_the_table_shows_each_arms_settings_and_every_score_over_seeds() -> None:
    cfg = AblationConfig(train=TrainJobConfig.model_validate({"recipe": {"kind": "detail-clip"}}),
                         eval=EvalConfig(mask_modes=["exact"]), seeds=[0, 1], dense=DenseConfig())
    results = {"CLIP": {"settings": {"alpha_cls": 0.0, "removal_mode": "attention"},
                        "seeds": {0: _run(0.2, 0.1, 0.3), 1: _run(0.4, 0.3, 0.5)}},
               "DetailCLIP, random removal": {"settings": {"removal_mode": "random"},
                                              "seeds": {0: _run(0.5, 0.2, 0.1), 1: _run(0.5, 0.2, 0.1)}}}
    text = ablation_markdown(cfg, results, ZeroShotScoring(cfg, rows=[{}] * 99))
    header = next(line for line in text.splitlines() if line.startswith("| model"))
    assert header.split(" | ")[1:3] == ["alpha cls", "removal mode"]
    for column in ("class mIoU %", "super-category mIoU %", "small-target IoU %", "kept on target %",
                   "target share %", "mAcc % exact"):
        assert column in header
    clip = next(line for line in text.splitlines() if line.startswith("| CLIP |")).split(" | ")
    assert clip[1:3] == ["0.0", "attention"] and "30.0 ± 10.0" in clip and "20.0 ± 10.0" in clip
    assert "40.0 ± 10.0" in clip, "the kept-on-target share over seeds"
    assert "mAcc % vs embedding dimension" not in text, "dimension curves are OG-CLIP's"
    plain_cfg = cfg.model_copy(update={"dense": None})
    plain = ablation_markdown(plain_cfg, results, ZeroShotScoring(plain_cfg, rows=[{}] * 99))
    assert "class mIoU %" not in plain


@pytest.mark.slow
def test_a_detail_clip_ablation_trains_on_ray_and_adds_the_dense_probe_without_retraining(
        tmp_path: Path, graph, job_settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """One DetailCLIP arm, two steps on Ray Train, scored zero-shot and by the dense probe; then, with the probe
    changed, the finished run is asked for its model again (its folder resumes at the last step, which the
    two-worker resume test covers; here the model of the first call stands in for it), its zero-shot scores are
    reused and only the probe runs again."""
    from ogclip_jobs import ablation

    data = tmp_path / "shards"
    write_shards(graph, data, classes=4, per_class=4)
    train = TrainJobConfig.model_validate({
        "name": "dc", "model": "og-clip-tiny", "output_dir": str(tmp_path / "train"),
        "data": {"kind": "synth", "class_set": "train", "max_classes": 4, "prefetch": 1},  # as the ablation trains
        "recipe": {"kind": "detail-clip", "caption_ratio": 0.0,
                   "head": {"head_hidden": 32, "head_bottleneck": 16, "prototypes": 64, "decoder_heads": 4}},
        "train": {"lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 1, "steps": 2, "batch_size": 4},
        "num_workers": 1, "cpus_per_worker": 1.0, "checkpoint_every": 2, "log_every": 1, "ray_num_cpus": 2})
    dense = DenseConfig(classes=4, class_set="train", fit_scenes=4, eval_scenes=2, pixels_per_scene=8,
                        zero_shot=None)
    cfg = AblationConfig(train=train, eval=EvalConfig(data=data, class_set="train", mask_modes=["exact"]),
                         variants=["+L_Patch (DetailCLIP)"], dense=dense, output_dir=tmp_path / "ablation")
    calls: list[tuple[TrainJobConfig, object]] = []
    real = ablation.run_training

    def run_training(cfg: TrainJobConfig, log):  # the real run, then its model for the same config
        model = next((m for c, m in calls if c == cfg), None) or real(cfg, log)[0]
        calls.append((cfg, model))
        return model, {}

    monkeypatch.setattr(ablation, "run_training", run_training)
    lines: list[str] = []
    first = ablation.run_ablation(cfg, lines.append)["+L_Patch (DetailCLIP)"]
    assert any(line.startswith("[ablation 1/1] training ") for line in lines) and len(calls) == 1
    assert first["settings"] == {"removal_mode": "attention"}
    assert 0.0 < first["seeds"][0]["training"]["target_share"] < 1.0, "the kept-on-target share is logged"
    assert 0.0 <= first["seeds"][0]["dense"]["class"]["miou"] <= 1.0
    table = (tmp_path / "ablation" / "ablation.md").read_text()
    assert "# Ablation of detail-clip" in table and "class mIoU %" in table and "kept on target %" in table
    lines.clear()
    again = ablation.run_ablation(cfg, lines.append)["+L_Patch (DetailCLIP)"]
    assert len(calls) == 1 and "not retrained" in lines[0], "everything was scored: nothing to load"
    assert again["seeds"][0]["dense"] == first["seeds"][0]["dense"]
    lines.clear()
    changed = ablation.run_ablation(cfg.model_copy(update={"dense": dense.model_copy(update={"fit_scenes": 5})}),
                                    lines.append)["+L_Patch (DetailCLIP)"]
    assert len(calls) == 2 and calls[1][0] == calls[0][0], "the finished run is loaded with its own config"
    assert any(line.startswith("[ablation 1/1] loading ") for line in lines), "\n".join(lines)
    assert changed["macc"] == first["macc"] and changed["seeds"][0]["dense"]["counts"]["fit_scenes"] == 5


MPS_BUDGET = {"name": "mps", "model": "og-clip-tiny", "pretrained": "backbone",
              "recipe": {"kind": "mps-clip", "adapters": {"adapter": "g2a", "dim": 8, "heads": 2, "perspectives": 2}},
              "data": {"kind": "scenes", "seed": 10}, "train": {"steps": 77, "batch_size": 5}}


def test_mps_clip_arms_change_the_adapter_then_add_the_loss_terms() -> None:
    base = TrainJobConfig.model_validate(MPS_BUDGET)
    arms = ABLATIONS["mps-clip"]
    assert arms["frozen backbone"] is None, "the backbone as it is: nothing to train"
    configs = {name: variant_config(base, name, 1) for name in arms}
    assert all(c.train == base.train and c.pretrained == base.pretrained and c.data.seed == 11
               for c in configs.values())
    recipes = {name: (c.recipe.adapters.adapter, c.recipe.triplet_weight, c.recipe.perspective_weight,
                      c.recipe.triplet_reduction, c.recipe.adapters.perspectives, c.recipe.perspective_response,
                      c.recipe.full_finetune) for name, c in configs.items()}
    assert recipes == {
        "frozen backbone": ("g2a", 1.0, 0.2, "sum", 2, "max", False),
        "+bottleneck adapters": ("bottleneck", 0.0, 0.0, "sum", 2, "max", False),
        "+G²A adapters": ("g2a", 0.0, 0.0, "sum", 2, "max", False),
        "+multi-perspective contrastive": ("g2a", 0.0, 0.2, "sum", 2, "max", False),
        "+weighted triplet (MPS-CLIP)": ("g2a", 1.0, 0.2, "sum", 2, "max", False),
        "MPS-CLIP, triplet averaged": ("g2a", 1.0, 0.2, "mean", 2, "max", False),
        "MPS-CLIP, K = 1": ("g2a", 1.0, 0.2, "sum", 1, "max", False),
        "MPS-CLIP, mean response": ("g2a", 1.0, 0.2, "sum", 2, "mean", False),
        "full fine-tuning": ("g2a", 1.0, 0.2, "sum", 2, "max", True),
    }
    # a nested change keeps the budget's other adapter settings, and the table names it by its dotted path
    assert configs["+bottleneck adapters"].recipe.adapters.dim == 8
    assert arm_settings(base, "+bottleneck adapters") == {"adapters.adapter": "bottleneck", "triplet_weight": 0.0,
                                                          "perspective_weight": 0.0}
    assert arm_settings(base, "frozen backbone") == {}


def test_every_mps_clip_arm_trains_a_step_and_reaches_every_trainable_parameter(tmp_path: Path) -> None:
    """Arms without the maximum-response terms leave the MPR heads frozen: data-parallel training refuses a
    trainable parameter that no loss reaches."""
    import torch
    from conftest import MICRO_MINILM, images_and_masks

    import ogclip
    from ogclip.recipes import TrainBatch, create_recipe
    from ogclip_jobs.train import build_optimizer, train_step

    torch.manual_seed(0)
    ogclip.save_checkpoint(ogclip.create_model("og-clip-tiny", device="cpu", **MICRO_MINILM),
                           tmp_path / "model.safetensors")
    base = TrainJobConfig.model_validate(MPS_BUDGET)
    images, _ = images_and_masks(batch=4)
    parts, part_masks = images_and_masks(batch=6, seed=1)
    for name, change in ABLATIONS["mps-clip"].items():
        if change is None:
            continue
        recipe = create_recipe(variant_config(base, name).recipe)
        model = ogclip.create_model("og-clip-tiny", device="cpu", **MICRO_MINILM, **recipe.model_overrides())
        ogclip.load_checkpoint(model, tmp_path / "model.safetensors")
        model = recipe.select_trainable(model)
        batch = TrainBatch(images=images, masks=torch.ones(4, 1, 32, 32),
                           texts=model.tokenize([f"scene {i}, caption {c}." for i in range(4) for c in range(2)]),
                           text_owner=torch.arange(4).repeat_interleave(2), labels=torch.arange(4), parts=parts,
                           part_masks=part_masks, part_owner=torch.tensor([0, 0, 1, 2, 3, 3]))
        train = TrainConfig(lr=1e-3, warmup_steps=1, steps=2)
        terms = train_step(model, recipe, build_optimizer(model, train), 0, train, batch,
                           torch.Generator().manual_seed(0))
        assert torch.isfinite(terms["loss"].detach()), name
        assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == [], name
        assert any(p.requires_grad for p in model.mpr.parameters()) == (recipe.cfg.perspective_weight > 0), name


def test_a_retrieval_record_holds_for_the_same_budget_and_scenes(tmp_path: Path) -> None:
    base = variant_config(TrainJobConfig.model_validate(MPS_BUDGET), "+G²A adapters")
    record = retrieval_record(tmp_path, "+G²A adapters", 0, base, RetrievalConfig(scenes=20))
    assert record.path == tmp_path / "g-a-adapters-s0-retrieval.json" and record.load() is None
    record.save({"sub_perspectives": {"none": {"mR": 5.0}}})
    assert retrieval_record(tmp_path, "+G²A adapters", 0, base, RetrievalConfig(
        scenes=20, bundle=tmp_path / "elsewhere", output_dir=tmp_path / "out")).load() is not None, \
        "the bundle and output folder of `eval retrieval` are not read by the ablation"
    assert retrieval_record(tmp_path, "+G²A adapters", 0, base, RetrievalConfig(scenes=21)).load() is None


def test_the_retrieval_table_gives_mr_per_sub_perspective_over_seeds() -> None:
    train = TrainJobConfig.model_validate(MPS_BUDGET)
    cfg = AblationConfig(train=train, seeds=[0, 1], retrieval=RetrievalConfig(sub_perspectives=["none", "noisy"]))

    def run(mr: float) -> dict:
        scores = {"mR": mr, "i2t_r1": mr / 2, "t2i_r1": mr / 5}
        return {"sub_perspectives": {"none": scores, "noisy": {**scores, "mR": mr + 1}}, "training": {}}

    results = {"frozen backbone": {"settings": {}, "seeds": {0: run(3.0), 1: run(3.0)}},
               "+G²A adapters": {"settings": arm_settings(train, "+G²A adapters"), "seeds": {0: run(5.0), 1: run(7.0)}}}
    text = ablation_markdown(cfg, results, RetrievalScoring(cfg, rows={}))
    header = next(line for line in text.splitlines() if line.startswith("| model")).strip(" |")
    assert header.split(" | ")[1:4] == ["adapters.adapter", "triplet weight", "perspective weight"]
    assert header.split(" | ")[4:8] == ["mR % none", "mR % noisy", "I→T R@1 % none", "T→I R@1 % none"]
    g2a = next(line for line in text.splitlines() if line.startswith("| +G²A adapters |")).strip(" |").split(" | ")
    assert g2a[4:8] == ["6.0 ± 1.0", "7.0 ± 1.0", "3.0 ± 0.5", "1.2 ± 0.2"]
    assert "frozen backbone: the `pretrained` bundle as it is, not trained" in text
    assert "mAcc" not in text and "vs embedding dimension" not in text


@pytest.mark.slow
def test_an_mps_clip_ablation_scores_the_backbone_once_and_trains_the_arms_on_ray(
        tmp_path: Path, graph, job_settings) -> None:
    """The frozen backbone is scored, not trained, with one record for every seed; a trained arm runs on Ray Train
    per seed; running the same command again trains and scores nothing."""
    import torch

    import ogclip
    from ogclip_jobs.ablation import run_ablation

    torch.manual_seed(0)
    backbone = ogclip.export_bundle(ogclip.create_model("og-clip-tiny", device="cpu"), tmp_path / "backbone")
    train = TrainJobConfig.model_validate({
        **MPS_BUDGET, "pretrained": str(backbone.path), "output_dir": str(tmp_path / "runs"),
        "data": {"kind": "scenes", "max_classes": 40, "targets_per_scene": [2, 3], "val_scenes": 0},
        "train": {"lr": 1e-3, "warmup_steps": 1, "steps": 2, "batch_size": 4},
        "num_workers": 1, "cpus_per_worker": 1, "checkpoint_every": 2, "log_every": 1, "ray_num_cpus": 2})
    cfg = AblationConfig(train=train, seeds=[0, 1], variants=["frozen backbone", "+G²A adapters"],
                         retrieval=RetrievalConfig(scenes=6, targets_per_scene=(2, 3), sub_perspectives=["none"]),
                         output_dir=tmp_path / "ablation")
    lines: list[str] = []
    results = run_ablation(cfg, lines.append)
    assert sum(line.startswith("[ablation 2/2] training +G²A adapters, seed") for line in lines) == 2
    assert not any("training frozen backbone" in line for line in lines)
    frozen = results["frozen backbone"]
    assert frozen["seeds"][0] == frozen["seeds"][1] and frozen["mR_std"]["none"] == 0.0
    assert sorted(p.name for p in (tmp_path / "ablation" / "runs").iterdir()) == [
        "frozen-backbone-s0-retrieval.json", "g-a-adapters-s0-retrieval.json", "g-a-adapters-s1-retrieval.json"]
    assert 0.0 <= results["+G²A adapters"]["mR"]["none"] <= 100.0
    assert "mR % none" in (tmp_path / "ablation" / "ablation.md").read_text()
    lines.clear()
    again = run_ablation(cfg, lines.append)
    assert sum("not retrained" in line for line in lines) == 4 and again == results
