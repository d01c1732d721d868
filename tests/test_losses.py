"""The training objective: CLIP loss, Matryoshka loss, BPA, and their sum."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import images_and_masks
from open_clip.loss import ClipLoss

import ogclip
from ogclip.config import MRLConfig
from ogclip.losses import contrastive_loss, og_clip_loss
from ogclip.models.mrl import MatryoshkaHead


def _features(batch: int = 8, dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    text = F.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    return image, text


def test_contrastive_loss_matches_open_clip() -> None:
    image, text = _features()
    scale = torch.tensor(14.0)
    torch.testing.assert_close(contrastive_loss(image, text, scale), ClipLoss()(image, text, scale))
    distinct = torch.arange(8)
    torch.testing.assert_close(contrastive_loss(image, text, scale, distinct), contrastive_loss(image, text, scale))


def test_labels_stop_same_class_pairs_acting_as_negatives() -> None:
    """An image equidistant from its class's captions is at the optimum with labels; without, it is pushed."""
    generator = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    class_vectors = torch.randn(4, 64, generator=generator)
    captions = F.normalize(class_vectors[labels] + 0.3 * torch.randn(8, 64, generator=generator), dim=-1)
    centres = F.normalize(captions.view(4, 2, 64).sum(dim=1), dim=-1)[labels]  # equidistant from both captions
    scale = torch.tensor(50.0)
    grads = {}
    for name, lab in (("labels", labels), ("none", None)):
        image = centres.clone().requires_grad_(True)
        contrastive_loss(image, captions, scale, lab).backward()
        grads[name] = image.grad.norm()
    assert grads["labels"] < 1e-4 < 0.1 < grads["none"]


@pytest.mark.parametrize("weighting", ["adaptive", "uniform"])
def test_total_is_clip_plus_mrl_plus_weighted_bpa(weighting: str) -> None:
    head = MatryoshkaHead(64, MRLConfig(weighting=weighting, alpha_momentum=0.0)).train()
    image, text = _features()
    image.requires_grad_(True)
    out = {"image_features": image, "text_features": text, "logit_scale": torch.tensor(10.0)}
    terms = og_clip_loss(out, head)
    torch.testing.assert_close(terms.total, terms.clip + terms.mrl + 0.2 * terms.bpa)
    torch.testing.assert_close(terms.mrl, (terms.alpha * terms.per_dim).sum())
    torch.testing.assert_close(terms.per_dim[-1], terms.clip)
    if weighting == "uniform":
        torch.testing.assert_close(terms.mrl, terms.per_dim.mean())
        assert terms.bpa == 0
    else:
        assert terms.bpa > 0 and not torch.allclose(terms.alpha, torch.full((8,), 1 / 8))
    terms.total.backward()
    assert torch.isfinite(image.grad).all()


def test_model_loss_and_gradients_are_finite(model: ogclip.OGCLIP) -> None:
    model = copy.deepcopy(model).train()
    images, masks = images_and_masks(batch=4)
    texts = ["a grey fighter", "a white destroyer", "a red helicopter", "a grey fighter"]
    terms = og_clip_loss(model(images, texts, masks), model.mrl, torch.tensor([0, 1, 2, 0]))
    terms.total.backward()
    assert all(torch.isfinite(v).all() for v in (terms.total, terms.clip, terms.mrl, terms.bpa))
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.logit_scale.grad is not None
