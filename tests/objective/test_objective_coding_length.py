"""MEC's coding-length term against a float64 reference written here (slogdet and plain powers)."""

from __future__ import annotations

import pytest
import torch
from objective_helpers import ref_logdet, ref_loss, ref_matrix, ref_series

from mec_quant_plugin.objective import coding_length_loss, exact_coding_length
from mec_quant_plugin.objective.coding_length import _power_traces


def _lam_for_bound(z1, z2, bound):
    """lambda with ||C||_F == bound (m x m form, as the reference)."""
    return bound / torch.linalg.matrix_norm(ref_matrix(z1, z2, 1.0)).item()


def _eps2(m, d, lam):
    return d / (m * lam)


@pytest.mark.parametrize("view", ["self", "teacher"])
@pytest.mark.parametrize("shape", [(48, 16), (16, 48)])
def test_series_matches_reference_and_is_close_to_exact_below_half(view, shape):
    m, d = shape
    z1 = torch.randn(m, d)
    z2 = None if view == "self" else z1 + 0.3 * torch.randn(m, d)
    lam = _lam_for_bound(z1, z2, 0.45)
    loss, stats = coding_length_loss(z1, z2, eps2=_eps2(m, d, lam))
    radius = torch.linalg.eigvals(ref_matrix(z1, z2, lam)).abs().max().item()
    assert stats.spectral_bound.item() >= radius
    if view == "self":  # the Frobenius norm is the same in both forms only when Z1 = Z2
        assert stats.spectral_bound.item() == pytest.approx(0.45, rel=1e-4)
    series = ref_series(z1, z2, lam, 4)
    torch.testing.assert_close(loss.double(), ref_loss(z1, z2, lam, 4), rtol=1e-5, atol=0)
    torch.testing.assert_close(stats.coding_length.double(), (m + d) / 2 * series / m, rtol=1e-5, atol=0)
    exact = ref_logdet(z1, z2, lam)
    assert abs(series - exact) / abs(exact) < 1e-3
    exact_loss, exact_stats = coding_length_loss(z1, z2, eps2=_eps2(m, d, lam), order=None)
    torch.testing.assert_close(exact_loss.double(), -exact / (m * lam), rtol=1e-5, atol=0)
    torch.testing.assert_close(exact_coding_length(z1, z2, lam=lam), (m + d) / 2 * exact / m, rtol=1e-10, atol=0)


@pytest.mark.parametrize("order", [2, 4, 6, None])
@pytest.mark.parametrize("view", ["self", "teacher"])
def test_m_by_m_and_d_by_d_forms_agree(order, view):
    z1 = torch.randn(24, 40)
    z2 = None if view == "self" else torch.randn(24, 40)
    kw = dict(eps2=3.0, order=order)
    small, s_small = coding_length_loss(z1, z2, form="m x m", **kw)
    big, s_big = coding_length_loss(z1, z2, form="d x d", **kw)
    assert (s_small.form, s_big.form) == ("m x m", "d x d")
    torch.testing.assert_close(small, big, rtol=1e-5, atol=0)
    assert coding_length_loss(z1, z2, **kw)[1].form == "m x m"  # auto picks the smaller
    assert coding_length_loss(z1.T.contiguous(), None, eps2=3.0)[1].form == "d x d"


@pytest.mark.parametrize("symmetric", [True, False])
def test_order4_trick_equals_plain_power_sum(symmetric):
    a = torch.randn(20, 20, dtype=torch.float64) / 10
    c = a @ a.T if symmetric else a
    traces = _power_traces(c, 4, symmetric)
    plain = [torch.trace(torch.linalg.matrix_power(c, k)) for k in range(1, 5)]
    torch.testing.assert_close(torch.stack(traces), torch.stack(plain), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(torch.stack(_power_traces(c, 6, symmetric)[:4]), torch.stack(plain), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("order", [4, 6, None])
@pytest.mark.parametrize("view", ["self", "teacher"])
def test_gradients_match_autograd_of_the_reference(order, view):
    m, d = 12, 20
    z1 = torch.randn(m, d, dtype=torch.float64)
    z2 = None if view == "self" else torch.randn(m, d, dtype=torch.float64)
    lam = _lam_for_bound(z1, z2, 0.6)
    inputs = [z1.clone().requires_grad_()] + ([] if z2 is None else [z2.clone().requires_grad_()])
    loss, _ = coding_length_loss(inputs[0], None if z2 is None else inputs[1], eps2=_eps2(m, d, lam), order=order)
    grads = torch.autograd.grad(loss, inputs)
    ref_inputs = [t.detach().clone().requires_grad_() for t in inputs]
    ref = ref_loss(ref_inputs[0], None if z2 is None else ref_inputs[1], lam, order)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), r, rtol=2e-4, atol=1e-6)


def test_bf16_input_works_and_autocast_is_off():
    z = torch.randn(32, 16).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, stats = coding_length_loss(z, eps2=4.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad.float()).all()
    ref, _ = coding_length_loss(z.detach().float(), eps2=4.0)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("order", [4, None])
def test_zero_rows_and_constant_batches_are_finite(adaptive, order):
    lam_kw = dict(eps2=1.0, target_radius=0.5 if adaptive else None, order=order)
    z = torch.randn(10, 8)
    z[3] = 0
    z.requires_grad_()
    loss, stats = coding_length_loss(z, **lam_kw)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all() and z.grad[3].abs().sum() == 0
    for batch in (torch.zeros(10, 8), torch.ones(10, 8) * 3.0):
        batch.requires_grad_()
        loss, stats = coding_length_loss(batch, **lam_kw)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(batch.grad).all()
        assert all(torch.isfinite(v) for v in stats.to_dict().values())


def test_collapse_is_penalized_by_even_orders():
    spread = torch.randn(64, 32)
    collapsed = torch.ones(64, 32) + 0.01 * torch.randn(64, 32)
    loss_spread, _ = coding_length_loss(spread, eps2=0.5)
    loss_collapsed, _ = coding_length_loss(collapsed, eps2=0.5)
    assert loss_collapsed > loss_spread  # minimizing the loss moves away from collapse


def test_invalid_arguments_raise_with_reasons():
    z = torch.randn(8, 4)
    with pytest.raises(ValueError, match="odd truncation.*collapse"):
        coding_length_loss(z, eps2=1.0, order=3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        coding_length_loss(z[:1], eps2=1.0)
    with pytest.raises(ValueError, match="same"):
        coding_length_loss(z, torch.randn(8, 5), eps2=1.0)
    with pytest.raises(ValueError, match="eps2"):
        coding_length_loss(z)
    with pytest.raises(ValueError, match="eps2"):
        coding_length_loss(z, eps2=-1.0)
    with pytest.raises(ValueError, match="form"):
        coding_length_loss(z, eps2=1.0, form="diag")
    with pytest.raises(ValueError, match="exactly one"):
        exact_coding_length(z, eps2=1.0, lam=1.0)
