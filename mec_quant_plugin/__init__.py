"""MEC-Quant: maximum-entropy-coding quantization-aware training for torchao and Hugging Face.

Two lines on top of an existing pipeline:

    model = prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2))
    ...train (loss = task_loss + MECRegularizer(model, config)(), the Trainer callback or mixin)...
    model = convert_model(model)
"""

from . import _quiet_import  # noqa: F401  (first: imports torchao without its optional-kernel noise)
from .api import calibrate_activations, convert_model, prepare_model
from .checkpoint import CheckpointMismatchError, convert_checkpoint
from .config import MECQuantConfig
from .export import GGUFExportError, ONNXExportError, export_gguf, export_onnx
from .integrations import MECQuantCallback, MECQuantTrainerMixin, from_pretrained, make_saveable
from .modules import is_fake_quantized, is_supported_layer
from .objective import (
    FeatureCapture,
    MECRegularizer,
    MECStats,
    TermStats,
    adaptive_lambda,
    coding_length_loss,
    exact_coding_length,
    make_teacher,
    mixture_coding_length_loss,
)
from .quantizers import ActivationFakeQuantizer, WeightFakeQuantizer
from .report import quantization_report

__version__ = "0.1.0"

__all__ = [
    "ActivationFakeQuantizer",
    "FeatureCapture",
    "GGUFExportError",
    "ONNXExportError",
    "MECQuantCallback",
    "MECQuantConfig",
    "MECQuantTrainerMixin",
    "MECRegularizer",
    "MECStats",
    "TermStats",
    "WeightFakeQuantizer",
    "adaptive_lambda",
    "calibrate_activations",
    "coding_length_loss",
    "CheckpointMismatchError",
    "convert_checkpoint",
    "convert_model",
    "exact_coding_length",
    "export_gguf",
    "export_onnx",
    "from_pretrained",
    "is_fake_quantized",
    "is_supported_layer",
    "make_saveable",
    "make_teacher",
    "mixture_coding_length_loss",
    "prepare_model",
    "quantization_report",
]
