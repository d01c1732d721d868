"""Adaptive Matryoshka representation learning (OG-CLIP, "Adaptive MRL").

The joint embedding of size D is read at G nested granularities, the prefixes of length D/G, 2D/G, ..., D, each
L2-normalised on its own. Plain MRL trains every prefix with the same fixed weight; OG-CLIP's adaptive variant
weights them with a dimension-attention vector α and ties neighbouring granularities with the Bi-directional
Projection Alignment (BPA) loss.

The paper gives the ingredients of α but not the fusion formula (its equation is missing from the text). We use
the simplest reading of its words, documented in :func:`gaussian_fusion`, :func:`information_entropy` and
:func:`classification_contribution`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ogclip.config import MRLConfig


def granularity_dims(embed_dim: int, granularities: int) -> list[int]:
    """The nested prefix lengths D/G, 2D/G, ..., D (e.g. 128..1024 for D=1024, G=8)."""
    if embed_dim % granularities:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by {granularities} granularities")
    step = embed_dim // granularities
    return [step * (g + 1) for g in range(granularities)]


def truncate(features: Tensor, dim: int) -> Tensor:
    """The first ``dim`` coordinates of ``features``, L2-normalised: the embedding at granularity ``dim``."""
    return F.normalize(features[..., :dim], dim=-1)


def information_entropy(features: Tensor, eps: float = 1e-12) -> Tensor:
    """H_g = -Σ p_i log p_i with p_i = |f_i| / Σ_j |f_j|, averaged over the batch.

    The paper calls p_i "the normalized activation value of the i-th dimension"; absolute values normalised to sum
    to one is the simplest distribution that reading allows (a softmax would add an arbitrary temperature).
    """
    p = features.abs() / features.abs().sum(dim=-1, keepdim=True).clamp_min(eps)
    return -(p * torch.log(p.clamp_min(eps))).sum(dim=-1).mean()


def classification_contribution(logits: Tensor, logits_full: Tensor) -> Tensor:
    """C_g = 1 - KL(P_g ‖ P_full), averaged over the batch.

    The paper scores each granularity with "a lightweight classifier" against the full-dimension prediction. We use
    the classifier the model already has: the zero-shot softmax of each image over the batch's texts at
    granularity g. It needs no extra parameters or validation split and measures what evaluation measures.
    """
    log_p = F.log_softmax(logits, dim=-1)
    log_q = F.log_softmax(logits_full, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
    return 1.0 - kl


def gaussian_fusion(scores: Tensor, eps: float = 1e-6) -> Tensor:
    """α_g = Φ(z_g) / Σ_k Φ(z_k), z_g = (s_g - μ) / σ, s_g = H_g · C_g; μ, σ its mean and std over granularities.

    The paper fuses H_g and C_g with "the Gaussian smoothing function" using exactly this μ and σ, and wants weights
    that are continuous, smooth and that "prioritize high-contribution features". The Gaussian CDF Φ of the
    standardised score is the simplest function with all of these: smooth and strictly increasing in s_g (a
    Gaussian bump exp(-z²/2) would instead penalise the best granularity as much as the worst), always positive
    (so no granularity is dropped), and uniform when all granularities score alike (σ → 0).
    """
    z = (scores - scores.mean()) / (scores.std(unbiased=False) + eps)
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    return cdf / cdf.sum()


class MatryoshkaHead(nn.Module):
    """Granularities, the dimension-attention state α and the BPA projections of one OG-CLIP model.

    ``alpha`` is a buffer (exported with the model) holding an exponential moving average of the per-batch α, so the
    weights move smoothly across steps rather than jumping with each batch. With ``weighting="uniform"`` α stays at
    1/G and there are no projections: that is plain MRL.
    """

    def __init__(self, embed_dim: int, cfg: MRLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.dims = granularity_dims(embed_dim, cfg.granularities)
        self.register_buffer("alpha", torch.full((cfg.granularities,), 1.0 / cfg.granularities))
        pairs = list(zip(self.dims[:-1], self.dims[1:], strict=True))
        # Proj_{g+1→g} ∈ R^{d_{g+1}×d_g} and Proj_{g→g+1} ∈ R^{d_g×d_{g+1}} for each neighbouring pair.
        self.down = nn.ModuleList(nn.Linear(hi, lo, bias=False) for lo, hi in pairs) if self.adaptive else None
        self.up = nn.ModuleList(nn.Linear(lo, hi, bias=False) for lo, hi in pairs) if self.adaptive else None

    @property
    def adaptive(self) -> bool:
        return self.cfg.weighting == "adaptive"

    def check_dim(self, dim: int | None) -> int:
        """Return the granularity to use (``None`` means D), or raise naming the supported ones."""
        if dim is None:
            return self.dims[-1]
        if dim not in self.dims:
            raise ValueError(f"unsupported embedding dim {dim}; this model serves {self.dims}")
        return dim

    def split(self, features: Tensor) -> list[Tensor]:
        """The embedding at every granularity, coarse to fine."""
        return [truncate(features, d) for d in self.dims]

    @torch.no_grad()
    def update_alpha(self, image: list[Tensor], text: list[Tensor], logit_scale: Tensor) -> Tensor:
        """Recompute α from one batch's per-granularity embeddings and fold it into the running α."""
        if not self.adaptive:
            return self.alpha
        full = logit_scale * image[-1] @ text[-1].T
        scores = torch.stack(
            [
                information_entropy(img) * classification_contribution(logit_scale * img @ txt.T, full)
                for img, txt in zip(image, text, strict=True)
            ]
        ).float()
        fresh = gaussian_fusion(scores)
        momentum = self.cfg.alpha_momentum
        self.alpha.mul_(momentum).add_((1.0 - momentum) * fresh.to(self.alpha))
        self.alpha.div_(self.alpha.sum())
        return self.alpha

    def bpa_loss(self, features: list[Tensor]) -> Tensor:
        """L_BPA = Σ_g α_g [(1 - cos(Proj_{g+1→g} f_{g+1}, f_g)) + (1 - cos(Proj_{g→g+1} f_g, f_{g+1}))].

        The paper constrains both projections with cosine similarity and weights each pair by α_g "to ensure the
        alignment priority of high-contribution granularities"; pair (g, g+1) takes the weight of its coarser end.
        """
        if not self.adaptive:
            return features[0].new_zeros(())
        total = features[0].new_zeros(())
        for g, (down, up) in enumerate(zip(self.down, self.up, strict=True)):
            coarse, fine = features[g], features[g + 1]
            to_coarse = 1.0 - F.cosine_similarity(down(fine), coarse, dim=-1).mean()
            to_fine = 1.0 - F.cosine_similarity(up(coarse), fine, dim=-1).mean()
            total = total + self.alpha[g] * (to_coarse + to_fine)
        return total
