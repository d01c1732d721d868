"""DetailCLIP's parts (Monsefi et al., arXiv 2409.06809), as its authors' code computes them.

An EMA teacher sees both views of an image whole; the student sees each view with the blocks of patches removed
where the teacher's CLS attention is lowest. Besides CLIP's contrastive loss the image tower learns from three
self-supervised terms: L_CLS (iBOT-style distillation of the CLS token across views), L_Patch (distillation of the
removed patches' tokens, the decoder's outputs against the teacher's) and L_Rec (MAE reconstruction of the removed
patches' per-patch normalised pixels). α1 = α2 = α3 = 1 by default.

This module holds the recipe and its pieces: the teacher's momentum schedule and update, the token removal,
centring and the three losses; the model's parts are :mod:`ogclip.models.detail`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ogclip.config import MASK_FREE_PREPROCESS, DetailCLIPRecipeConfig
from ogclip.losses import contrastive_loss
from ogclip.recipes.base import Autocast, Recipe, TrainBatch, register_recipe

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


def two_views(images: Tensor, masks: Tensor, scale: tuple[float, float], generator: torch.Generator
              ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Two independent random resized crops (area share in ``scale``, aspect 3/4–4/3) with horizontal flips of each
    image, back at its size, the masks cut alike: the method's two views (its colour jitter, grayscale, blur and
    solarisation are left out: colour is what the synthetic world's classes differ by)."""
    batch, _, height, width = images.shape
    views = []
    for _ in range(2):
        out_images, out_masks = [], []
        for i in range(batch):
            draw = torch.rand(4, generator=generator).tolist()
            area = height * width * (scale[0] + (scale[1] - scale[0]) * draw[0])
            aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * draw[1])
            h = min(height, max(1, round(math.sqrt(area / aspect))))
            w = min(width, max(1, round(math.sqrt(area * aspect))))
            top, left = int(draw[2] * (height - h + 1)), int(draw[3] * (width - w + 1))
            crop = torch.cat([images[i], masks[i]])[:, top:top + h, left:left + w].unsqueeze(0)
            crop = torch.cat([F.interpolate(crop[:, :-1], size=(height, width), mode="bilinear", align_corners=False),
                              F.interpolate(crop[:, -1:], size=(height, width), mode="nearest")], dim=1)[0]
            if float(torch.rand((), generator=generator)) < 0.5:
                crop = crop.flip(-1)
            out_images.append(crop[:-1])
            out_masks.append(crop[-1:])
        views.append((torch.stack(out_images), torch.stack(out_masks)))
    return views[0], views[1]


@register_recipe
class DetailCLIPRecipe(Recipe):
    """L_CLIP + α1 L_CLS + α2 L_Patch + α3 L_Rec (see the module's text); the image tower reads no mask."""

    kind = "detail-clip"
    cfg: DetailCLIPRecipeConfig

    def model_overrides(self) -> dict[str, Any]:
        """The detail-clip architecture with this head; no ROI zoom (the tower reads no mask) and no Matryoshka
        projections: the losses train the full-size embedding only, and a parameter no loss reaches would stop
        data-parallel training (DDP refuses gradients that never arrive)."""
        return {"architecture": "detail-clip", "detail": self.cfg.head.model_dump(),
                "preprocess_cfg": dict(MASK_FREE_PREPROCESS), "mrl": {"weighting": "none"}}

    def loss(self, model: nn.Module, batch: TrainBatch, generator: torch.Generator,
             autocast: Autocast) -> dict[str, Tensor]:
        inner = getattr(model, "module", model)
        cfg = self.cfg
        (u, u_mask), (v, v_mask) = two_views(batch.images, batch.masks, cfg.crop_scale, generator)
        with autocast():
            out = model(u, batch.texts, None, batch.text_owner, second_view=v, removal=cfg.removal,
                        removal_mode=cfg.removal_mode, block=cfg.block, generator=generator)
        out = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
        clip = 0.5 * sum(contrastive_loss(out[f"image_features_{s}"], out["text_features"], out["logit_scale"],
                                          batch.labels, out.get("negative_text_features")) for s in "uv")
        distil_cls = cls_loss(out["teacher_cls_u"], out["teacher_cls_v"], out["student_cls_u"], out["student_cls_v"],
                              inner.center_cls, cfg.teacher_temp_cls, cfg.student_temp)
        distil_patch = 0.5 * sum(patch_loss(out[f"teacher_patch_{s}"], out[f"student_patch_{s}"],
                                            ~out[f"kept_{s}"], inner.center_patch, cfg.teacher_temp_patch,
                                            cfg.student_temp) for s in "uv")
        rec = 0.5 * sum(reconstruction_loss(out[f"pixels_{s}"], view, inner.patch, ~out[f"kept_{s}"])
                        for s, view in (("u", u), ("v", v)))
        update_center(inner.center_cls, torch.cat([out["teacher_cls_u"], out["teacher_cls_v"]]), cfg.center_momentum)
        update_center(inner.center_patch, torch.cat([out["teacher_patch_u"], out["teacher_patch_v"]]),
                      cfg.center_momentum)
        on_target = F.avg_pool2d(torch.cat([u_mask, v_mask]), inner.patch).flatten(1) > 0.5
        kept = torch.cat([out["kept_u"], out["kept_v"]])
        total = clip + cfg.alpha_cls * distil_cls + cfg.alpha_patch * distil_patch + cfg.alpha_rec * rec
        return {"loss": total, "loss_clip": clip.detach(), "loss_cls": distil_cls.detach(),
                "loss_patch": distil_patch.detach(), "loss_rec": rec.detach(),
                # the diagnostic of the issue: kept tokens on the target vs the target's share of all tokens
                "kept_on_target": (kept & on_target).sum() / kept.sum().clamp(min=1),
                "target_share": on_target.float().mean()}

    def after_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        momentum = teacher_momentum(step, total_steps, self.cfg.teacher_momentum)
        ema_update(model.teacher, model.visual, momentum)
        ema_update(model.teacher_head, model.head, momentum)
