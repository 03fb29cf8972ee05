"""Conditioning: centering, the adaptive lambda (power iterations) and MEC's warm-up."""

from __future__ import annotations

import pytest
import torch
from objective_helpers import ref_matrix

from mec_quant_plugin.objective import adaptive_lambda, center_features, coding_length_loss, warmup_lambda_scale


def _low_rank_non_negative(m=128, d=64, rank=3):
    return torch.relu(torch.randn(m, rank) @ torch.randn(rank, d)) + 0.5  # large common component


@pytest.mark.parametrize("features", ["low_rank_non_negative", "collapsed", "centered_low_rank"])
def test_adaptive_lambda_keeps_the_bound_at_target(features):
    if features == "low_rank_non_negative":
        z = _low_rank_non_negative()
    elif features == "collapsed":
        z = torch.ones(128, 64) + 1e-3 * torch.randn(128, 64)
    else:
        z = center_features(torch.randn(128, 2) @ torch.randn(2, 64))
    lam = adaptive_lambda(z, target_radius=0.5)
    assert not lam.requires_grad
    radius = torch.linalg.matrix_norm(ref_matrix(z, None, lam.item()), ord=2).item()
    assert radius == pytest.approx(0.5, rel=0.02)
    _, stats = coding_length_loss(z, eps2=1.0, target_radius=0.5)
    # On such features the Frobenius bound is the spectral radius up to the small tail.
    assert 0.5 * 0.98 <= stats.spectral_bound.item() <= 0.5 * 1.3


def test_fixed_lambda_diverges_where_adaptive_converges():
    z = _low_rank_non_negative()
    m, d = z.shape
    _, fixed = coding_length_loss(z, eps2=d / 32)  # MEC's eps^2/d = 1/32
    _, adaptive = coding_length_loss(z, eps2=d / 32, target_radius=0.5)
    assert fixed.spectral_bound > 10 and adaptive.spectral_bound < 1


def test_adaptive_lambda_teacher_view_bounds_the_spectral_radius():
    z1, z2 = torch.randn(40, 24), torch.randn(40, 24)
    lam = adaptive_lambda(z1, z2, target_radius=0.5, iters=30)
    c = ref_matrix(z1, z2, lam.item())
    assert torch.linalg.matrix_norm(c, ord=2).item() == pytest.approx(0.5, rel=0.02)
    assert torch.linalg.eigvals(c).abs().max().item() <= 0.5 * 1.02


def test_adaptive_lambda_falls_back_on_a_zero_batch():
    assert adaptive_lambda(torch.zeros(8, 4), fallback=0.25).item() == 0.25
    with pytest.raises(ValueError, match="target_radius"):
        adaptive_lambda(torch.randn(8, 4), target_radius=1.5)


def test_center_features_and_standardize():
    z = torch.randn(32, 8) * torch.arange(1, 9) + 5
    centered = center_features(z)
    torch.testing.assert_close(centered.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    standardized = center_features(z, standardize=True)
    torch.testing.assert_close(standardized.std(0, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)
    constant = torch.full((16, 8), 0.1)
    assert center_features(constant).abs().max() == 0  # no rounding noise left to normalize
    with pytest.raises(ValueError, match=r"\(m, d\)"):
        center_features(torch.randn(2, 3, 4))


def test_warmup_schedule_goes_from_eight_to_one():
    assert warmup_lambda_scale(0, 1000, 0.1) == pytest.approx(1 / 8)
    assert warmup_lambda_scale(50, 1000, 0.1) == pytest.approx(1 / 4.5)
    assert warmup_lambda_scale(100, 1000, 0.1) == 1.0
    assert warmup_lambda_scale(900, 1000, 0.1) == 1.0
    assert warmup_lambda_scale(0, 1000, 0.0) == 1.0
    with pytest.raises(ValueError, match="fraction"):
        warmup_lambda_scale(0, 10, 1.5)
