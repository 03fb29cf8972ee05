"""torchao entry point (`quantize_` handler) and the one-call helpers with the layer policy."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchao.quantization import quantize_
from torchao.quantization.transform_module import register_quantize_module_handler

from .config import MECQuantConfig
from .convert import convert_layer
from .layer_policy import find_head_layer, find_input_layers
from .modules.base import FakeQuantizedModule
from .modules.registry import (
    fake_quantized_class_for,
    is_fake_quantized,
    is_supported_layer,
    refused_float_type,
    supported_type_names,
)
from .quantizers import ActivationFakeQuantizer, WeightFakeQuantizer

logger = logging.getLogger("mec_quant_plugin")

FilterFn = Callable[[nn.Module, str], bool]


@register_quantize_module_handler(MECQuantConfig)
def _mec_quant_transform(module: nn.Module, config: MECQuantConfig) -> nn.Module:
    """What `quantize_(model, MECQuantConfig(...))` does to each selected module."""
    if config.step == "convert":
        return convert_layer(module) if is_fake_quantized(module) else module
    if is_fake_quantized(module):
        return module  # prepared already
    fq_cls = fake_quantized_class_for(module)
    if fq_cls is None:
        raise TypeError(
            f"MECQuantConfig cannot quantize {type(module).__name__}; supported layer types: "
            f"{supported_type_names()}. Use filter_fn=is_supported_layer to select only those."
        )
    return fq_cls.from_float(
        module,
        weight_bits=config.weight_bits,
        act_bits=config.act_bits,  # an Embedding with act_bits raises a clear ValueError
        group_size=config.group_size,
        ternary=config.ternary,
        act_signedness=config.act_signedness,
    )


def _edge_config(config: MECQuantConfig) -> MECQuantConfig:
    return config.replace(
        weight_bits=8,
        act_bits=8 if config.act_bits is not None else None,
        ternary=False,
        weight_granularity="per_channel",
        group_size=None,
    )


def prepare_model(
    model: nn.Module, config: MECQuantConfig | None = None, *, filter_fn: FilterFn | None = None
) -> nn.Module:
    """Insert fake quantizers into every supported layer, applying the edge-layer policy.

    The first layers taking the raw input (every Embedding, else the stem conv / patch
    projection) and the task head (lm_head / classifier) follow `config.edge_layers`: '8bit'
    (W8A8, default), 'float' or 'same'. Embeddings are always weight-only. The model is changed
    in place and returned; one log line per bit-width group says which layers got what.

    Example:
        >>> model = prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2))

    Raises:
        ValueError: config.step is not 'prepare'; the model has no supported layer.
    """
    config = config or MECQuantConfig()
    if config.step != "prepare":
        raise ValueError(f"prepare_model needs config.step='prepare', got {config.step!r}.")
    _warn_refused_subclasses(model)
    edge = set(find_input_layers(model)) | {find_head_layer(model)}

    def selected(module: nn.Module, fqn: str) -> bool:
        return is_supported_layer(module, fqn) and (filter_fn is None or filter_fn(module, fqn))

    def embedding(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Embedding)

    groups: list[tuple[MECQuantConfig, FilterFn]] = []
    body = lambda m, n: selected(m, n) and n not in edge  # noqa: E731
    edge_sel = lambda m, n: selected(m, n) and n in edge  # noqa: E731
    groups.append((config, lambda m, n: body(m, n) and not embedding(m, n)))
    groups.append((config.replace(act_bits=None), lambda m, n: body(m, n) and embedding(m, n)))
    if config.edge_layers != "float":
        edge_cfg = _edge_config(config) if config.edge_layers == "8bit" else config
        groups.append((edge_cfg, lambda m, n: edge_sel(m, n) and not embedding(m, n)))
        groups.append((edge_cfg.replace(act_bits=None), lambda m, n: edge_sel(m, n) and embedding(m, n)))
    for cfg, fn in groups:
        quantize_(model, cfg, filter_fn=fn)
    _share_quantizers_of_tied_weights(model)
    report = quantization_report(model)
    for line in report.splitlines():
        logger.info(line)
    return model


def _warn_refused_subclasses(model: nn.Module) -> None:
    """One warning per class for subclasses of a supported type (e.g. nn.Conv2d) whose own
    forward the plugin does not reproduce: they stay float rather than lose their behaviour."""
    refused: dict[tuple[type, type], list[str]] = {}
    for name, mod in model.named_modules():
        base = refused_float_type(mod)
        if base is not None:
            refused.setdefault((type(mod), base), []).append(name)
    for (cls, base), names in refused.items():
        shown = ", ".join(names[:4]) + (f", ... (+{len(names) - 4})" if len(names) > 4 else "")
        logger.warning(
            "Left in float: %d %s layer(s) (%s). %s subclasses %s.%s but overrides forward in a way the "
            "plugin does not reproduce (supported overrides: static-padding convs), so quantizing it would "
            "silently replace that forward.",
            len(names), cls.__name__, shown, cls.__qualname__, base.__module__.split(".")[0], base.__qualname__,
        )


def _tied_groups(model: nn.Module) -> list[list[FakeQuantizedModule]]:
    """Fake-quantized layers that hold the SAME weight Parameter (tied embeddings / lm_head)."""
    by_weight: dict[int, list[FakeQuantizedModule]] = {}
    for mod in model.modules():
        if isinstance(mod, FakeQuantizedModule):
            by_weight.setdefault(id(mod.weight), []).append(mod)
    return [mods for mods in by_weight.values() if len(mods) > 1]


def _share_quantizers_of_tied_weights(model: nn.Module) -> None:
    """A tied weight is ONE tensor: give its users one weight quantizer, so they agree on the
    quantized values during training and convert to one shared int tensor (which is what
    `save_pretrained` and the reload-time re-tying of transformers expect)."""
    for mods in _tied_groups(model):
        first = mods[0].weight_fake_quantizer
        for other in mods[1:]:
            wfq = other.weight_fake_quantizer
            compatible = (first is None) == (wfq is None) and (
                first is None
                or (first.bits, first.ternary, first.group_size, first.channel_axis)
                == (wfq.bits, wfq.ternary, wfq.group_size, wfq.channel_axis)
            )
            if not compatible:
                logger.warning(
                    "Tied weight quantized two ways (%s vs %s): the tie will be broken at convert.",
                    mods[0].bits_summary(), other.bits_summary(),
                )
                continue
            other.register_module("weight_fake_quantizer", first)


def convert_model(model: nn.Module) -> nn.Module:
    """Replace every fake-quantized layer's weight by a torchao int tensor (see `convert_layer`).

    Example:
        >>> model = convert_model(model)  # after training

    Raises:
        ValueError: the model holds no fake-quantized layer (nothing to convert).
    """
    if not any(is_fake_quantized(m) for m in model.modules()):
        raise ValueError("convert_model found no fake-quantized layer: call prepare_model first.")
    names = {id(m): n for n, m in model.named_modules()}
    tied = [[names[id(m)] for m in mods] for mods in _tied_groups(model)]
    quantize_(model, MECQuantConfig(step="convert"), filter_fn=is_fake_quantized)
    for group in tied:  # re-tie: every user of the tied weight gets the first user's int tensor
        first = model.get_submodule(group[0])
        for name in group[1:]:
            model.get_submodule(name)._parameters["weight"] = first._parameters["weight"]
    return model


def quantization_report(model: nn.Module) -> str:
    """Which layers are quantized at which bits, and which supported-or-not layers are not.

    One line per group, e.g. `W2A2: 12 layers (model.layers.0.self_attn.q_proj, ...)`.
    """
    groups: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, FakeQuantizedModule):
            groups.setdefault(mod.bits_summary(), []).append(name)
        elif is_supported_layer(mod, name):
            groups.setdefault("float (not quantized)", []).append(name)
    lines = []
    for key, names in groups.items():
        shown = ", ".join(names[:6]) + (f", ... (+{len(names) - 6})" if len(names) > 6 else "")
        lines.append(f"{key}: {len(names)} layers ({shown})")
    leaves = Counter(
        type(m).__name__
        for m in model.modules()
        if not list(m.children()) and any(True for _ in m.parameters(recurse=False))
        and not isinstance(m, (FakeQuantizedModule, WeightFakeQuantizer, ActivationFakeQuantizer))
        and not is_supported_layer(m)
    )
    if leaves:
        lines.append("left in float (type not quantizable): " + ", ".join(f"{k} x{v}" for k, v in sorted(leaves.items())))
    return "\n".join(lines)


@torch.no_grad()
def calibrate_activations(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    """Initialize every activation step size from one batch (`model(*args, **kwargs)`).

    Training does this on its first forward; call it explicitly to calibrate on chosen data or
    before evaluating a freshly prepared model. Already initialized quantizers are left alone.
    """
    was_training = model.training
    model.train()
    try:
        model(*args, **kwargs)
    finally:
        model.train(was_training)
