"""Two gloo processes on CPU give the loss and gradients of one process on the concatenated batch."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from testing_utils import TinyMLP

from mec_quant_plugin.config import MECQuantConfig
from mec_quant_plugin.objective import MECRegularizer, center_features, coding_length_loss, gather_rows

pytestmark = pytest.mark.distributed  # starts two gloo processes

ROWS = (3, 5)  # unequal per-rank batches: the gather pads and strips


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(sum(ROWS), 6, generator=g), torch.randn(sum(ROWS), 8, generator=g)


def _function_term(z):
    loss, _ = coding_length_loss(center_features(z), eps2=4.0, target_radius=0.5)
    return loss


def _model():
    torch.manual_seed(0)
    return TinyMLP()


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, z = _data()
        start = sum(ROWS[:rank])
        local = slice(start, start + ROWS[rank])
        # 1) the pure function on gathered rows
        z_local = z[local].clone().requires_grad_()
        loss = _function_term(gather_rows(z_local))
        loss.backward()
        # 2) the regularizer with mec_gather, gradients averaged as DDP would
        model = _model().train()
        reg = MECRegularizer(model, MECQuantConfig(mec_weight=1.0, mec_gather=True))
        model(x[local])
        term = reg()
        term.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in model.body.parameters()]
        for grad in grads:
            dist.all_reduce(grad)
            grad /= world
        results = {
            "loss": loss.detach(),
            "grad": z_local.grad / world,  # each rank holds W * dL/dz_local (see distributed.py)
            "term": term.detach(),
            "param_grads": grads,
        }
        torch.save(results, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gather_equals_one_process_on_the_concatenated_batch(tmp_path):
    out = str(tmp_path / "result")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    x, z = _data()
    z_ref = z.clone().requires_grad_()
    ref_loss = _function_term(z_ref)
    ref_loss.backward()
    model = _model().train()
    reg = MECRegularizer(model, MECQuantConfig(mec_weight=1.0))
    model(x)
    ref_term = reg()
    ref_term.backward()
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        start = sum(ROWS[:rank])
        torch.testing.assert_close(got["loss"], ref_loss.detach())
        torch.testing.assert_close(got["grad"], z_ref.grad[start : start + ROWS[rank]])
        torch.testing.assert_close(got["term"], ref_term.detach())
        for g, p in zip(got["param_grads"], model.body.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad)
