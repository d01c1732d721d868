"""OG-CLIP's training objective: L_total = L_CLIP + L_MRL + w_BPA · L_BPA (paper Eq. 6, w_BPA = 0.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ogclip.models.mrl import MatryoshkaHead


def contrastive_loss(image: Tensor, text: Tensor, logit_scale: Tensor, labels: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE over the batch, CLIP's loss, on L2-normalised embeddings.

    Without ``labels`` pair i matches only pair i. With class ``labels`` every pair of the same class counts as a
    match (the target spreads evenly over them): a batch of a few hundred classes holds repeated classes, and
    treating an image's own-class captions as negatives would push apart exactly what zero-shot needs together.
    """
    logits = logit_scale * image @ text.T
    if labels is None:
        target = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    same = (labels[:, None] == labels[None, :]).to(logits.dtype)
    target = same / same.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@dataclass
class LossTerms:
    """Everything a training step logs: the total to backpropagate and its parts."""

    total: Tensor
    clip: Tensor
    mrl: Tensor
    bpa: Tensor
    per_dim: Tensor  # contrastive loss at each granularity, coarse to fine
    alpha: Tensor  # the weights L_MRL used

    def as_dict(self) -> dict[str, float | list[float]]:
        return {
            "loss": float(self.total.detach()),
            "loss_clip": float(self.clip.detach()),
            "loss_mrl": float(self.mrl.detach()),
            "loss_bpa": float(self.bpa.detach()),
            "alpha": [round(float(a), 5) for a in self.alpha],
        }


def og_clip_loss(out: dict[str, Tensor], head: MatryoshkaHead, labels: Tensor | None = None) -> LossTerms:
    """L_CLIP on the full embedding, L_MRL = Σ_g α_g L_CLIP(g), and the BPA loss (zero for plain MRL).

    With ``weighting="none"`` L_MRL is zero too (the per-granularity losses are still reported).

    ``out`` is :meth:`OGCLIP.forward`'s output. In training mode the head's α is first updated from this batch
    (no gradient flows through α: it is a weighting, not a parameter).
    """
    image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
    image_g, text_g = head.split(image), head.split(text)
    if head.training:
        head.update_alpha(image_g, text_g, scale)
    alpha = head.alpha.detach().clone()
    clip = contrastive_loss(image, text, scale, labels)
    per_dim = torch.stack([contrastive_loss(i, t, scale, labels) for i, t in zip(image_g, text_g, strict=True)])
    mrl = (alpha.to(per_dim) * per_dim).sum() if head.cfg.weighting != "none" else per_dim.new_zeros(())
    bpa = head.bpa_loss(image_g)
    total = clip + mrl + head.cfg.bpa_weight * bpa
    return LossTerms(total=total, clip=clip, mrl=mrl, bpa=bpa, per_dim=per_dim.detach(), alpha=alpha)
