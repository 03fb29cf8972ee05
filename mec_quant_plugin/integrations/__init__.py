"""Integrations with the Hugging Face stack: the Trainer callback and save / reload / push."""

from .hub import from_pretrained, make_saveable, restore_activation_quantizers, standard_torchao_config
from .trainer import MECQuantCallback, quantization_parameter_names

__all__ = [
    "MECQuantCallback",
    "from_pretrained",
    "make_saveable",
    "quantization_parameter_names",
    "restore_activation_quantizers",
    "standard_torchao_config",
]
