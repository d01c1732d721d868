"""MPS-CLIP (Li, Wang, Huang, arXiv 2601.18190) as a recipe, following its authors' code: a frozen backbone with
adapters on both towers (:mod:`ogclip.models.mps`), trained for image–text retrieval on captioned scenes and their
sub-perspectives (one masked view per target).

Per step, with g the whole images' embeddings, t the captions' (each image brings ``captions_per_image`` of its
five; all of an image's captions are its positives), r the mean of an image's sub-perspective embeddings (g when it
has none) and v_1..v_K the MPR heads' outputs on r:

* L_con: InfoNCE both ways on S = g·tᵀ at the fixed temperature τ (targets uniform over an image's captions);
* L_tri: the focal-weighted triplet on S: every violation c = [m + S_neg − S_pos]₊ of an (anchor, positive,
  negative) triple, image anchors against other images' captions and caption anchors against other images, weighted
  by (1 − e^(−c))^γ (the only mining: no hardest negative), summed (the authors' reduction, divided by the captions
  per image so one caption per image is exactly theirs) or averaged;
* L_MPC and L_MPT: the same two on the maximum response S^max_ij = max_k v_k(i)·t_j at the frozen CLIP's logit
  scale (100) (``perspective_response: mean`` takes the mean over k instead: an ablation arm);
* L = L_con + w_tri · L_tri + w_mp · (L_MPC + w_tri · L_MPT), with w_tri = 1 and w_mp = 0.2 by default.

At inference the image is normalize(g + r) (r from the image alone: every detected target, or none), as
``ogclip eval retrieval`` scores every bundle; the MPR heads serve the losses only. Under torch.distributed the
terms are computed on the global batch (features gathered with their gradients, as the authors' code does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ogclip.config import MPSCLIPRecipeConfig
from ogclip.losses import all_gather_with_grad, batch_sizes, distributed_world_size
from ogclip.recipes.base import Autocast, Recipe, TrainBatch, register_recipe


def positive_pairs(owner: Tensor, images: int) -> Tensor:
    """(images, texts) bool: True where text j belongs to image i (``owner[j] == i``)."""
    return owner.unsqueeze(0) == torch.arange(images, device=owner.device).unsqueeze(1)


def multi_positive_contrastive(similarity: Tensor, positive: Tensor, scale: float) -> Tensor:
    """Symmetric cross-entropy on ``scale · similarity`` (images × texts) whose targets are uniform over each row's
    (column's) positives: ½ (image→text + text→image), each averaged over its anchors."""
    logits = scale * similarity
    targets = positive.float()
    image_to_text = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    text_to_image = -(targets / targets.sum(0, keepdim=True) * F.log_softmax(logits, dim=0)).sum(0).mean()
    return 0.5 * (image_to_text + text_to_image)


def focal_triplet(similarity: Tensor, positive: Tensor, margin: float = 0.2, gamma: float = 2.0,
                  reduction: str = "sum") -> Tensor:
    """The focal-weighted triplet loss on ``similarity`` (images × texts) with ``positive`` pairs.

    Image anchors: c = [m + S_ij − S_ip]₊ for each positive text p of image i and each text j not its own; text
    anchors: c' = [m + S_kp − S_ip]₊ for each text p of image i and each other image k. Each violation is weighted
    by w = (1 − e^(−c))^γ. ``sum``: ½ (Σ w·c + Σ w·c') divided by the positives per image (the authors' sum when an
    image has one caption); ``mean``: ½ (mean w·c + mean w·c') over the triples."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"unknown reduction {reduction!r}; expected 'sum' or 'mean'")
    pos = positive.float()
    neg = 1.0 - pos
    own = similarity.masked_fill(~positive, 0.0)
    # image anchors: [image i, positive p, negative j]
    image_anchor = F.relu(margin + similarity.unsqueeze(1) - own.unsqueeze(2)) * pos.unsqueeze(2) * neg.unsqueeze(1)
    # text anchors: [image k, text p]; S_ip is the text's own similarity
    own_per_text = own.sum(0, keepdim=True)
    text_anchor = F.relu(margin + similarity - own_per_text) * neg

    def weighted(c: Tensor) -> Tensor:
        return (1.0 - torch.exp(-c)).pow(gamma) * c

    if reduction == "mean":
        image_triples = (pos.unsqueeze(2) * neg.unsqueeze(1)).sum().clamp(min=1.0)
        text_triples = neg.sum().clamp(min=1.0)
        return 0.5 * (weighted(image_anchor).sum() / image_triples + weighted(text_anchor).sum() / text_triples)
    per_image = pos.sum(1).mean().clamp(min=1.0)
    return 0.5 * (weighted(image_anchor).sum() + weighted(text_anchor).sum()) / per_image


def perspective_response(perspectives: Tensor, texts: Tensor, reduction: str = "max") -> Tensor:
    """S^max (images × texts): each pair's best match over the image's K perspective embeddings (B, K, D); with
    ``reduction="mean"`` the mean match instead."""
    per_view = torch.einsum("bkd,td->bkt", perspectives, texts)
    if reduction == "max":
        return per_view.max(dim=1).values
    if reduction == "mean":
        return per_view.mean(dim=1)
    raise ValueError(f"unknown perspective reduction {reduction!r}; expected 'max' or 'mean'")


def _gather(image: Tensor, views: Tensor, text: Tensor, owner: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The global batch under torch.distributed (a no-op with one rank): every rank's image and perspective
    features, texts, and text owners shifted to the gathered images' numbering."""
    if distributed_world_size() == 1:
        return image, views, text, owner
    image_sizes = batch_sizes(image.shape[0], image.device)
    text_sizes = batch_sizes(text.shape[0], text.device)
    rank = torch.distributed.get_rank()
    shifted = owner + sum(image_sizes[:rank])
    return (all_gather_with_grad(image, image_sizes), all_gather_with_grad(views, image_sizes),
            all_gather_with_grad(text, text_sizes), all_gather_with_grad(shifted, text_sizes))


@register_recipe
class MPSCLIPRecipe(Recipe):
    """Adapters and MPR heads on a frozen backbone (or, with ``full_finetune``, the baseline that trains the image
    tower and text projection instead), with the losses of the module docstring."""

    kind = "mps-clip"
    cfg: MPSCLIPRecipeConfig

    def model_overrides(self) -> dict[str, Any]:
        return {"architecture": "mps-clip", "mps": self.cfg.adapters.model_dump()}

    def build_model(self, architecture: str, pretrained: str | Path | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
        """The backbone (``pretrained``: a checkpoint file or an export bundle's folder) with fresh adapters and
        heads, trainable as :meth:`select_trainable` says."""
        if pretrained is None:
            raise ValueError("mps-clip adapts a trained backbone: set `pretrained` to a bundle folder or checkpoint "
                             "(e.g. an og-clip run's bundle)")
        path = Path(pretrained)
        weights = path / "model.safetensors" if path.is_dir() else path
        return self.select_trainable(super().build_model(architecture, weights, device))

    def select_trainable(self, model: nn.Module) -> nn.Module:
        """Freeze the backbone: only the adapters and the MPR heads train; with ``full_finetune`` the image tower,
        the text projection and the heads instead (the adapters stay the identity). The heads serve only the
        maximum-response terms: with ``perspective_weight`` 0 they stay frozen (data-parallel training refuses a
        trainable parameter that no loss reaches). Returns ``model``."""
        model.requires_grad_(False)
        model.mpr.requires_grad_(self.cfg.perspective_weight > 0)
        if self.cfg.full_finetune:
            model.visual.requires_grad_(True)
            for param in model.text_projection_parameters():
                param.requires_grad_(True)
        else:
            model.adapters.requires_grad_(True)
        return model

    def loss(self, model: nn.Module, batch: TrainBatch, generator: torch.Generator,
             autocast: Autocast) -> dict[str, Tensor]:
        if batch.parts is None:
            raise ValueError("mps-clip trains on scenes with sub-perspectives (data: {kind: scenes})")
        cfg = self.cfg
        with autocast():
            out = model(batch.images, batch.texts, batch.masks, parts=batch.parts, part_masks=batch.part_masks,
                        part_owner=batch.part_owner)
        image, views, text, owner = _gather(out["image_features"].float(), out["perspective_features"].float(),
                                            out["text_features"].float(), batch.text_owner)
        positive = positive_pairs(owner, image.shape[0])
        similarity, response = image @ text.T, perspective_response(views, text, cfg.perspective_response)
        terms = {
            "loss_con": multi_positive_contrastive(similarity, positive, 1.0 / cfg.temperature),
            "loss_tri": focal_triplet(similarity, positive, cfg.margin, cfg.gamma, cfg.triplet_reduction),
            "loss_mpc": multi_positive_contrastive(response, positive, cfg.perspective_scale),
            "loss_mpt": focal_triplet(response, positive, cfg.margin, cfg.gamma, cfg.triplet_reduction),
        }
        terms["loss"] = (terms["loss_con"] + cfg.triplet_weight * terms["loss_tri"]
                         + cfg.perspective_weight * (terms["loss_mpc"] + cfg.triplet_weight * terms["loss_mpt"]))
        return terms
