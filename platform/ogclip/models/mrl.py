"""Adaptive Matryoshka representation learning (OG-CLIP, "Adaptive MRL").

The joint embedding of size D is read at G nested granularities, the prefixes of length D/G, 2D/G, ..., D, each
L2-normalised on its own. Plain MRL trains every prefix with the same fixed weight; OG-CLIP's adaptive variant
weights them with a dimension-attention vector α and ties neighbouring granularities with the Bi-directional
Projection Alignment (BPA) loss.

The granularities stay prefixes of one vector (not the paper's learnable splitting matrix W_g): serving truncates
one stored embedding and keeps one index per size, which a learned split would break.

The paper gives the ingredients of α but not the fusion formula (its equation is missing from the text), and its
ingredients taken literally make α a fixed ramp over sizes (see :func:`entropy_score` and
:func:`classification_contribution`). We use the simplest reading of its words that keeps α a function of the
data, documented in :func:`entropy_score`, :func:`classification_contribution`, :func:`gaussian_fusion` and
:meth:`MatryoshkaHead.bpa_terms`.
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


def _entropy(features: Tensor, eps: float) -> Tensor:
    """Per-sample -Σ p_i log p_i with p_i = |f_i| / Σ_j |f_j|."""
    p = features.abs() / features.abs().sum(dim=-1, keepdim=True).clamp_min(eps)
    return -(p * torch.log(p.clamp_min(eps))).sum(dim=-1)


def information_entropy(features: Tensor, eps: float = 1e-12) -> Tensor:
    """H_g = -Σ p_i log p_i with p_i = |f_i| / Σ_j |f_j|, averaged over the batch.

    The paper calls p_i "the normalized activation value of the i-th dimension"; absolute values normalised to sum
    to one is the simplest distribution that reading allows (a softmax would add an arbitrary temperature).
    """
    return _entropy(features, eps).mean()


def entropy_score(features: Tensor, eps: float = 1e-12) -> Tensor:
    """The entropy term of α: exp(H_g) / d_g, the share of the granularity's dimensions that carry activation.

    Raw H_g grows like log d_g whatever the features hold (a d-long vector of i.i.d. activations has H ≈ log d - c),
    so it ranks granularities by size, not by content. The usual normalisation H_g / log d_g still does (it is
    1 - c / log d_g: 0.87 at d=8, 0.96 at d=1024 for Gaussian features). exp(H_g) is the effective number of active
    dimensions; dividing by d_g gives a score in (0, 1] that is the same at every size for unstructured features
    (≈ 0.76 for Gaussian ones) and falls when a granularity's activation concentrates on few dimensions.
    """
    return (_entropy(features, eps).exp() / features.shape[-1]).mean()


def classification_contribution(logits: Tensor, target: Tensor) -> Tensor:
    """C_g = exp(-KL(Y ‖ P_g)), averaged over the batch: how well granularity g classifies the batch, in (0, 1].

    The paper writes C_g = 1 - KL(P_g ‖ P_full) with P_g from "a lightweight classifier". We use the classifier the
    model already has: the zero-shot softmax P_g of each image over the batch's texts at granularity g (``logits``);
    it needs no extra parameters or validation split and measures what evaluation measures. Against P_full the
    full size scores C = 1 by construction and every prefix is scored by how much it differs from the full
    vector, which on any features (random ones included) ranks granularities by size. We compare each granularity,
    the full one included, with the batch's ground truth Y instead (``target``: rows summing to one, the
    contrastive target; KL(Y ‖ P_g) is finite where KL(P_g ‖ Y) is not). That KL is of order log(batch) early in
    training, where 1 - KL would turn negative and flip the sign of H_g·C_g; exp(-KL), of which 1 - KL is the
    first-order expansion, stays in (0, 1] (it is the geometric-mean probability given to the right texts).
    """
    log_p = F.log_softmax(logits, dim=-1)
    log_y = torch.log(target.clamp_min(1e-12))
    kl = (target * (log_y - log_p)).sum(dim=-1)
    return torch.exp(-kl).mean()


def gaussian_fusion(scores: Tensor, score_noise: float = 0.0, eps: float = 1e-6) -> Tensor:
    """α_g = Φ(z_g) / Σ_k Φ(z_k), z_g = (s_g - μ) / sqrt(σ² + ν²), s_g = H_g·C_g; μ, σ its mean and std over g.

    The paper fuses H_g and C_g with "the Gaussian smoothing function" using exactly this μ and σ, and wants weights
    that are continuous, smooth and that "prioritize high-contribution features". The Gaussian CDF Φ of the
    standardised score is the simplest function with all of these: smooth and strictly increasing in s_g (a
    Gaussian bump exp(-z²/2) would instead penalise the best granularity as much as the worst), always positive
    (so no granularity is dropped), and uniform when all granularities score alike (σ → 0).

    Standardising by σ alone makes α blind to how large the differences are: scores 0.500 and 0.501 get the same
    weights as 0.1 and 0.9, so any tiny systematic difference (sampling noise, a size bias) becomes a full ramp
    from Φ(-1.5) to Φ(1.5). ``score_noise`` ν (scores live in [0, 1]) sets the spread below which differences
    count as noise: σ ≫ ν gives the paper's formula, σ ≪ ν a near-uniform α. ν = 0 is the paper's σ.
    """
    sigma = torch.sqrt(scores.var(unbiased=False) + score_noise**2) + eps
    z = (scores - scores.mean()) / sigma
    cdf = 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    return cdf / cdf.sum()


def contrastive_target(batch: int, labels: Tensor | None, device: torch.device | None = None) -> Tensor:
    """The image→text target distribution of a batch: pair i matches pair i, or every pair of the same class."""
    if labels is None:
        return torch.eye(batch, device=device)
    same = (labels[:, None] == labels[None, :]).float()
    return same / same.sum(dim=1, keepdim=True)


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
        # See bpa_terms: down reads the d_{g+1} - d_g coordinates f_{g+1} adds and predicts f_g; up predicts them
        # from f_g. These are the paper's Proj_{g+1→g} and Proj_{g→g+1} less the rows and columns prefix nesting
        # makes trivial.
        self.down = nn.ModuleList(nn.Linear(hi - lo, lo, bias=False) for lo, hi in pairs) if self.adaptive else None
        self.up = nn.ModuleList(nn.Linear(lo, hi - lo, bias=False) for lo, hi in pairs) if self.adaptive else None

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
    def scores(self, image: list[Tensor], text: list[Tensor], logit_scale: Tensor,
               labels: Tensor | None = None) -> Tensor:
        """s_g = entropy_score(f_g) · C_g for each granularity, coarse to fine; each in (0, 1]."""
        target = contrastive_target(image[0].shape[0], labels, image[0].device)
        return torch.stack(
            [
                entropy_score(img.float()) * classification_contribution(logit_scale * img.float() @ txt.float().T,
                                                                         target)
                for img, txt in zip(image, text, strict=True)
            ]
        )

    @torch.no_grad()
    def update_alpha(self, image: list[Tensor], text: list[Tensor], logit_scale: Tensor,
                     labels: Tensor | None = None) -> Tensor:
        """Recompute α from one batch's per-granularity embeddings and fold it into the running α.

        The fused weights are mixed with the uniform 1/G (``alpha_uniform_mix`` λ): α_g ≥ λ/G always, so a
        granularity that scores low keeps being trained rather than being starved until it scores lower still.
        """
        if not self.adaptive:
            return self.alpha
        fresh = gaussian_fusion(self.scores(image, text, logit_scale, labels), self.cfg.alpha_score_noise)
        mix = self.cfg.alpha_uniform_mix
        fresh = (1.0 - mix) * fresh + mix / len(self.dims)
        momentum = self.cfg.alpha_momentum
        self.alpha.mul_(momentum).add_((1.0 - momentum) * fresh.to(self.alpha))
        self.alpha.div_(self.alpha.sum())
        return self.alpha

    def bpa_terms(self, features: list[Tensor]) -> Tensor:
        """Per neighbouring pair (g, g+1), the two alignment losses, shape (G-1, 2): [down, up].

        The paper aligns Proj_{g+1→g} f_{g+1} with f_g and Proj_{g→g+1} f_g with f_{g+1} by cosine similarity.
        With prefix granularities f_g is (up to scale) the first d_g coordinates of f_{g+1}, so the down
        projection [I | 0] copies it and reaches cosine 1 whatever the encoder does, and the up projection gets
        f_g's part of f_{g+1} for free. We keep only what is not given by nesting, the new coordinates
        Δ_{g+1} = f_{g+1}[d_g:]:

        * down: 1 - cos(Proj_{g+1→g} Δ_{g+1}, f_g), the added detail must still carry the coarse semantics;
        * up: 1 - cos(Proj_{g→g+1} f_g, Δ_{g+1}), the added detail must be predictable from the coarse one.

        These are the paper's matrices with the trivial block fixed (Proj_{g+1→g} = [0 | W_down],
        Proj_{g→g+1} = [I ; W_up]); both now need the encoder's help, and inference stays a prefix read.
        """
        terms = []
        for g, (down, up) in enumerate(zip(self.down, self.up, strict=True)):
            coarse, added = features[g], features[g + 1][..., self.dims[g]:]
            to_coarse = 1.0 - F.cosine_similarity(down(added), coarse, dim=-1).mean()
            to_fine = 1.0 - F.cosine_similarity(up(coarse), added, dim=-1).mean()
            terms.append(torch.stack([to_coarse, to_fine]))
        return torch.stack(terms)

    def bpa_loss(self, features: list[Tensor]) -> Tensor:
        """L_BPA = Σ_g α_g (down_g + up_g) over neighbouring pairs (:meth:`bpa_terms`).

        The paper weights each pair by α_g "to ensure the alignment priority of high-contribution granularities";
        pair (g, g+1) takes the weight of its coarser end.
        """
        if not self.adaptive:
            return features[0].new_zeros(())
        terms = self.bpa_terms(features)
        return (self.alpha[:-1].detach().to(terms) * terms.sum(dim=1)).sum()
