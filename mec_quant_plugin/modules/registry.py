"""One registry from float module type to its fake-quantized subclass.

Lookup is by exact type first; a subclass of a registered float type is accepted only when it
does not override `forward` (e.g. a Conv2d subclass that only adds attributes), because our
fake-quantized forward would silently replace its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

FAKE_QUANTIZED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}

T = TypeVar("T", bound=type)


def register_fake_quantized(float_cls: type[nn.Module]) -> Callable[[T], T]:
    """Class decorator: `@register_fake_quantized(nn.Linear) class FakeQuantizedLinear(...)`."""

    def wrap(cls: T) -> T:
        FAKE_QUANTIZED_CLASSES[float_cls] = cls
        cls.float_class = float_cls
        return cls

    return wrap


def supported_type_names() -> list[str]:
    """Names of the float module types the plugin can quantize (for error messages)."""
    return sorted(f"{c.__module__.split('.')[0]}.{c.__qualname__}" for c in FAKE_QUANTIZED_CLASSES)


def fake_quantized_class_for(module: nn.Module) -> type[nn.Module] | None:
    """The fake-quantized class for `module`, or None when it is not supported."""
    cls = type(module)
    if cls in FAKE_QUANTIZED_CLASSES:
        return FAKE_QUANTIZED_CLASSES[cls]
    if is_fake_quantized(module):
        return None
    for float_cls, fq_cls in FAKE_QUANTIZED_CLASSES.items():
        if isinstance(module, float_cls) and cls.forward is float_cls.forward:
            return fq_cls
    return None


def is_fake_quantized(module: nn.Module, fqn: str = "") -> bool:
    """Filter for `quantize_(..., step="convert")`: True for the plugin's fake-quantized layers."""
    from .base import FakeQuantizedModule

    return isinstance(module, FakeQuantizedModule)


def is_supported_layer(module: nn.Module, fqn: str = "") -> bool:
    """Filter for `quantize_(..., step="prepare")`: Linear, Conv2d, Embedding, GPT-2 Conv1D.

    torchao's default filter only sees nn.Linear; pass this one to also reach Conv2d, Embedding
    and Conv1D. Already fake-quantized layers are not selected again.
    """
    return not is_fake_quantized(module) and fake_quantized_class_for(module) is not None
