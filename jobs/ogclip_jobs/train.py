"""The OG-CLIP training step and its optimiser, as the paper specifies them.

AdamW (decoupled weight decay on matrices only, as open_clip does: gains, biases and the logit scale are not
decayed), linear warm-up then cosine decay to ``min_lr``, global grad-norm clipping, and hybrid sampling: a share
``hybrid_ratio`` of batches replaces the masks with all ones so the model keeps its global view.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ogclip.config import TrainConfig
from ogclip.losses import LossTerms, og_clip_loss
from ogclip.models import OGCLIP


def build_optimizer(model: OGCLIP, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on weight matrices only."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_gain_or_bias = param.ndim < 2 or "bias" in name or name.endswith(("logit_scale", "embedding"))
        (no_decay if is_gain_or_bias else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up from 0 to ``lr`` over ``warmup_steps``, then cosine from ``lr`` to ``min_lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def hybrid_masks(masks: Tensor, ratio: float, generator: torch.Generator) -> Tensor:
    """With probability ``ratio`` replace the whole batch's masks by all ones (the paper's r_s sampling)."""
    if float(torch.rand((), generator=generator)) < ratio:
        return torch.ones_like(masks)
    return masks


def train_step(
    model: OGCLIP,
    optimizer: torch.optim.Optimizer,
    step: int,
    cfg: TrainConfig,
    images: Tensor,
    masks: Tensor,
    texts: Tensor,
    labels: Tensor | None,
    generator: torch.Generator,
) -> LossTerms:
    """One optimisation step on a batch (``texts`` as token ids); returns the loss terms."""
    model.train()
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, cfg)
    masks = hybrid_masks(masks, cfg.hybrid_ratio, generator)
    terms = og_clip_loss(model(images, texts, masks), model.mrl, labels)
    optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm)
    optimizer.step()
    return terms
