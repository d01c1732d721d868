"""Adaptive MRL: granularities, the dimension-attention weights α, and the BPA projections."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ogclip.config import MRLConfig
from ogclip.models.mrl import (
    MatryoshkaHead,
    classification_contribution,
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
    logits = torch.randn(5, 5)
    torch.testing.assert_close(classification_contribution(logits, logits), torch.tensor(1.0))
    assert classification_contribution(torch.zeros(5, 5), logits * 5) < 1.0


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
    assert head.down[0].weight.shape == (8, 16) and head.up[0].weight.shape == (16, 8)
    features = torch.randn(6, 64, requires_grad=True)
    loss = head.bpa_loss(head.split(features))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert features.grad.abs().sum() > 0
