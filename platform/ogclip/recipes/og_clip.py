"""OG-CLIP as a recipe: the ROI mask (with the paper's hybrid sampling), KG-Aug prompts, Adaptive MRL + BPA."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ogclip.config import MASK_FREE_PREPROCESS, OGCLIPRecipeConfig
from ogclip.losses import og_clip_loss
from ogclip.recipes.base import Autocast, Recipe, TrainBatch, register_recipe
from ogclip.transforms import apply_visual_prompt


def hybrid_masks(masks: Tensor, ratio: float, generator: torch.Generator) -> Tensor:
    """With probability ``ratio`` replace the whole batch's masks by all ones (the paper's r_s sampling)."""
    if float(torch.rand((), generator=generator)) < ratio:
        return torch.ones_like(masks)
    return masks


@register_recipe
class OGCLIPRecipe(Recipe):
    """L_total = L_CLIP + L_MRL + 0.2 · L_BPA on images read with their ROI masks (:func:`ogclip.og_clip_loss`)."""

    kind = "og-clip"
    cfg: OGCLIPRecipeConfig

    def model_overrides(self) -> dict[str, Any]:
        """The MRL weighting when the config overrides it, and no ROI zoom or turn for a model that never sees the
        mask (``visual_prompt: none``, the ablation's plain CLIP: either would hand it the mask's location)."""
        overrides: dict[str, Any] = {"mrl": {"weighting": self.cfg.mrl}} if self.cfg.mrl else {}
        if self.cfg.visual_prompt == "none":
            overrides["preprocess_cfg"] = dict(MASK_FREE_PREPROCESS)
        return overrides

    def loss(self, model: nn.Module, batch: TrainBatch, generator: torch.Generator,
             autocast: Autocast) -> dict[str, Tensor]:
        inner = getattr(model, "module", model)
        images, masks = apply_visual_prompt(batch.images, batch.masks, self.cfg.visual_prompt, inner.cfg.preprocess)
        masks = hybrid_masks(masks, self.cfg.hybrid_ratio, generator)
        with autocast():
            out = model(images, batch.texts, masks, batch.text_owner)
        out = {k: v.float() for k, v in out.items()}  # the losses in fp32: softmax over the batch is precision-hungry
        return og_clip_loss(out, inner.mrl, batch.labels).named()
