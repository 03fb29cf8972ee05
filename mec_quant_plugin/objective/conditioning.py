"""Conditioning of the features and of lambda, so the Taylor series of log det converges.

Measured (docs/method.md): pooled post-ReLU features are non-negative and low-rank, so with MEC's
fixed eps^2 the matrix C = lambda Z1 Z2^T has a spectral radius far above 1, the truncated series
diverges and its gradient swamps the task loss (W2A2 accuracy 88.8% -> 64%). The cures here:
center (optionally standardize) features over the batch before the row normalization, and set
lambda each step from a cheap power-iteration estimate of the spectral radius (`adaptive_lambda`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

WARMUP_START = 8.0  # MEC: 1/lambda starts at 8/lambda and decreases linearly to 1/lambda


def normalize_rows(z: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows scaled to unit L2 norm; zero rows stay zero, with finite (zero) gradients.

    `F.normalize` differentiates through `norm()`, whose gradient at 0 is NaN-prone; clamping the
    squared norm keeps the gradient of a zero row exactly zero.

    Example:
        >>> normalize_rows(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        tensor([[0.6000, 0.8000],
                [0.0000, 0.0000]])
    """
    return z * torch.rsqrt(z.pow(2).sum(dim=-1, keepdim=True).clamp_min(eps * eps))


def center_features(z: Tensor, *, standardize: bool = False, eps: float = 1e-5) -> Tensor:
    """Subtract the batch mean of each feature (optionally divide by its batch std, like MEC's
    affine-free BatchNorm projector).

    Rows left with a norm below `1e-5` of the batch's typical row norm are set to exactly zero:
    a constant batch would otherwise leave rounding noise that the row normalization blows up
    into random unit vectors.

    Example:
        >>> center_features(torch.ones(4, 3)).abs().max().item()
        0.0

    Raises:
        ValueError: z is not an (m, d) matrix.
    """
    if z.dim() != 2:
        raise ValueError(f"center_features expects an (m, d) matrix, got shape {tuple(z.shape)}.")
    scale = z.detach().norm(dim=1).mean()
    out = z - z.mean(dim=0, keepdim=True)
    if standardize:
        out = out / (out.pow(2).mean(dim=0, keepdim=True) + eps).sqrt()
        scale = torch.ones_like(scale) * math.sqrt(z.shape[1])
    keep = out.detach().norm(dim=1, keepdim=True) > 1e-5 * scale + 1e-30
    return out * keep


def fixed_lambda(m: int, d: int, eps2: float) -> float:
    """MEC's `lambda = d / (m * eps2)`.

    Example:
        >>> fixed_lambda(256, 2048, 64.0)
        0.125

    Raises:
        ValueError: eps2 not a positive finite number.
    """
    if isinstance(eps2, bool) or not isinstance(eps2, (int, float)) or not math.isfinite(eps2) or eps2 <= 0:
        raise ValueError(f"eps2 (the allowed distortion eps^2) must be a positive number, got {eps2!r}.")
    return d / (m * eps2)


def adaptive_lambda(
    z1: Tensor,
    z2: Tensor | None = None,
    *,
    target_radius: float = 0.5,
    iters: int = 8,
    fallback: float = 1.0,
    normalize: bool = True,
) -> Tensor:
    """lambda (a detached fp32 scalar) that puts the spectral radius of `C = lambda * Z1 Z2^T` at
    `target_radius`, so the Taylor series of log det converges.

    The largest singular value of Z1 Z2^T (an upper bound of its spectral radius, equal to it in
    the self view) is estimated with `iters` power iterations made of matrix-vector products with
    Z1 and Z2: the cost is O(iters * m * d) and no m x m or d x d matrix is formed. Power
    iteration approaches sigma_max from below, so lambda errs slightly high when the top of the
    spectrum is flat (then ||C||_F, not lambda, is what tells the user). Degenerate batches (all
    rows zero, e.g. a constant batch after centering) get `fallback`.

    Example:
        >>> lam = adaptive_lambda(torch.rand(64, 16), target_radius=0.5)  # non-negative: ~0.5/64

    Raises:
        ValueError: target_radius not in (0, 1), iters < 1, or views not matching (m, d) matrices.
    """
    if not 0 < target_radius < 1:
        raise ValueError(f"target_radius must be in (0, 1) for the series to converge, got {target_radius}.")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}.")
    if z1.dim() != 2 or (z2 is not None and z2.shape != z1.shape):
        shapes = (tuple(z1.shape), None if z2 is None else tuple(z2.shape))
        raise ValueError(f"adaptive_lambda expects two (m, d) views of the same shape, got {shapes}.")
    with torch.no_grad(), torch.autocast(z1.device.type, enabled=False):
        a = z1.detach().float()
        b = a if z2 is None else z2.detach().float()
        if normalize:
            a = normalize_rows(a)
            b = a if z2 is None else normalize_rows(b)
        return batched_adaptive_lambda(a.unsqueeze(0), b.unsqueeze(0), target_radius, iters, fallback)[0]


def _sigma_max(
    matvec: Callable[[Tensor], Tensor], rmatvec: Callable[[Tensor], Tensor], k: int, n: int, like: Tensor, iters: int
) -> Tensor:
    """Largest singular values (K,) of K stacked matrices G, by `iters` power iterations on G^T G.

    `matvec(v)` = G v and `rmatvec(u)` = G^T u on (K, n, 1) stacks, so G itself need not exist.
    The estimate approaches sigma_max from below.
    """
    # A fixed, generic start vector: ones would be (nearly) orthogonal to the top direction
    # of centered features, a random one would make lambda depend on the global RNG state.
    v = torch.sin(torch.arange(n, device=like.device, dtype=like.dtype) * 12.9898 + 78.233) + 1.5
    v = v.expand(k, n).unsqueeze(-1)
    sigma2 = torch.zeros(k, device=like.device, dtype=like.dtype)
    for _ in range(iters):
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
        gv = matvec(v)
        sigma2 = gv.pow(2).sum(dim=(1, 2))  # ||G v||^2 with ||v|| = 1: sigma_max^2 from below
        v = rmatvec(gv)  # G^T G v
    return sigma2.sqrt()


def _lambda_from_sigma(sigma: Tensor, target_radius: float, fallback: float) -> Tensor:
    # Unit rows give sigma >= 1 when there is any signal; far below means the batch is zero.
    degenerate = sigma < 1e-6
    return torch.where(degenerate, torch.full_like(sigma, fallback), target_radius / sigma.clamp_min(1e-6))


def batched_adaptive_lambda(a: Tensor, b: Tensor, target_radius: float, iters: int, fallback: float) -> Tensor:
    """`adaptive_lambda` for K groups at once: a, b are (K, m, d) row-normalized views; returns (K,)."""
    with torch.no_grad():
        a, b = a.detach(), b.detach()
        # G = Z1 Z2^T is never formed: G v = Z1 (Z2^T v), G^T u = Z2 (Z1^T u).
        sigma = _sigma_max(lambda v: a @ (b.mT @ v), lambda u: b @ (a.mT @ u), a.shape[0], a.shape[-2], a, iters)
        return _lambda_from_sigma(sigma, target_radius, fallback)


def gram_adaptive_lambda(gram: Tensor, target_radius: float, iters: int, fallback: float) -> Tensor:
    """`adaptive_lambda` of the self view from its (K, n, n) Gram matrix Z Z^T or Z^T Z (the same
    nonzero spectrum), which the term computes anyway: power iterations then cost n^2, not m*d."""
    with torch.no_grad():
        g = gram.detach()
        sigma = _sigma_max(lambda v: g @ v, lambda u: g @ u, g.shape[0], g.shape[-1], g, iters)  # G^T = G
        return _lambda_from_sigma(sigma, target_radius, fallback)


def warmup_lambda_scale(step: int, total_steps: int, fraction: float) -> float:
    """MEC's lambda warm-up: the factor on lambda, 1/8 at step 0 rising so that 1/lambda falls
    linearly from 8/lambda to 1/lambda over `fraction` of `total_steps`; 1 afterwards.

    Example:
        >>> warmup_lambda_scale(0, 100, 0.1), warmup_lambda_scale(10, 100, 0.1)
        (0.125, 1.0)

    Raises:
        ValueError: fraction outside [0, 1] or negative step.
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"warm-up fraction must be in [0, 1], got {fraction}.")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}.")
    horizon = fraction * total_steps
    if horizon <= 0:
        return 1.0
    progress = min(1.0, step / horizon)
    return 1.0 / (WARMUP_START - (WARMUP_START - 1.0) * progress)
