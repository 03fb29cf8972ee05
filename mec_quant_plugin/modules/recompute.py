"""Keep only float tensors alive for backward: recompute fake-quantized operands instead.

Why: the Linear/Conv after a quantizer saves its fake-quantized input (and weight) for backward,
while the quantizer itself keeps the float input (its LSQ gradient needs the rounding remainder).
That is two copies of every quantized activation where float training keeps one (measured: peak
memory of a W2A2 CNN step 1.35x FP). Under these saved-tensor hooks the layer's saved copy of a
quantized operand is replaced by (quantizer, float source) and recomputed, bit-identically, when
backward needs it: one elementwise pass per operand instead of a second activation-sized buffer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# A fake quantizer module, or any deterministic tensor -> tensor transform built on one.
Quantizer = Callable[[torch.Tensor], torch.Tensor]


class _Recompute:
    __slots__ = ("quantizer", "source", "size", "stride", "offset")

    def __init__(self, quantizer: Quantizer, source: torch.Tensor, like: torch.Tensor) -> None:
        self.quantizer, self.source = quantizer, source
        self.size, self.stride, self.offset = like.size(), like.stride(), like.storage_offset()

    def materialize(self) -> torch.Tensor:
        with torch.no_grad():
            full = self.quantizer(self.source)
        return full.as_strided(self.size, self.stride, self.offset)


def call_with_recomputed_operands(
    fn: Callable[..., torch.Tensor], operands: list[tuple[Quantizer | None, torch.Tensor]], *rest: Any
) -> torch.Tensor:
    """`fn(q(x) for (q, x) in operands, *rest)`, saving the float `x` instead of `q(x)` for backward.

    `q` is a fake quantizer, or any deterministic transform of one (e.g. quantize-then-pad); an
    operand whose quantizer is None is passed through unchanged. Under `torch.compile` the plain
    call is traced (saved-tensor hooks break the graph; the compiler decides what to keep).
    """
    quantized = [q(x) if q is not None else x for q, x in operands]
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        # Under torch.compile the hooks would break the graph at every layer; AOTAutograd's
        # partitioner chooses what to save and recomputes cheap elementwise ops itself.
        return fn(*quantized, *rest)
    sources = {id(t): (q, x) for (q, x), t in zip(operands, quantized) if q is not None}

    def pack(t: torch.Tensor) -> Any:
        base = t if id(t) in sources else t._base
        if base is not None and id(base) in sources:
            return _Recompute(*sources[id(base)], t)
        return t

    def unpack(packed: Any) -> torch.Tensor:
        return packed.materialize() if isinstance(packed, _Recompute) else packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return fn(*quantized, *rest)
