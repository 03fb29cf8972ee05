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

from .modules.base import FakeQuantizedModule
from .quantizers import WeightFakeQuantizer

_INT_DTYPES = {b: getattr(torch, f"int{b}") for b in range(1, 8)} | {8: torch.int8}


def block_layout(weight: torch.Tensor, wfq: WeightFakeQuantizer) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """torchao `block_size` and scale shape for a weight quantized by `wfq`.

    Per channel: one block spans everything but the channel axis. Per group: blocks of
    `group_size` input channels (times the kernel for convolutions) along axis 1.
    """
    shape = list(weight.shape)
    axis = wfq.channel_axis
    if wfq.group_size is None:
        block = [1 if i == axis else n for i, n in enumerate(shape)]
    else:
        if axis != 0:
            raise ValueError("per-group export needs the output channel on axis 0 (not Conv1D).")
        block = [1, wfq.group_size, *shape[2:]]
    scale_shape = tuple(n // b for n, b in zip(shape, block))
    return tuple(block), scale_shape


@torch.no_grad()
def to_intx_weight(weight: torch.Tensor, wfq: WeightFakeQuantizer) -> IntxUnpackedToInt8Tensor:
    """The torchao tensor holding `wfq`'s integer codes and learned scales for `weight`.

    Built from the codes directly rather than through `from_hp`: re-quantizing with torchao's
    rounding would not reproduce the binary (float zero point) and ternary (narrow range) codes.
    """
    block, scale_shape = block_layout(weight, wfq)
    codes, scale, zero_point = wfq.quantized_codes(weight)
    qdata = wfq._ungrouped(codes, weight).to(torch.int8)
    dtype = torch.int1 if (wfq.bits == 1 and not wfq.ternary) else _INT_DTYPES[wfq.bits]
    return IntxUnpackedToInt8Tensor(
        qdata,
        scale.reshape(scale_shape).to(torch.float32),
        zero_point.reshape(scale_shape).to(torch.float32),
        dtype,
        block,
        weight.dtype,
        None,
    )


def convert_layer(module: FakeQuantizedModule) -> nn.Module:
    """Convert one fake-quantized layer.

    Without an activation quantizer the result is the plain float class (nn.Linear, nn.Conv2d,
    nn.Embedding) holding the torchao weight, exactly what torchao's own PTQ produces. With one,
    the fake-quantized class stays (weight quantizer removed) so the input keeps being quantized
    at inference with the learned step. Conv1D (GPT-2) keeps a dequantized float weight: torchao
    has no kernel for its transposed `addmm` layout.
    """
    wfq = module.weight_fake_quantizer
    if wfq is not None:
        if module.weight_channel_axis == 0:
            new_weight = to_intx_weight(module.weight, wfq)
        else:
            new_weight = wfq(module.weight.detach()).detach()
        module._parameters["weight"] = nn.Parameter(new_weight, requires_grad=False)
        module.register_module("weight_fake_quantizer", None)
    if module.activation_fake_quantizer is None:
        return module.to_float()
    return module
