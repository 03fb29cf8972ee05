"""Fake-quantized nn.Embedding (weight only: its input is integer ids)."""

import torch
import torch.nn.functional as F
from torch import nn

from .base import FakeQuantizedModule
from .registry import register_fake_quantized


@register_fake_quantized(nn.Embedding)
class FakeQuantizedEmbedding(FakeQuantizedModule, nn.Embedding):
    """nn.Embedding with an LSQ fake-quantized table (one step size per row)."""

    supports_activation_quantization = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            ids,
            self.quantized_weight(),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )
