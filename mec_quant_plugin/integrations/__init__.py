"""Integrations with the Hugging Face stack: the Trainer callback, the Trainer mixin, and save /
reload / push. Every transformers internal they rely on is in `transformers_internals.py`."""

from .hub import (
    from_pretrained,
    make_saveable,
    model_class_from_config,
    restore_activation_quantizers,
    standard_torchao_config,
)
from .trainer import MECQuantCallback, quantization_parameter_names
from .trainer_mixin import MECQuantTrainerMixin
from .transformers_internals import TransformersInternalsError

__all__ = [
    "MECQuantCallback",
    "MECQuantTrainerMixin",
    "TransformersInternalsError",
    "from_pretrained",
    "make_saveable",
    "model_class_from_config",
    "quantization_parameter_names",
    "restore_activation_quantizers",
    "standard_torchao_config",
]
