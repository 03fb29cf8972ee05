"""The integer codes and fp16 steps of every quantized weight, as export formats need them.

Each exporter writes `w = k * step` per block: `k` integers, `step` one value per group of input
channels. `LayerCodes` is that form, read from a converted model (torchao
`IntxUnpackedToInt8Tensor` weights: `w = (qdata - zero_point) * scale`) or from a model still
fake-quantized (`WeightFakeQuantizer.to_affine`). Binary weights (codes {-1, 0}, zero point -0.5,
scale 2*alpha) become k in {-1, +1} with step alpha. Steps are rounded to fp16, the precision every
target format stores them in: the exported weight is exactly `codes x fp16(scale)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..modules.base import FakeQuantizedModule


@dataclass(frozen=True)
class LayerCodes:
    """A quantized 2-D weight as `k * step`, the form block formats store.

    Attributes:
        name: the weight's name in the model (`model.layers.0.mlp.up_proj.weight`).
        codes: int16 integers k, shape (rows, cols) (output channels, input channels).
        step: float32 values exactly representable in fp16, shape (rows, groups); each covers
            `cols // groups` consecutive inputs of its row.
        bits: the bit-width the layer was trained at (1 = binary; ternary layers report 2).
        source_exact: False when a step could not be represented in fp16 (underflow / overflow):
            the codes x fp16(step) then differ from the torch model.

    Example:
        >>> codes = quantized_weights(model)["model.layers.0.mlp.up_proj.weight"]
        >>> codes.dequantize().shape
        torch.Size([64, 32])
    """

    name: str
    codes: torch.Tensor
    step: torch.Tensor
    bits: int
    source_exact: bool = True

    @property
    def group_size(self) -> int:
        """Consecutive input channels sharing one step (the row length for per-channel steps)."""
        return self.codes.shape[1] // self.step.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight `k * step` (what an exact export must decode to)."""
        return self.codes.float() * self.step.repeat_interleave(self.group_size, dim=1)

    def permute_rows(self, order: torch.Tensor) -> LayerCodes:
        """The same weight with its output rows reordered (e.g. llama.cpp's rotary layout)."""
        return LayerCodes(self.name, self.codes[order], self.step[order], self.bits, self.source_exact)


def codes_from_affine(
    name: str,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    block_size: tuple[int, ...],
    bits: int,
) -> LayerCodes:
    """`LayerCodes` of one weight in torchao's affine form `(qdata - zero_point) * scale`.

    Raises:
        ValueError: a weight that is not 2-D, a block that spans several output rows, or a zero
            point that is not an integer or half-integer (asymmetric codes: no symmetric block type
            stores them).
    """
    if qdata.dim() != 2:
        raise ValueError(
            f"{name}: only 2-D weights (Linear, Embedding) can be exported, got shape {tuple(qdata.shape)}."
        )
    rows, cols = qdata.shape
    if block_size[0] != 1 or cols % block_size[1]:
        raise ValueError(f"{name}: block size {tuple(block_size)} does not give one step per row group.")
    groups = cols // block_size[1]
    scale = scale.detach().float().reshape(rows, groups)
    zp = torch.zeros_like(scale) if zero_point is None else zero_point.detach().float().reshape(rows, groups)
    twice = 2 * zp
    if not torch.equal(twice, twice.round()):
        raise ValueError(
            f"{name}: zero points {zp.unique()[:4].tolist()} are not integers or halves (asymmetric codes)."
        )
    half = bool((twice.remainder(2) != 0).any())  # binary: zero point -0.5
    scale16 = scale.half().float()
    source_exact = bool(torch.isfinite(scale16).all() and (scale16 != 0).eq(scale != 0).all())
    zp_full = zp.repeat_interleave(block_size[1], dim=1)
    if half:
        # (q - zp) * s == (2q - 2zp) * (s / 2): s / 2 is exact in fp16 unless it underflows.
        codes = 2 * qdata.to(torch.int16) - (2 * zp_full).to(torch.int16)
        step = scale16 / 2
        source_exact = source_exact and torch.equal(step.half().float(), step)
    else:
        codes = qdata.to(torch.int16) - zp_full.to(torch.int16)
        step = scale16
    return LayerCodes(name, codes, step, bits, source_exact)


def _bits_of(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.int8 else int(str(dtype).removeprefix("torch.int"))


def quantized_weights(model: nn.Module, *, skip_non_2d: bool = False) -> dict[str, LayerCodes]:
    """Every quantized weight of `model` as `LayerCodes`, keyed by parameter name.

    Reads converted layers (torchao `IntxUnpackedToInt8Tensor` weights) and layers still
    fake-quantized (their weight quantizer's `to_affine`). A weight shared by several layers
    (tied embeddings / lm_head) appears once, under its first name. With `skip_non_2d`, weights
    that are not 2-D (convolutions) are left out instead of raising.

    Example:
        >>> sorted(quantized_weights(convert_model(model)))[:1]
        ['lm_head.weight']
    """
    found: dict[str, LayerCodes] = {}
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        weight = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
        if weight is None or id(weight) in seen or (skip_non_2d and weight.dim() != 2):
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        wfq = getattr(mod, "weight_fake_quantizer", None) if isinstance(mod, FakeQuantizedModule) else None
        if wfq is not None:
            if mod.weight_channel_axis != 0:
                continue  # Conv1D (GPT-2): transposed layout, not an export target
            a = wfq.to_affine(weight)
            found[name] = codes_from_affine(name, a.codes, a.scale, a.zero_point, a.block_size, _bits_of(a.dtype))
        elif all(hasattr(weight, attr) for attr in ("qdata", "scale", "zero_point", "block_size", "target_dtype")):
            found[name] = codes_from_affine(
                name,
                weight.qdata,
                weight.scale,
                weight.zero_point,
                tuple(weight.block_size),
                _bits_of(weight.target_dtype),
            )
        else:
            continue
        seen.add(id(weight))
    return found
