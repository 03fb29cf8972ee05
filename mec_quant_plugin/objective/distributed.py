"""Gradient-preserving all-gather of feature rows, so m is the global batch under data parallelism.

Every rank computes the same coding length on the gathered (global) rows. In backward, the
gradient of the gathered rows is summed over ranks (all-reduce) and each rank keeps the slice of
its own rows: rank r then holds W * dL/dZ_r, and the data-parallel average of parameter
gradients (DDP divides by W) gives exactly the gradient of L on the concatenated batch, as one
process would compute it. Ranks may hold different numbers of rows (token rows after removing
padding): rows are padded to the largest count for the collective and stripped afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..distributed import is_distributed


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, rows: Tensor, group: Any | None) -> Tensor:
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        count = torch.tensor([rows.shape[0]], device=rows.device, dtype=torch.long)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        sizes = [int(c.item()) for c in counts]
        padded = rows.new_zeros((max(sizes),) + tuple(rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded.contiguous(), group=group)
        ctx.group = group
        ctx.start = sum(sizes[:rank])
        ctx.count = sizes[rank]
        return torch.cat([g[:n] for g, n in zip(gathered, sizes)])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.count], None


def gather_rows(rows: Tensor, group: Any | None = None) -> Tensor:
    """Rows of all ranks concatenated in rank order, differentiable w.r.t. the local rows.

    A no-op when torch.distributed is not initialized or has one rank. Every rank must call it
    (a collective), with the same number of columns.

    Example:
        >>> z_global = gather_rows(z_local)  # (sum of m_r, d)

    Raises:
        ValueError: rows is not an (m, d) matrix.
    """
    if rows.dim() != 2:
        raise ValueError(f"gather_rows expects (m, d) rows, got shape {tuple(rows.shape)}.")
    if not is_distributed():
        return rows
    return _GatherRows.apply(rows, group)
