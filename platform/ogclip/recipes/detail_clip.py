"""DetailCLIP's parts (Monsefi et al., arXiv 2409.06809), as its authors' code computes them.

An EMA teacher sees both views of an image whole; the student sees each view with the blocks of patches removed
where the teacher's CLS attention is lowest. Besides CLIP's contrastive loss the image tower learns from three
self-supervised terms: L_CLS (iBOT-style distillation of the CLS token across views), L_Patch (distillation of the
removed patches' tokens, the decoder's outputs against the teacher's) and L_Rec (MAE reconstruction of the removed
patches' per-patch normalised pixels). α1 = α2 = α3 = 1 by default.

This module holds the pieces that do not depend on the encoder: the teacher's momentum schedule and update, the
token removal, the prototype head, centring, and the three losses.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RemovalMode = Literal["attention", "random", "inverted"]


def teacher_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """λ of the EMA teacher at ``step``: a cosine schedule from ``base`` at step 0 to 1 at ``total_steps``."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """θ ← λθ + (1 − λ)φ for every parameter of the teacher and the student's counterpart (same structure)."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach().to(t.dtype), alpha=1.0 - momentum)


def cls_attention(attentions: list[Tensor]) -> Tensor:
    """The CLS query's attention over the patch keys, averaged over all layers and heads: ``attentions`` are
    (B, heads, 1+N, 1+N) softmax maps with the CLS token first; returns (B, N) (the softmax ran over all 1+N
    keys, as in the paper's Eq. 9)."""
    return torch.stack([a[:, :, 0, 1:] for a in attentions]).mean(dim=(0, 2))


def keep_mask(attention: Tensor, grid: int, block: int = 2, removal: float = 0.5, mode: RemovalMode = "attention",
              generator: torch.Generator | None = None) -> Tensor:
    """Which patches the student keeps, (B, grid²) bool, True = kept.

    The patch grid is cut into ``block``×``block`` cells; the attention map (B, grid²) is resized bilinearly to the
    cell grid and the ``⌊cells · removal⌋`` cells of lowest attention are removed (``attention``), so the same
    number of patches goes in every image. ``random`` removes as many cells at random, ``inverted`` the highest
    (the method's ablation arms).
    """
    if grid % block:
        raise ValueError(f"a {grid}×{grid} patch grid does not split into {block}×{block} blocks")
    if not 0.0 <= removal < 1.0:
        raise ValueError(f"removal ratio {removal} is outside [0, 1)")
    batch, side = attention.shape[0], grid // block
    cells = side * side
    keep = cells - math.floor(cells * removal)
    if mode == "random":
        score = torch.rand(batch, cells, generator=generator).to(attention.device)
    else:
        score = F.interpolate(attention.reshape(batch, 1, grid, grid).float(), size=(side, side), mode="bilinear",
                              align_corners=False).flatten(1)
        if mode == "inverted":
            score = -score
    kept = torch.zeros(batch, cells, dtype=torch.bool, device=attention.device)
    kept.scatter_(1, score.topk(keep, dim=1).indices, True)
    kept = kept.reshape(batch, side, side).repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)
    return kept.flatten(1)


class PrototypeHead(nn.Module):
    """The DINO/iBOT head shared by CLS and patch tokens: MLP in → hidden → hidden → bottleneck (GELU, no norm),
    L2-normalisation, then a linear map to ``prototypes`` with unit-norm rows and no bias (weight norm with g
    fixed at 1)."""

    def __init__(self, width: int, hidden: int = 2048, bottleneck: int = 256, prototypes: int = 8192) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.linear(F.normalize(self.mlp(tokens), dim=-1), F.normalize(self.prototypes, dim=-1))


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float = 0.9) -> None:
    """The teacher's centre c ← m·c + (1 − m)·mean of this step's teacher outputs (over every token of every image,
    on every rank: all-reduced under torch.distributed)."""
    mean = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float().mean(dim=0)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(mean)
        mean /= torch.distributed.get_world_size()
    center.mul_(momentum).add_(mean, alpha=1.0 - momentum)


def distillation(teacher: Tensor, student: Tensor, center: Tensor, teacher_temp: float,
                 student_temp: float = 0.1) -> Tensor:
    """Cross-entropy H(P_t, P_s) per token: P_t = softmax((teacher − c)/T_t) (no gradient), P_s = softmax(student/T_s).
    The paper writes KL(P_s‖P_t); the code computes this, which is KL(P_t‖P_s) up to a constant."""
    target = F.softmax((teacher.detach() - center) / teacher_temp, dim=-1)
    return -(target * F.log_softmax(student / student_temp, dim=-1)).sum(dim=-1)


def cls_loss(teacher_u: Tensor, teacher_v: Tensor, student_u: Tensor, student_v: Tensor, center: Tensor,
             teacher_temp: float = 0.04, student_temp: float = 0.1) -> Tensor:
    """L_CLS, across views only: ½ (H(P_t(v), P_s(u)) + H(P_t(u), P_s(v))), averaged over images. The student's
    CLS is that of the view with patches removed."""
    return 0.5 * (distillation(teacher_v, student_u, center, teacher_temp, student_temp).mean()
                  + distillation(teacher_u, student_v, center, teacher_temp, student_temp).mean())


def patch_loss(teacher: Tensor, student: Tensor, removed: Tensor, center: Tensor, teacher_temp: float = 0.07,
               student_temp: float = 0.1) -> Tensor:
    """L_Patch for one view: H(P_t^j, P_s^j) averaged over the removed positions j of each image (``removed``
    (B, N) bool), then over images. The student's tokens are the decoder's outputs, the teacher's its full view's."""
    per_token = distillation(teacher, student, center, teacher_temp, student_temp)
    weight = removed.to(per_token.dtype)
    return ((per_token * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)).mean()


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) → (B, N, patch·patch·C), patches in row-major order, each flattened (row, column, channel)."""
    batch, channels, height, width = images.shape
    if height % patch or width % patch:
        raise ValueError(f"a {height}×{width} image does not split into {patch}×{patch} patches")
    x = images.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, (height // patch) * (width // patch), patch * patch * channels)


def reconstruction_loss(predicted: Tensor, images: Tensor, patch: int, removed: Tensor, eps: float = 1e-6) -> Tensor:
    """L_Rec for one view: the MSE between the pixel head's (B, N, patch²·C) output and each patch's pixels
    normalised by that patch's own mean and variance, averaged over a patch's values and then over the removed
    patches only (MAE's loss with ``norm_pix_loss``)."""
    target = patchify(images, patch)
    target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + eps).sqrt()
    per_patch = (predicted - target).pow(2).mean(dim=-1)
    weight = removed.to(per_patch.dtype)
    return (per_patch * weight).sum() / weight.sum().clamp(min=1.0)


def vit_tokens(visual: nn.Module, x: Tensor, kept: Tensor | None = None, with_attention: bool = False
               ) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Run an open_clip ``VisionTransformer`` on ``x`` (its conv1 input: for OG-CLIP the image with its mask
    channel) keeping only the patches where ``kept`` (B, N) is True (the same count in every row; MAE-style: the
    removed tokens never enter the encoder). Returns the projected pooled output (what ``visual(x)`` returns when
    nothing is removed), the final tokens after ``ln_post`` (B, 1 + kept, width) and, with ``with_attention``, each
    block's attention maps (B, heads, 1 + kept, 1 + kept)."""
    tokens = visual._embeds(x)
    if kept is not None:
        count = int(kept[0].sum())
        if not bool((kept.sum(dim=1) == count).all()):
            raise ValueError("every image must keep the same number of patches")
        index = kept.nonzero()[:, 1].reshape(kept.shape[0], count)
        patches = tokens[:, 1:].gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        tokens = torch.cat([tokens[:, :1], patches], dim=1)
    if not visual.transformer.batch_first:
        raise ValueError("vit_tokens expects a batch-first open_clip Transformer")
    attentions: list[Tensor] = []
    for block in visual.transformer.resblocks:
        if with_attention:
            normed = block.ln_1(tokens)
            out, weights = block.attn(normed, normed, normed, need_weights=True, average_attn_weights=False)
            attentions.append(weights)
            tokens = tokens + block.ls_1(out)
            tokens = tokens + block.ls_2(block.mlp(block.ln_2(tokens)))
        else:
            tokens = block(tokens)
    pooled, _ = visual._pool(tokens)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, visual.ln_post(tokens), attentions
