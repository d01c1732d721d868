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
from ogclip.losses import contrastive_loss, distributed_world_size, og_clip_loss
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
        assert terms.bpa > 0 and float(terms.alpha.min()) >= 0.5 / 8 - 1e-6
        torch.testing.assert_close(terms.alpha.sum(), torch.tensor(1.0))
    assert set(terms.named()) == {"loss", "loss_clip", "loss_mrl", "loss_bpa", "alpha"}  # all logged every step
    assert terms.named()["alpha"].shape == (8,)
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


def test_alpha_is_updated_from_the_labelled_batch() -> None:
    """With class labels, α's classification contribution counts same-class texts as right answers."""
    generator = torch.Generator().manual_seed(4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    image = F.normalize(torch.randn(4, 64, generator=generator)[labels] + 0.3 * torch.randn(8, 64, generator=generator),
                        dim=-1)
    text = F.normalize(image + 0.3 * torch.randn(8, 64, generator=generator), dim=-1)
    out = {"image_features": image, "text_features": text, "logit_scale": torch.tensor(10.0)}
    head = MatryoshkaHead(64, MRLConfig(alpha_momentum=0.0)).train()
    terms = og_clip_loss(out, head, labels)
    expected = MatryoshkaHead(64, MRLConfig(alpha_momentum=0.0))
    expected.update_alpha(expected.split(image), expected.split(text), torch.tensor(10.0), labels)
    torch.testing.assert_close(terms.alpha, expected.alpha)
    assert not torch.equal(head.scores(head.split(image), head.split(text), torch.tensor(10.0), labels),
                           head.scores(head.split(image), head.split(text), torch.tensor(10.0)))


def test_single_process_loss_needs_no_process_group() -> None:
    """Outside torch.distributed the loss is the local batch's (the two-rank case is tests/test_gather.py)."""
    assert distributed_world_size() == 1
    head = MatryoshkaHead(64, MRLConfig(alpha_momentum=0.0)).train()
    image, text = _features()
    out = {"image_features": image, "text_features": text, "logit_scale": torch.tensor(10.0)}
    gathered, local = og_clip_loss(out, head), og_clip_loss(out, head, gather=False)
    torch.testing.assert_close(gathered.total, local.total)


def test_hard_negatives_join_only_the_image_to_text_softmax() -> None:
    """Against a hand computation: extra texts widen each image's softmax, never the text→image one."""
    g = torch.Generator().manual_seed(0)
    image, text, negatives = (F.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in (3, 3, 4))
    scale = torch.tensor(10.0)
    logits = scale * image @ text.T
    extra = scale * image @ negatives.T
    i2t = -torch.stack([logits[i, i] - torch.logsumexp(torch.cat([logits[i], extra[i]]), 0) for i in range(3)]).mean()
    t2i = -torch.stack([logits[i, i] - torch.logsumexp(logits[:, i], 0) for i in range(3)]).mean()
    torch.testing.assert_close(contrastive_loss(image, text, scale, negatives=negatives), (i2t + t2i) / 2)
    torch.testing.assert_close(contrastive_loss(image, text, scale, negatives=negatives[:0]),
                               contrastive_loss(image, text, scale))
    labels = torch.tensor([0, 1, 2])
    torch.testing.assert_close(contrastive_loss(image, text, scale, labels, negatives),
                               contrastive_loss(image, text, scale, None, negatives))
