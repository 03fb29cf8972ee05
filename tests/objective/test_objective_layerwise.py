"""Per-layer coding length, label-aware rate reduction and logit distillation."""

from __future__ import annotations

import pytest
import torch
from objective_helpers import ref_normalize
from torch import nn

from mec_quant_plugin import MECQuantConfig, prepare_model
from mec_quant_plugin.objective.class_coding import rate_reduction_loss
from mec_quant_plugin.objective.distill import distillation_loss
from mec_quant_plugin.objective.layerwise import LayerwiseCodingLength


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(16, 4))


def _ref_term(z: torch.Tensor, eps2_per_dim: float) -> torch.Tensor:
    z = z.double()
    z = ref_normalize(z - z.mean(0))
    m, d = z.shape
    lam = d / (m * eps2_per_dim * d)
    return -torch.linalg.slogdet(torch.eye(d, dtype=z.dtype) + lam * z.T @ z).logabsdet / (m * lam)


def test_activation_term_sees_the_quantized_inputs_of_the_inner_layers_only():
    model = prepare_model(_cnn(), MECQuantConfig(weight_bits=2, act_bits=2))
    term = LayerwiseCodingLength(model, "activations", max_rows=10_000)
    assert [n for n, _ in term.layers] == ["2", "4"]  # stem "0" and classifier "8" stay W8A8
    seen = {}
    model[2].activation_fake_quantizer.register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    model[4].activation_fake_quantizer.register_forward_hook(lambda m, a, out: seen.setdefault("y", out))
    model(torch.randn(2, 3, 5, 5))
    loss = term()
    rows = [t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) for t in (seen["x"], seen["y"])]
    expected = torch.stack([_ref_term(r.detach(), 1 / 32) for r in rows]).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)
    assert term.last_stats["layers"] == 2


def test_activation_term_gradient_reaches_float_weights_and_step_sizes():
    model = prepare_model(_cnn(), MECQuantConfig(weight_bits=2, act_bits=2))
    term = LayerwiseCodingLength(model, "activations", experts=2)
    model(torch.randn(4, 3, 6, 6))
    term().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0
    assert model[2].activation_fake_quantizer.scale.grad.abs() > 0


def test_activation_term_is_zero_without_a_training_forward_and_removes_its_hooks():
    model = prepare_model(_cnn(), MECQuantConfig(weight_bits=2, act_bits=2))
    term = LayerwiseCodingLength(model, "activations")
    with torch.no_grad():
        model(torch.randn(2, 3, 5, 5))
    assert term().item() == 0.0
    term.remove()
    model(torch.randn(2, 3, 5, 5))
    assert term._captured == {}


def test_weight_term_codes_filters_as_rows():
    model = prepare_model(_cnn(), MECQuantConfig(weight_bits=2, act_bits=2))
    term = LayerwiseCodingLength(model, "weights", eps2_per_dim=0.5)
    loss = term()
    expected = torch.stack([_ref_term(model[i].quantized_weight().detach().flatten(1), 0.5) for i in (2, 4)]).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-5)
    loss.backward()
    assert model[2].weight.grad.abs().sum() > 0


def test_layerwise_term_refuses_a_float_model_and_unknown_targets():
    with pytest.raises(ValueError, match="prepare_model"):
        LayerwiseCodingLength(_cnn(), "activations")
    with pytest.raises(ValueError, match="activations"):
        LayerwiseCodingLength(prepare_model(_cnn(), MECQuantConfig()), "gradients")


def _ref_rate(z: torch.Tensor, eps2: float) -> torch.Tensor:
    m, d = z.shape
    return 0.5 * torch.linalg.slogdet(torch.eye(d, dtype=z.dtype) + d / (m * eps2) * z.T @ z).logabsdet


def test_rate_reduction_matches_the_float64_definition():
    z, y = torch.randn(40, 6), torch.arange(40) % 3
    zn = ref_normalize(z.double() - z.double().mean(0))
    expected = _ref_rate(zn, 0.5) - sum((y == j).sum() / 40 * _ref_rate(zn[y == j], 0.5) for j in range(3))
    torch.testing.assert_close(rate_reduction_loss(z, y).double(), -expected / 6, rtol=1e-4, atol=1e-6)


def test_rate_reduction_prefers_classes_in_separate_subspaces_to_mixed_classes():
    y = torch.arange(60) % 3
    basis = torch.eye(6)
    separated = torch.stack([basis[2 * int(c)] * torch.randn(()) + basis[2 * int(c) + 1] * torch.randn(()) for c in y])
    mixed = torch.randn(60, 6)
    assert rate_reduction_loss(separated, y, center=False) < rate_reduction_loss(mixed, y, center=False)


def test_distillation_matches_kl_times_t_squared_and_gives_no_teacher_gradient():
    s, t = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7, requires_grad=True)
    loss = distillation_loss(s, t, temperature=2.0)
    p = torch.softmax(t.detach() / 2, -1)
    expected = (p * (p.log() - torch.log_softmax(s.detach() / 2, -1))).sum(-1).mean() * 4
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(s, t, temperature=0.0)
