"""DetailCLIP's parts against values worked out by hand on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ogclip.models.detail import PrototypeHead
from ogclip.models.ogclip import vit_tokens
from ogclip.recipes.detail_clip import (
    cls_attention,
    cls_loss,
    distillation,
    ema_update,
    keep_mask,
    patch_loss,
    patchify,
    reconstruction_loss,
    teacher_momentum,
    update_center,
)


def test_teacher_momentum_rises_on_a_cosine_from_base_to_one() -> None:
    assert teacher_momentum(0, 100) == pytest.approx(0.996)
    assert teacher_momentum(50, 100) == pytest.approx(0.998)  # 1 − 0.004 · (cos(π/2) + 1)/2
    assert teacher_momentum(100, 100) == pytest.approx(1.0)
    assert teacher_momentum(250, 100) == pytest.approx(1.0), "past the end the teacher is frozen"


def test_ema_update_moves_the_teacher_towards_the_student() -> None:
    teacher, student = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        teacher.weight.fill_(1.0), teacher.bias.fill_(0.0)
        student.weight.fill_(3.0), student.bias.fill_(2.0)
    ema_update(teacher, student, 0.75)
    assert torch.equal(teacher.weight, torch.full((1, 2), 1.5)) and torch.equal(teacher.bias, torch.tensor([0.5]))
    assert torch.equal(student.weight, torch.full((1, 2), 3.0)), "the student is untouched"


def test_cls_attention_averages_the_cls_row_over_layers_and_heads() -> None:
    one = torch.zeros(1, 2, 3, 3)
    one[0, 0, 0] = torch.tensor([0.2, 0.3, 0.5])
    one[0, 1, 0] = torch.tensor([0.0, 0.6, 0.4])
    two = torch.zeros(1, 2, 3, 3)
    two[0, :, 0] = torch.tensor([0.5, 0.1, 0.4])
    # patch keys only: layer 1 heads (0.3, 0.5) and (0.6, 0.4), layer 2 (0.1, 0.4) twice → mean (0.275, 0.425)
    torch.testing.assert_close(cls_attention([one, two]), torch.tensor([[0.275, 0.425]]))


def test_keep_mask_keeps_the_highest_attention_blocks_at_the_configured_ratio() -> None:
    # A 4×4 patch grid in 2×2 blocks: 4 cells. Attention is highest in the top-right block, then bottom-left.
    attention = torch.tensor([[0.0, 0.0, 9.0, 9.0],
                              [0.0, 0.0, 9.0, 9.0],
                              [5.0, 5.0, 1.0, 1.0],
                              [5.0, 5.0, 1.0, 1.0]]).reshape(1, 16)
    kept = keep_mask(attention, grid=4, block=2, removal=0.5).reshape(4, 4)
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(kept, expected)
    inverted = keep_mask(attention, grid=4, block=2, removal=0.5, mode="inverted").reshape(4, 4)
    assert torch.equal(inverted, ~expected), "the ablation arm keeps the lowest instead"
    # The paper's 7×7 cells at removal 0.5: 24 removed, 25 kept, in every image, whatever the mode.
    many = torch.rand(3, 196)
    for mode in ("attention", "random", "inverted"):
        assert keep_mask(many, grid=14, removal=0.5, mode=mode, generator=torch.Generator().manual_seed(0)
                         ).sum(dim=1).tolist() == [100, 100, 100]
    with pytest.raises(ValueError, match="blocks"):
        keep_mask(torch.rand(1, 25), grid=5)


def test_distillation_is_the_cross_entropy_of_the_centred_sharpened_teacher() -> None:
    teacher, student, center = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.5]]), torch.tensor([0.5, 0.0])
    # P_t = softmax(((1, 0) − (0.5, 0)) / 0.5) = softmax(1, 0);
    # log P_s = log_softmax((0, 0.5) / 0.1) = log_softmax(0, 5)
    p_t = torch.tensor([math.e, 1.0]) / (math.e + 1.0)
    log_p_s = torch.tensor([0.0, 5.0]) - math.log(1.0 + math.e**5)
    expected = -(p_t * log_p_s).sum()
    torch.testing.assert_close(distillation(teacher, student, center, 0.5, 0.1), expected.reshape(1))


def test_cls_loss_crosses_the_views() -> None:
    center = torch.zeros(3)
    t_u, t_v = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    s_u, s_v = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    # Each student view matches the *other* view's teacher: the loss is that of two matched pairs.
    matched = distillation(t_v, s_u, center, 0.04) + distillation(t_u, s_v, center, 0.04)
    torch.testing.assert_close(cls_loss(t_u, t_v, s_u, s_v, center), 0.5 * matched.squeeze())
    assert cls_loss(t_u, t_v, s_v, s_u, center) > cls_loss(t_u, t_v, s_u, s_v, center)


def test_patch_loss_counts_only_the_removed_positions() -> None:
    center = torch.zeros(2)
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    student = torch.tensor([[[1.0, 0.0], [9.0, -9.0], [0.0, 1.0]]])
    removed = torch.tensor([[True, False, True]])
    per_token = distillation(teacher, student, center, 0.07)[0]
    torch.testing.assert_close(patch_loss(teacher, student, removed, center), (per_token[0] + per_token[2]) / 2)


def test_reconstruction_targets_per_patch_normalised_pixels_of_removed_patches() -> None:
    images = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    patches = patchify(images, 2)
    assert patches.shape == (1, 4, 8)
    # Patch 1 (top right): rows 0-1, columns 2-3, each pixel's channels together: (2, 18), (3, 19), (6, 22), (7, 23).
    assert patches[0, 1].tolist() == [2.0, 18.0, 3.0, 19.0, 6.0, 22.0, 7.0, 23.0]
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    removed = torch.tensor([[False, True, False, True]])
    perfect = target.clone()
    perfect[0, 0] += 10.0  # a kept patch: its error does not count
    assert reconstruction_loss(perfect, images, 2, removed) == pytest.approx(0.0, abs=1e-6)
    off = target.clone()
    off[0, 1] += 1.0  # one removed patch off by 1 everywhere: MSE 1 on it, 0 on the other
    assert reconstruction_loss(off, images, 2, removed) == pytest.approx(0.5)


def test_the_centre_follows_the_teacher_mean_and_the_head_has_unit_prototypes() -> None:
    center = torch.zeros(2)
    update_center(center, torch.tensor([[[1.0, 3.0], [3.0, 5.0]]]), momentum=0.9)
    torch.testing.assert_close(center, torch.tensor([0.2, 0.4]))
    head = PrototypeHead(8, hidden=16, bottleneck=4, prototypes=32)
    logits = head(torch.randn(5, 8))
    assert logits.shape == (5, 32) and float(logits.detach().abs().max()) <= 1.0 + 1e-6, "cosines of unit vectors"


def test_vit_tokens_matches_the_tower_and_drops_removed_patches(micro_minilm) -> None:
    from conftest import images_and_masks

    model = micro_minilm.eval()
    images, masks = images_and_masks(batch=2)
    x = model._with_mask(images, masks)
    with torch.no_grad():
        pooled, tokens, attentions = vit_tokens(model.visual, x, with_attention=True)
        torch.testing.assert_close(pooled, model.visual(x))
        plain, _, none = vit_tokens(model.visual, x)
        torch.testing.assert_close(plain, pooled)
        grid = model.cfg.image_size // model.cfg.vision_cfg["patch_size"]
        assert tokens.shape[1] == 1 + grid * grid and not none
        assert len(attentions) == model.cfg.vision_cfg["layers"]
        torch.testing.assert_close(attentions[0].sum(-1), torch.ones_like(attentions[0].sum(-1)))
        kept = keep_mask(cls_attention(attentions), grid=grid, removal=0.5)
        _, kept_tokens, kept_attn = vit_tokens(model.visual, x, kept, with_attention=True)
        assert kept_tokens.shape[1] == 1 + int(kept[0].sum()) == 1 + grid * grid // 2
        assert kept_attn[0].shape[-1] == kept_tokens.shape[1]
    with pytest.raises(ValueError, match="same number"):
        uneven = kept.clone()
        uneven[0, kept[0].nonzero()[0]] = False
        vit_tokens(model.visual, x, uneven)


def test_the_detail_clip_recipe_trains_with_the_shared_step_and_its_teacher_follows(tmp_path) -> None:
    from conftest import MICRO_MINILM, images_and_masks

    import ogclip
    from ogclip.config import DetailCLIPRecipeConfig, DetailConfig
    from ogclip.models import DetailCLIP
    from ogclip.recipes import TrainBatch, create_recipe
    from ogclip_jobs.config import TrainConfig
    from ogclip_jobs.train import build_optimizer, train_step

    recipe = create_recipe(DetailCLIPRecipeConfig(head=DetailConfig(head_hidden=32, head_bottleneck=16, prototypes=64,
                                                                    decoder_heads=4)))
    torch.manual_seed(0)
    model = ogclip.create_model("og-clip-tiny", device="cpu", **MICRO_MINILM, **recipe.model_overrides())
    assert isinstance(model, DetailCLIP) and not any(p.requires_grad for p in model.teacher.parameters())
    teacher_before = [p.clone() for p in model.teacher.parameters()]
    cfg = TrainConfig(lr=1e-3, warmup_steps=1, steps=3)
    optimizer = build_optimizer(model, cfg)
    images, masks = images_and_masks(batch=4)
    batch = TrainBatch(images=images, masks=masks, texts=model.tokenize([f"target {i}" for i in range(5)]),
                       text_owner=torch.tensor([0, 1, 2, 3, 4]), labels=torch.arange(4))
    generator = torch.Generator().manual_seed(0)
    rows = [train_step(model, recipe, optimizer, s, cfg, batch, generator) for s in range(3)]
    # every trainable parameter is reached by the loss: data-parallel training (DDP) refuses to run otherwise
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert {"loss", "loss_clip", "loss_cls", "loss_patch", "loss_rec", "kept_on_target"} <= set(rows[0])
    assert all(torch.isfinite(r["loss"]) for r in rows)
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, model.teacher.parameters(), strict=True)), \
        "the teacher moved towards the student"
    assert float(model.center_cls.abs().sum()) > 0
    bundle = ogclip.export_bundle(model, tmp_path / "bundle", recipe="detail-clip")
    served, info = ogclip.load_bundle(bundle.path, device="cpu")
    assert isinstance(served, DetailCLIP) and (info.architecture, info.recipe) == ("detail-clip", "detail-clip")
    with torch.no_grad():
        torch.testing.assert_close(served.encode_image(images), model.eval().encode_image(images))
