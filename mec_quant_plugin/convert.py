"""convert: fake-quantized layers -> torchao `IntxUnpackedToInt8Tensor` weights.

The converted weight stores the integer codes and the LEARNED scales (not re-estimated ones), so
the converted layer computes what the fake-quantized layer computed. Binary weights are stored
exactly as torchao int1 codes q in {-1, 0} with scale 2*alpha and zero point -0.5.
"""

from __future__ import annotations

import torch
from torch import nn
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
    IntxUnpackedToInt8Tensor,
)

from .modules.base import LEVELS_ATTR, FakeQuantizedModule, nonfinite_parameters
from .quantizers import WeightFakeQuantizer


@torch.no_grad()
def to_intx_weight(weight: torch.Tensor, wfq: WeightFakeQuantizer) -> IntxUnpackedToInt8Tensor:
    """The torchao tensor holding `wfq`'s integer codes and learned scales for `weight`.

    Built from `wfq.to_affine(weight)` directly rather than through `from_hp`: re-quantizing with
    torchao's rounding would not reproduce the binary (float zero point) and ternary (narrow
    range) codes.

    Example:
        >>> to_intx_weight(layer.weight, layer.weight_fake_quantizer).dequantize()
    """
    affine = wfq.to_affine(weight)
    return IntxUnpackedToInt8Tensor(
        affine.codes, affine.scale, affine.zero_point, affine.dtype, affine.block_size, weight.dtype, None
    )


def convert_layer(module: FakeQuantizedModule) -> nn.Module:
    """Convert one fake-quantized layer.

    Without an activation quantizer the result is the plain float class (nn.Linear, nn.Conv2d,
    nn.Embedding) holding the torchao weight, exactly what torchao's own PTQ produces. With one,
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
        if module.weight_channel_axis == 0:
            new_weight = to_intx_weight(module.weight, wfq)
        else:
            new_weight = wfq(module.weight.detach()).detach()
            module.__dict__[LEVELS_ATTR] = "ternary" if wfq.ternary else str(wfq.bits)  # for the report
        module._parameters["weight"] = nn.Parameter(new_weight, requires_grad=False)
        module.register_module("weight_fake_quantizer", None)
    if module.activation_fake_quantizer is None:
        return module.to_float()
    return module


def nonfinite_message(names: list[str]) -> str:
    """The error for NaN/inf parameters found at convert (names shown, at most 6)."""
    shown = ", ".join(names[:6]) + (f", ... (+{len(names) - 6})" if len(names) > 6 else "")
    return (
        f"Cannot convert: {len(names)} non-finite (NaN/inf) parameter(s): {shown}. They would be stored as "
        "meaningless int codes or scales. Training diverged: convert an earlier checkpoint, or train again with "
        "a lower learning rate (MECQuantConfig(on_nonfinite='stop') stops the Trainer at the first such step)."
    )
