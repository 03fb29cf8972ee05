"""MEC-Quant: maximum-entropy-coding quantization-aware training for torchao and Hugging Face.

Two lines on top of an existing pipeline:

    model = prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2))
    ...train...
    model = convert_model(model)
"""

from .api import calibrate_activations, convert_model, prepare_model, quantization_report
from .config import MECQuantConfig
from .modules import is_fake_quantized, is_supported_layer
from .quantizers import ActivationFakeQuantizer, WeightFakeQuantizer

__version__ = "0.1.0"

__all__ = [
    "ActivationFakeQuantizer",
    "MECQuantConfig",
    "WeightFakeQuantizer",
    "calibrate_activations",
    "convert_model",
    "is_fake_quantized",
    "is_supported_layer",
    "prepare_model",
    "quantization_report",
]
