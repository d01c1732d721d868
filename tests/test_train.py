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
