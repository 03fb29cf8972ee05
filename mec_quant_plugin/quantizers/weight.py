"""`WeightFakeQuantizer`: symmetric per-channel / per-group LSQ for weights, and its affine export."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..options import check_bits
from .autograd import BinaryFakeQuantize, LSQFakeQuantize
from .numerics import KeepsFloat32, check_finite, mse_step_search, positive_step, run_in_fp32


@dataclass(frozen=True)
class AffineWeight:
    """A quantized weight in torchao's affine form: `w = (codes - zero_point) * scale`, per block.

    Attributes:
        codes: int8 integer codes, the weight's shape.
        scale: float32 step of each block, shape `weight.shape[i] // block_size[i]` per axis.
        zero_point: float32 zero point of each block, the shape of `scale` (0, or -0.5 for binary).
        block_size: torchao's block size: everything but the channel axis (per channel), or
            `group_size` input channels times the kernel (per group).
        dtype: the codes' integer range as a torch dtype (torch.int1 .. torch.int8), torchao's
            `target_dtype`; ternary codes {-1, 0, 1} are torch.int2.
        group_size: input channels per group, None for per-channel steps.

    Example:
        >>> affine = WeightFakeQuantizer(w, bits=2).to_affine(w)
        >>> torch.equal(affine.dequantize(), WeightFakeQuantizer(w, bits=2)(w))
        True
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    block_size: tuple[int, ...]
    dtype: torch.dtype
    group_size: int | None

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the codes stand for (equal to the fake-quantized weight)."""
        scale, zero_point = self.scale, self.zero_point
        for dim, size in enumerate(self.block_size):
            if size > 1:
                scale = scale.repeat_interleave(size, dim)
                zero_point = zero_point.repeat_interleave(size, dim)
        return (self.codes.float() - zero_point) * scale


def _int_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits == 8 else getattr(torch, f"int{bits}")


class WeightFakeQuantizer(KeepsFloat32):
    """Symmetric per-output-channel (or per-group) LSQ fake quantizer for a weight tensor.

    Levels: bits=1 -> {-alpha, +alpha}; ternary -> {-1, 0, 1} * s; bits=b >= 2 -> integers in
    [-2^(b-1), 2^(b-1) - 1] times s. `channel_axis` is the output-channel axis of the weight
    (0 for Linear/Conv2d/Embedding rows, 1 for GPT-2's Conv1D).

    Example:
        >>> wq = WeightFakeQuantizer(torch.randn(8, 16), bits=2)
        >>> wq(torch.randn(8, 16)).shape
        torch.Size([8, 16])

    Raises:
        ValueError: bits outside 1..8, a group size that does not divide the input dimension,
            or NaN/inf weights.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bits: int,
        *,
        channel_axis: int = 0,
        group_size: int | None = None,
        ternary: bool = False,
    ) -> None:
        super().__init__()
        check_bits("weight bits", bits)
        self.bits = bits
        self.ternary = ternary
        self.channel_axis = channel_axis
        self.group_size = group_size
        if ternary:
            self.qmin, self.qmax = -1, 1
        elif bits == 1:
            self.qmin, self.qmax = -1, 0  # binary: stored as q in {-1, 0}, scale 2*alpha, zp -0.5
        else:
            self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        check_finite(weight, "weight")
        w = self._grouped(weight.detach().float())
        self.scale = nn.Parameter(self._init_scale(w))
        per_scale = w[0].numel() if group_size is None else group_size
        qp = 1 if bits == 1 else max(self.qmax, 1)
        self.grad_scale = 1.0 / math.sqrt(per_scale * qp)

    @property
    def binary(self) -> bool:
        """True for 1-bit sign(w) * alpha weights (not ternary)."""
        return self.bits == 1 and not self.ternary

    # ---- layout ----------------------------------------------------------------------------
    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        """View the weight as (channels, groups, group_size) or (channels, rest)."""
        w = w.movedim(self.channel_axis, 0)
        if self.group_size is None:
            return w.reshape(w.shape[0], -1)
        if w.shape[1] % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} does not divide the weight's input dimension "
                f"{w.shape[1]} (weight shape {tuple(w.movedim(0, self.channel_axis).shape)}); "
                "use a divisor of it or weight_granularity='per_channel'."
            )
        return w.reshape(w.shape[0], w.shape[1] // self.group_size, -1, *w.shape[2:]).reshape(
            w.shape[0], w.shape[1] // self.group_size, -1
        )

    def _ungrouped(self, w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        moved = like.movedim(self.channel_axis, 0)
        return w.reshape(moved.shape).movedim(0, self.channel_axis)

    @torch.no_grad()
    def _init_scale(self, w: torch.Tensor) -> torch.Tensor:
        """Per-channel (group) step minimizing the quantization MSE over a grid of clip ratios.

        LSQ's 2*mean|w|/sqrt(Qp) is a rough start at 2 bits; a 40-point search over
        s = r * max|w| / Qp (`mse_step_search`, all channels and ratios batched) starts QAT closer.
        """
        if self.binary:
            return w.abs().mean(dim=-1, keepdim=True).clamp_min(1e-8)  # alpha = mean|w|
        # The layout is (channels, rest) or (channels, groups, group_size): one search per last-axis row.
        return mse_step_search(w, self.qmin, self.qmax)

    @run_in_fp32
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantized weight, same shape and dtype as `weight`."""
        w = self._grouped(weight)
        if self.binary:
            wq = BinaryFakeQuantize.apply(w, positive_step(self.scale), self.grad_scale)
        else:
            wq = LSQFakeQuantize.apply(
                w, positive_step(self.scale), None, float(self.qmin), float(self.qmax), self.grad_scale
            )
        return self._ungrouped(wq, weight)

    @torch.no_grad()
    def to_affine(self, weight: torch.Tensor) -> AffineWeight:
        """`weight` as integer codes plus the LEARNED scales and zero points, in torchao's layout.

        `to_affine(w).dequantize()` equals `self(w)`; `convert` builds torchao's
        `IntxUnpackedToInt8Tensor` from it. Binary weights are q in {-1, 0} with scale 2*alpha
        and zero point -0.5, which torchao's int1 dtype represents exactly.

        Example:
            >>> affine = layer.weight_fake_quantizer.to_affine(layer.weight)
            >>> affine.codes.dtype, affine.block_size
            (torch.int8, (1, 16))

        Raises:
            ValueError: a weight whose input dimension the group size does not divide.
        """
        w = self._grouped(weight.detach().float())
        s = positive_step(self.scale.detach().float())
        if self.binary:
            q = torch.where(w >= 0, 0.0, -1.0)
            scale, zero_point = 2 * s, torch.full_like(s, -0.5)
        else:
            q = torch.clamp(torch.round(w / s), self.qmin, self.qmax)
            scale, zero_point = s, torch.zeros_like(s)
        # The block layout in the channel-first view, then moved back to the weight's own axes.
        moved = weight.movedim(self.channel_axis, 0).shape
        block = [1, *moved[1:]] if self.group_size is None else [1, self.group_size, *moved[2:]]
        scale_shape = tuple(n // b for n, b in zip(moved, block))
        block.insert(self.channel_axis, block.pop(0))
        return AffineWeight(
            codes=self._ungrouped(q, weight).to(torch.int8),
            scale=scale.reshape(scale_shape).movedim(0, self.channel_axis).contiguous(),
            zero_point=zero_point.reshape(scale_shape).movedim(0, self.channel_axis).contiguous(),
            block_size=tuple(block),
            dtype=torch.int1 if self.binary else _int_dtype(self.bits),
            group_size=self.group_size,
        )

    def extra_repr(self) -> str:
        kind = "ternary" if self.ternary else ("binary" if self.bits == 1 else f"int{self.bits}")
        gran = f"group_size={self.group_size}" if self.group_size else "per_channel"
        return f"{kind}, {gran}, levels=[{self.qmin}, {self.qmax}]"
