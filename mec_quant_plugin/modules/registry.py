"""One registry from float module type to its fake-quantized subclass.

Lookup is by exact type first; a subclass of a registered float type is accepted when it does
not override `forward` (e.g. a Conv2d subclass that only adds attributes). A subclass that DOES
override `forward` is accepted only by a handler registered for that pattern with a `match`
predicate (e.g. the static "same"-padding Conv2d of EfficientNet ports, see
`static_padding_conv2d.py`); any other is refused (left in float, with a warning from
`prepare_model`), because our fake-quantized forward would silently replace its own.

Some layers are never called at all: their parent reads their weight directly (the `out_proj` of
`nn.MultiheadAttention`). Fake-quantizing them would train them in float while reporting them as
quantized, so they are not supported (`BYPASSED_FORWARD`, reported by `quantization_report`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

FAKE_QUANTIZED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}

# (float base type, match predicate, fake-quantized class) for subclasses that override forward,
# tried in registration order.
SUBCLASS_HANDLERS: list[tuple[type[nn.Module], Callable[[nn.Module], bool], type[nn.Module]]] = []

# Float types whose parent never calls their forward (it reads their weight itself) -> why.
# NonDynamicallyQuantizableLinear is torch's marker class for exactly MHA's out_proj.
BYPASSED_FORWARD: dict[type[nn.Module], str] = {
    nn.modules.linear.NonDynamicallyQuantizableLinear: (
        "nn.MultiheadAttention reads out_proj.weight and .bias directly and never calls out_proj's forward"
    ),
}

T = TypeVar("T", bound=type)


def register_fake_quantized(
    float_cls: type[nn.Module], *, match: Callable[[nn.Module], bool] | None = None
) -> Callable[[T], T]:
    """Class decorator: `@register_fake_quantized(nn.Linear) class FakeQuantizedLinear(...)`.

    With `match`, the class handles the subclasses of `float_cls` that override `forward` and for
    which `match(module)` is True (the predicate must check that the class's forward is one the
    fake-quantized class reproduces); the exact-type entry of `float_cls` is left alone.
    """

    def wrap(cls: T) -> T:
        if match is None:
            FAKE_QUANTIZED_CLASSES[float_cls] = cls
        else:
            SUBCLASS_HANDLERS.append((float_cls, match, cls))
        cls.float_class = float_cls
        return cls

    return wrap


def supported_type_names() -> list[str]:
    """Names of the float module types the plugin can quantize (for error messages)."""
    return sorted(f"{c.__module__.split('.')[0]}.{c.__qualname__}" for c in FAKE_QUANTIZED_CLASSES)


def fake_quantized_class_for(module: nn.Module) -> type[nn.Module] | None:
    """The fake-quantized class for `module`, or None when it is not supported."""
    cls = type(module)
    if cls in BYPASSED_FORWARD:
        return None
    if cls in FAKE_QUANTIZED_CLASSES:
        return FAKE_QUANTIZED_CLASSES[cls]
    if is_fake_quantized(module):
        return None
    for float_cls, fq_cls in FAKE_QUANTIZED_CLASSES.items():
        if isinstance(module, float_cls) and cls.forward is float_cls.forward:
            return fq_cls
    for float_cls, match, fq_cls in SUBCLASS_HANDLERS:
        if isinstance(module, float_cls) and match(module):
            return fq_cls
    return None


def refused_float_type(module: nn.Module) -> type[nn.Module] | None:
    """The registered float type that `module` subclasses when it is refused for overriding
    `forward` in a way no handler reproduces; None for supported or unrelated modules."""
    if is_fake_quantized(module) or fake_quantized_class_for(module) is not None or bypassed_reason(module):
        return None
    return next((c for c in FAKE_QUANTIZED_CLASSES if isinstance(module, c)), None)


def bypassed_reason(module: nn.Module) -> str | None:
    """Why `module`'s parent never calls its forward (see `BYPASSED_FORWARD`), or None."""
    return BYPASSED_FORWARD.get(type(module))


def is_fake_quantized(module: nn.Module, fqn: str = "") -> bool:
    """Filter for `quantize_(..., step="convert")`: True for the plugin's fake-quantized layers."""
    from .base import FakeQuantizedModule

    return isinstance(module, FakeQuantizedModule)


def is_supported_layer(module: nn.Module, fqn: str = "") -> bool:
    """Filter for `quantize_(..., step="prepare")`: Linear, Conv2d, Embedding, GPT-2 Conv1D.

    torchao's default filter only sees nn.Linear; pass this one to also reach Conv2d (including
    static "same"-padding subclasses), Embedding and Conv1D. Already fake-quantized layers are not
    selected again.
    """
    return not is_fake_quantized(module) and fake_quantized_class_for(module) is not None
