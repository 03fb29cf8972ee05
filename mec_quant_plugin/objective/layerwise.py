"""Per-layer coding length: the entropy of what each quantized layer computes on.

The head-feature term (`MECRegularizer`, `mec_taps="head"`) sees one pooled vector per image at
the end of the network. The entropy methods that helped low-bit networks act per layer (on the
activations entering each quantizer, or on each layer's weights), so this module measures the
coding length there:

- `"activations"`: the QUANTIZED input of every inner fake-quantized layer (the output of its
  activation quantizer: what the layer really multiplies), with spatial positions (or tokens) as
  rows and channels as features, sub-sampled to `max_rows` rows per layer; rows are centered
  (optionally standardized) per channel, then L2-normalized. The gradient reaches the float input
  through the quantizer's straight-through estimator and the step size through LSQ's gradient.
- `"weights"`: the fake-quantized weight of every inner layer, one row per output filter.

`experts > 1` splits the rows by magnitude quantiles (the mixture coding length: the near-zero
majority and the long tail of large rows are coded apart, each with its own lambda), as in
`mixture_coding_length_loss`. The log det is exact (fp64) by default: d <= a few hundred here.

Layers kept at 8 bits (the stem and the classifier under `edge_layers="8bit"`) are skipped: the
term acts where the quantization is coarse. The loss is the MEAN over layers, so its weight does
not grow with depth.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..options import LAYER_TARGETS
from .capture import subsample_rows, to_rows
from .conditioning import center_features
from .mixture import mixture_coding_length_loss


def low_bit_layers(model: nn.Module, max_bits: int = 7) -> list[tuple[str, nn.Module]]:
    """The fake-quantized layers whose weights or activations use at most `max_bits` bits."""
    from ..modules.registry import is_fake_quantized

    out = []
    for name, mod in model.named_modules():
        if not is_fake_quantized(mod):
            continue
        bits = [q.bits for q in (mod.weight_fake_quantizer, mod.activation_fake_quantizer) if q is not None]
        if bits and min(bits) <= max_bits:
            out.append((name, mod))
    return out


class LayerwiseCodingLength(nn.Module):
    """Mean coding-length loss over the low-bit layers of a prepared model (see module docstring).

    Args:
        model: a model after `prepare_model`.
        target: "activations" or "weights".
        experts: mixture experts (rows routed by magnitude); 1 = plain term.
        eps2_per_dim: distortion eps^2/d (MEC's default 1/32).
        order: None (exact log det) or an even Taylor order.
        max_rows: rows sampled per layer and step (activations).
        standardize: divide each channel by its batch std after centering (MEC's BN projector).

    Call it after the model's training forward; `last_stats` holds the mean coding length per
    sample and the number of layers. Remove the hooks with `remove()`.

    Example:
        >>> term = LayerwiseCodingLength(prepare_model(cnn, MECQuantConfig()), "activations")
        >>> loss = task_loss(cnn(x)) + 0.1 * term()

    Raises:
        ValueError: unknown target, or no low-bit layer in the model.
    """

    def __init__(
        self,
        model: nn.Module,
        target: str = "activations",
        *,
        experts: int = 1,
        eps2_per_dim: float = 1 / 32,
        order: int | None = None,
        max_rows: int = 1024,
        standardize: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if target not in LAYER_TARGETS:
            raise ValueError(f"target must be one of {list(LAYER_TARGETS)}, got {target!r}.")
        self.target, self.experts, self.eps2_per_dim, self.order = target, experts, eps2_per_dim, order
        self.max_rows, self.standardize, self.seed, self.step = max_rows, standardize, seed, 0
        self.layers = [(n, m) for n, m in low_bit_layers(model)
                       if target == "weights" and m.weight_fake_quantizer is not None
                       or target == "activations" and m.activation_fake_quantizer is not None]
        if not self.layers:
            raise ValueError(f"No low-bit fake-quantized layer with quantized {target} found: call prepare_model first.")
        self._captured: dict[str, Tensor] = {}
        self._handles = []
        if target == "activations":
            for name, mod in self.layers:
                self._handles.append(mod.activation_fake_quantizer.register_forward_hook(self._hook(name)))
        self._stats: dict[str, float] = {}

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if module.training and torch.is_grad_enabled():
                self._captured[name] = output
        return hook

    def set_step(self, step: int) -> None:
        """Seed of this step's row sub-sampling (same step, same rows: resumable, reproducible)."""
        self.step = step

    @property
    def last_stats(self) -> dict[str, float]:
        return dict(self._stats)

    def _rows(self) -> list[Tensor]:
        if self.target == "weights":
            return [mod.quantized_weight().flatten(1) for _, mod in self.layers]
        rows = []
        for i, (name, _) in enumerate(self.layers):
            x = self._captured.pop(name, None)
            if x is not None:
                rows.append(subsample_rows(to_rows(x, positions=True), self.max_rows, seed=self.seed + 7919 * self.step + i))
        self._captured.clear()
        return rows

    def forward(self) -> Tensor:
        losses, lengths = [], []
        for z in self._rows():
            z = center_features(z.float(), standardize=self.standardize)
            m, d = z.shape
            if m < 2 * self.experts:
                continue
            loss, stats = mixture_coding_length_loss(
                z, eps2=self.eps2_per_dim * d, order=self.order, experts=self.experts, routing="magnitude")
            losses.append(loss)
            lengths.append(stats.coding_length.detach())
        if not losses:
            self._stats = {}
            return torch.zeros(())
        self._stats = {"coding_length": float(torch.stack(lengths).mean()), "layers": float(len(losses))}
        return torch.stack(losses).mean()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
