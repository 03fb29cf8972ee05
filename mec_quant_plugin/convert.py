"""convert: fake-quantized layers -> torchao `IntxUnpackedToInt8Tensor` weights.

The converted weight stores the integer codes the layer trained with and its LEARNED scales (not
re-estimated ones), rounded to fp16: every export format (GGUF, ONNX MatMulNBits) stores fp16
steps, so the torchao artifact holds exactly the numbers an export writes (the weight moves by at
most 2^-11 of itself). Symmetric codes store an int8 zero point (always 0: one byte per block,
torchao requires the tensor); binary weights are torchao int1 codes q in {-1, 0} with scale
2*alpha and an fp16 zero point -0.5. A layer whose scales fp16 cannot hold (below its normal
range, on a group that has non-zero codes) keeps fp32 scales, with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import nn
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
    IntxUnpackedToInt8Tensor,
)

from .modules.base import LEVELS_ATTR, FakeQuantizedModule, nonfinite_parameters
from .quantized_embedding import can_gather, use_gathering_embeddings
from .quantizers import AffineWeight, WeightFakeQuantizer

# GGUF's block types (Q4_0, Q8_0, ...) hold one fp16 step per 32 consecutive weights of a row.
EXPORT_BLOCK = 32


def fp16_scale(scale: torch.Tensor, codes: torch.Tensor, block_size: tuple[int, ...]) -> torch.Tensor | None:
    """`scale` rounded to fp16 (as an fp16 tensor), or None when fp16 would change a weight by more
    than its rounding (2^-11 relative): a scale outside fp16's normal range on a block whose codes
    are not all zero."""
    half = scale.half()
    info = torch.finfo(torch.float16)
    fits = (half.float().abs() >= info.tiny) & torch.isfinite(half)
    if bool(fits.all()):
        return half
    nonzero = codes != 0
    for dim, size in enumerate(block_size):  # any non-zero code per block
        if size > 1:
            nonzero = nonzero.unflatten(dim, (-1, size)).any(dim + 1)
    return half if bool((fits | ~nonzero).all()) else None


@torch.no_grad()
def stored_affine(weight: torch.Tensor, wfq: WeightFakeQuantizer, name: str = "") -> AffineWeight:
    """`wfq.to_affine(weight)` in the form convert stores: the codes training used, the scales
    rounded to fp16 (fp16 tensor; fp32 with a warning where fp16 cannot hold them, see
    `fp16_scale`), the zero point int8 (symmetric codes: always 0) or fp16 (binary's -0.5).

    Example:
        >>> stored_affine(layer.weight, layer.weight_fake_quantizer).scale.dtype
        torch.float16
    """
    affine = wfq.to_affine(weight)
    scale = fp16_scale(affine.scale, affine.codes, affine.block_size)
    if scale is None:
        warnings.warn(
            f"{name or 'a layer'}: some weight scales are below fp16's normal range "
            f"({torch.finfo(torch.float16).tiny:.1e}); they are kept in fp32, so exports that store fp16 steps "
            "(GGUF, ONNX) will not reproduce this layer exactly.",
            stacklevel=4,
        )
        scale = affine.scale
    zero_point = affine.zero_point.to(scale.dtype if wfq.binary else torch.int8)
    return replace(affine, scale=scale, zero_point=zero_point)


def to_intx_weight(weight: torch.Tensor, wfq: WeightFakeQuantizer, name: str = "") -> IntxUnpackedToInt8Tensor:
    """The torchao tensor holding `wfq`'s integer codes and learned scales for `weight`, as
    `stored_affine` gives them.

    Built from `wfq.to_affine(weight)` directly rather than through `from_hp`: re-quantizing with
    torchao's rounding would not reproduce the binary (float zero point) and ternary (narrow
    range) codes.

    Example:
        >>> to_intx_weight(layer.weight, layer.weight_fake_quantizer).dequantize()
    """
    a = stored_affine(weight, wfq, name)
    return IntxUnpackedToInt8Tensor(a.codes, a.scale, a.zero_point, a.dtype, a.block_size, weight.dtype, None)


def inexact_export_reason(group_size: int | None) -> str | None:
    """Why per-group weights with `group_size` cannot be exported exactly, or None when they can.

    GGUF block types hold one fp16 step per 32 weights, so a group must be a multiple of 32;
    ONNX Runtime's MatMulNBits needs a power-of-two block of at least 16. Per-channel steps
    (None) export exactly to both wherever the row length fits the format.
    """
    if group_size is None:
        return None
    problems = []
    if group_size % EXPORT_BLOCK:
        problems.append(f"GGUF stores one step per {EXPORT_BLOCK} weights, so groups must be a multiple of {EXPORT_BLOCK}")
    if group_size < 16 or group_size & (group_size - 1):
        problems.append("ONNX MatMulNBits needs a power-of-two group of at least 16")
    if not problems:
        return None
    return (
        f"group_size={group_size} cannot be exported exactly: " + "; ".join(problems) + ". The torchao artifact is "
        "exact; an export would have to re-quantize these layers. Use group_size=32, 64 or 128, or per-channel steps."
    )


def convert_layer(module: FakeQuantizedModule) -> nn.Module:
    """Convert one fake-quantized layer.

    Without an activation quantizer the result is the plain float class (nn.Linear, nn.Conv2d,
    nn.Embedding, the latter with a forward that dequantizes only the looked-up rows, see
    `quantized_embedding`) holding the torchao weight, the layout torchao's own PTQ produces. With one,
    the fake-quantized class stays (weight quantizer removed) so the input keeps being quantized
    at inference with the learned step. Conv1D (GPT-2) keeps a dequantized float weight: torchao
    has no kernel for its transposed `addmm` layout.

    Raises:
        ValueError: a weight, bias or step size holds NaN/inf (it would be stored as garbage codes).
    """
    bad = nonfinite_parameters(module)
    if bad:
        raise ValueError(nonfinite_message(bad))
    wfq = module.weight_fake_quantizer
    if wfq is not None:
        name = f"{type(module).__name__}{tuple(module.weight.shape)}"
        if module.weight_channel_axis == 0:
            new_weight = to_intx_weight(module.weight, wfq, name)
        else:  # the same numbers, as a float tensor
            new_weight = stored_affine(module.weight, wfq, name).dequantize().to(module.weight.dtype)
            module.__dict__[LEVELS_ATTR] = "ternary" if wfq.ternary else str(wfq.bits)  # for the report
        module._parameters["weight"] = nn.Parameter(new_weight, requires_grad=False)
        module.register_module("weight_fake_quantizer", None)
    if module.activation_fake_quantizer is None:
        module = module.to_float()
        if can_gather(module):
            use_gathering_embeddings(module)  # dequantize only the looked-up rows
    return module


def nonfinite_message(names: list[str]) -> str:
    """The error for NaN/inf parameters found at convert (names shown, at most 6)."""
    shown = ", ".join(names[:6]) + (f", ... (+{len(names) - 6})" if len(names) > 6 else "")
    return (
        f"Cannot convert: {len(names)} non-finite (NaN/inf) parameter(s): {shown}. They would be stored as "
        "meaningless int codes or scales. Training diverged: convert an earlier checkpoint, or train again with "
        "a lower learning rate (MECQuantConfig(on_nonfinite='stop') stops the Trainer at the first such step)."
    )
