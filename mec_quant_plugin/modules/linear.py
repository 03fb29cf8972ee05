"""Fake-quantized nn.Linear."""

import torch
import torch.nn.functional as F
from torch import nn

from .base import FakeQuantizedModule
from .recompute import call_with_recomputed_operands
from .registry import register_fake_quantized


@register_fake_quantized(nn.Linear)
class FakeQuantizedLinear(FakeQuantizedModule, nn.Linear):
    """nn.Linear with LSQ fake-quantized weight (per output row) and input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return call_with_recomputed_operands(
            F.linear, [(self.activation_fake_quantizer, x), (self.weight_fake_quantizer, self.weight)], self.bias
        )
