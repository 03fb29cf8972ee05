"""Fake-quantized nn.Conv2d (any stride, padding, padding_mode, dilation and groups)."""

import torch
from torch import nn

from .base import FakeQuantizedModule
from .recompute import call_with_recomputed_operands
from .registry import register_fake_quantized


@register_fake_quantized(nn.Conv2d)
class FakeQuantizedConv2d(FakeQuantizedModule, nn.Conv2d):
    """nn.Conv2d with LSQ fake-quantized weight (per output channel) and input.

    nn.Conv2d's own `_conv_forward` applies stride, padding (incl. non-zero padding modes),
    dilation and groups, so depthwise and grouped convolutions behave exactly as the float layer.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return call_with_recomputed_operands(
            self._conv_forward, [(self.activation_fake_quantizer, x), (self.weight_fake_quantizer, self.weight)], self.bias
        )
