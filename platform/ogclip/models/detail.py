"""The ``detail-clip`` architecture: OG-CLIP's towers (served exactly like OG-CLIP) plus DetailCLIP's training-only
parts: an EMA teacher copy of the image tower and its head, the prototype head shared by CLS and patch tokens, a
one-block decoder with a pixel head, and the teacher's centres."""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ogclip.config import ModelConfig
from ogclip.models.ogclip import OGCLIP, vit_tokens
from ogclip.models.registry import register_architecture


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


def sincos_2d(width: int, grid: int) -> Tensor:
    """Fixed 2-D sine-cosine positional embeddings (MAE's), (1 + grid², width) with a zero row for the CLS token."""
    if width % 4:
        raise ValueError(f"2-D sine-cosine embeddings need a width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = [torch.outer(axis.flatten(), omega) for axis in (cols, rows)]
    table = torch.cat([torch.cat([p.sin(), p.cos()], dim=1) for p in parts], dim=1)
    return torch.cat([torch.zeros(1, width, dtype=torch.float64), table]).float()


class MaskedDecoder(nn.Module):
    """DetailCLIP's decoder: the kept tokens (CLS first) embedded, a learned mask token at every removed position,
    fixed sine-cosine positions, one transformer block and a LayerNorm; returns every patch position's token and its
    pixel prediction (patch² · 3 values)."""

    def __init__(self, width: int, grid: int, patch: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"decoder heads {heads} do not divide the width {width}")
        self.embed = nn.Linear(width, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.normal_(self.mask_token, std=0.02)
        self.register_buffer("positions", sincos_2d(width, grid).unsqueeze(0), persistent=False)
        self.block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                                batch_first=True, norm_first=True, layer_norm_eps=1e-6)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.pixels = nn.Linear(width, patch * patch * 3)

    def forward(self, tokens: Tensor, kept: Tensor) -> tuple[Tensor, Tensor]:
        x = self.embed(tokens)
        batch, count = kept.shape
        where = kept.unsqueeze(-1).expand(batch, count, x.shape[-1])
        placed = torch.zeros(batch, count, x.shape[-1], dtype=x.dtype, device=x.device).masked_scatter(where, x[:, 1:])
        patches = torch.where(where, placed, self.mask_token.to(x.dtype).expand(batch, count, -1))
        out = self.norm(self.block(torch.cat([x[:, :1], patches], dim=1) + self.positions.to(x.dtype)))[:, 1:]
        return out, self.pixels(out)


@register_architecture("detail-clip")
class DetailCLIP(OGCLIP):
    """OG-CLIP's towers plus DetailCLIP's training parts (``cfg.detail``). The teacher and its head get no gradient
    and stay in eval mode; they follow the student through :func:`ogclip.recipes.detail_clip.ema_update`."""

    def __init__(self, cfg: ModelConfig, name: str | None = None) -> None:
        if cfg.detail is None:
            raise ValueError("a detail-clip architecture needs its `detail` settings")
        super().__init__(cfg, name)
        width, patch = int(cfg.vision_cfg["width"]), int(cfg.vision_cfg["patch_size"])
        self.grid = cfg.image_size // patch
        self.patch = patch
        d = cfg.detail
        self.head = PrototypeHead(width, d.head_hidden, d.head_bottleneck, d.prototypes)
        self.decoder = MaskedDecoder(width, self.grid, patch, d.decoder_heads)
        self.teacher = copy.deepcopy(self.visual).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center_cls", torch.zeros(d.prototypes))
        self.register_buffer("center_patch", torch.zeros(d.prototypes))

    def train(self, mode: bool = True) -> DetailCLIP:
        super().train(mode)
        self.teacher.eval()
        self.teacher_head.eval()
        return self

    def forward(self, image: Tensor, text: Any, mask: Tensor | None = None, text_owner: Tensor | None = None,
                second_view: Tensor | None = None, removal: float = 0.5, removal_mode: str = "attention",
                block: int = 2, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Without ``second_view``: OG-CLIP's forward. With it (training): ``image`` and ``second_view`` are the two
        views u and v; everything DetailCLIP's losses read, per view: the student's normalised image features (of
        the view with blocks removed), the text features (and hard negatives), the teacher's and the student's
        prototype logits for CLS and patch tokens (the student's patch tokens from the decoder), the pixel
        predictions, and which patches the student kept. One call, because DDP synchronises gradients through the
        wrapped forward."""
        from ogclip.recipes.detail_clip import cls_attention, keep_mask

        if second_view is None:
            return super().forward(image, text, mask, text_owner)
        batch = image.shape[0]
        out: dict[str, Any] = {"logit_scale": self.logit_scale.exp().clamp(max=100.0)}
        owner = text_owner if text_owner is not None else torch.arange(batch, device=image.device)
        groups = max(batch, int(owner.max()) + 1) if len(owner) else batch
        ensembles = self.encode_prompt_ensembles(text, owner, groups)
        out["text_features"] = ensembles[:batch]
        if groups > batch:
            out["negative_text_features"] = ensembles[batch:]
        for name, view in (("u", image), ("v", second_view)):
            x = self._with_mask(view, None)
            with torch.no_grad():
                _, teacher_tokens, attentions = vit_tokens(self.teacher, x, with_attention=True)
                teacher_logits = self.teacher_head(teacher_tokens)
            kept = keep_mask(cls_attention(attentions), self.grid, block, removal, removal_mode, generator)
            pooled, tokens, _ = vit_tokens(self.visual, x, kept)
            patches, pixels = self.decoder(tokens, kept)
            out.update({f"image_features_{name}": F.normalize(pooled, dim=-1), f"kept_{name}": kept,
                        f"teacher_cls_{name}": teacher_logits[:, 0], f"teacher_patch_{name}": teacher_logits[:, 1:],
                        f"student_cls_{name}": self.head(tokens[:, 0]), f"student_patch_{name}": self.head(patches),
                        f"pixels_{name}": pixels})
        return out
