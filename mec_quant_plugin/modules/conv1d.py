"""Fake-quantized transformers `Conv1D` (GPT-2's transposed linear layer, weight (in, out))."""

import torch
from transformers.pytorch_utils import Conv1D

from .base import FakeQuantizedModule
from .registry import register_fake_quantized


@register_fake_quantized(Conv1D)
class FakeQuantizedConv1D(FakeQuantizedModule, Conv1D):
    """GPT-2 Conv1D with fake-quantized weight (one step per output column) and input."""

    weight_channel_axis = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantized_input(x)
        size_out = x.size()[:-1] + (self.nf,)
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.quantized_weight())
        return out.view(size_out)
