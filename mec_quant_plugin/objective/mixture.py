"""The mixture-of-experts reformulation of the coding length.

The coding length is split among K experts whose costs add up (the mixture coding length of
Ma et al. 2007): each expert codes its own part of the data with its own lambda, so
- `routing="magnitude"`: samples are split into K quantile bins of their pre-normalization row
  norm, so the head and the long tail of a long-tailed distribution are coded separately; expert
  e holds m_e rows, lambda_e = d/(m_e eps2), and losses mix with weights m_e/m;
- `routing="gate"`: a learned softmax gate (an nn.Module mapping (m, d) -> (m, K) logits) sends
  each sample to its top expert, whose rows are scaled by sqrt(gate probability) so the gate gets
  gradients (Switch-Transformer style); a load-balancing term `K * sum_e f_e P_e - 1` is added;
- `routing="features"`: the d features are split into K contiguous groups (a block-diagonal
  covariance), each group re-normalized and coded with lambda_e = d_e/(m eps2), losses mixed with
  weights d_e/d. In the d x d form this costs K (d/K)^3 instead of d^3: the fast one for large d.
Every routing equals `coding_length_loss` at K = 1 (same arithmetic, not just the same value).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ..options import ROUTINGS, check_choice, check_order
from .coding_length import check_views, grouped_coding_length_loss
from .conditioning import normalize_rows
from .stats import TermStats


def _grouped(
    views: list[tuple[Tensor, Tensor | None]], kwargs: dict[str, Any], eps2s: list[float | None] | None = None
) -> tuple[Tensor, TermStats]:
    """Losses (K,) and stats of the experts' normalized views: one batched call when the experts
    have equal shapes (the common case: K divides m or d), else one call per expert. `eps2s`
    overrides eps2 per expert (the feature split scales it with the group size)."""
    eps2s = eps2s or [kwargs["eps2"]] * len(views)
    self_view = views[0][1] is None
    if len({tuple(a.shape) for a, _ in views}) == 1:
        a = torch.stack([a for a, _ in views])
        b = None if self_view else torch.stack([b for _, b in views])
        return grouped_coding_length_loss(a, b, **{**kwargs, "eps2": eps2s[0]})
    parts = [
        grouped_coding_length_loss(a[None], None if b is None else b[None], **{**kwargs, "eps2": eps2})
        for (a, b), eps2 in zip(views, eps2s, strict=True)
    ]
    first = parts[0][1]
    stats = TermStats(
        coding_length=torch.cat([s.coding_length for _, s in parts]),
        spectral_bound=torch.cat([s.spectral_bound for _, s in parts]),
        lam=torch.cat([s.lam for _, s in parts]),
        form=first.form,
        order=first.order,
    )
    return torch.cat([loss for loss, _ in parts]), stats


def _mix(losses: Tensor, stats: TermStats, weights: Tensor, cl_weights: Tensor) -> tuple[Tensor, TermStats]:
    """Weighted sum of expert losses and coding lengths; bound = max over experts."""
    mixed = TermStats(
        coding_length=(cl_weights * stats.coding_length).sum(),
        spectral_bound=stats.spectral_bound.max(),
        lam=stats.lam.mean(),
        form=stats.form,
        order=stats.order,
        expert_lambda=tuple(stats.lam.unbind()),
    )
    return (weights * losses).sum(), mixed


def mixture_coding_length_loss(
    z1: Tensor,
    z2: Tensor | None = None,
    *,
    eps2: float | None = None,
    order: int | None = 4,
    experts: int = 1,
    routing: str = "magnitude",
    gate: nn.Module | None = None,
    target_radius: float | None = None,
    lam_scale: float = 1.0,
    balance_weight: float = 0.01,
) -> tuple[Tensor, TermStats]:
    """MEC's loss split among `experts` experts (see the module docstring for the routings).

    Arguments are those of `coding_length_loss`, plus the number of experts K, the routing, the
    `gate` (required for routing="gate": a module mapping the detached (m, d) features to (m, K)
    logits) and the weight of the gate's load-balancing term. Magnitude and gate routing look at
    z1 (the teacher in the teacher view).

    Returns:
        (loss, stats) as `coding_length_loss`; stats also holds `expert_share` (per expert, the
        fraction of samples, or of features, it codes), `expert_lambda`, `routing` and, for the
        gate, `balance`.

    Example:
        >>> z = torch.randn(512, 4096)
        >>> loss, stats = mixture_coding_length_loss(z, eps2=128.0, experts=8, routing="features")

    Raises:
        ValueError: unknown routing, K < 1, too few rows/features for K experts, missing gate.
    """
    check_order(order)
    m, d = check_views(z1, z2)
    check_choice("routing", routing, ROUTINGS)
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
        raise ValueError(f"experts must be an int >= 1, got {experts!r}.")
    kwargs = dict(eps2=eps2, order=order, target_radius=target_radius, lam_scale=lam_scale)
    with torch.autocast(z1.device.type, enabled=False):
        a = z1.float()
        b = None if z2 is None else z2.float()
        if routing == "features":
            if d < experts:
                raise ValueError(f"routing='features' splits d={d} features among {experts} experts; needs d >= experts.")
            groups = torch.arange(d, device=z1.device).tensor_split(experts)
            sizes = [cols.numel() for cols in groups]
            eps2s = [None if eps2 is None else eps2 * size / d for size in sizes]
            # Each group is coded on its own sub-vectors, re-normalized, with the same eps^2 per dimension.
            if d % experts == 0:  # equal groups: one reshape, one batched call
                a_g = normalize_rows(a.reshape(m, experts, d // experts).transpose(0, 1).contiguous())
                b_g = None if b is None else normalize_rows(b.reshape(m, experts, d // experts).transpose(0, 1).contiguous())
                losses, stats = grouped_coding_length_loss(a_g, b_g, **{**kwargs, "eps2": eps2s[0]})
            else:
                views = [(normalize_rows(a[:, c]), None if b is None else normalize_rows(b[:, c])) for c in groups]
                losses, stats = _grouped(views, kwargs, eps2s)
            shares = [size / d for size in sizes]
            weights = torch.tensor(shares, device=losses.device)
            # The groups' coding lengths (mu_e S_e / m each) add up: weights 1.
            loss, stats = _mix(losses, stats, weights, torch.ones_like(weights))
        elif routing == "magnitude":
            if m < 2 * experts:
                raise ValueError(f"routing='magnitude' needs >= 2 rows per expert: m={m}, experts={experts}.")
            order_by_norm = a.detach().norm(dim=1).argsort()
            # Keep the original row order inside an expert: at K = 1 this is the plain term exactly.
            groups = [rows.sort().values for rows in order_by_norm.tensor_split(experts)]
            a, b = normalize_rows(a), None if b is None else normalize_rows(b)
            if m % experts == 0:  # equal shares: one gather, one batched call
                index = torch.stack(groups)
                losses, stats = grouped_coding_length_loss(a[index], None if b is None else b[index], **kwargs)
            else:
                views = [(a[rows], None if b is None else b[rows]) for rows in groups]
                losses, stats = _grouped(views, kwargs)
            shares = [rows.numel() / m for rows in groups]
            weights = torch.tensor(shares, device=losses.device)
            loss, stats = _mix(losses, stats, weights, weights)
        else:
            loss, stats, shares = _gate_routed(a, b, gate, experts, kwargs, balance_weight)
    return loss, dataclasses.replace(stats, expert_share=tuple(shares), routing=routing)


def _gate_routed(
    z1: Tensor, z2: Tensor | None, gate: nn.Module | None, experts: int, kwargs: dict[str, Any], balance_weight: float
) -> tuple[Tensor, TermStats, list[Tensor]]:
    if gate is None:
        raise ValueError("routing='gate' needs a gate: an nn.Module mapping (m, d) features to (m, experts) logits.")
    m = z1.shape[0]
    with torch.autocast(z1.device.type, enabled=False):
        # The gate routes; it must not reshape the features it routes, hence the detach.
        logits = gate(z1.detach().float()).float()
        if logits.shape != (m, experts):
            raise ValueError(f"gate output must be (m, experts) = {(m, experts)}, got {tuple(logits.shape)}.")
        probs = logits.softmax(dim=-1)
        top = probs.argmax(dim=-1)
        a = normalize_rows(z1.float())
        b = None if z2 is None else normalize_rows(z2.float())
        views, weights, counts = [], [], []
        for e in range(experts):
            rows = (top == e).nonzero().flatten()
            counts.append(rows.numel())
            if rows.numel() < 2:
                continue  # an expert with < 2 samples has no coding length; balancing moves it
            # Rows scaled by sqrt(p) after the normalization: C_e = lambda_e diag(sqrt p) Z1 Z2^T diag(sqrt p).
            scale = probs[rows, e].sqrt().unsqueeze(1)
            views.append((a[rows] * scale, None if b is None else b[rows] * scale))
            weights.append(rows.numel() / m)
        if not views:
            raise ValueError(f"routing='gate' sent every expert fewer than 2 of the m={m} samples.")
        losses, stats = _grouped(views, kwargs)
        w = torch.tensor(weights, device=losses.device)
        loss, stats = _mix(losses, stats, w, w)
        fraction = torch.tensor(counts, dtype=probs.dtype, device=probs.device) / m
        balance = experts * (fraction * probs.mean(dim=0)).sum() - 1.0
        loss = loss + balance_weight * balance
    return loss, dataclasses.replace(stats, balance=balance.detach()), [fraction[e] for e in range(experts)]
