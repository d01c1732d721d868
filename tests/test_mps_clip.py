"""MPS-CLIP: adapters that start as the identity, what trains, the losses against values worked out by hand, the
scene stream it trains on, and a bundle that serves."""

from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ogclip
from ogclip.config import MPSCLIPRecipeConfig, MPSConfig
from ogclip.models import MPSCLIP, save_checkpoint
from ogclip.recipes import MPSCLIPRecipe, TrainBatch, create_recipe
from ogclip.recipes.mps_clip import (
    focal_triplet,
    multi_positive_contrastive,
    perspective_response,
    positive_pairs,
)

SMALL = MPSConfig(dim=16, heads=4, perspectives=3)


def _backbone(tmp_path: Path) -> tuple[ogclip.OGCLIP, Path]:
    """A micro OG-CLIP whose ROI conv is not zero (so the mask matters), saved as a backbone checkpoint."""
    from conftest import MICRO_MINILM

    torch.manual_seed(0)
    base = ogclip.create_model("og-clip-tiny", device="cpu", **MICRO_MINILM)
    with torch.no_grad():
        base.visual.conv1.roi.weight.normal_(0.0, 0.1)
    save_checkpoint(base, tmp_path / "model.safetensors")
    return base.eval(), tmp_path


def _recipe(**settings) -> MPSCLIPRecipe:
    recipe = create_recipe(MPSCLIPRecipeConfig(adapters=settings.pop("adapters", SMALL), **settings))
    assert isinstance(recipe, MPSCLIPRecipe)
    return recipe


def _build(recipe: MPSCLIPRecipe, folder: Path) -> MPSCLIP:
    """What ``recipe.build_model`` does, on the micro layout (an override of og-clip-tiny)."""
    from conftest import MICRO_MINILM

    model = ogclip.create_model("og-clip-tiny", device="cpu", **MICRO_MINILM, **recipe.model_overrides())
    ogclip.load_checkpoint(model, folder / "model.safetensors")
    return recipe.select_trainable(model)


@pytest.mark.parametrize("kind", ["g2a", "bottleneck"])
def test_a_fresh_mps_clip_computes_exactly_its_backbone(tmp_path: Path, kind: str) -> None:
    from conftest import images_and_masks

    base, folder = _backbone(tmp_path)
    recipe = _recipe(adapters=SMALL.model_copy(update={"adapter": kind}))
    model = _build(recipe, folder).eval()
    assert isinstance(model, MPSCLIP) and len(model.adapters["visual"]) == 2 and len(model.adapters["text"]) == 6
    images, masks = images_and_masks(batch=3)
    texts = model.tokenize(["a grey destroyer at the top left.", "two aircraft on an apron."])
    with torch.no_grad():
        torch.testing.assert_close(model.image_features(images, masks), base.image_features(images, masks),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model.text_features(texts), base.text_features(texts), atol=1e-5, rtol=0)
        # a trained adapter (non-zero up-projection) changes both towers
        for adapters in model.adapters.values():
            for adapter in adapters:
                adapter.up.weight.normal_(0.0, 0.05)
        assert (model.image_features(images, masks) - base.image_features(images, masks)).abs().max() > 1e-3
        assert (model.text_features(texts) - base.text_features(texts)).abs().max() > 1e-3


def test_only_the_adapters_and_heads_train_unless_full_finetuning(tmp_path: Path) -> None:
    _, folder = _backbone(tmp_path)
    model = _build(_recipe(), folder)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adapters", "mpr"}
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < count < 0.1 * sum(p.numel() for p in model.parameters())
    full = _build(_recipe(full_finetune=True), folder)
    trained = {n for n, p in full.named_parameters() if p.requires_grad}
    assert any(n.startswith("visual.") for n in trained) and any(n.startswith("text.proj") for n in trained)
    assert not any(n.startswith(("adapters.", "text.transformer.")) for n in trained)
    with pytest.raises(ValueError, match="pretrained"):
        _recipe().build_model("og-clip-tiny", None, "cpu")


def test_the_g2a_gate_starts_at_its_configured_value() -> None:
    from ogclip.models.mps import Adapter

    adapter = Adapter(32, "g2a", 8, 2, 0.6, 5, 0.1, 0.1)
    assert float(torch.sigmoid(adapter.gate.detach())) == pytest.approx(0.6)
    assert not adapter.up.weight.any() and not adapter.up.bias.any()
    with pytest.raises(ValueError, match="divide"):
        MPSConfig(dim=10, heads=4)


def test_multi_positive_contrastive_by_hand() -> None:
    # 2 images, 3 texts: texts 0, 1 are image 0's, text 2 is image 1's
    similarity = torch.tensor([[0.5, 0.1, -0.2], [0.0, 0.3, 0.4]])
    positive = positive_pairs(torch.tensor([0, 0, 1]), 2)
    assert positive.tolist() == [[True, True, False], [False, False, True]]
    scale = 10.0
    logits = scale * similarity
    row = torch.log_softmax(logits, dim=1)
    col = torch.log_softmax(logits, dim=0)
    image_to_text = (-(0.5 * row[0, 0] + 0.5 * row[0, 1]) - row[1, 2]) / 2
    text_to_image = (-col[0, 0] - col[0, 1] - col[1, 2]) / 3
    expected = 0.5 * (image_to_text + text_to_image)
    assert float(multi_positive_contrastive(similarity, positive, scale)) == pytest.approx(float(expected))


def _triplet_by_loops(s: torch.Tensor, owner: list[int], margin: float, gamma: float) -> list[tuple[float, int]]:
    """(Σ w·c, triples) over image anchors and over text anchors, written out."""
    def w(c: float) -> float:
        return (1 - math.exp(-c)) ** gamma * c

    images, texts = s.shape
    sums = [[0.0, 0], [0.0, 0]]
    for i in range(images):
        for p in (p for p in range(texts) if owner[p] == i):
            for j in (j for j in range(texts) if owner[j] != i):
                sums[0][0] += w(max(0.0, margin + float(s[i, j]) - float(s[i, p])))
                sums[0][1] += 1
            for k in (k for k in range(images) if k != i):
                sums[1][0] += w(max(0.0, margin + float(s[k, p]) - float(s[i, p])))
                sums[1][1] += 1
    return [(total, int(count)) for total, count in sums]


def test_focal_triplet_by_hand() -> None:
    generator = torch.Generator().manual_seed(0)
    # one caption per image: the authors' sum over every off-diagonal pair in both directions, halved
    s = torch.rand(4, 4, generator=generator) * 2 - 1
    (image_sum, _), (text_sum, _) = _triplet_by_loops(s, [0, 1, 2, 3], 0.2, 2.0)
    eye = positive_pairs(torch.arange(4), 4)
    assert float(focal_triplet(s, eye, 0.2, 2.0, "sum")) == pytest.approx(0.5 * (image_sum + text_sum), rel=1e-5)
    # two captions per image: the sum divided by the captions per image, or each direction's mean over its triples
    s = torch.rand(3, 6, generator=generator) * 2 - 1
    owner = [0, 0, 1, 1, 2, 2]
    positive = positive_pairs(torch.tensor(owner), 3)
    (image_sum, image_count), (text_sum, text_count) = _triplet_by_loops(s, owner, 0.2, 2.0)
    assert (image_count, text_count) == (3 * 2 * 4, 6 * 2)
    assert float(focal_triplet(s, positive, 0.2, 2.0, "sum")) == pytest.approx(0.5 * (image_sum + text_sum) / 2,
                                                                              rel=1e-5)
    assert float(focal_triplet(s, positive, 0.2, 2.0, "mean")) == pytest.approx(
        0.5 * (image_sum / image_count + text_sum / text_count), rel=1e-5)
    # γ = 0 is the plain hinge; a satisfied margin costs nothing
    assert float(focal_triplet(torch.eye(3), positive_pairs(torch.arange(3), 3), 0.2, 0.0)) == 0.0
    hinge = focal_triplet(torch.zeros(2, 2), positive_pairs(torch.arange(2), 2), 0.2, 0.0, "mean")
    assert float(hinge) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="reduction"):
        focal_triplet(s, positive, reduction="max")


def test_the_response_takes_each_pairs_best_perspective_or_their_mean() -> None:
    views = F.normalize(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [-1.0, 0.0]]]), dim=-1)
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    torch.testing.assert_close(perspective_response(views, texts),
                               torch.tensor([[1.0, 1.0, 0.0], [2 ** -0.5, 2 ** -0.5, 1.0]]))
    half = 2 ** -0.5 / 2
    torch.testing.assert_close(perspective_response(views, texts, "mean"),
                               torch.tensor([[0.5, 0.5, -0.5], [half - 0.5, half, 0.5 - half]]))
    with pytest.raises(ValueError, match="reduction"):
        perspective_response(views, texts, "min")


def test_perspectives_fuse_each_images_parts_or_keep_the_whole() -> None:
    from conftest import MICRO_MINILM

    recipe = _recipe()
    model = ogclip.create_model("og-clip-tiny", device="cpu", **MICRO_MINILM, **recipe.model_overrides())
    whole = F.normalize(torch.randn(3, model.cfg.embed_dim), dim=-1)
    parts = F.normalize(torch.randn(3, model.cfg.embed_dim), dim=-1)
    fused, views = model.perspectives(whole, parts, torch.tensor([0, 0, 2]))
    torch.testing.assert_close(fused[0], F.normalize(parts[0] + parts[1], dim=-1))
    torch.testing.assert_close(fused[1], whole[1])  # no part: the whole image
    torch.testing.assert_close(fused[2], parts[2])
    assert views.shape == (3, SMALL.perspectives, model.cfg.embed_dim)
    torch.testing.assert_close(views.norm(dim=-1), torch.ones(3, SMALL.perspectives))


def test_the_recipe_trains_adapters_on_scenes_and_the_bundle_serves(tmp_path: Path) -> None:
    from conftest import images_and_masks

    from ogclip_jobs.config import TrainConfig
    from ogclip_jobs.train import build_optimizer, train_step

    base, folder = _backbone(tmp_path / "backbone")
    recipe = _recipe()
    model = _build(recipe, folder)
    images, _ = images_and_masks(batch=4)
    parts, part_masks = images_and_masks(batch=6, seed=1)
    captions = [f"scene {i}, caption {c}." for i in range(4) for c in range(2)]
    batch = TrainBatch(images=images, masks=torch.ones(4, 1, 32, 32), texts=model.tokenize(captions),
                       text_owner=torch.arange(4).repeat_interleave(2), labels=torch.arange(4), parts=parts,
                       part_masks=part_masks, part_owner=torch.tensor([0, 0, 1, 2, 3, 3]))
    cfg = TrainConfig(lr=1e-3, warmup_steps=1, steps=4)
    optimizer = build_optimizer(model, cfg)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    rows = [train_step(model, recipe, optimizer, s, cfg, batch, torch.Generator().manual_seed(0)) for s in range(4)]
    assert {"loss", "loss_con", "loss_tri", "loss_mpc", "loss_mpt"} <= set(rows[0])
    assert float(rows[-1]["loss"].detach()) < float(rows[0]["loss"].detach())
    # every trainable parameter is reached by the loss (DDP refuses otherwise); the backbone did not move
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    with pytest.raises(ValueError, match="scenes"):
        recipe.loss(model, TrainBatch(images=images, masks=images[:, :1], texts=batch.texts,
                                      text_owner=batch.text_owner, labels=batch.labels),
                    torch.Generator(), contextlib.nullcontext)
    bundle = ogclip.export_bundle(model, tmp_path / "bundle", recipe="mps-clip")
    served, info = ogclip.load_bundle(bundle.path, device="cpu")
    assert isinstance(served, MPSCLIP) and (info.architecture, info.recipe) == ("mps-clip", "mps-clip")
    with torch.no_grad():
        torch.testing.assert_close(served.encode_image(images), model.eval().encode_image(images))
        torch.testing.assert_close(served.encode_text(captions), model.encode_text(captions))
        assert (served.encode_image(images) - base.encode_image(images)).abs().max() > 1e-4, "the adapters trained"


def test_scene_texts_draw_each_scenes_own_captions() -> None:
    from ogclip_jobs.train import scene_texts

    captions = [[f"s{i} c{c}" for c in range(5)] for i in range(3)]
    texts, owner = scene_texts(captions, 2, random.Random(0))
    assert owner == [0, 0, 1, 1, 2, 2] and len(set(texts)) == 6
    assert all(text.startswith(f"s{i} ") for text, i in zip(texts, owner, strict=True))


def test_the_scene_stream_renders_captioned_scenes_with_their_parts(graph) -> None:
    from ogclip.config import PreprocessConfig
    from ogclip_jobs.config import TrainJobConfig
    from ogclip_jobs.retrieval import SceneWorld
    from ogclip_jobs.train import RenderScenesForTraining
    from ogclip_kg import cypher
    from ogclip_kg.prompts import fetch_class_facts

    keys = [r["key"] for r in graph.read(cypher.CLASS_SET_KEYS, key="train")][:60]
    facts = {row["key"]: row for row in fetch_class_facts(graph, keys)}
    preprocess = PreprocessConfig(image_size=32, roi_zoom=2.0).model_dump(mode="json")
    stage = RenderScenesForTraining(preprocess, facts, seed=3, per_scene=(2, 4), sub_perspectives="targets")
    batch = stage({"id": [0, 1, 2, 3]})
    assert batch["image"].shape == (4, 3, 32, 32) and (batch["mask"] == 1).all()
    assert [len(c) for c in batch["captions"]] == [5] * 4 and list(batch["label"]) == [0, 1, 2, 3]
    world = SceneWorld(facts, (2, 4), 3, 32)
    visible = [sum(a > 0 for a in world.draw("train", i, i)[0].areas) for i in range(4)]
    assert batch["part_owner"].tolist() == [i for i in range(4) for _ in range(visible[i])]
    assert batch["part_image"].shape == (sum(visible), 3, 32, 32)
    assert 0 < batch["part_mask"].mean() < 1
    again = RenderScenesForTraining(preprocess, facts, seed=3, per_scene=(2, 4), sub_perspectives="targets")
    assert (again({"id": [2]})["image"] == batch["image"][2:3]).all(), "deterministic in the row id"
    cfg = TrainJobConfig.model_validate({"model": "og-clip-tiny", "data": {"kind": "scenes", "captions_per_image": 3},
                                         "recipe": {"kind": "mps-clip"}})
    assert cfg.data.kind == "scenes" and cfg.data.captions_per_image == 3 and cfg.recipe.kind == "mps-clip"


def test_the_recipe_and_its_data_are_checked_together() -> None:
    """Scenes are what mps-clip trains on and only it; its config has no single-target text settings (a scene is
    contrasted with its own captions), so setting one is refused instead of silently ignored."""
    from pydantic import ValidationError

    from ogclip_jobs.config import TrainJobConfig

    scenes = {"kind": "scenes"}
    with pytest.raises(ValidationError, match="set data: {kind: scenes}"):
        TrainJobConfig.model_validate({"data": {"kind": "synth"}, "recipe": {"kind": "mps-clip"}})
    for other in ("og-clip", "detail-clip"):
        with pytest.raises(ValidationError, match=f"only it, not '{other}'"):
            TrainJobConfig.model_validate({"data": scenes, "recipe": {"kind": other}})
    for unused in ({"hard_negatives": 4}, {"caption_ratio": 0.0}):
        with pytest.raises(ValidationError, match=next(iter(unused))):
            TrainJobConfig.model_validate({"data": scenes, "recipe": {"kind": "mps-clip", **unused}})
    assert TrainJobConfig.model_validate({"data": scenes, "recipe": {"kind": "mps-clip", "prompts": "label"}}
                                         ).recipe.prompts == "label"


@pytest.mark.slow
def test_ogclip_train_on_scenes_chooses_the_checkpoint_on_val_and_exports(tmp_path: Path, graph, job_settings,
                                                                          local_ray) -> None:
    """The recipe end to end on Ray Train: a backbone bundle, scenes rendered by an actor, checkpoints scored by
    retrieval mR on the val split, the best exported as an mps-clip bundle."""
    from ogclip_jobs.config import TrainJobConfig
    from ogclip_jobs.train import run_training

    torch.manual_seed(0)
    backbone = ogclip.export_bundle(ogclip.create_model("og-clip-tiny", device="cpu"), tmp_path / "backbone")
    cfg = TrainJobConfig.model_validate({
        "name": "mps", "model": "og-clip-tiny", "pretrained": str(backbone.path), "output_dir": str(tmp_path / "runs"),
        "recipe": {"kind": "mps-clip", "adapters": {"dim": 8, "heads": 2, "perspectives": 2}},
        "data": {"kind": "scenes", "max_classes": 40, "targets_per_scene": [2, 3], "val_scenes": 6},
        "train": {"lr": 1e-3, "warmup_steps": 1, "steps": 4, "batch_size": 4},
        "num_workers": 1, "cpus_per_worker": 1, "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 2,
        "export_class_sets": [], "ray_num_cpus": 2})
    model, summary = run_training(cfg, log=lambda _: None)
    selection = summary["selection"]
    assert selection["selected_by"].startswith("val mR") and set(selection["val_mR"]) == {"2", "4"}
    scores = {int(k): v for k, v in selection["val_mR"].items()}
    assert scores[selection["step"]] == max(scores.values())
    served, info = ogclip.load_bundle(summary["bundle"], device="cpu")
    assert isinstance(served, MPSCLIP) and info.recipe == "mps-clip"
