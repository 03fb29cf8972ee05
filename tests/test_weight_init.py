"""The weight-step initialization (issue 13 §3): the batched search equals the former per-ratio loop."""

from __future__ import annotations

import pytest
import torch

from mec_quant_plugin.quantizers import WeightFakeQuantizer
from mec_quant_plugin.quantizers.numerics import mse_step_search


def _loop_search(w: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The search as it was written before it was batched (a loop over the 40 clipping ratios)."""
    absw = w.abs()
    wmax = absw.amax(dim=-1, keepdim=True).clamp_min(1e-8)
    best_s = wmax / qmax
    best_err = torch.full_like(best_s, float("inf"))
    for r in torch.linspace(0.05, 1.0, 40).tolist():
        s = wmax * r / qmax
        err = ((torch.clamp(torch.round(w / s), qmin, qmax) * s - w) ** 2).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_err = torch.where(better, err, best_err)
    return best_s


@pytest.mark.parametrize("qrange", [(-2, 1), (-1, 1), (-8, 7), (-128, 127)])
@pytest.mark.parametrize("chunk_elements", [1, 1000, 1 << 18])  # one row per block, a ragged last block, one block
def test_batched_search_is_bit_identical_to_the_ratio_loop(qrange, chunk_elements):
    gen = torch.Generator().manual_seed(sum(qrange) + chunk_elements)
    w = torch.randn(37, 24, generator=gen) * torch.rand(37, 1, generator=gen) * 3
    w[3] = 0.0  # an all-zero channel (the 1e-8 floor)
    w[5, 0] = 40.0  # an outlier: the best clip ratio is far below 1
    got = mse_step_search(w, *qrange, chunk_elements=chunk_elements)
    assert got.shape == (37, 1)
    assert torch.equal(got, _loop_search(w, *qrange))


@pytest.mark.parametrize(
    ("shape", "kwargs"),
    [
        ((48, 32), dict(bits=2)),
        ((48, 32), dict(bits=4, group_size=8)),
        ((48, 32), dict(bits=2, ternary=True)),
        ((16, 8, 3, 3), dict(bits=2)),  # Conv2d
        ((32, 48), dict(bits=3, channel_axis=1)),  # transformers' Conv1D
        ((64, 16), dict(bits=8)),
    ],
)
def test_weight_quantizer_steps_equal_the_loop_search(shape, kwargs):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)))
    wq = WeightFakeQuantizer(w, **kwargs)
    grouped = wq._grouped(w)
    assert torch.equal(wq.scale.detach(), _loop_search(grouped, wq.qmin, wq.qmax))


def test_search_leaves_the_thread_count_alone():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        mse_step_search(torch.randn(64, 32), -2, 1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
