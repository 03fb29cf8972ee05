"""Fake quantizers: levels, LSQ gradients (formula and finite differences), dtype handling."""

from __future__ import annotations

import math

import pytest
import torch

from mec_quant_plugin import ActivationFakeQuantizer, WeightFakeQuantizer


@pytest.mark.parametrize(
    "bits,ternary,max_levels", [(1, False, 2), (2, False, 4), (3, False, 8), (2, True, 3), (4, False, 16)]
)
def test_weight_levels_per_channel(bits, ternary, max_levels):
    w = torch.randn(6, 40)
    wq = WeightFakeQuantizer(w, bits, ternary=ternary)(w)
    for row in wq:
        levels = torch.unique(row)
        assert len(levels) <= max_levels
        if bits == 1:
            assert len(levels) == 2 and torch.allclose(levels[0], -levels[1])
        # levels sit on the integer grid of the row's own step
    if not (bits == 1 and not ternary):
        s = WeightFakeQuantizer(w, bits, ternary=ternary).scale.detach()
        codes = wq / s
        assert torch.allclose(codes, codes.round(), atol=1e-5)


def test_binary_alpha_initialized_to_mean_abs():
    w = torch.randn(4, 32)
    q = WeightFakeQuantizer(w, 1)
    assert torch.allclose(q.scale.detach().squeeze(), w.abs().mean(1))
    assert torch.equal(q(w), torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(1, keepdim=True))


def test_per_group_levels_and_bad_group():
    w = torch.randn(3, 32)
    q = WeightFakeQuantizer(w, 2, group_size=8)
    assert q.scale.shape == (3, 4, 1)
    out = q(w)
    for c in range(3):
        for g in range(4):
            assert len(torch.unique(out[c, g * 8 : (g + 1) * 8])) <= 4
    with pytest.raises(ValueError, match="does not divide"):
        WeightFakeQuantizer(torch.randn(3, 30), 2, group_size=8)


def test_conv_weight_per_output_channel_and_conv1d_axis():
    w = torch.randn(5, 3, 3, 3)
    q = WeightFakeQuantizer(w, 2)
    assert q.scale.shape == (5, 1)
    assert q(w).shape == w.shape
    wt = torch.randn(16, 7)  # GPT-2 Conv1D layout (in, out): one step per column
    qt = WeightFakeQuantizer(wt, 3, channel_axis=1)
    assert qt.scale.shape == (7, 1)
    out = qt(wt)
    assert all(len(torch.unique(out[:, j])) <= 8 for j in range(7))


def _lsq_reference_grads(x, s, qmin, qmax, g, grad_out, offset=None):
    off = offset if offset is not None else torch.zeros(())
    v = (x - off) / s
    inside = (v >= qmin) & (v <= qmax)
    q = v.round().clamp(qmin, qmax)
    gx = grad_out * inside
    gs = (grad_out * torch.where(inside, q - v, q)).sum() * g
    go = (grad_out * (~inside)).sum() * g
    return gx, gs, go


@pytest.mark.parametrize("signed", [False, True])
def test_activation_gradients_equal_lsq_formulas(signed):
    aq = ActivationFakeQuantizer(2, "signed" if signed else "unsigned")
    x0 = torch.randn(4, 10) * 2 + (0 if signed else 1.0)
    x0 = x0 if signed else x0.abs()
    aq.calibrate(x0)
    x = x0.clone().requires_grad_(True)
    y = aq(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    qmin, qmax = aq.qrange
    g = 1.0 / math.sqrt(10 * qmax)
    gx, gs, go = _lsq_reference_grads(
        x0, aq.scale.detach(), qmin, qmax, g, grad_out, aq.offset.detach() if signed else None
    )
    assert torch.allclose(x.grad, gx)
    assert torch.allclose(aq.scale.grad, gs, atol=1e-6)
    if signed:
        assert torch.allclose(aq.offset.grad, go, atol=1e-6)
    else:  # unused, but with an explicit zero gradient so plain DDP does not wait for it
        assert torch.equal(aq.offset.grad, torch.zeros(()))


def test_weight_gradients_equal_lsq_formulas():
    w0 = torch.randn(3, 12)
    q = WeightFakeQuantizer(w0, 3)
    w = w0.clone().requires_grad_(True)
    grad_out = torch.randn(3, 12)
    q(w).backward(grad_out)
    g = 1.0 / math.sqrt(12 * 3)
    for c in range(3):
        gx, gs, _ = _lsq_reference_grads(w0[c], q.scale.detach()[c], -4, 3, g, grad_out[c])
        assert torch.allclose(w.grad[c], gx)
        assert torch.allclose(q.scale.grad[c], gs.reshape(1), atol=1e-6)


def test_step_and_offset_gradients_match_finite_differences_where_smooth():
    # Inside the range LSQ's step gradient (q - v) uses the straight-through estimate of
    # round(); where the output is smooth in (s, offset), i.e. in the clipped region where it
    # equals qmin*s + offset or qmax*s + offset, it must equal the true derivative.
    aq = ActivationFakeQuantizer(2, "signed")
    aq.calibrate(torch.randn(1, 64))
    x = torch.cat([torch.full((1, 16), 50.0), torch.full((1, 16), -50.0)], dim=1)
    weights = torch.randn(1, 32)
    (aq(x) * weights).sum().backward()
    g = 1.0 / math.sqrt(32 * 1)
    h = 1e-3

    def f(param, value):
        with torch.no_grad():
            old = param.item()
            param.fill_(value)
            out = (aq(x) * weights).double().sum().item()
            param.fill_(old)
        return out

    for param in (aq.scale, aq.offset):
        p0 = param.item()
        numeric = (f(param, p0 + h) - f(param, p0 - h)) / (2 * h)
        assert param.grad.item() == pytest.approx(numeric * g, rel=1e-3)


def test_input_gradient_zero_outside_clipping_range():
    aq = ActivationFakeQuantizer(2, "unsigned")
    aq.calibrate(torch.rand(100))
    x = torch.tensor([-1.0, 0.1, 1e3], requires_grad=True)
    aq(x).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 0.0]


def test_auto_signedness_and_initialized_buffer_survives_reload():
    aq = ActivationFakeQuantizer(4)
    aq.train()
    aq(torch.rand(8, 3))
    assert bool(aq.initialized) and not bool(aq.signed)
    state = aq.state_dict()
    fresh = ActivationFakeQuantizer(4)
    fresh.load_state_dict(state)
    fresh.train()
    fresh(torch.randn(8, 3) * 100)  # must NOT re-initialize from this very different batch
    assert fresh.scale.item() == pytest.approx(aq.scale.item())
    neg = ActivationFakeQuantizer(4)
    neg.calibrate(torch.randn(8, 3))
    assert bool(neg.signed)


def test_uninitialized_activation_in_eval_calibrates_with_a_warning():
    aq = ActivationFakeQuantizer(2).eval()
    with pytest.warns(UserWarning, match="calibrating it from this evaluation batch"):
        aq(torch.rand(3))
    assert bool(aq.initialized)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_math_for_low_precision_inputs_and_under_autocast(dtype):
    # The quantizer math runs in fp32 and rounds once, back to the input's dtype: computed in
    # bf16/fp16, inputs near a level boundary land on the neighbouring level (and a weight
    # quantizer would return fp32). Expected = the fp32 computation cast once.
    w = torch.randn(64, 64)
    wq = WeightFakeQuantizer(w, 2)
    aq = ActivationFakeQuantizer(4, "signed")
    aq.calibrate(torch.randn(64, 64))
    for q, t in ((wq, w.to(dtype)), (aq, torch.randn(64, 64).to(dtype))):
        expected = q(t.float()).to(dtype)
        out = q(t)
        assert out.dtype == dtype and torch.equal(out, expected), type(q).__name__
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(q(t), expected), type(q).__name__


@pytest.mark.parametrize("bad", [0, 9, -1])
def test_bits_out_of_range(bad):
    with pytest.raises(ValueError, match="1..8"):
        WeightFakeQuantizer(torch.randn(2, 4), bad)
    with pytest.raises(ValueError, match="1..8"):
        ActivationFakeQuantizer(bad)


def test_nan_weights_rejected():
    w = torch.randn(2, 4)
    w[0, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        WeightFakeQuantizer(w, 2)


_LAYOUTS = {  # weight shape, channel axis, group size
    "linear": ((6, 16), 0, None),
    "linear-group": ((6, 16), 0, 8),
    "conv": ((5, 4, 3, 3), 0, None),
    "conv-group": ((5, 4, 3, 3), 0, 2),
    "conv1d": ((16, 6), 1, None),
    "conv1d-group": ((16, 6), 1, 4),
}


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("bits,ternary", [(1, False), (2, False), (2, True), (4, False), (8, False)])
def test_to_affine_reproduces_the_fake_quantized_weight(layout, bits, ternary):
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
    )

    shape, axis, group = _LAYOUTS[layout]
    w = torch.randn(shape)
    wfq = WeightFakeQuantizer(w, bits, channel_axis=axis, group_size=group, ternary=ternary)
    affine = wfq.to_affine(w)
    assert affine.codes.dtype == torch.int8 and affine.codes.shape == w.shape
    assert affine.scale.shape == affine.zero_point.shape
    assert tuple(n // b for n, b in zip(w.shape, affine.block_size)) == tuple(affine.scale.shape)
    assert affine.group_size == group
    assert affine.dtype == (torch.int1 if bits == 1 and not ternary else torch.int8 if bits == 8 else getattr(torch, f"int{bits}"))
    lo, hi = (-1, 1) if ternary else (-1, 0) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert lo <= affine.codes.min() and affine.codes.max() <= hi
    with torch.no_grad():
        assert torch.equal(affine.dequantize(), wfq(w))
        # torchao reads the same layout back
        tensor = IntxUnpackedToInt8Tensor(affine.codes, affine.scale, affine.zero_point, affine.dtype,
                                          affine.block_size, w.dtype, None)
        assert torch.allclose(tensor.dequantize(), wfq(w), atol=1e-6)


def test_to_affine_of_a_weight_the_group_does_not_divide():
    wfq = WeightFakeQuantizer(torch.randn(3, 32), 2, group_size=8)
    with pytest.raises(ValueError, match="does not divide"):
        wfq.to_affine(torch.randn(3, 30))


_DEGENERATE = {
    "zeros": torch.zeros(4, 8),
    "constant": torch.full((4, 8), 0.7),
    "nan": torch.randn(4, 8).index_fill_(1, torch.tensor([3]), float("nan")),
    "inf": torch.randn(4, 8).index_fill_(1, torch.tensor([3]), float("inf")),
}


@pytest.mark.parametrize("first", sorted(_DEGENERATE))
def test_degenerate_first_batch_is_skipped_and_the_next_batch_calibrates(first):
    # An all-zero first batch used to freeze the step at 1e-8 and the signedness at unsigned, so
    # every later negative input was clipped to 0; a NaN batch crashed.
    aq = ActivationFakeQuantizer(2).train()
    bad = _DEGENERATE[first]
    with pytest.warns(UserWarning, match="degenerate"):
        out = aq(bad)
    assert not bool(aq.initialized)
    assert torch.equal(out, bad) or first in ("nan", "inf")  # passed through, not quantized
    good = torch.randn(64, 8)
    aq(good)
    ref = ActivationFakeQuantizer(2)
    ref.calibrate(good)
    assert bool(aq.initialized) and bool(aq.signed)
    assert (aq.scale.item(), aq.offset.item()) == (ref.scale.item(), ref.offset.item())


@pytest.mark.parametrize("first", ["zeros", "constant"])
def test_explicit_calibration_on_a_constant_batch_is_an_error(first):
    with pytest.raises(ValueError, match="constant"):
        ActivationFakeQuantizer(2).calibrate(_DEGENERATE[first])


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to_float16"])
def test_casting_the_model_keeps_step_sizes_float32(cast):
    # model.half() used to cast the step sizes too: the 1e-8 floor (and any small step) became 0.
    from torch import nn
    from torchao.quantization import quantize_

    from mec_quant_plugin import MECQuantConfig, is_supported_layer

    model = nn.Sequential(nn.Linear(8, 4))
    quantize_(model, MECQuantConfig(weight_bits=2, act_bits=2), filter_fn=is_supported_layer)
    fq = model[0]
    fq.activation_fake_quantizer.calibrate(torch.randn(16, 8))
    with torch.no_grad():
        fq.weight_fake_quantizer.scale[0] = 1e-8
    steps = {n: p.detach().clone() for n, p in model.named_parameters() if "fake_quantizer" in n}
    dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "to_float16": torch.float16}[cast]
    model = model.to(dtype) if cast.startswith("to_") else getattr(model, cast)()
    assert fq.weight.dtype == dtype
    for name, p in model.named_parameters():
        if "fake_quantizer" in name:
            assert p.dtype == torch.float32 and torch.equal(p, steps[name]), name
    out = model(torch.randn(3, 8).to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
