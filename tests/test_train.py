"""The training step: schedule, optimiser groups, and real learning on a small batch (the recipes: test_recipes)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import images_and_masks

import ogclip
from ogclip.config import OGCLIPRecipeConfig
from ogclip.recipes import TrainBatch, create_recipe
from ogclip_jobs.config import TrainConfig
from ogclip_jobs.train import build_optimizer, learning_rate, train_step


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, steps=110)
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == pytest.approx(1e-3)
    assert learning_rate(60, cfg) == pytest.approx((1e-3 + 1e-5) / 2)
    assert learning_rate(110, cfg) == pytest.approx(1e-5)
    values = [learning_rate(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_paper_recipe_is_the_default() -> None:
    cfg = TrainConfig()
    assert (cfg.lr, cfg.min_lr, cfg.weight_decay, cfg.grad_clip_norm) == (5e-5, 5e-6, 0.05, 1.0)
    assert OGCLIPRecipeConfig().hybrid_ratio == 0.1


def test_optimizer_skips_frozen_and_does_not_decay_gains(micro_openclip: ogclip.OGCLIP) -> None:
    optimizer = build_optimizer(micro_openclip, TrainConfig())
    decayed, plain = (set(map(id, g["params"])) for g in optimizer.param_groups)
    trainable = {id(p) for p in micro_openclip.parameters() if p.requires_grad}
    assert decayed | plain == trainable
    assert id(micro_openclip.logit_scale) in plain and id(micro_openclip.visual.conv1.weight) in decayed
    assert id(micro_openclip.visual.conv1.roi.weight) in decayed


def test_the_text_projection_learns_at_its_own_scale_and_stays_fixed_at_zero(micro_minilm: ogclip.OGCLIP) -> None:
    images, masks = images_and_masks(batch=4)
    recipe = create_recipe(OGCLIPRecipeConfig(hybrid_ratio=0.0))
    moved = {}
    for scale in (1.0, 0.25, 0.0):
        model = copy.deepcopy(micro_minilm)
        cfg = TrainConfig(lr=1e-3, min_lr=1e-3, warmup_steps=0, steps=3, text_projection_lr_scale=scale)
        optimizer = build_optimizer(model, cfg)
        (projection,) = model.text_projection_parameters()
        before, visual = projection.detach().clone(), model.visual.conv1.weight.detach().clone()
        batch = TrainBatch(images=images, masks=masks, texts=model.tokenize([f"target {i}" for i in range(4)]),
                           text_owner=torch.arange(4), labels=torch.arange(4))
        train_step(model, recipe, optimizer, 0, cfg, batch, torch.Generator().manual_seed(0))
        rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
        assert rates[id(model.visual.conv1.weight)] == pytest.approx(1e-3)
        assert not torch.equal(model.visual.conv1.weight, visual), "the image tower learns at every scale"
        moved[scale] = float((projection.detach() - before).abs().max())
        if scale:
            assert rates[id(projection)] == pytest.approx(1e-3 * scale)
        else:  # fixed: out of the optimiser, no gradient, bit-identical
            assert id(projection) not in rates and not projection.requires_grad and moved[scale] == 0.0
    # Adam's first step moves every weight by about its rate: a quarter of the rate, about a quarter of the move
    assert moved[0.25] == pytest.approx(0.25 * moved[1.0], rel=0.2)


def test_steps_reduce_the_loss_on_a_fixed_batch(micro_minilm: ogclip.OGCLIP) -> None:
    model = copy.deepcopy(micro_minilm)
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, steps=30)
    recipe = create_recipe(OGCLIPRecipeConfig(hybrid_ratio=0.0))
    optimizer = build_optimizer(model, cfg)
    images, masks = images_and_masks(batch=6)
    batch = TrainBatch(images=images, masks=masks, texts=model.tokenize([f"target number {i}" for i in range(6)]),
                       text_owner=torch.arange(6), labels=torch.arange(6))
    generator = torch.Generator().manual_seed(0)
    losses = [float(train_step(model, recipe, optimizer, s, cfg, batch, generator)["loss"].detach())
              for s in range(cfg.steps)]
    assert losses[-1] < 0.5 * losses[0]
    assert model.visual.conv1.roi.weight.abs().sum() > 0, "the ROI branch learns once masks carry signal"
