"""Recipes: dispatch on the config's kind, the hooks the shared loop calls, and OG-CLIP unchanged as a recipe."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

import pytest
import torch
from conftest import MICRO_MINILM
from torch import Tensor, nn

import ogclip
from ogclip.config import OGCLIPRecipeConfig, StrictModel
from ogclip.recipes import OGCLIPRecipe, Recipe, TrainBatch, create_recipe, list_recipes, register_recipe
from ogclip.recipes.base import _RECIPES
from ogclip.recipes.og_clip import hybrid_masks
from ogclip_jobs.config import TrainConfig, TrainJobConfig
from ogclip_jobs.train import build_optimizer, logged_terms, metrics_line, train_step

# The loss curve of the OG-CLIP step before it became a recipe (the same model, data, seeds and settings as
# `_og_clip_curve` below, run through the former `train_step`): the refactor must not change a number.
BEFORE_RECIPES = [
    (3.902554750442505, 1.669454574584961, 1.8799229860305786, 1.7658867835998535),
    (3.472825765609741, 1.5482730865478516, 1.5769190788269043, 1.738167643547058),
    (5.067056179046631, 2.255157470703125, 2.4803104400634766, 1.657942295074463),
    (3.8925893306732178, 1.698272466659546, 1.875978708267212, 1.591691017150879),
    (3.32244610786438, 1.5058026313781738, 1.5077334642410278, 1.5445504188537598),
    (3.5577471256256104, 1.5788995027542114, 1.679520845413208, 1.496633768081665),
]
WORDS = ["a grey aircraft", "a red ship", "a small green boat", "a large white jet", "a blue helicopter",
         "striped tanker"]


def _og_clip_curve() -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = ogclip.create_model("og-clip-tiny", device="cpu", **MICRO_MINILM)
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, steps=6, batch_size=4)
    recipe = create_recipe(OGCLIPRecipeConfig(hybrid_ratio=0.3))
    optimizer = build_optimizer(model, cfg)
    generator, data = torch.Generator().manual_seed(7), torch.Generator().manual_seed(1)
    curve = []
    for step in range(cfg.steps):
        images = torch.randn(4, 3, 32, 32, generator=data)
        masks = (torch.rand(4, 1, 32, 32, generator=data) > 0.5).float()
        batch = TrainBatch(images=images, masks=masks, texts=model.tokenize([WORDS[(step + i) % 6] for i in range(6)]),
                           text_owner=torch.tensor([0, 1, 2, 3, 4, 4]),  # 4 images + one hard-negative group
                           labels=torch.tensor([0, 1, 1, 2]))
        curve.append(logged_terms(train_step(model, recipe, optimizer, step, cfg, batch, generator)))
    return curve


def test_og_clip_as_a_recipe_keeps_its_loss_curve() -> None:
    curve = _og_clip_curve()
    got = [(row["loss"], row["loss_clip"], row["loss_mrl"], row["loss_bpa"]) for row in curve]
    assert got == [pytest.approx(row, rel=1e-4) for row in BEFORE_RECIPES]
    assert all(len(row["alpha"]) == 8 for row in curve), "α is logged every step"


def test_the_job_config_dispatches_to_its_recipe() -> None:
    assert "og-clip" in list_recipes()
    cfg = TrainJobConfig.model_validate({"recipe": {"kind": "og-clip", "visual_prompt": "none", "mrl": "uniform"}})
    recipe = create_recipe(cfg.recipe)
    assert isinstance(recipe, OGCLIPRecipe) and recipe.cfg.visual_prompt == "none"
    assert recipe.model_overrides() == {"mrl": {"weighting": "uniform"},
                                        "preprocess_cfg": {"roi_zoom": 1.0, "roi_orient": False}}
    assert TrainJobConfig().recipe == OGCLIPRecipeConfig(), "OG-CLIP is the default"
    with pytest.raises(ValueError, match="kind"):
        TrainJobConfig.model_validate({"recipe": {"kind": "no-such-method"}})
    with pytest.raises(ValueError, match="Extra inputs"):
        TrainJobConfig.model_validate({"prompts": "kg"})  # the method's settings live in its recipe


def test_hybrid_sampling_rate() -> None:
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 1, 4, 4)
    ones = sum(bool(hybrid_masks(masks, 0.1, generator).all()) for _ in range(2000))
    assert 150 < ones < 250


class _CountingConfig(StrictModel):
    kind: Literal["counting"] = "counting"


class _CountingRecipe(Recipe):
    """A second method in miniature: a loss with its own terms and an after-step hook that keeps an EMA."""

    kind = "counting"

    def __init__(self, cfg: _CountingConfig) -> None:
        super().__init__(cfg)
        self.after: list[tuple[nn.Module, int]] = []

    def loss(self, model: nn.Module, batch: TrainBatch, generator: torch.Generator, autocast: Any
             ) -> dict[str, Tensor]:
        with autocast():
            features = model.encode_image(batch.images, batch.masks)
        pull = (features - 1.0).pow(2).mean()
        return {"loss": pull, "loss_pull": pull.detach(), "spread": features.std(dim=0).mean().detach()}

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        self.after.append((model, step))
        assert total_steps == 3


@pytest.fixture
def counting() -> Iterator[type[_CountingRecipe]]:
    register_recipe(_CountingRecipe)
    yield _CountingRecipe
    _RECIPES.pop("counting")


def test_the_loop_runs_any_recipe_and_calls_its_hook(counting: type[_CountingRecipe],
                                                     micro_minilm: ogclip.OGCLIP) -> None:
    import copy

    model = copy.deepcopy(micro_minilm)
    recipe = create_recipe(_CountingConfig())  # type: ignore[arg-type]
    assert isinstance(recipe, counting) and "counting" in list_recipes()
    cfg = TrainConfig(lr=1e-3, warmup_steps=1, steps=3)
    optimizer = build_optimizer(model, cfg)
    images = torch.randn(2, 3, 32, 32)
    batch = TrainBatch(images=images, masks=torch.ones(2, 1, 32, 32), texts=torch.zeros(0), text_owner=torch.zeros(0),
                       labels=torch.arange(2))
    rows = [logged_terms(train_step(model, recipe, optimizer, s, cfg, batch, torch.Generator())) for s in range(3)]
    assert [step for _, step in recipe.after] == [1, 2, 3] and all(m is model for m, _ in recipe.after)
    assert rows[-1]["loss"] < rows[0]["loss"] and set(rows[0]) == {"loss", "loss_pull", "spread"}
    line = metrics_line({"step": 3, **rows[-1], "loss_ema": 0.5, "lr": 1e-3, "samples_per_s": 10.0}, 3)
    assert "pull" in line and "ema 0.500" in line, "the console shows whatever terms the recipe returns"


def test_a_recipe_refuses_another_methods_config_and_a_kind_twice(counting: type[_CountingRecipe]) -> None:
    with pytest.raises(ValueError, match="takes a 'og-clip' config"):
        OGCLIPRecipe(_CountingConfig())  # type: ignore[arg-type]

    class Impostor(_CountingRecipe):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_recipe(Impostor)
    with pytest.raises(ValueError, match="unknown recipe"):
        _RECIPES.pop("counting")
        try:
            create_recipe(_CountingConfig())  # type: ignore[arg-type]
        finally:
            register_recipe(_CountingRecipe)
