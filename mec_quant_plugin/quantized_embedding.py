"""Quantized embeddings that gather the looked-up rows BEFORE dequantizing them.

torchao's `F.embedding` on an `IntxUnpackedToInt8Tensor` dequantizes the whole table on every
call (30522 x 384 floats for a BERT vocabulary, to read a few dozen rows). `GatheringEmbedding`
gathers the int8 codes, scales and zero points of the requested rows first and dequantizes only
those, through torchao's own `dequantize()`, so the result is bit-identical to
dequantize-then-embed. It is `nn.Embedding` with another `forward`: the state dict, and so the
saved folder, are unchanged, and plain transformers + torchao reload the folder as a normal
`nn.Embedding` (which dequantizes the whole table again: only the plugin's `from_pretrained`
and `convert_model` install the gathering forward).

Example:
    >>> use_gathering_embeddings(model)  # after loading a torchao-quantized model yourself
    1
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
    IntxUnpackedToInt8Tensor,
)


def can_gather(module: nn.Module) -> bool:
    """True for a plain `nn.Embedding` (not a subclass with its own forward) whose weight is a
    torchao int tensor with one step per row or per group of a row, and no `max_norm` (which
    renormalizes the table in place)."""
    weight = module._parameters.get("weight") if isinstance(module, nn.Embedding) else None
    return (
        type(module) in (nn.Embedding, GatheringEmbedding)
        and isinstance(weight, IntxUnpackedToInt8Tensor)
        and weight.dim() == 2
        and weight.block_size[0] == 1
        and module.max_norm is None
    )


def gather_rows(weight: IntxUnpackedToInt8Tensor, ids: torch.Tensor) -> torch.Tensor:
    """`F.embedding(ids, weight.dequantize())`, dequantizing only the rows `ids` names.

    Example:
        >>> torch.equal(gather_rows(w, ids), F.embedding(ids, w.dequantize()))
        True
    """
    flat = ids.reshape(-1)
    rows = IntxUnpackedToInt8Tensor(
        weight.qdata[flat],
        weight.scale[flat],
        weight.zero_point[flat],
        weight.target_dtype,
        tuple(weight.block_size),
        weight.dtype,
        None,
    )
    return rows.dequantize().reshape(*ids.shape, weight.shape[1])


class GatheringEmbedding(nn.Embedding):
    """`nn.Embedding` over a torchao int table that dequantizes only the rows it looks up.

    Installed on existing modules by `use_gathering_embeddings` (never constructed directly).
    Its output equals `nn.Embedding`'s exactly; gradients do not flow (the table is frozen ints).
    """

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if not isinstance(weight, IntxUnpackedToInt8Tensor) or self.max_norm is not None:
            return F.embedding(ids, weight, self.padding_idx, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.sparse)
        return gather_rows(weight, ids)


def use_gathering_embeddings(model: nn.Module) -> int:
    """Give every quantized `nn.Embedding` of `model` the gathering forward (in place, same
    parameters and state dict); returns how many embeddings now gather.

    Embeddings that are subclasses with their own forward, use `max_norm`, or hold float weights
    are left alone.
    """
    changed = 0
    for module in model.modules():
        if can_gather(module):
            if type(module) is nn.Embedding:
                module.__class__ = GatheringEmbedding
            changed += 1
    return changed
