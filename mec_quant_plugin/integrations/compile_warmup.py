"""Run the first training steps eagerly under `Trainer(torch_compile=True)` until every activation
quantizer is calibrated.

The Trainer compiles the model before the first batch. Compiled while an activation step is still
uncalibrated, dynamo traces the calibration step, breaks inside every layer (calibration reads the
batch's statistics as Python numbers) and keeps those per-layer graphs: correct but slow for the
whole run. Run eagerly until calibrated, dynamo first sees the calibrated model and compiles it
whole. torch has no per-module switch for this; `torch.compiler.set_stance("force_eager")` is the
public, global one, so it is set only for those first steps and always restored.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..quantizers import ActivationFakeQuantizer

logger = logging.getLogger("mec_quant_plugin")


def uncalibrated_activation_quantizers(model: nn.Module) -> list[str]:
    """Names of the activation quantizers whose step is not initialized yet."""
    return [name for name, mod in model.named_modules()
            if isinstance(mod, ActivationFakeQuantizer) and not bool(mod.initialized)]


class EagerUntilCalibrated:
    """`start(args, model)` at train begin, `step_done(model)` after each step, `stop()` at the end."""

    def __init__(self) -> None:
        self.active = False

    def start(self, args, model: nn.Module | None) -> None:
        if not getattr(args, "torch_compile", False) or model is None or not uncalibrated_activation_quantizers(model):
            return
        torch.compiler.set_stance("force_eager")
        self.active = True
        logger.info("torch_compile: the first step runs eagerly to calibrate the activation steps; "
                    "the model is compiled from the next step on.")

    def step_done(self, model: nn.Module | None) -> None:
        if self.active and model is not None and not uncalibrated_activation_quantizers(model):
            self.stop()

    def stop(self) -> None:
        if self.active:
            torch.compiler.set_stance("default")
            self.active = False
