"""torchao entry point (`quantize_` handler) and the one-call helpers with the layer policy."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torchao.quantization import quantize_
from torchao.quantization.transform_module import register_quantize_module_handler

from .config import MECQuantConfig
from .convert import convert_layer, inexact_export_reason, nonfinite_message
from .distributed import sharded_model_message, sharded_parameter_names
from .layer_policy import find_head_layer, find_input_layers
from .modules.base import (
    FakeQuantizedModule,
    holds_converted_weight,
    layer_settings,
    nonfinite_parameters,
    planned_settings,
    settings_label,
)
from .modules.registry import (
    bypassed_reason,
    fake_quantized_class_for,
    is_fake_quantized,
    is_supported_layer,
    refused_float_type,
    supported_type_names,
)
from .progress import advance, layer_progress
from .quantizers import ActivationFakeQuantizer
from .report import quantization_report

logger = logging.getLogger("mec_quant_plugin")

FilterFn = Callable[[nn.Module, str], bool]


@register_quantize_module_handler(MECQuantConfig)
def _mec_quant_transform(module: nn.Module, config: MECQuantConfig) -> nn.Module:
    """What `quantize_(model, MECQuantConfig(...))` does to each selected module."""
    if config.step == "convert":
        return convert_layer(module) if is_fake_quantized(module) else module
    if holds_converted_weight(module):
        raise ValueError(_CONVERTED.format(what=f"This {type(module).__name__}"))
    if is_fake_quantized(module):
        has, asked = layer_settings(module), planned_settings(config, module)
        if has != asked:  # prepared already, with other settings
            raise ValueError(_ALREADY.format(layers=f"this layer: {settings_label(has)}, asked {settings_label(asked)}"))
        return module
    fq_cls = fake_quantized_class_for(module)
    if fq_cls is None and bypassed_reason(module):
        raise TypeError(
            f"MECQuantConfig cannot quantize this {type(module).__name__}: its forward is bypassed by its "
            f"parent ({bypassed_reason(module)}), so a fake quantizer there would never run."
        )
    if fq_cls is None:
        raise TypeError(
            f"MECQuantConfig cannot quantize {type(module).__name__}; supported layer types: "
            f"{supported_type_names()}. Use filter_fn=is_supported_layer to select only those."
        )
    prepared = fq_cls.from_float(
        module,
        weight_bits=config.weight_bits,
        act_bits=config.act_bits,  # an Embedding with act_bits raises a clear ValueError
        group_size=config.group_size,
        ternary=config.ternary,
        act_signedness=config.act_signedness,
    )
    advance()  # prepare_model's progress bar, when one is shown
    return prepared


_ALREADY = (
    "The model is already prepared with other settings ({layers}): a second prepare "
    "cannot change a layer's quantizers. Prepare a fresh float model, or prepare with the same config."
)
_CONVERTED = (
    "{what} holds converted (torchao int) weights: prepare_model needs the float model. Train from the "
    "float checkpoint, or load the converted one for inference only."
)


def _edge_config(config: MECQuantConfig) -> MECQuantConfig | None:
    """The edge layers' config under `config.edge_layers`; None leaves them float.

    None (default): 8 bits for each side the body quantizes (weights, activations), float where it
    is float; '8bit': W8 always, A8 when act_bits is set.
    """
    if config.edge_layers == "same":
        return config
    if config.edge_layers == "float":
        return None
    weight_bits = 8 if config.edge_layers == "8bit" or config.weight_bits is not None else None
    act_bits = 8 if config.act_bits is not None else None
    if weight_bits is None and act_bits is None:
        return None
    return config.replace(
        weight_bits=weight_bits,
        act_bits=act_bits,
        ternary=False,
        weight_granularity="per_channel",
        group_size=None,
    )


def _layer_plan(
    model: nn.Module, config: MECQuantConfig, filter_fn: FilterFn | None
) -> dict[str, MECQuantConfig | None]:
    """Layer name -> the config `prepare_model` gives it (None: left float), for every supported
    or already fake-quantized layer that `filter_fn` selects."""
    edge = set(find_input_layers(model)) | {find_head_layer(model)}
    edge_cfg = _edge_config(config)
    plan: dict[str, MECQuantConfig | None] = {}
    for name, mod in model.named_modules():
        if not (is_supported_layer(mod, name) or is_fake_quantized(mod, name)):
            continue
        if filter_fn is not None and not filter_fn(mod, name):
            continue
        cfg = edge_cfg if name in edge else config
        if cfg is not None and isinstance(mod, nn.Embedding):
            cfg = cfg.replace(act_bits=None)  # embeddings read integer ids: weight-only
        plan[name] = cfg
    return plan


def _check_not_prepared_otherwise(model: nn.Module, plan: dict[str, MECQuantConfig | None]) -> None:
    """Raise when a layer is converted already, or fake-quantized with settings other than the plan's."""
    converted = [n for n in plan if holds_converted_weight(model.get_submodule(n))]
    if converted:
        raise ValueError(_CONVERTED.format(what=f"The model ({_names(converted)})"))
    conflicts = []
    for name, cfg in plan.items():
        mod = model.get_submodule(name)
        if is_fake_quantized(mod):
            has, asked = layer_settings(mod), planned_settings(cfg, mod)
            if has != asked:
                conflicts.append((name, settings_label(has), settings_label(asked)))
    if conflicts:
        shown = "; ".join(f"{n}: {h}, asked {a}" for n, h, a in conflicts[:4]) + (
            f"; ... (+{len(conflicts) - 4})" if len(conflicts) > 4 else ""
        )
        raise ValueError(_ALREADY.format(layers=shown))


def _names(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", ... (+{len(names) - limit})" if len(names) > limit else "")


def prepare_model(
    model: nn.Module,
    config: MECQuantConfig | None = None,
    *,
    filter_fn: FilterFn | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Insert fake quantizers into every supported layer, applying the edge-layer policy.

    The first layers taking the raw input (every Embedding, else the stem conv / patch
    projection) and the task head (lm_head / classifier) follow `config.edge_layers`: by default
    8 bits for what the body quantizes (W8A8 for a W2A2 body; float when nothing is quantized),
    '8bit', 'float' or 'same'. Embeddings are always weight-only. The model is changed in place
    and returned; one log line per bit-width group says which layers got what. Preparing again
    with the same config is a no-op. A group size that GGUF / ONNX cannot store exactly (not a
    multiple of 32, or not a power of two >= 16) gives a UserWarning: the torchao artifact stays
    exact, an export of those layers would not.

    A progress bar over the layers (stderr) appears when preparing takes more than a couple of
    seconds (a 135M-parameter model on a CPU): `progress=False` never shows it, `True` always; by
    default it follows `MEC_QUANT_PROGRESS` (0/1) and the Hugging Face progress-bar setting (see
    `mec_quant_plugin.progress`).

    Example:
        >>> model = prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2))

    Raises:
        ValueError: config.step is not 'prepare'; the model has no supported layer; it is prepared
            already with other settings, or converted.
    """
    config = config or MECQuantConfig()
    if config.step != "prepare":
        raise ValueError(f"prepare_model needs config.step='prepare', got {config.step!r}.")
    _warn_refused_subclasses(model)
    plan = _layer_plan(model, config, filter_fn)
    inexact = {inexact_export_reason(cfg.group_size) for cfg in plan.values() if cfg is not None and cfg.weight_bits}
    for reason in sorted(filter(None, inexact)):
        warnings.warn(reason, UserWarning, stacklevel=2)
    _check_not_prepared_otherwise(model, plan)
    groups: list[tuple[MECQuantConfig, set[str]]] = []
    for name, cfg in plan.items():
        if cfg is None:
            continue
        group = next((g for g in groups if g[0] == cfg), None)
        if group is None:
            groups.append((cfg, {name}))
        else:
            group[1].add(name)
    todo = sum(1 for _, names in groups for n in names if is_supported_layer(model.get_submodule(n), n))
    with layer_progress(todo, f"MEC-Quant: preparing {_bits_label(config)}", progress):
        for cfg, names in groups:
            quantize_(model, cfg, filter_fn=lambda m, n, names=names: n in names and is_supported_layer(m, n))
    _share_quantizers_of_tied_weights(model)
    report = quantization_report(model)
    for line in report.splitlines():
        logger.info(line)
    return model


def _bits_label(config: MECQuantConfig) -> str:
    """'W2A2', 'W4' (weight-only), 'A8' (activation-only), 'float'."""
    weights = "" if config.weight_bits is None else f"W{config.weight_bits}"
    acts = "" if config.act_bits is None else f"A{config.act_bits}"
    return (weights + acts) or "float"


def _warn_refused_subclasses(model: nn.Module) -> None:
    """One warning per class for subclasses of a supported type (e.g. nn.Conv2d) whose own
    forward the plugin does not reproduce, and for layers whose forward their parent bypasses:
    they stay float rather than lose their behaviour or pretend to be quantized."""
    refused: dict[tuple[type, type], list[str]] = {}
    bypassed: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        base = refused_float_type(mod)
        if base is not None:
            refused.setdefault((type(mod), base), []).append(name)
        if bypassed_reason(mod):
            bypassed.setdefault(bypassed_reason(mod), []).append(name)
    for why, names in bypassed.items():
        logger.warning("Left in float: %d layer(s) whose forward their parent bypasses (%s): %s.",
                       len(names), _names(names), why)
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
        ValueError: the model holds no fake-quantized layer (nothing to convert); a weight, bias or
            step size of one holds NaN/inf (checked for every layer before any is converted); a model
            sharded by FSDP2 (DTensor parameters: convert the gathered full state dict instead).
    """
    if not any(is_fake_quantized(m) for m in model.modules()):
        raise ValueError("convert_model found no fake-quantized layer: call prepare_model first.")
    sharded = sharded_parameter_names(model)
    if sharded:
        raise ValueError(sharded_model_message("convert_model", sharded))
    bad = [
        f"{name}.{param}" if name else param
        for name, mod in model.named_modules()
        if is_fake_quantized(mod)
        for param in nonfinite_parameters(mod)
    ]
    if bad:
        raise ValueError(nonfinite_message(bad))
    names = {id(m): n for n, m in model.named_modules()}
    tied = [[names[id(m)] for m in mods] for mods in _tied_groups(model)]
    quantize_(model, MECQuantConfig(step="convert"), filter_fn=is_fake_quantized)
    for group in tied:  # re-tie: every user of the tied weight gets the first user's int tensor
        first = model.get_submodule(group[0])
        for name in group[1:]:
            model.get_submodule(name)._parameters["weight"] = first._parameters["weight"]
    return model


@torch.no_grad()
def calibrate_activations(model: nn.Module, *args: Any, **kwargs: Any) -> None:
    """Initialize every activation step size from one batch (`model(*args, **kwargs)`), and
    change nothing else.

    Training does this on its first forward; call it explicitly to calibrate on chosen data or
    before evaluating a freshly prepared model. The forward runs in training mode (BatchNorm on
    the batch's statistics, as training's first batch would), then every other buffer (BatchNorm
    running statistics and counters), each module's train/eval mode and the random number
    generators are restored. Already initialized quantizers are left alone; one the batch could
    not calibrate (constant or non-finite inputs) is named in a warning and calibrates later.

    Example:
        >>> calibrate_activations(model, **next(iter(train_loader)))
    """
    quantizers = {name: m for name, m in model.named_modules() if isinstance(m, ActivationFakeQuantizer)}
    buffers = [
        (mod, key, buf.clone())
        for mod in model.modules()
        if not isinstance(mod, ActivationFakeQuantizer)
        for key, buf in mod._buffers.items()
        if buf is not None
    ]
    modes = [(mod, mod.training) for mod in model.modules()]
    accelerators = {p.device for p in model.parameters() if p.device.type != "cpu"}
    device_type = next(iter(accelerators)).type if accelerators else "cuda"
    try:
        with torch.random.fork_rng(devices=sorted({d.index or 0 for d in accelerators}), device_type=device_type):
            model.train()
            model(*args, **kwargs)
    finally:
        for mod, training in modes:
            mod.training = training
        for mod, key, value in buffers:
            current = mod._buffers.get(key)
            if current is not None and current.shape == value.shape and current.dtype == value.dtype:
                current.copy_(value)
            else:
                mod._buffers[key] = value
    left = [name for name, q in quantizers.items() if not bool(q.initialized)]
    if left:
        warnings.warn(
            f"calibrate_activations: {len(left)} activation quantizer(s) still uncalibrated ({_names(left)}): this "
            "batch did not reach them or gave them constant / non-finite inputs; they calibrate on the next "
            "training batch, or call calibrate_activations again with other data.",
            stacklevel=3,
        )
