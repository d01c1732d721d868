"""Adaptive MRL: granularities, the dimension-attention weights α, and the BPA projections."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ogclip.config import MRLConfig
from ogclip.losses import og_clip_loss
from ogclip.models.mrl import (
    MatryoshkaHead,
    classification_contribution,
    contrastive_target,
    entropy_score,
    gaussian_fusion,
    granularity_dims,
    information_entropy,
)


def test_granularities_follow_the_paper() -> None:
    assert granularity_dims(1024, 8) == [128, 256, 384, 512, 640, 768, 896, 1024]
    assert granularity_dims(768, 8) == [96, 192, 288, 384, 480, 576, 672, 768]
    with pytest.raises(ValueError):
        granularity_dims(100, 8)


def test_alpha_is_positive_normalised_and_uniform_for_equal_scores() -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        scores = torch.randn(8, generator=generator) * torch.rand((), generator=generator) * 10
        alpha = gaussian_fusion(scores)
        assert (alpha > 0).all()
        torch.testing.assert_close(alpha.sum(), torch.tensor(1.0))
    torch.testing.assert_close(gaussian_fusion(torch.full((8,), 3.7)), torch.full((8,), 1 / 8))


def test_alpha_prioritises_higher_scores() -> None:
    scores = torch.tensor([0.1, 0.5, 0.2, 0.9, 0.3, 0.4, 0.8, 0.6])
    alpha = gaussian_fusion(scores)
    assert torch.equal(torch.argsort(alpha), torch.argsort(scores))


def test_alpha_is_smooth_in_its_inputs() -> None:
    """Small changes of the scores give proportionally small changes of α (no jumps): a bounded derivative."""
    generator = torch.Generator().manual_seed(1)
    scores = torch.randn(8, generator=generator, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(gaussian_fusion, scores)
    assert torch.isfinite(jacobian).all()
    bound = jacobian.abs().sum(dim=1).max() / scores.std(unbiased=False)
    for eps in (1e-2, 1e-3, 1e-4):
        step = eps * torch.randn(8, generator=generator, dtype=torch.float64)
        change = (gaussian_fusion(scores + step) - gaussian_fusion(scores)).abs().max()
        assert change <= 2 * bound * step.abs().max() * scores.std(unbiased=False)


def test_running_alpha_moves_smoothly_across_steps() -> None:
    head = MatryoshkaHead(64, MRLConfig(alpha_momentum=0.9))
    generator = torch.Generator().manual_seed(2)
    previous = head.alpha.clone()
    for _ in range(20):
        image = [F.normalize(torch.randn(16, d, generator=generator), dim=-1) for d in head.dims]
        text = [F.normalize(torch.randn(16, d, generator=generator), dim=-1) for d in head.dims]
        alpha = head.update_alpha(image, text, torch.tensor(10.0)).clone()
        assert (alpha > 0).all() and math.isclose(float(alpha.sum()), 1.0, rel_tol=1e-6)
        assert (alpha - previous).abs().max() <= 0.1 + 1e-6  # (1 - momentum) × at most 1
        previous = alpha


def test_entropy_and_contribution_match_their_definitions() -> None:
    uniform = torch.ones(4, 32)
    one_hot = F.one_hot(torch.arange(4), 32).float()
    torch.testing.assert_close(information_entropy(uniform), torch.tensor(math.log(32)))
    torch.testing.assert_close(information_entropy(one_hot), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy_score(uniform), torch.tensor(1.0))
    torch.testing.assert_close(entropy_score(one_hot), torch.tensor(1 / 32))
    eye = contrastive_target(5, None)
    torch.testing.assert_close(classification_contribution(torch.zeros(5, 5), eye), torch.tensor(1 / 5))
    torch.testing.assert_close(classification_contribution(100 * eye, eye), torch.tensor(1.0))
    # With class labels the target spreads over the same-class texts: predicting them evenly is perfect.
    labels = torch.tensor([0, 0, 1, 1])
    target = contrastive_target(4, labels)
    same = (labels[:, None] == labels[None, :]).float()
    torch.testing.assert_close(classification_contribution(100 * same, target), torch.tensor(1.0))


def test_entropy_score_does_not_rank_granularities_by_size() -> None:
    """Unstructured activations score the same at every size; raw or log-normalised entropy grows with d_g."""
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(256, 1024, generator=generator)
    dims = granularity_dims(1024, 8)
    scores = torch.stack([entropy_score(features[:, :d]) for d in dims])
    normalised = torch.stack([information_entropy(features[:, :d]) / math.log(d) for d in dims])
    assert float(scores.max() - scores.min()) < 0.01
    assert float(normalised[-1] - normalised[0]) > 0.01


def test_contribution_scores_every_granularity_against_the_labels() -> None:
    """The full size is scored too (no free C = 1), and a granularity that classifies better scores higher."""
    generator = torch.Generator().manual_seed(5)
    image, text, labels = _structured(64, 256, generator)
    head = MatryoshkaHead(256, MRLConfig())
    full = head.scores(head.split(image), head.split(text), torch.tensor(14.3), labels)[-1]
    assert 0.05 < float(full) < 0.95
    noise = torch.randn(64, 256, generator=generator)
    target = contrastive_target(64, labels)
    contribution = [classification_contribution(14.3 * F.normalize(image + w * noise, dim=-1)
                                                 @ F.normalize(text, dim=-1).T, target) for w in (0.0, 1.0, 3.0)]
    assert contribution[0] > contribution[1] > contribution[2]


def _structured(batch: int, dim: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Image and text features that share a class vector (two pairs per class), every coordinate informative."""
    labels = torch.arange(batch) % (batch // 2)
    classes = torch.randn(batch // 2, dim, generator=generator)
    image = classes[labels] + 0.5 * torch.randn(batch, dim, generator=generator)
    text = classes[labels] + 0.5 * torch.randn(batch, dim, generator=generator)
    return image, text, labels


def _alpha(image: Tensor, text: Tensor, labels: Tensor | None = None, scale: float = 14.3, **cfg: float) -> Tensor:
    """One batch's α (no running average)."""
    head = MatryoshkaHead(image.shape[1], MRLConfig(alpha_momentum=0.0, **cfg))
    return head.update_alpha(head.split(image), head.split(text), torch.tensor(scale), labels).clone()


@pytest.mark.parametrize(("dim", "batch", "scale"), [(64, 32, 10.0), (256, 64, 14.3), (1024, 128, 100.0)])
def test_alpha_is_near_uniform_on_unstructured_features(dim: int, batch: int, scale: float) -> None:
    """Random image and text features carry no reason to prefer any size: α stays within 15% of 1/G."""
    generator = torch.Generator().manual_seed(dim)
    for _ in range(3):
        image, text = torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator)
        alpha = _alpha(image, text, scale=scale)
        assert float((alpha * len(alpha) - 1).abs().max()) < 0.15, alpha


@pytest.mark.parametrize("block", [0, 3, 7])
def test_alpha_drops_for_a_corrupted_granularity(block: int) -> None:
    """Noise in one block hurts the granularity it completes most: that granularity loses weight, the least of all.

    This is the paper's direction, α "prioritizes high-contribution" granularities; the uniform mix keeps the
    loser above half of plain MRL's weight.
    """
    generator = torch.Generator().manual_seed(block)
    image, text, labels = _structured(64, 256, generator)
    clean = _alpha(image, text, labels)
    corrupted = image.clone()
    corrupted[:, 32 * block : 32 * (block + 1)] = 3 * torch.randn(64, 32, generator=generator)
    alpha = _alpha(corrupted, text, labels)
    assert float(alpha[block]) < 0.8 * float(clean[block])
    assert int(alpha.argmin()) == block
    assert float(alpha.min()) >= 0.5 / 8 - 1e-6


def test_no_granularity_is_starved() -> None:
    """The uniform mix is a floor: α_g ≥ alpha_uniform_mix / G however badly a granularity scores."""
    generator = torch.Generator().manual_seed(6)
    image, text, labels = _structured(64, 256, generator)
    image[:, 224:] = 10 * torch.randn(64, 32, generator=generator)  # the full size is hopeless
    sharp = {"alpha_score_noise": 0.0}
    assert float(_alpha(image, text, labels, **sharp, alpha_uniform_mix=0.0)[-1]) < 0.1 / 8  # what the fusion says
    for mix in (0.5, 0.8, 1.0):
        alpha = _alpha(image, text, labels, **sharp, alpha_uniform_mix=mix)
        assert float(alpha.min()) >= mix / 8 - 1e-6
        torch.testing.assert_close(alpha.sum(), torch.tensor(1.0))
    torch.testing.assert_close(_alpha(image, text, labels, alpha_uniform_mix=1.0), torch.full((8,), 1 / 8))


def test_score_noise_only_damps_differences_smaller_than_itself() -> None:
    close = torch.tensor([0.500, 0.501, 0.502, 0.503])
    far = torch.tensor([0.1, 0.4, 0.6, 0.9])
    assert float(gaussian_fusion(close, 0.0).max() - gaussian_fusion(close, 0.0).min()) > 0.2  # the paper's σ
    assert float(gaussian_fusion(close, 0.05).max() - gaussian_fusion(close, 0.05).min()) < 0.02
    torch.testing.assert_close(gaussian_fusion(far, 0.05), gaussian_fusion(far, 0.0), atol=0.02, rtol=0)


def test_plain_mrl_has_fixed_equal_weights_and_no_bpa() -> None:
    head = MatryoshkaHead(64, MRLConfig(weighting="uniform"))
    assert head.down is None and head.up is None and not list(head.parameters())
    feats = [F.normalize(torch.randn(4, d), dim=-1) for d in head.dims]
    head.update_alpha(feats, feats, torch.tensor(10.0))
    torch.testing.assert_close(head.alpha, torch.full((8,), 1 / 8))
    assert head.bpa_loss(feats) == 0


def test_bpa_trains_both_projections_and_reaches_the_features() -> None:
    head = MatryoshkaHead(64, MRLConfig())
    assert len(head.down) == len(head.up) == 7
    # Pair (16, 24): down reads the 8 coordinates f_24 adds and predicts f_16; up predicts those 8 from f_16.
    assert head.down[1].weight.shape == (16, 8) and head.up[1].weight.shape == (8, 16)
    features = torch.randn(6, 64, requires_grad=True)
    loss = head.bpa_loss(head.split(features))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert features.grad.abs().sum() > 0


def test_bpa_gradients_reach_the_features_in_both_directions() -> None:
    head = MatryoshkaHead(64, MRLConfig())
    generator = torch.Generator().manual_seed(7)
    for direction in (0, 1):  # down, up
        features = torch.randn(6, 64, generator=generator).requires_grad_(True)
        head.bpa_terms(head.split(features))[:, direction].sum().backward()
        grad = features.grad
        for g in range(7):  # every pair moves both its coarse granularity and the coordinates the fine one adds
            assert grad[:, : head.dims[g]].abs().sum() > 0 and grad[:, head.dims[g] : head.dims[g + 1]].abs().sum() > 0


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Tiny matrices: intra-op threads only add contention (and on a shared machine, a lot of it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit_projections(head: MatryoshkaHead, features: Tensor, steps: int = 300) -> None:
    """The best projections for fixed features (the encoder cannot help)."""
    optimizer = torch.optim.Adam(head.parameters(), lr=0.02)
    for _ in range(steps):
        optimizer.zero_grad()
        head.bpa_loss(head.split(features)).backward()
        optimizer.step()


@pytest.mark.usefixtures("single_thread")
def test_nesting_alone_does_not_satisfy_bpa() -> None:
    """Copying the prefix ([I | 0]) no longer aligns anything: on features whose blocks are independent, the best
    projections leave both directions at chance (cosine ≈ 0, loss ≈ 1 each) on new samples."""
    torch.manual_seed(8)
    head = MatryoshkaHead(64, MRLConfig())
    _fit_projections(head, torch.randn(512, 64), steps=200)
    with torch.no_grad():
        per_pair = head.bpa_loss(head.split(torch.randn(512, 64))) / head.alpha[:-1].sum()
    assert float(per_pair) > 1.5  # two directions, each ≈ 1


def _train_tiny_encoder(bpa_reaches_encoder: bool, steps: int = 100) -> float:
    """Train an MLP image encoder against fixed class text embeddings with OG-CLIP's loss (D=32, G=4).

    The projections are trained in both runs; only whether L_BPA's gradient reaches the encoder differs. Returns
    the BPA loss per pair on held-out samples, unweighted (1 - cosine in each direction, summed): the
    cross-granularity inconsistency BPA is meant to reduce.
    """
    generator = torch.Generator().manual_seed(0)
    classes, din, dim = 16, 24, 32
    prototypes = torch.randn(classes, din, generator=generator)
    text = F.normalize(torch.randn(classes, dim, generator=generator), dim=-1)

    def batch(size: int) -> tuple[Tensor, Tensor]:
        labels = torch.randint(classes, (size,), generator=generator)
        return prototypes[labels] + 0.8 * torch.randn(size, din, generator=generator), labels

    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(din, 64), nn.GELU(), nn.Linear(64, dim))
    head = MatryoshkaHead(dim, MRLConfig(granularities=4, bpa_weight=0.2 if bpa_reaches_encoder else 0.0)).train()
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=0.01)
    for _ in range(steps):
        x, labels = batch(64)
        image = encoder(x)
        out = {"image_features": image, "text_features": text[labels], "logit_scale": torch.tensor(10.0)}
        total = og_clip_loss(out, head, labels).total
        if not bpa_reaches_encoder:
            total = total + 0.2 * head.bpa_loss(head.split(image.detach()))
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    x, _ = batch(512)
    with torch.no_grad():
        head.alpha.fill_(1 / 4)
        return float(head.bpa_loss(head.split(encoder(x))) / head.alpha[:-1].sum())


@pytest.mark.usefixtures("single_thread")
def test_bpa_makes_neighbouring_granularities_consistent() -> None:
    """A small seeded experiment: with L_BPA reaching the encoder, the coordinates each granularity adds predict,
    and are predicted by, the coarser embedding much better than when only the projections are trained."""
    without, with_bpa = _train_tiny_encoder(False), _train_tiny_encoder(True)
    assert with_bpa < 0.7 * without, (with_bpa, without)
