"""Typed results of the coding-length objective, and their log keys (written once, here).

`TermStats` is what `coding_length_loss` / `mixture_coding_length_loss` return beside the loss;
`MECStats` is what `MECRegularizer` keeps of its last call (one `TapStats` per tap of the head
term, `LayerwiseStats` and the label / distillation losses for the other terms). `to_dict`
flattens them to the keys a logger receives (the Trainer callback logs them under `mec/`), so
every statistic reaches the logs without a list of names to keep in sync elsewhere.

Tensors stay tensors (detached, on the features' device) until `to_dict`, which converts them
all with one device synchronization.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


def _floats(values: dict[str, Tensor | float | int]) -> dict[str, float]:
    """The values as Python floats, tensors read with a single device synchronization."""
    tensors = [(k, v) for k, v in values.items() if isinstance(v, Tensor)]
    out = {k: float(v) for k, v in values.items() if not isinstance(v, Tensor)}
    if tensors:
        stacked = torch.stack([v.detach().float().reshape(()).to(tensors[0][1].device) for _, v in tensors])
        out.update(zip((k for k, _ in tensors), stacked.tolist()))
    return {k: out[k] for k in values}  # the caller's order


@dataclass(frozen=True)
class TermStats:
    """Detached diagnostics of one coding-length term.

    Attributes:
        coding_length: mu * S / m, the coding length per sample (mixtures: summed over experts
            as the mixture coding length adds up).
        spectral_bound: ||C||_F >= the spectral radius of C (max over experts); the Taylor series
            converges when it is < 1.
        lam: lambda (mean over experts).
        form: "m x m" or "d x d", the matrix the series was computed on.
        order: the Taylor order, None for the exact log det.
        expert_share: per expert, the fraction of samples (or of features) it codes.
        expert_lambda: per expert, its lambda.
        balance: the gate's load-balancing term (routing="gate"), else None.
        routing: the mixture routing, None for the plain term.

    Inside `grouped_coding_length_loss` the numeric fields hold one value per group, shape (K,).

    Example:
        >>> _, stats = coding_length_loss(torch.randn(64, 8), eps2=8.0)
        >>> stats.form, sorted(stats.to_dict())
        ('d x d', ['coding_length', 'lambda', 'spectral_bound'])
    """

    coding_length: Tensor
    spectral_bound: Tensor
    lam: Tensor
    form: str
    order: int | None
    expert_share: tuple[Tensor | float, ...] = ()
    expert_lambda: tuple[Tensor, ...] = ()
    balance: Tensor | None = None
    routing: str | None = None

    def to_dict(self) -> dict[str, Tensor | float]:
        """The numeric statistics by log key: `coding_length`, `spectral_bound`, `lambda`, and
        for mixtures `expert_share/e`, `expert_lambda/e`, `balance` (values not converted)."""
        out: dict[str, Tensor | float] = {
            "coding_length": self.coding_length,
            "spectral_bound": self.spectral_bound,
            "lambda": self.lam,
        }
        for e, share in enumerate(self.expert_share):
            out[f"expert_share/{e}"] = share
        for e, lam in enumerate(self.expert_lambda):
            out[f"expert_lambda/{e}"] = lam
        if self.balance is not None:
            out["balance"] = self.balance
        return out

    def __getitem__(self, key: str) -> Any:
        # Transitional: code written against the former dict (stats["coding_length"]) keeps
        # working while it moves to attributes. Remove once no caller indexes TermStats.
        warnings.warn(
            f"TermStats[{key!r}] is deprecated; use the attribute (e.g. stats.coding_length, stats.lam) "
            "or stats.to_dict().",
            DeprecationWarning,
            stacklevel=2,
        )
        if key in ("form", "order", "routing"):
            return getattr(self, key)
        return self.to_dict()[key]


@dataclass(frozen=True)
class TapStats:
    """One tap's part of the regularizer: its unweighted loss, its rows, its term statistics."""

    loss: Tensor
    rows: int
    term: TermStats


@dataclass(frozen=True)
class LayerwiseStats:
    """The per-layer coding length's part (`mec_layer_weight`): its unweighted loss (the mean over
    layers), the mean coding length per sample, the number of layers coded."""

    loss: Tensor
    coding_length: float
    layers: int


@dataclass(frozen=True)
class MECStats:
    """What `MECRegularizer` computed in its last call, one part per enabled term.

    Attributes:
        loss: the head term (`mec_weight`) unweighted, the mean of the taps' losses (detached);
            None when that term is off or was skipped this step.
        lambda_scale: the factor of MEC's lambda warm-up at this step.
        taps: per tap name, its `TapStats` (taps skipped for too few rows are absent).
        teacher_ms / teacher_param_mb: cost of the teacher's forward, None when none ran.
        layerwise: the per-layer term (`mec_layer_weight`), None when off.
        label_loss: the label-aware rate reduction loss `-(R(Z) - sum_j m_j/m R(Z_j)) / d`
            (`mec_label_weight`), None when off.
        mi_loss: the mutual-information loss `-I(Zq; Zfp) / d` averaged over blocks
            (`mec_mi_weight`), None when off.
        distill_loss: the logit distillation loss (`distill_weight`), None when off.
        total: what the regularizer returned (detached): the sum over terms of
            `weight * (loss - lower bound)`.
        weights / lower_bounds: each term's weight and the constant lower bound subtracted from
            its loss, by log key (`loss`, `layer/loss`, `label/loss`, `mi/loss`, `distill/loss`); a key
            absent means weight 1, bound 0.

    The losses above are unweighted, as the term functions return them; `to_dict` logs each
    as what it adds to the training loss.

    Example:
        >>> reg = MECRegularizer(model, config); _ = model(x); loss = reg()
        >>> reg.stats.loss, reg.stats.to_dict()["coding_length"]

    """

    loss: Tensor | None
    lambda_scale: float
    taps: dict[str, TapStats] = field(default_factory=dict)
    teacher_ms: float | None = None
    teacher_param_mb: float | None = None
    layerwise: LayerwiseStats | None = None
    label_loss: Tensor | None = None
    mi_loss: Tensor | None = None
    distill_loss: Tensor | None = None
    total: Tensor | None = None
    weights: Mapping[str, float] = field(default_factory=dict)
    lower_bounds: Mapping[str, float] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows coded this step on this rank by the head term, over all taps (before any gather)."""
        return sum(tap.rows for tap in self.taps.values())

    @property
    def coding_length(self) -> Tensor:
        """Mean coding length per sample over the taps of the head term."""
        return torch.stack([tap.term.coding_length for tap in self.taps.values()]).mean()

    @property
    def lam(self) -> Tensor:
        """Mean lambda over the taps of the head term."""
        return torch.stack([tap.term.lam for tap in self.taps.values()]).mean()

    @property
    def spectral_bound(self) -> Tensor:
        """Largest spectral bound over the taps (the one that decides convergence)."""
        return torch.stack([tap.term.spectral_bound for tap in self.taps.values()]).max()

    def _added(self, key: str, loss: Tensor) -> Tensor:
        """What the term logged as `key` adds to the training loss: weight x (loss - lower bound)."""
        return self.weights.get(key, 1.0) * (loss - self.lower_bounds.get(key, 0.0))

    def to_dict(self) -> dict[str, float]:
        """Every statistic as a float by log key.

        Every `loss` key (`loss`, `<tap>/loss`, `layer/loss`, `label/loss`, `mi/loss`, `distill/loss`) is
        what that term adds to the training loss, `weight * (loss - lower bound)` (>= 0), so
        they add up to `total` and a loss curve reads as the training loss's parts.

        Head term (when computed): `loss`, `coding_length`, `spectral_bound`, `lambda`, `rows`, and
        each tap's mixture statistics (`expert_share/e`, `expert_lambda/e`, `balance`); with more
        than one tap, each tap's `loss`, `coding_length`, `spectral_bound`, `lambda` and mixture
        statistics also appear under `<tap name>/`. Always `lambda_scale` and `total`; the
        teacher's `teacher_ms` / `teacher_param_mb` when it ran; `layer/loss`,
        `layer/coding_length`, `layer/layers`, `label/loss`, `mi/loss`, `distill/loss` for the terms that are on.
        """
        out: dict[str, Tensor | float] = {}
        if self.loss is not None and self.taps:
            out.update({
                "loss": self._added("loss", self.loss),
                "coding_length": self.coding_length,
                "spectral_bound": self.spectral_bound,
                "lambda": self.lam,
            })
        out["lambda_scale"] = self.lambda_scale
        if self.taps:
            out["rows"] = self.rows
        if self.teacher_ms is not None:
            out["teacher_ms"] = self.teacher_ms
        if self.teacher_param_mb is not None:
            out["teacher_param_mb"] = self.teacher_param_mb
        several = len(self.taps) > 1
        for name, tap in self.taps.items():
            prefix = f"{name}/" if several else ""
            for key, value in tap.term.to_dict().items():
                if several or key.startswith(("expert_", "balance")):
                    out[prefix + key] = value
            if several:
                out[prefix + "loss"] = self._added("loss", tap.loss)
        if self.layerwise is not None:
            out["layer/loss"] = self._added("layer/loss", self.layerwise.loss)
            out["layer/coding_length"] = self.layerwise.coding_length
            out["layer/layers"] = self.layerwise.layers
        if self.label_loss is not None:
            out["label/loss"] = self._added("label/loss", self.label_loss)
        if self.mi_loss is not None:
            out["mi/loss"] = self._added("mi/loss", self.mi_loss)
        if self.distill_loss is not None:
            out["distill/loss"] = self._added("distill/loss", self.distill_loss)
        if self.total is not None:
            out["total"] = self.total
        return _floats(out)
