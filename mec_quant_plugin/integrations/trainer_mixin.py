"""`MECQuantTrainerMixin`: MEC-Quant for code that subclasses the Trainer (PEFT's way).

    class MyTrainer(MECQuantTrainerMixin, Trainer):
        ...  # your own overrides, if any

    trainer = MyTrainer(model=model, args=args, train_dataset=ds, mec_config=MECQuantConfig(weight_bits=2))

Where the callback has to find the Trainer on the call stack and patch it, the mixin IS the
Trainer and overrides its public, documented methods: `compute_loss` adds the term,
`get_decay_parameter_names` keeps step sizes out of weight decay, `log` adds the `mec/*`
statistics, `train` converts at the end. It trains exactly like `MECQuantCallback` (tested).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..config import MECQuantConfig
from ..objective import MECRegularizer
from . import transformers_internals as internals
from .model_card import update_model_card
from .trainer import MECTrainingTerm, quantization_parameter_names


class MECQuantTrainerMixin:
    """Adds MEC-Quant to a `transformers.Trainer` subclass: list it BEFORE the Trainer class.

    Args (keywords, besides the Trainer's own):
        mec_config: quantization bits, layer policy and `mec_*` objective settings.
        mec_convert_on_train_end: convert to torchao int weights when `train()` returns, so
            `save_model()` / `push_to_hub()` write the quantized model.
        mec_run_info: extra facts for the model card (e.g. {"base_model": ..., "dataset": ...}).

    At the end of `__init__` (before the optimizer exists) the teacher is made if a term needs
    one and the model is prepared, like the callback does; the loss of TRAINING steps gets the
    MEC-Quant terms, evaluation losses stay the task loss; `trainer.mec_regularizer` is the
    `MECRegularizer`.

    Example:
        >>> class MECTrainer(MECQuantTrainerMixin, Trainer):
        ...     pass
        >>> trainer = MECTrainer(model=model, args=args, train_dataset=ds, mec_config=MECQuantConfig())
        >>> trainer.train(); trainer.save_model()

    Raises:
        TypeError: the mixin is not listed before a Trainer class.
        ValueError: `optimizers=` or `model_init` with a model that is not prepared yet (call
            `prepare_model` first); the teacher view or distillation with an already prepared model.
    """

    def __init__(
        self,
        *args: Any,
        mec_config: MECQuantConfig | None = None,
        mec_convert_on_train_end: bool = True,
        mec_run_info: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        from transformers import Trainer

        if not isinstance(self, Trainer):
            raise TypeError(
                f"{type(self).__name__} must subclass transformers.Trainer too: "
                "class MyTrainer(MECQuantTrainerMixin, Trainer)."
            )
        super().__init__(*args, **kwargs)
        self.mec_config = mec_config or MECQuantConfig()
        self.mec_convert_on_train_end = mec_convert_on_train_end
        self.mec_run_info = dict(mec_run_info or {})
        self.mec_term = MECTrainingTerm(self.mec_config, "MECQuantTrainerMixin")
        self.mec_term.setup(self, self.model)
        self.add_callback(_StepGuard(self))

    @property
    def mec_regularizer(self) -> MECRegularizer | None:
        """The coding-length term built at `__init__`."""
        return self.mec_term.regularizer

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The Trainer's loss, plus the MEC-Quant terms in training (scaled like a per-batch mean
        under gradient accumulation and data parallelism); the terms see the model's logits and
        the batch's labels."""
        training = model.training and torch.is_grad_enabled()
        if training:
            self.mec_term.set_progress(self.state.global_step, self.state.max_steps)
        labels = inputs.get("labels")  # read first: the Trainer pops them when it smooths labels
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
        )
        if training:
            divisor = internals.compute_loss_divisor(self, num_items_in_batch)
            loss = self.mec_term.add_to(loss, divisor, logits=outputs, labels=labels)
        return (loss, outputs) if return_outputs else loss

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """The Trainer's decayed parameters without the learnable step sizes and MEC gates."""
        exempt = quantization_parameter_names(model)
        return [n for n in super().get_decay_parameter_names(model) if n not in exempt]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with the `mec/*` statistics averaged since the last training log
        (`mec/*loss`: what each term adds to the logged training loss, weight applied, >= 0)."""
        if "loss" in logs:
            logs.update(self.mec_term.pop_log())
        super().log(logs, *args, **kwargs)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """The Trainer's train; then, with `mec_convert_on_train_end`, torchao int weights.

        Raises:
            RuntimeError: the model was converted at the end of a previous train().
            FloatingPointError: a step with NaN/inf gradients, under on_nonfinite='stop'.
        """
        self.mec_term.check_can_train()
        output = super().train(*args, **kwargs)
        if self.mec_convert_on_train_end:
            self.mec_term.convert(self.model, self.mec_run_info, self.state.log_history)
        return output


    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The Trainer's card (`push_to_hub` calls this too), with the plugin's quantization section
        and tags merged in: the Trainer writes its card over the one `save_model` wrote."""
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            update_model_card(self.model, os.path.join(self.args.output_dir, "README.md"))


class _StepGuard(TrainerCallback):
    """The mixin's NaN/inf check before each optimizer step (`on_pre_optimizer_step` is a public
    callback event; the Trainer has no public method between backward and the optimizer step)."""

    def __init__(self, trainer: MECQuantTrainerMixin) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.trainer.mec_term.guard_step(self.trainer, model, state.global_step + 1)
        return control
