"""The behaviour every fake-quantized layer shares (one mixin; the layers are ~20 lines each)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from ..options import bits_label
from ..quantizers import ActivationFakeQuantizer, WeightFakeQuantizer


class FakeQuantizedModule:
    """Mixin for `FakeQuantizedX(FakeQuantizedModule, X)`.

    The instance is built from an existing float module and REUSES its Parameters and buffers
    (same objects, so state-dict keys stay those of the checkpoint and an optimizer that already
    holds them keeps working); it adds two submodules, `weight_fake_quantizer` and
    `activation_fake_quantizer` (None when off), like torchao's FakeQuantizedLinear.
    After `convert`, `weight` holds a torchao `IntxUnpackedToInt8Tensor` and
    `weight_fake_quantizer` is None, while the activation quantizer stays so inference numerics
    equal training numerics.
    """

    float_class: type[nn.Module]
    weight_channel_axis: int = 0
    supports_activation_quantization: bool = True

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        *,
        weight_bits: int | None,
        act_bits: int | None,
        group_size: int | None = None,
        ternary: bool = False,
        act_signedness: str = "auto",
    ) -> FakeQuantizedModule:
        """Wrap `module` (its Parameters are shared, not copied).

        Raises:
            ValueError: activation bits for a layer without float inputs (Embedding), bad bits,
                a group size that does not divide, NaN/inf weights.
        """
        if act_bits is not None and not cls.supports_activation_quantization:
            raise ValueError(
                f"{type(module).__name__} reads integer ids, so activation quantization does not apply; "
                f"got act_bits={act_bits}, allowed: None (prepare_model sets this for embeddings)."
            )
        new = cls.__new__(cls)
        # Share the float module's state: same Parameter objects, hooks and attributes.
        new.__dict__ = module.__dict__.copy()
        # The float module's own class (a subclass of float_class, e.g. a static-padding conv),
        # restored by to_float so its forward comes back with it.
        new.__dict__["_float_module_class"] = type(module)
        for table in ("_parameters", "_buffers", "_modules"):
            new.__dict__[table] = dict(module.__dict__[table])
        wfq = None
        if weight_bits is not None:
            wfq = WeightFakeQuantizer(
                module.weight,
                weight_bits,
                channel_axis=cls.weight_channel_axis,
                group_size=group_size,
                ternary=ternary,
            ).to(module.weight.device)
        afq = ActivationFakeQuantizer(act_bits, act_signedness) if act_bits is not None else None
        if afq is not None:
            afq = afq.to(module.weight.device)
        new.register_module("weight_fake_quantizer", wfq)
        new.register_module("activation_fake_quantizer", afq)
        return new

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses: fake-quantized while training, the stored one after convert."""
        wfq = self.weight_fake_quantizer
        return wfq(self.weight) if wfq is not None else self.weight

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        afq = self.activation_fake_quantizer
        return afq(x) if afq is not None else x

    def to_float(self) -> nn.Module:
        """The float module again, of its original class, sharing the same Parameters
        (quantizers dropped)."""
        cls = self.__dict__.get("_float_module_class", self.float_class)
        new = cls.__new__(cls)
        new.__dict__ = self.__dict__.copy()
        new.__dict__.pop("_float_module_class", None)
        for table in ("_parameters", "_buffers", "_modules"):
            new.__dict__[table] = dict(self.__dict__[table])
        del new._modules["weight_fake_quantizer"]
        del new._modules["activation_fake_quantizer"]
        return new

    def bits_summary(self) -> str:
        """The layer's `W{w}A{a}` label, e.g. "W2A2", "W8Afloat", "WternaryA4"."""
        w = self.weight_fake_quantizer
        a = self.activation_fake_quantizer
        if w is None:
            return bits_label(None, None if a is None else a.bits)
        return bits_label(w.bits, None if a is None else a.bits, ternary=w.ternary)


# Set by `convert_layer` on a layer whose converted weight stays a float tensor (GPT-2's Conv1D):
# the weight's levels, e.g. "2" or "ternary" (read by `quantization_report`).
LEVELS_ATTR = "_mec_weight_levels"


class LayerSettings(NamedTuple):
    """A layer's quantizer settings, comparable between a prepared layer and a config."""

    weight_bits: int | None
    ternary: bool
    group_size: int | None
    act_bits: int | None
    act_signedness: str | None


def layer_settings(module: FakeQuantizedModule) -> LayerSettings:
    """The settings of a fake-quantized layer's quantizers."""
    w, a = module.weight_fake_quantizer, module.activation_fake_quantizer
    return LayerSettings(
        None if w is None else w.bits,
        False if w is None else w.ternary,
        None if w is None else w.group_size,
        None if a is None else a.bits,
        None if a is None else a.signedness,
    )


def planned_settings(config: Any, module: nn.Module) -> LayerSettings:
    """The settings a `MECQuantConfig` (None: float) gives `module` (no activations for embeddings)."""
    if config is None:
        return LayerSettings(None, False, None, None, None)
    act = config.act_bits if getattr(module, "supports_activation_quantization", True) else None
    weight = config.weight_bits
    return LayerSettings(
        weight,
        bool(config.ternary) if weight is not None else False,
        config.group_size if weight is not None else None,
        act,
        config.act_signedness if act is not None else None,
    )


def settings_label(settings: LayerSettings) -> str:
    """e.g. "W2A2", "W4Afloat", "W3A4 (group 32, signed activations)", "float"."""
    if settings.weight_bits is None and settings.act_bits is None:
        return "float"
    extras = [f"group {settings.group_size}"] if settings.group_size else []
    if settings.act_signedness not in (None, "auto"):
        extras.append(f"{settings.act_signedness} activations")
    label = bits_label(settings.weight_bits, settings.act_bits, ternary=settings.ternary)
    return label + (f" ({', '.join(extras)})" if extras else "")


def holds_converted_weight(module: nn.Module) -> bool:
    """True for a layer whose weight is a torchao int tensor (converted or reloaded), or a float
    tensor holding the levels of a converted layer without torchao kernel (GPT-2's Conv1D)."""
    from torchao.utils import TorchAOBaseTensor

    return isinstance(getattr(module, "weight", None), TorchAOBaseTensor) or LEVELS_ATTR in module.__dict__


def nonfinite_parameters(module: nn.Module) -> list[str]:
    """Names (relative to `module`) of its parameters holding NaN/inf: weight, bias, step sizes."""
    return [name for name, p in module.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
