"""Fake-quantized layers, one small file each, registered by float module type."""

from .base import FakeQuantizedModule
from .conv1d import FakeQuantizedConv1D
from .conv2d import FakeQuantizedConv2d
from .embedding import FakeQuantizedEmbedding
from .linear import FakeQuantizedLinear
from .registry import (
    BYPASSED_FORWARD,
    FAKE_QUANTIZED_CLASSES,
    SUBCLASS_HANDLERS,
    bypassed_reason,
    fake_quantized_class_for,
    is_fake_quantized,
    is_supported_layer,
    refused_float_type,
    register_fake_quantized,
    supported_type_names,
)
from .static_padding_conv2d import FakeQuantizedStaticPaddingConv2d

__all__ = [
    "BYPASSED_FORWARD",
    "FAKE_QUANTIZED_CLASSES",
    "FakeQuantizedConv1D",
    "FakeQuantizedConv2d",
    "FakeQuantizedEmbedding",
    "FakeQuantizedLinear",
    "FakeQuantizedModule",
    "FakeQuantizedStaticPaddingConv2d",
    "SUBCLASS_HANDLERS",
    "bypassed_reason",
    "fake_quantized_class_for",
    "is_fake_quantized",
    "is_supported_layer",
    "refused_float_type",
    "register_fake_quantized",
    "supported_type_names",
]
