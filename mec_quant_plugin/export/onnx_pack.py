"""Our codes in ONNX Runtime's block-quantized layouts (com.microsoft `MatMulNBits`,
`GatherBlockQuantized`), without re-quantizing.

Both ops decode `w = (q - zero_point) * scale` per block of `block_size` consecutive input
channels of a row, with unsigned codes `q` of 2, 4 or 8 bits packed low-order bits first and, when
no zero point is given, the zero point 2^(bits-1). Our signed codes `k` are stored as
`q = k + 2^(bits-1)`, so the op decodes exactly `k * step`. A block must hold ONE step: blocks are
powers of two >= 16 (the ops' rule) in which every step is the same (see `choose_block`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .codes import LayerCodes

ONNX_BITS = (2, 4, 8)
PREFERRED_BLOCKS = (128, 64, 32, 16)  # dividing the row: no padding


@dataclass(frozen=True)
class PackedWeight:
    """One weight in a MatMulNBits / GatherBlockQuantized layout.

    Attributes:
        bits: 2, 4 or 8 (codes stored unsigned, zero point 2^(bits-1)).
        block_size: input channels per scale (a power of two >= 16).
        packed: uint8, (rows, k_blocks, block_size * bits // 8) (MatMulNBits' B).
        scales: float32, (rows, k_blocks): our fp16 steps, exactly.
    """

    bits: int
    block_size: int
    packed: np.ndarray
    scales: np.ndarray

    def gather_data(self, cols: int) -> np.ndarray:
        """GatherBlockQuantized's `data`: the rows packed along the last axis, (rows, cols * bits / 8)."""
        rows = self.packed.shape[0]
        return self.packed.reshape(rows, -1)[:, : cols * self.bits // 8]


def onnx_bits(lc: LayerCodes) -> int | None:
    """The smallest of 2/4/8 bits that holds the layer's codes (trained bits as the floor), or None."""
    lo, hi = int(lc.codes.min()), int(lc.codes.max())
    for bits in ONNX_BITS:
        if bits >= min(lc.bits, 8) and -(2 ** (bits - 1)) <= lo and hi < 2 ** (bits - 1):
            return bits
    return None


def _column_steps(lc: LayerCodes, padded: int) -> torch.Tensor:
    steps = lc.step.repeat_interleave(lc.group_size, dim=1)
    if padded > steps.shape[1]:  # the padding repeats the last step (its codes are zero)
        steps = torch.cat([steps, steps[:, -1:].expand(-1, padded - steps.shape[1])], dim=1)
    return steps


def _one_step_per_block(lc: LayerCodes, block: int) -> bool:
    cols = lc.codes.shape[1]
    blocks = -(-cols // block)
    steps = _column_steps(lc, blocks * block).reshape(lc.codes.shape[0], blocks, block)
    return bool((steps == steps[..., :1]).all())


def choose_block(lc: LayerCodes, block_size: int | None = None, *, divide: bool = False) -> tuple[int | None, str]:
    """(block, "") for the block size that stores `lc` exactly, else (None, why).

    Preferred: the largest of 128/64/32/16 that divides the row and holds one step per block; then
    (unless `divide`) a power of two >= 16 with the row padded. `block_size` forces one size.
    """
    cols = lc.codes.shape[1]
    if block_size is not None:
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size}: ONNX Runtime needs a power of two >= 16.")
        candidates: list[int] = [block_size]
    else:
        candidates = [b for b in PREFERRED_BLOCKS if cols % b == 0]
        if not divide:
            top = max(16, 1 << (cols - 1).bit_length())
            candidates += [b for b in (16 << i for i in range(32)) if b <= top and b not in candidates]
    for block in candidates:
        if (not divide or cols % block == 0) and _one_step_per_block(lc, block):
            return block, ""
    group = "per-channel steps" if lc.group_size == cols else f"one step per {lc.group_size} inputs"
    tried = ", ".join(map(str, candidates)) or "none divides the row"
    return None, (
        f"{lc.name} ({group}, rows of {cols}): no block of {tried} holds a single step "
        "(ONNX Runtime blocks are powers of two >= 16)"
    )


def pack(lc: LayerCodes, bits: int, block: int) -> PackedWeight:
    """`lc` as unsigned `bits`-bit codes in blocks of `block` (zero point 2^(bits-1))."""
    rows, cols = lc.codes.shape
    blocks = -(-cols // block)
    zero = 2 ** (bits - 1)
    q = torch.full((rows, blocks * block), zero, dtype=torch.int16)
    q[:, :cols] = lc.codes.to(torch.int16) + zero
    per_byte = 8 // bits
    q = q.reshape(rows, blocks, block // per_byte, per_byte).numpy().astype(np.uint8)
    packed = np.zeros(q.shape[:-1], dtype=np.uint8)
    for i in range(per_byte):  # low-order bits first
        packed |= q[..., i] << (i * bits)
    scales = _column_steps(lc, blocks * block).reshape(rows, blocks, block)[..., 0]
    return PackedWeight(bits, block, packed, scales.numpy().astype(np.float32))
