"""OG-CLIP's training objective: L_total = L_CLIP + L_MRL + w_BPA · L_BPA (paper Eq. 6, w_BPA = 0.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ogclip.models.mrl import MatryoshkaHead, contrastive_target


def contrastive_loss(image: Tensor, text: Tensor, logit_scale: Tensor, labels: Tensor | None = None,
                     negatives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE over the batch, CLIP's loss, on L2-normalised embeddings.

    Without ``labels`` pair i matches only pair i. With class ``labels`` every pair of the same class counts as a
    match (the target spreads evenly over them): a batch of a few hundred classes holds repeated classes, and
    treating an image's own-class captions as negatives would push apart exactly what zero-shot needs together.
    ``negatives``: extra texts that match no image (hard negatives); they join the image→text softmax only, since
    they have no image of their own to be the target of.
    """
    logits = logit_scale * image @ text.T
    target = contrastive_target(logits.shape[0], labels, logits.device).to(logits.dtype)
    text_to_image = F.cross_entropy(logits.T, target)
    if negatives is not None and len(negatives):
        logits = torch.cat([logits, logit_scale * image @ negatives.T], dim=1)
        target = F.pad(target, (0, negatives.shape[0]))
    return (F.cross_entropy(logits, target) + text_to_image) / 2


@dataclass
class LossTerms:
    """Everything a training step logs: the total to backpropagate and its parts."""

    total: Tensor
    clip: Tensor
    mrl: Tensor
    bpa: Tensor
    per_dim: Tensor  # contrastive loss at each granularity, coarse to fine
    alpha: Tensor  # the weights L_MRL used

    def named(self) -> dict[str, Tensor]:
        """The terms by name, as a recipe's loss returns them (``loss`` is backpropagated, the rest logged)."""
        return {"loss": self.total, "loss_clip": self.clip, "loss_mrl": self.mrl, "loss_bpa": self.bpa,
                "alpha": self.alpha}


def distributed_world_size() -> int:
    """The number of torch.distributed ranks (1 when torch.distributed is unavailable or not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def batch_sizes(batch: int, device: torch.device) -> list[int]:
    """Every rank's batch size, in rank order (ranks may differ, e.g. on a last partial batch)."""
    size = torch.tensor([batch], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s) for s in sizes]


def all_gather_with_grad(tensor: Tensor, sizes: list[int]) -> Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 in rank order; gradients flow back to each rank's own part.

    Built on ``torch.distributed.nn.functional.all_gather``, whose backward sums, over all ranks, the gradient each
    rank's loss sends to this rank's part (open_clip's ``gather_with_grad=True``). ``sizes`` are the ranks' lengths
    along dim 0 (:func:`batch_sizes`): every part is padded to the largest, gathered, then trimmed. Integer tensors
    (labels) pass through too, without gradient.
    """
    from torch.distributed.nn.functional import all_gather

    padded = F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, max(sizes) - tensor.shape[0]))
    parts = all_gather(padded)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)], dim=0)


def gather_batch(image: Tensor, text: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The global batch of a data-parallel step: image and text features and labels of every rank, in rank order.

    Contrastive losses need the global batch as negatives (8 workers × 32 pairs is a 256-pair problem, not eight
    32-pair ones), and α must be computed from the same batch on every rank so the ranks keep identical weights.
    A no-op outside torch.distributed or with one rank.
    """
    if distributed_world_size() == 1:
        return image, text, labels
    sizes = batch_sizes(image.shape[0], image.device)
    return (
        all_gather_with_grad(image, sizes),
        all_gather_with_grad(text, sizes),
        None if labels is None else all_gather_with_grad(labels, sizes),
    )


def og_clip_loss(
    out: dict[str, Tensor], head: MatryoshkaHead, labels: Tensor | None = None, *, gather: bool = True
) -> LossTerms:
    """L_CLIP on the full embedding, L_MRL = Σ_g α_g L_CLIP(g), and the BPA loss (zero for plain MRL).

    With ``weighting="none"`` L_MRL is zero too (the per-granularity losses are still reported).

    ``out`` is :meth:`OGCLIP.forward`'s output; its ``negative_text_features`` (hard negatives), when present,
    join every granularity's image→text softmax. In training mode the head's α is first updated from this batch
    (no gradient flows through α: it is a weighting, not a parameter).

    Under torch.distributed with more than one rank (and ``gather``, the default; ``False`` keeps the local batch)
    every term is computed on the global batch gathered by :func:`gather_batch`, so every rank returns the same loss
    and α, those of a single process on the concatenated batch; every rank must call this each step. Gradient
    convention: the gather keeps gradients (:func:`all_gather_with_grad`), so a rank's features receive the gradient
    of every rank's copy of the loss, W × ∂L/∂f_local, and DDP's average over the W ranks gives every parameter
    exactly the single-process gradient of the global-batch loss: encoder, logit scale and BPA projections alike.
    (open_clip's default, a gather without gradient with the local shard put back, gives the encoder 1/W of it while
    the logit scale gets all of it, so the learning rate and the gradient-norm clip would depend on W.)
    """
    image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
    negatives = out.get("negative_text_features")
    if gather:
        image, text, labels = gather_batch(image, text, labels)
        if negatives is not None and distributed_world_size() > 1:
            negatives = all_gather_with_grad(negatives, batch_sizes(negatives.shape[0], negatives.device))
    image_g, text_g = head.split(image), head.split(text)
    negatives_g = head.split(negatives) if negatives is not None else [None] * len(image_g)
    if head.training:
        head.update_alpha(image_g, text_g, scale, labels)
    alpha = head.alpha.detach().clone()
    clip = contrastive_loss(image, text, scale, labels, negatives)
    per_dim = torch.stack([contrastive_loss(i, t, scale, labels, n)
                           for i, t, n in zip(image_g, text_g, negatives_g, strict=True)])
    mrl = (alpha.to(per_dim) * per_dim).sum() if head.cfg.weighting != "none" else per_dim.new_zeros(())
    bpa = head.bpa_loss(image_g)
    total = clip + mrl + head.cfg.bpa_weight * bpa
    return LossTerms(total=total, clip=clip, mrl=mrl, bpa=bpa, per_dim=per_dim.detach(), alpha=alpha)
