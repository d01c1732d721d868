"""The ``mps-clip`` architecture: a frozen OG-CLIP/CLIP backbone with MPS-CLIP's trainable parts (Li, Wang, Huang,
arXiv 2601.18190, as its authors' code builds them): an adapter after every transformer block of both towers and
the multi-perspective representation (MPR) heads the training losses read.

G²A adapter (after block output x, width d, bottleneck r): z = GELU(Down(x)); ẑ = Linear(MHA(z)) (plain attention,
no residual or norm); the global-attention branch a = ẑ + DropPath(LN(ẑ + Dropout(MHA(PE(LN ẑ))))) with fixed
sinusoidal positions PE, then a conv FFN out = a + DropPath(FFN(a)) (1×1 conv r→2r, depthwise conv over tokens,
ReLU, 1×1 conv 2r→r); x ← x + Up(σ(g) · out) with one scalar gate g (0.6 at start) and Up zero-initialised, so a
fresh adapter is the identity and a fresh MPS-CLIP computes exactly its backbone. ``adapter: bottleneck`` is the
plain residual bottleneck x + Up(GELU(Down(x))) the method is compared with. Like the authors' code, the text
adapters' attention is not causal and sees padding.

The adapters act through forward hooks on the towers' blocks, so every encoder path (training, serving, the
evaluations) runs them, and the backbone's state-dict keys are untouched: a backbone checkpoint loads as is, with
the adapters and heads (``adapters.``, ``mpr.``) keeping their initialisation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from torch import Tensor, nn

from ogclip.config import ModelConfig
from ogclip.models.ogclip import OGCLIP, TextInput
from ogclip.models.registry import register_architecture


def sinusoidal_positions(length: int, width: int, device: torch.device | None = None) -> Tensor:
    """Fixed 1-D sine-cosine positions (Transformer's), (length, width)."""
    position = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    rate = torch.exp(torch.arange(0, width, 2, dtype=torch.float32, device=device) * (-math.log(10000.0) / width))
    table = torch.zeros(length, width, device=device)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate[: width // 2])
    return table


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``drop_path``): in training, zero a sample's branch with probability p
    and scale the kept ones by 1/(1 − p)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class GlobalAttention(nn.Module):
    """G²A's global-attention branch on the bottleneck tokens (B, N, r)."""

    def __init__(self, dim: int, heads: int, kernel: int, dropout: float, drop_path: float) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm_out = nn.LayerNorm(dim)
        self.ffn_in = nn.Conv1d(dim, 2 * dim, 1)
        self.ffn_mix = nn.Conv1d(2 * dim, 2 * dim, kernel, padding=kernel // 2, groups=2 * dim)
        self.ffn_out = nn.Conv1d(2 * dim, dim, 1)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        normed = self.norm_in(x)
        query = normed + sinusoidal_positions(x.shape[1], x.shape[2], x.device).to(x.dtype)
        attended, _ = self.attn(query, query, query, need_weights=False)
        a = x + self.drop_path(self.norm_out(x + self.dropout(attended)))
        ffn = self.ffn_out(F.relu(self.ffn_mix(self.ffn_in(a.transpose(1, 2))))).transpose(1, 2)
        return a + self.drop_path(ffn)


class Adapter(nn.Module):
    """One serial adapter after a block: G²A (``kind='g2a'``) or the plain residual bottleneck (``'bottleneck'``);
    see the module docstring. (B, N, d) → (B, N, d), the identity at initialisation."""

    def __init__(self, width: int, kind: str, dim: int, heads: int, gate_init: float, kernel: int, dropout: float,
                 drop_path: float) -> None:
        super().__init__()
        self.kind = kind
        self.down = nn.Linear(width, dim)
        self.up = nn.Linear(dim, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if kind == "g2a":
            self.mix = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.mix_proj = nn.Linear(dim, dim)
            self.global_attention = GlobalAttention(dim, heads, kernel, dropout, drop_path)
            # σ⁻¹(gate_init): the gate starts at gate_init (the authors' g = 0.6)
            self.gate = nn.Parameter(torch.tensor(math.log(gate_init / (1.0 - gate_init))))
        elif kind != "bottleneck":
            raise ValueError(f"unknown adapter {kind!r}; expected 'g2a' or 'bottleneck'")

    def forward(self, x: Tensor) -> Tensor:
        z = F.gelu(self.down(x))
        if self.kind == "bottleneck":
            return x + self.up(z)
        mixed, _ = self.mix(z, z, z, need_weights=False)
        branch = self.global_attention(self.mix_proj(mixed))
        return x + self.up(torch.sigmoid(self.gate) * branch)


class MPRHead(nn.Module):
    """Multi-perspective representation: K heads D → D → D (GELU between, Xavier init) over the fused sub-perspective
    embedding, each output L2-normalised: (B, D) → (B, K, D)."""

    def __init__(self, dim: int, perspectives: int) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))
                                   for _ in range(perspectives))
        for head in self.heads:
            for layer in (head[0], head[2]):
                nn.init.xavier_uniform_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, fused: Tensor) -> Tensor:
        return F.normalize(torch.stack([head(fused) for head in self.heads], dim=1), dim=-1)


def _text_blocks(text: nn.Module) -> list[nn.Module]:
    """The text tower's transformer blocks (open_clip or Hugging Face encoder layout)."""
    if isinstance(text, HFTextEncoder):
        encoder = getattr(text.transformer, "encoder", None)
        layers = getattr(encoder, "layer", None) or getattr(encoder, "layers", None)
        if layers is None:
            raise ValueError(f"cannot find the blocks of text model {type(text.transformer).__name__}")
        return list(layers)
    return list(text.transformer.resblocks)


def _width(block: nn.Module) -> int:
    """A transformer block's token width, read from its first LayerNorm."""
    norm = next(m for m in block.modules() if isinstance(m, nn.LayerNorm))
    return int(norm.normalized_shape[0])


@register_architecture("mps-clip")
class MPSCLIP(OGCLIP):
    """OG-CLIP's towers (the frozen backbone) with an adapter after every block of both towers and the MPR heads
    (``cfg.mps``). Which parameters train is the recipe's choice (:mod:`ogclip.recipes.mps_clip`); serving and the
    evaluations read it like any bundle, the adapters running inside both encoders."""

    ADDED_PREFIXES = (*OGCLIP.ADDED_PREFIXES, "adapters.", "mpr.")

    def __init__(self, cfg: ModelConfig, name: str | None = None) -> None:
        if cfg.mps is None:
            raise ValueError("an mps-clip architecture needs its `mps` settings")
        super().__init__(cfg, name)
        m = cfg.mps
        blocks = {"visual": list(self.visual.transformer.resblocks), "text": _text_blocks(self.text)}

        def adapter(block: nn.Module) -> Adapter:
            return Adapter(_width(block), m.adapter, m.dim, m.heads, m.gate_init, m.kernel, m.dropout, m.drop_path)

        self.adapters = nn.ModuleDict({tower: nn.ModuleList(adapter(b) for b in found)
                                       for tower, found in blocks.items()})
        self.mpr = MPRHead(cfg.embed_dim, m.perspectives)
        for tower, found in blocks.items():
            for block, module in zip(found, self.adapters[tower], strict=True):
                block.register_forward_hook(_after(module))

    def text_features(self, text: TextInput) -> Tensor:
        """Unnormalised D-dimensional text features through the adapted tower: the adapters change the frozen
        transformer's output, so nothing is cached and gradients reach them."""
        tokens = text if isinstance(text, Tensor) else self.tokenize(text)
        return self._project_text(self._pooled_text(tokens))

    def forward(self, image: Tensor, text: TextInput, mask: Tensor | None = None, text_owner: Tensor | None = None,
                parts: Tensor | None = None, part_masks: Tensor | None = None,
                part_owner: Tensor | None = None) -> dict[str, Any]:
        """Without ``parts``: OG-CLIP's forward. With them (training): the normalised global image embeddings g,
        the captions' embeddings (``text`` row by row: no prompt ensembles), the fused sub-perspective embeddings r
        and the K perspective embeddings (``parts`` (P, 3, S, S) and ``part_masks`` (P, 1, S, S) are the
        sub-perspectives as the image tower reads them, ``part_owner`` (P,) the image each belongs to). The whole
        images and their parts go through the image tower as one batch. One call, because DDP synchronises
        gradients through the wrapped forward."""
        if parts is None:
            return super().forward(image, text, mask, text_owner)
        if part_masks is None or part_owner is None or not len(parts) == len(part_masks) == len(part_owner):
            raise ValueError("parts need one mask and one owner each")
        batch = image.shape[0]
        if mask is None:
            mask = image.new_ones(batch, 1, *image.shape[-2:])
        features = F.normalize(self.image_features(torch.cat([image, parts]), torch.cat([mask, part_masks])), dim=-1)
        whole = features[:batch]
        fused, views = self.perspectives(whole, features[batch:], part_owner)
        return {"image_features": whole, "fused_features": fused, "perspective_features": views,
                "text_features": F.normalize(self.text_features(text), dim=-1),
                "logit_scale": self.logit_scale.exp().clamp(max=100.0)}

    def perspectives(self, whole: Tensor, parts: Tensor | None, owner: Tensor | None) -> tuple[Tensor, Tensor]:
        """The fused sub-perspective embedding r and the K perspective embeddings of each image.

        ``whole`` (B, D) are the images' normalised global embeddings g; ``parts`` (P, D) the normalised embeddings
        of their sub-perspectives, ``owner`` (P,) the image each belongs to. r = normalize(mean of an image's parts),
        g where it has none; returns r (B, D) and the MPR heads' output on it (B, K, D)."""
        fused = whole
        if parts is not None and len(parts):
            sums = torch.zeros_like(whole).index_add(0, owner, parts.to(whole.dtype))
            counts = torch.zeros(whole.shape[0], device=whole.device).index_add(
                0, owner, torch.ones(len(owner), device=whole.device))
            fused = torch.where(counts[:, None] > 0, F.normalize(sums, dim=-1), whole)
        return fused, self.mpr(fused)


def _after(adapter: Adapter) -> Any:
    """A forward hook that passes a block's output (a tensor, or a tuple whose first item is the hidden states, as
    Hugging Face layers return it) through ``adapter``."""

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook
