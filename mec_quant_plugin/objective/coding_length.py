"""The coding-length term of Maximum Entropy Coding (MEC), as pure tensor functions.

For two views Z1, Z2 (m samples x d features, rows L2-normalized) the coding length is
`mu * logdet(I_m + lambda * Z1 Z2^T)` with `mu = (m + d) / 2` and `lambda = d / (m * eps2)`.
MEC replaces the log det by its Taylor series truncated at an even order n,
`S = sum_{k=1..n} (-1)^(k+1) tr(C^k) / k`, `C = lambda * Z1 Z2^T`, and minimizes
`-S / (m * lambda)` (its first-order part is minus the mean cosine of paired rows, so the term
sits on the scale of a cross-entropy). Everything here runs in fp32 with autocast off; the exact
log det runs in fp64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..options import check_order
from .conditioning import batched_adaptive_lambda, fixed_lambda, gram_adaptive_lambda, normalize_rows
from .stats import TermStats

ADAPTIVE_ITERS = 8  # power iterations of the adaptive lambda

FORM_SAMPLES = "m x m"
FORM_FEATURES = "d x d"


def check_views(z1: Tensor, z2: Tensor | None) -> tuple[int, int]:
    """Shapes (m, d) of the views, validated.

    Raises:
        ValueError: not 2-D, shapes differ, fewer than 2 rows or no features.
    """
    if z1.dim() != 2:
        raise ValueError(f"z1 must be an (m, d) matrix of m samples, got shape {tuple(z1.shape)}.")
    if z2 is not None and z2.shape != z1.shape:
        raise ValueError(f"z1 and z2 must have the same (m, d) shape, got {tuple(z1.shape)} and {tuple(z2.shape)}.")
    m, d = z1.shape
    if m < 2:
        raise ValueError(f"The coding length needs at least 2 samples (rows), got m={m}.")
    if d < 1:
        raise ValueError(f"The coding length needs at least 1 feature, got d={d}.")
    return m, d


def _power_traces(c: Tensor, order: int, symmetric: bool) -> list[Tensor]:
    """[tr(C), ..., tr(C^order)] for a (..., n, n) stack; order 4 costs one matmul (C2 = C @ C)."""
    ct = c if symmetric else c.mT
    traces = [torch.diagonal(c, dim1=-2, dim2=-1).sum(-1), (c * ct).sum((-2, -1))]
    if order == 2:
        return traces
    c2 = c @ c
    if order == 4:
        # tr(C^3) = <C2, C^T>, tr(C^4) = <C2, C2^T>: no second matmul needed.
        c2t = c2 if symmetric else c2.mT
        return traces + [(c2 * ct).sum((-2, -1)), (c2 * c2t).sum((-2, -1))]
    power = c2
    for _ in range(3, order + 1):
        power = power @ c
        traces.append(torch.diagonal(power, dim1=-2, dim2=-1).sum(-1))
    return traces


FORMS = ("auto", FORM_SAMPLES, FORM_FEATURES)


def _small_form(a: Tensor, b: Tensor, form: str = "auto") -> tuple[Tensor, str]:
    """Z1 Z2^T (m x m) or Z2^T Z1 (d x d), the smaller by default: tr of their powers agree."""
    m, d = a.shape[-2:]
    if form == FORM_SAMPLES or (form == "auto" and m <= d):
        return a @ b.mT, FORM_SAMPLES
    return b.mT @ a, FORM_FEATURES


def exact_coding_length(
    z1: Tensor, z2: Tensor | None = None, *, eps2: float | None = None, lam: float | None = None
) -> Tensor:
    """Exact coding length per sample, `mu * logdet(I + lambda Z1 Z2^T) / m`, in fp64 (the reference).

    Rows are L2-normalized; exactly one of `eps2` (lambda = d/(m eps2)) or `lam` is given. The log
    det is taken in the smaller form (Sylvester: det(I_m + A B^T) = det(I_d + B^T A)); for the
    teacher view a negative determinant (possible when lambda is large) gives log|det|.

    Example:
        >>> z = torch.randn(32, 8)
        >>> exact_coding_length(z, eps2=0.5).dtype
        torch.float64

    Raises:
        ValueError: bad shapes, or not exactly one of eps2 / lam.
    """
    m, d = check_views(z1, z2)
    if (eps2 is None) == (lam is None):
        raise ValueError("Give exactly one of eps2 (lambda = d/(m*eps2)) or lam.")
    lam_value = fixed_lambda(m, d, eps2) if eps2 is not None else lam
    with torch.autocast(z1.device.type, enabled=False):
        a = normalize_rows(z1.double())
        b = a if z2 is None else normalize_rows(z2.double())
        g, _ = _small_form(a, b)
        eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        logdet = torch.linalg.slogdet(eye + lam_value * g).logabsdet
    return (m + d) / 2 * logdet / m


def coding_length_loss(
    z1: Tensor,
    z2: Tensor | None = None,
    *,
    eps2: float | None = None,
    order: int | None = 4,
    target_radius: float | None = None,
    lam_scale: float = 1.0,
    normalize: bool = True,
    form: str = "auto",
) -> tuple[Tensor, TermStats]:
    """MEC's loss `-S / (m * lambda)` on two views (z2=None: the "self" view, z2 = z1).

    lambda is `d / (m * eps2)` (fixed) or, when `target_radius` is given, `adaptive_lambda` (eps2
    is then the fallback for all-zero batches); it is multiplied by `lam_scale` (MEC's warm-up).
    `order=None` uses the exact log det (fp64) in place of the series. `form` forces the
    "m x m" or "d x d" form (same result; "auto" picks the smaller). `normalize=False` skips the
    row normalization (for callers that scaled normalized rows themselves).

    Returns:
        (loss, stats): loss an fp32 scalar with grad; stats a `TermStats` of detached scalars:
        `coding_length` (mu*S/m), `spectral_bound` (||C||_F of the form computed, >= the spectral
        radius of C; the series converges when it is < 1), `lam`, and `form`, `order`.

    Example:
        >>> z = torch.randn(256, 64, requires_grad=True)
        >>> loss, stats = coding_length_loss(z, eps2=64.0)
        >>> loss.backward(); stats.form
        'd x d'

    Raises:
        ValueError: odd order (rewards collapse), m < 2, mismatched views, no lambda setting,
            unknown form.
    """
    check_order(order)
    m, d = check_views(z1, z2)
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}.")
    if eps2 is None and target_radius is None:
        raise ValueError("Give eps2 (fixed lambda = d/(m*eps2)) or target_radius (adaptive lambda).")
    with torch.autocast(z1.device.type, enabled=False):
        a = z1.float()
        b = None if z2 is None else z2.float()
        if normalize:
            a = normalize_rows(a)
            b = None if b is None else normalize_rows(b)
        loss, stats = grouped_coding_length_loss(
            a.unsqueeze(0), None if b is None else b.unsqueeze(0),
            eps2=eps2, order=order, target_radius=target_radius, lam_scale=lam_scale, form=form,
        )
    return loss[0], TermStats(
        coding_length=stats.coding_length[0], spectral_bound=stats.spectral_bound[0], lam=stats.lam[0],
        form=stats.form, order=stats.order,
    )


def grouped_coding_length_loss(
    a: Tensor,
    b: Tensor | None,
    *,
    eps2: float | None,
    order: int | None,
    target_radius: float | None,
    lam_scale: float = 1.0,
    form: str = "auto",
) -> tuple[Tensor, TermStats]:
    """`coding_length_loss` of K groups at once (batched matmuls): a, b are (K, m, d) views whose
    rows are already normalized (b=None: self view). Returns the (K,) losses and a TermStats of
    (K,) values; each group has its own lambda (from its own m, d, or its own spectral estimate)."""
    m, d = a.shape[-2:]
    symmetric = b is None
    g, form = _small_form(a, a if b is None else b, form)
    if target_radius is not None:
        fallback = fixed_lambda(m, d, eps2) if eps2 is not None else 1.0 / m
        if symmetric:  # iterate on the small Gram matrix already at hand: n^2 per step, not m*d
            lam = gram_adaptive_lambda(g, target_radius, ADAPTIVE_ITERS, fallback)
        else:  # sigma_max(Z1 Z2^T) differs from sigma_max(Z2^T Z1): iterate through Z1, Z2 themselves
            lam = batched_adaptive_lambda(a, b, target_radius, ADAPTIVE_ITERS, fallback)
    else:
        lam = torch.full((a.shape[0],), fixed_lambda(m, d, eps2), device=a.device)
    lam = lam * lam_scale
    c = lam[:, None, None] * g
    if order is None:
        eye = torch.eye(c.shape[-1], dtype=torch.float64, device=c.device)
        series = torch.linalg.slogdet(eye + c.double()).logabsdet.float()
        bound = torch.linalg.matrix_norm(c.detach())
    else:
        traces = _power_traces(c, order, symmetric)
        series = sum(((-1) ** k) * t / (k + 1) for k, t in enumerate(traces))
        # In the self view tr(C^2) = ||C||_F^2 already; otherwise one more reduction.
        bound = traces[1].detach().clamp_min(0).sqrt() if symmetric else torch.linalg.matrix_norm(c.detach())
    loss = -series / (m * lam)
    stats = TermStats(
        coding_length=((m + d) / 2 * series / m).detach(), spectral_bound=bound, lam=lam.detach(), form=form, order=order
    )
    return loss, stats
