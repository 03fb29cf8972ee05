"""Float64 references of the coding length for the objective tests (the tiny models are in
tests/testing_utils.py)."""

from __future__ import annotations

import torch
from torch import Tensor


def ref_normalize(z: Tensor) -> Tensor:
    z = z.double()
    norms = z.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, z / norms.clamp_min(1e-300), torch.zeros_like(z))


def ref_matrix(z1: Tensor, z2: Tensor | None, lam: float) -> Tensor:
    a = ref_normalize(z1)
    b = a if z2 is None else ref_normalize(z2)
    return lam * a @ b.T  # always the m x m form, plain matrix powers


def ref_series(z1: Tensor, z2: Tensor | None, lam: float, order: int) -> Tensor:
    c = ref_matrix(z1, z2, lam)
    return sum((-1) ** (k + 1) * torch.trace(torch.linalg.matrix_power(c, k)) / k for k in range(1, order + 1))


def ref_logdet(z1: Tensor, z2: Tensor | None, lam: float) -> Tensor:
    c = ref_matrix(z1, z2, lam)
    return torch.linalg.slogdet(torch.eye(c.shape[0], dtype=c.dtype) + c).logabsdet


def ref_loss(z1: Tensor, z2: Tensor | None, lam: float, order: int | None) -> Tensor:
    m = z1.shape[0]
    s = ref_logdet(z1, z2, lam) if order is None else ref_series(z1, z2, lam, order)
    return -s / (m * lam)
