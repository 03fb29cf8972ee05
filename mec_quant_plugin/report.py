"""`quantization_report`: per layer, the bits and what the weight tensor stores.

It reads the model itself, so it describes a prepared model (float weights fake-quantized for
training), a converted one (torchao int codes + scales), one reloaded by plain transformers +
torchao (the plugin's classes gone, the int tensors kept), and GPT-2's Conv1D, whose converted
weight stays float32 holding the quantized levels.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from .modules.base import LEVELS_ATTR, FakeQuantizedModule, holds_converted_weight
from .modules.registry import bypassed_reason, is_supported_layer
from .options import bits_label
from .quantizers import ActivationFakeQuantizer, WeightFakeQuantizer

FLOAT = "float (not quantized)"
BYPASSED = "left in float, forward bypassed by its parent"


@dataclass(frozen=True)
class LayerQuantization:
    """How one layer is quantized and stored.

    Attributes:
        bits: its `W{w}A{a}` label ("W4Afloat"), or "float (not quantized)".
        storage: what its weight tensor holds, e.g. "int4 codes + float16 scales per channel
            (torchao IntxUnpackedToInt8Tensor)" or "float weights fake-quantized for training".
    """

    bits: str
    storage: str


def describe_layer(module: nn.Module) -> LayerQuantization | None:
    """How `module` is quantized and stored; None for a module that is not a weight layer the
    plugin knows (supported type, fake-quantized, or holding a torchao weight).

    Example:
        >>> describe_layer(model.model.layers[0].mlp.up_proj)
        LayerQuantization(bits='W4Afloat', storage='int4 codes + float16 scales per channel (torchao IntxUnpackedToInt8Tensor)')
    """
    fake = isinstance(module, FakeQuantizedModule)
    if not (fake or is_supported_layer(module) or holds_converted_weight(module)):
        return None
    afq = module.activation_fake_quantizer if fake else None
    act = None if afq is None else afq.bits
    wfq = module.weight_fake_quantizer if fake else None
    if wfq is not None:
        return LayerQuantization(
            bits_label(wfq.bits, act, ternary=wfq.ternary), "float weights fake-quantized for training (learned step sizes)"
        )
    weight_bits, storage = _weight_storage(module)
    if weight_bits is None and act is None:
        return LayerQuantization(FLOAT, storage)
    return LayerQuantization(bits_label(weight_bits, act), storage)


def _weight_storage(module: nn.Module) -> tuple[str | None, str]:
    """(the weight's bits, None when float; what the weight tensor stores)."""
    from torchao.utils import TorchAOBaseTensor

    weight = module.weight
    if isinstance(weight, TorchAOBaseTensor):
        bits = _torchao_bits(weight)
        scale = getattr(weight, "scale", None)
        scales = f" + {_dtype_name(scale.dtype)} scales" if isinstance(scale, torch.Tensor) else ""
        codes = f"int{bits} codes" if bits is not None else "codes"
        return bits or "torchao", f"{codes}{scales}{_granularity(weight)} (torchao {type(weight).__name__})"
    levels = module.__dict__.get(LEVELS_ATTR)
    if levels is not None:
        what = "ternary levels" if levels == "ternary" else f"{levels}-bit levels"
        return levels, (
            f"{_dtype_name(weight.dtype)} weights holding the {what} "
            f"(no torchao int kernel for {type(module).__name__.removeprefix('FakeQuantized')})"
        )
    return None, f"{_dtype_name(weight.dtype)} weights"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torchao_bits(weight: torch.Tensor) -> str | None:
    """The bit-width of a torchao int tensor: its `target_dtype` (int1..int8), else its class name
    (Int4Tensor, Int8Tensor), else None."""
    target = getattr(weight, "target_dtype", None)
    match = re.search(r"int(\d+)", str(target)) if target is not None else None
    match = match or re.search(r"Int(\d+)", type(weight).__name__)
    return match.group(1) if match else None


def _granularity(weight: torch.Tensor) -> str:
    """" per channel", " per group of 32" or " per tensor", read off a torchao block size."""
    block = getattr(weight, "block_size", None)
    if block is None or len(block) != weight.dim():
        return ""
    blocks = [n // b for n, b in zip(weight.shape, block)]
    if all(n == 1 for n in blocks):
        return " per tensor"
    if blocks[0] == weight.shape[0] and all(n == 1 for n in blocks[1:]):
        return " per channel"
    return f" per group of {block[1]}" if weight.dim() > 1 else f" in blocks of {tuple(block)}"


@dataclass(frozen=True)
class LayerGroup:
    """Layers quantized and stored the same way (one line of `quantization_report`).

    Attributes:
        bits: the `W{w}A{a}` label, or "float (not quantized)".
        storage: what each layer's weight tensor holds (see `LayerQuantization.storage`).
        names: the layers' module names, in model order.
    """

    bits: str
    storage: str
    names: tuple[str, ...]


def quantization_groups(model: nn.Module) -> list[LayerGroup]:
    """The model's weight layers grouped by (bits, storage), in model order: what
    `quantization_report` prints one line each for, and the model card's table lists.

    Example:
        >>> for group in quantization_groups(converted_gpt2):
        ...     print(group.bits, len(group.names), group.storage)
        W2A4 8 float32 weights holding the 2-bit levels (no torchao int kernel for Conv1D)
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for name, mod in model.named_modules():
        layer = describe_layer(mod)
        if layer is not None:
            groups.setdefault((layer.bits, layer.storage), []).append(name)
    return [LayerGroup(bits, storage, tuple(names)) for (bits, storage), names in groups.items()]


def quantization_report(model: nn.Module) -> str:
    """Which layers are quantized at which bits and what their weights store, and what stays float.

    One line per group, e.g. `W2A2: 12 layers, int2 codes + float16 scales per channel (torchao
    IntxUnpackedToInt8Tensor) (model.layers.0.self_attn.q_proj, ...)`; then the layers left float
    because their parent bypasses their forward, and the modules holding float parameters of a
    type the plugin does not quantize (norms, ViT's position embeddings).

    Example:
        >>> print(quantization_report(prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2))))
    """
    bypassed: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        if describe_layer(mod) is None and bypassed_reason(mod):
            bypassed.setdefault(bypassed_reason(mod), []).append(name)
    lines = [f"{g.bits}: {len(g.names)} layers, {g.storage} ({_shown(list(g.names))})" for g in quantization_groups(model)]
    lines += [f"{BYPASSED}: {len(names)} layers ({_shown(names)}): {why}" for why, names in bypassed.items()]
    holders = Counter(
        type(m).__name__
        for m in model.modules()
        if any(True for _ in m.parameters(recurse=False))
        and describe_layer(m) is None
        and not bypassed_reason(m)
        and not isinstance(m, (WeightFakeQuantizer, ActivationFakeQuantizer))
    )
    if holders:
        lines.append("left in float (type not quantizable): " + ", ".join(f"{k} x{v}" for k, v in sorted(holders.items())))
    return "\n".join(lines)


def _shown(names: list[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (f", ... (+{len(names) - limit})" if len(names) > limit else "")
