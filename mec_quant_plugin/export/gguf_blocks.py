"""GGUF block encoders that write GIVEN integer codes and steps (no re-quantization).

The `gguf` package quantizes floats (it picks its own scale); an exact export must instead store
our codes k and our fp16 step d with `w = k * d`. Each encoder below packs blocks of k (one step
per block) in the byte layout of llama.cpp's `ggml-common.h`; `tests/export/test_gguf.py` checks
every one against `gguf.quants.dequantize` (Q1_0 and Q2_0, which gguf cannot decode, against the
reference loops of ggml-quants.c, `dequantize_q1_0` / `dequantize_q2_0` here), and
`benchmarks/deploy.py blocks` against llama.cpp's own C decoders.

Q2_0 (2.25 bits per weight, blocks of 64) is in llama.cpp but not in the gguf 0.19.0 of PyPI:
it is used only when the installed gguf knows it (`GGMLQuantizationType.Q2_0`).

Negative steps are allowed: a code range that fits a type only mirrored (int2 codes [-2, 1] in
TQ2_0's [-1, 2]) is stored as `(-k) * (-d)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

QK_K = 256


def _fp16_bytes(d: np.ndarray) -> np.ndarray:
    return d.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _pack_2bit(q: np.ndarray) -> np.ndarray:
    """256 values 0..3 -> 64 bytes: byte h*32+i holds values h*128 + s*32 + i in bits 2s."""
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32) << np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return np.bitwise_or.reduce(q, axis=2).reshape(-1, 64)


def encode_q8_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q8_0: fp16 d, then 32 int8 codes; w = d * k, k in [-128, 127]."""
    return np.concatenate([_fp16_bytes(d), k.astype(np.int8).view(np.uint8)], axis=1)


def encode_q5_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q5_0: fp16 d, uint32 high bits, 16 bytes of low nibbles; w = d * (q - 16), q = k + 16."""
    q = (k + 16).astype(np.uint8)
    qh = np.packbits(q >> 4, axis=1, bitorder="little")  # bit j of the little-endian uint32
    low = q & 0xF
    return np.concatenate([_fp16_bytes(d), qh, low[:, :16] | (low[:, 16:] << 4)], axis=1)


def encode_q4_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q4_0: fp16 d, 16 bytes (element j low nibble, j + 16 high); w = d * (q - 8), q = k + 8."""
    q = (k + 8).astype(np.uint8)
    return np.concatenate([_fp16_bytes(d), q[:, :16] | (q[:, 16:] << 4)], axis=1)


def encode_q3_k(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q3_K with all 16 sub-scales 1 (6-bit value 33, offset 32); w = d * k, k in [-4, 3].

    Layout: hmask[32] (bit j of byte i: element j*32 + i is >= 0), qs[64] (k & 3, 2-bit packed),
    scales[12], fp16 d.
    """
    n = k.shape[0]
    nonneg = (k >= 0).astype(np.uint8).reshape(n, 8, 32) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    hmask = np.bitwise_or.reduce(nonneg, axis=1)
    qs = _pack_2bit(k & 3)
    scales = np.tile(np.array([0x11] * 8 + [0xAA] * 4, dtype=np.uint8), (n, 1))  # 33 = 0b10_0001
    return np.concatenate([hmask, qs, scales, _fp16_bytes(d)], axis=1)


def encode_q2_k(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q2_K with sub-scale 1 and sub-minimum 2 everywhere; w = d*q - d*2 = d * k, k in [-2, 1]."""
    n = k.shape[0]
    scales = np.full((n, 16), 0x21, dtype=np.uint8)  # low nibble: scale 1, high nibble: min 2
    return np.concatenate([scales, _pack_2bit(k + 2), _fp16_bytes(d), _fp16_bytes(d)], axis=1)


def encode_tq2_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """TQ2_0: 64 bytes of 2-bit q = k + 1, then fp16 d; w = d * k, k in [-1, 2]."""
    return np.concatenate([_pack_2bit(k + 1), _fp16_bytes(d)], axis=1)


def encode_tq1_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """TQ1_0: ternary digits q = k + 1, five per byte (48 bytes) and four per byte (4 bytes), fp16 d.

    A byte holding trits t0..t4 stores ceil(sum(t_i 3^(4-i)) * 256 / 243), so the decoder reads
    trit i as ((byte * 3^i) mod 256) * 3 >> 8.
    """
    n = k.shape[0]
    q = (k + 1).astype(np.uint16)
    pow5 = np.array([81, 27, 9, 3, 1], dtype=np.uint16).reshape(1, 1, 5, 1)
    qs0 = (q[:, :160].reshape(n, 1, 5, 32) * pow5).sum(axis=2).reshape(n, 32)
    qs1 = (q[:, 160:240].reshape(n, 1, 5, 16) * pow5).sum(axis=2).reshape(n, 16)
    qh = (q[:, 240:].reshape(n, 1, 4, 4) * pow5[:, :, :4]).sum(axis=2).reshape(n, 4)
    packed = (np.concatenate([qs0, qs1, qh], axis=1) * 256 + 242) // 243
    return np.concatenate([packed.astype(np.uint8), _fp16_bytes(d)], axis=1)


def encode_q2_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q2_0: fp16 d, 16 bytes of 2-bit q = k + 1 (bits 2*(j%4) of byte j/4); w = d * k, k in [-1, 2]."""
    q = (k + 1).astype(np.uint8).reshape(-1, 16, 4) << np.array([0, 2, 4, 6], dtype=np.uint8)
    return np.concatenate([_fp16_bytes(d), np.bitwise_or.reduce(q, axis=2)], axis=1)


def dequantize_q2_0(blocks: np.ndarray) -> np.ndarray:
    """The reference decoder of Q2_0 (ggml-quants.c `dequantize_row_q2_0`), for gguf lacks it."""
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = (blocks[:, 2:, None] >> np.array([0, 2, 4, 6], dtype=np.uint8)) & 3
    return d * (q.reshape(blocks.shape[0], -1).astype(np.float32) - 1)


def encode_q1_0(k: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q1_0: fp16 d, 16 bytes of sign bits (bit j%8 of byte j/8: 1 -> +d, 0 -> -d); k in {-1, +1}."""
    bits = np.packbits((k > 0).astype(np.uint8), axis=1, bitorder="little")
    return np.concatenate([_fp16_bytes(d), bits], axis=1)


def dequantize_q1_0(blocks: np.ndarray) -> np.ndarray:
    """The reference decoder of Q1_0 (ggml-quants.c `dequantize_row_q1_0`), for gguf lacks it."""
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    bits = np.unpackbits(blocks[:, 2:], axis=1, bitorder="little").astype(np.float32)
    return d * (2 * bits - 1)


@dataclass(frozen=True)
class BlockType:
    """One GGUF block type that can hold codes exactly.

    Attributes:
        name: the GGML type name (`gguf.GGMLQuantizationType[name]`).
        block: weights per block (one step per block).
        lo, hi: the code range stored without mirroring.
        bytes_per_block: bytes of one block.
        encode: (codes (n, block), fp16 steps (n,)) -> uint8 (n, bytes_per_block).
        no_zero: the type has no zero level (Q1_0: only -d and +d).
    """

    name: str
    block: int
    lo: int
    hi: int
    bytes_per_block: int
    encode: Callable[[np.ndarray, np.ndarray], np.ndarray]
    no_zero: bool = False

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes_per_block / self.block

    def mirror_for(self, kmin: int, kmax: int, has_zero: bool) -> int | None:
        """+1 if codes in [kmin, kmax] fit as they are, -1 if they fit negated, None otherwise."""
        if self.no_zero and has_zero:
            return None
        if self.lo <= kmin and kmax <= self.hi:
            return 1
        if self.lo <= -kmax and -kmin <= self.hi:
            return -1
        return None


BLOCK_TYPES: dict[str, BlockType] = {
    t.name: t
    for t in (
        BlockType("Q1_0", 128, -1, 1, 18, encode_q1_0, no_zero=True),
        BlockType("TQ1_0", QK_K, -1, 1, 54, encode_tq1_0),
        BlockType("TQ2_0", QK_K, -1, 2, 66, encode_tq2_0),
        BlockType("Q2_0", 64, -1, 2, 18, encode_q2_0),
        BlockType("Q2_K", QK_K, -2, 1, 84, encode_q2_k),
        BlockType("Q3_K", QK_K, -4, 3, 110, encode_q3_k),
        BlockType("Q4_0", 32, -8, 7, 18, encode_q4_0),
        BlockType("Q5_0", 32, -16, 15, 22, encode_q5_0),
        BlockType("Q8_0", 32, -128, 127, 34, encode_q8_0),
    )
}

# Default order ("speed"): Q4_0 and Q8_0 have llama.cpp's repacked AVX2/AVX512 CPU kernels
# (ggml-cpu "extra" buffer types) and are the widely optimized ones; everything <= 4 bits goes to
# Q4_0, wider codes to Q8_0. "size" takes the smallest exact type.
SPEED_ORDER = ("Q4_0", "Q8_0")
SIZE_ORDER = tuple(sorted(BLOCK_TYPES, key=lambda n: BLOCK_TYPES[n].bits_per_weight))
