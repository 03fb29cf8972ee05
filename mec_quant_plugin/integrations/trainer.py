"""`MECQuantCallback`: MEC-Quant in a standard `transformers.Trainer` with one added argument.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[MECQuantCallback(config)])

At the end of `Trainer.__init__` (before the optimizer, DDP wrapping and torch.compile exist) the
callback makes the full-precision teacher if the view needs one, prepares the model (layer policy
included), and adds the coding-length term to the model's TRAINING loss through a forward hook on
the top-level model. Eval and predict losses stay the task loss (the hook only acts in training
mode with grad enabled).
"""

from __future__ import annotations

import inspect
import logging
import math
import re
import warnings
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..api import convert_model, prepare_model
from ..config import MECQuantConfig
from ..modules.registry import is_fake_quantized
from ..objective import MECRegularizer, make_teacher
from ..quantizers import ActivationFakeQuantizer, WeightFakeQuantizer
from .hub import make_saveable

logger = logging.getLogger("mec_quant_plugin")

_PREPARE_FIRST = (
    "MECQuantCallback cannot prepare the model here because {why}: the optimizer would not own the "
    "learnable step sizes. Call `mec_quant_plugin.prepare_model(model, config)` BEFORE building the "
    "optimizer (or the model in model_init), then pass MECQuantCallback(config) as usual: it will "
    "see the prepared model and only add the coding-length term."
)


def _calling_trainer() -> Any:
    """The Trainer whose __init__ is running `on_init_end`.

    Why: callbacks never receive the Trainer, but three things need it before training starts:
    the weight-decay grouping (step sizes must go to the no-decay group, and the optimizer is built
    later from `get_decay_parameter_names`), the loss-kwargs flag (transformers' ResNet/ConvNeXt
    drop `num_items_in_batch`), and the callback order (our `on_log` must run before the
    reporters). The Trainer's own frame is a few levels up the stack at this point.
    """
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
    finally:
        del frame
    return None


def _drops_loss_kwargs(model: nn.Module) -> bool:
    """True unless forward passes **kwargs on to `self.loss_function(...)`: models that compute
    their loss without `num_items_in_batch` (transformers' ResNet/ConvNeXt call loss_function
    without it, BERT uses CrossEntropyLoss) still accept **kwargs, so the Trainer would neither
    divide their loss by the accumulation steps nor let them normalize it (measured: BERT's
    logged loss doubles at accumulation 2). Erring towards True only changes how micro-batches
    are weighted (mean of means), never the scale."""
    try:
        src = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False
    calls = re.findall(r"self\.loss_function\(([^)]*)\)", src)
    return not any("**kwargs" in c for c in calls)


def quantization_parameter_names(model: nn.Module) -> set[str]:
    """Names of the learnable step sizes / offsets (and MEC gates): never weight-decayed."""
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (WeightFakeQuantizer, ActivationFakeQuantizer)) or mod_name.startswith("mec_gates"):
            for p_name, _ in mod.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


class MECQuantCallback(TrainerCallback):
    """Quantization-aware training with the MEC coding-length term for `transformers.Trainer`.

    Args:
        config: quantization bits, layer policy and `mec_*` objective settings.
        convert_on_train_end: convert to torchao int weights at the end of training, so
            `trainer.save_model()` / `trainer.push_to_hub()` write the quantized model.
        run_info: extra facts for the model card (e.g. {"base_model": ..., "dataset": ...}).

    Logged through the Trainer (progress bar, TensorBoard, any `report_to`): every statistic of
    the regularizer (`MECStats.to_dict()`: `mec/loss`, `mec/coding_length`, `mec/spectral_bound`,
    `mec/lambda`, per-tap and per-expert values, the gate balance, the teacher's cost), averaged
    over the logging interval.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[MECQuantCallback(MECQuantConfig())])

    Raises:
        ValueError: the Trainer got `optimizers=` or `model_init` and the model is not prepared
            (the message says to call `prepare_model` first).
    """

    def __init__(
        self,
        config: MECQuantConfig | None = None,
        *,
        convert_on_train_end: bool = True,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        self.config = config or MECQuantConfig()
        self.convert_on_train_end = convert_on_train_end
        self.run_info = dict(run_info or {})
        self.regularizer: MECRegularizer | None = None
        self.trainer: Any = None
        self._hook: Any = None
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._count = 0
        self._warned: set[str] = set()

    # ---- set-up ----------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        trainer = _calling_trainer()
        self.trainer = trainer
        prepared = any(is_fake_quantized(m) for m in model.modules())
        if not prepared and trainer is not None:
            if getattr(trainer, "model_init", None) is not None:
                raise ValueError(_PREPARE_FIRST.format(why="the Trainer builds the model with model_init"))
            if trainer.optimizer is not None:
                raise ValueError(_PREPARE_FIRST.format(why="the Trainer got a ready optimizer (optimizers=...)"))
        teacher = None
        if self.config.mec_view == "teacher":
            if prepared:
                raise ValueError(
                    "mec_view='teacher' needs the full-precision model: pass the unprepared model to the "
                    "Trainer (the callback makes the teacher, then prepares), or build the term yourself "
                    "with MECRegularizer(model, config, teacher=make_teacher(float_model))."
                )
            teacher = make_teacher(model)
        if not prepared:
            prepare_model(model, self.config)
        self.attach(model, teacher)
        if trainer is not None:
            self._configure_trainer(trainer, model)
        return control

    def attach(self, model: nn.Module, teacher: nn.Module | None = None) -> None:
        """Build the regularizer and the loss hook on an already prepared model."""
        self.regularizer = MECRegularizer(model, self.config, teacher=teacher)
        if len(self.regularizer.gates):
            # Gates are trained with the model: registering them makes the Trainer's optimizer own
            # them and its checkpoints hold them (removed again at convert).
            model.mec_gates = self.regularizer.gates
        self._hook = model.register_forward_hook(self._add_term, with_kwargs=True)

    def _configure_trainer(self, trainer: Any, model: nn.Module) -> None:
        if _drops_loss_kwargs(model) and trainer.model_accepts_loss_kwargs:
            model.accepts_loss_kwargs = False
            trainer.model_accepts_loss_kwargs = False
        original = trainer.get_decay_parameter_names

        def get_decay_parameter_names(opt_model: nn.Module) -> list[str]:
            exempt = quantization_parameter_names(opt_model)
            return [n for n in original(opt_model) if n not in exempt]

        trainer.get_decay_parameter_names = get_decay_parameter_names
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:  # run our on_log first so every reporter sees the mec/* keys
            callbacks.remove(self)
            callbacks.insert(0, self)

    # ---- the term --------------------------------------------------------------------------
    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _loss_divisor(self, kwargs: dict[str, Any]) -> float:
        """When the Trainer passes `num_items_in_batch`, it neither divides the loss by the
        accumulation steps nor keeps it per-process (it multiplies by the number of processes
        before DDP averages); the term is a per-batch mean, so undo both for it."""
        trainer = self.trainer
        if trainer is None or kwargs.get("num_items_in_batch") is None:
            return 1.0
        steps = getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps
        divisor = float(steps)
        if trainer.args.average_tokens_across_devices:
            divisor *= trainer.accelerator.num_processes
        return divisor

    def _add_term(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        reg = self.regularizer
        if reg is None or not module.training or not torch.is_grad_enabled():
            return None
        loss = output.get("loss") if isinstance(output, dict) else None
        if loss is None:
            reg.capture.clear()  # drop this forward's features: nothing may pile up
            self._warn_once(
                "no-loss",
                "MECQuantCallback: the model returned no loss (no labels in the batch?); training "
                "continues WITHOUT the coding-length term.",
            )
            return None
        term = reg()
        if not torch.isfinite(term).all():
            self._warn_once("nonfinite", "MECQuantCallback: non-finite coding-length term; skipped for this step.")
            return None
        output["loss"] = loss + term / self._loss_divisor(kwargs)
        stats = reg.last_stats
        for key, value in stats.items():  # every statistic, each averaged over the steps that had it
            if math.isfinite(value):
                self._sums[key] = self._sums.get(key, 0.0) + value
                self._counts[key] = self._counts.get(key, 0) + 1
        self._count += 1
        # The adaptive lambda holds the spectral radius at its target by construction; with a fixed
        # lambda the Frobenius bound is the only guard users have.
        if self.config.mec_lambda_mode == "fixed" and stats.get("spectral_bound", 0.0) >= 1.0:
            self._warn_once(
                "bound",
                f"MECQuantCallback: spectral bound ||C||_F = {stats['spectral_bound']:.2f} >= 1, the Taylor "
                "series of log det may diverge; use mec_lambda_mode='adaptive' or a larger mec_eps2_per_dim.",
            )
        return output

    # ---- schedule, logging, end ------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        if self.regularizer is not None:
            self.regularizer.set_progress(state.global_step, max(state.max_steps, 1))
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self._count:
            ours = {f"mec/{key}": round(total / self._counts[key], 6) for key, total in self._sums.items()}
            logs.update(ours)  # what the reporters (progress bar, TensorBoard, ...) receive
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(ours)  # the Trainer appended its copy before on_log
            self._sums, self._counts, self._count = {}, {}, 0
        return control

    def detach(self, model: nn.Module) -> None:
        """Remove the loss hook, the capture hooks and the gates from the model."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.regularizer is not None:
            self.regularizer.remove()
        if "mec_gates" in model._modules:
            del model._modules["mec_gates"]

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.convert_on_train_end or model is None:
            return control
        self.detach(model)
        convert_model(model)
        info = dict(self.run_info)
        info.setdefault("base_model", getattr(getattr(model, "config", None), "_name_or_path", None) or None)
        if state.log_history:
            info.setdefault("metrics", {k: v for k, v in state.log_history[-1].items() if isinstance(v, (int, float))})
        make_saveable(model, self.config, run_info=info)
        logger.info("MECQuantCallback: converted the model to torchao int weights at the end of training.")
        return control
