"""`MECQuantCallback`: MEC-Quant in a standard `transformers.Trainer` with one added argument.

    trainer = Trainer(model, args, train_dataset=..., callbacks=[MECQuantCallback(config)])

At the end of `Trainer.__init__` (before the optimizer, DDP wrapping and torch.compile exist) the
callback makes the full-precision teacher if a term needs one (`mec_view="teacher"`,
`distill_weight > 0`), prepares the model (layer policy included), and adds the MEC-Quant terms
to the model's TRAINING loss through a forward hook on the top-level model (which sees the
model's logits and the batch's labels). Eval and predict losses stay the task loss (the hook only acts in training
mode with grad enabled). A callback is never handed the Trainer, so it reaches into it (see
`transformers_internals.py`); `MECQuantTrainerMixin` (trainer_mixin.py) does the same through
public Trainer methods for users who subclass the Trainer. Both share `MECTrainingTerm` below.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..api import convert_model, prepare_model
from ..checkpoint import check_same_quantization, load_checkpoint_state, write_train_config
from ..config import MECQuantConfig
from ..distributed import sharded_model_message, sharded_parameter_names
from ..modules.registry import is_fake_quantized
from ..objective import MECRegularizer, make_teacher
from ..quantizers import ActivationFakeQuantizer, WeightFakeQuantizer
from . import transformers_internals as internals
from .compile_warmup import EagerUntilCalibrated
from .hub import make_saveable
from .model_card import update_model_card

logger = logging.getLogger("mec_quant_plugin")

_PREPARE_FIRST = (
    "{owner} cannot prepare the model here because {why}: the optimizer would not own the "
    "learnable step sizes. Call `mec_quant_plugin.prepare_model(model, config)` BEFORE building the "
    "optimizer (or the model in model_init), then use {owner} as usual: it will see the prepared "
    "model and only add the coding-length term."
)


def quantization_parameter_names(model: nn.Module) -> set[str]:
    """Names of the learnable step sizes / offsets (and MEC gates): never weight-decayed.

    Example:
        >>> decay = [n for n in trainer.get_decay_parameter_names(model) if n not in quantization_parameter_names(model)]
    """
    names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (WeightFakeQuantizer, ActivationFakeQuantizer)) or mod_name.startswith("mec_gates"):
            for p_name, _ in mod.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


class MECTrainingTerm:
    """What the callback and the Trainer mixin share: preparing the model for a Trainer, adding
    the term to a training loss, averaging the statistics between logs, converting at the end.

    Args:
        config: quantization bits, layer policy and `mec_*` objective settings.
        owner: the user-facing class name, for messages.
    """

    def __init__(self, config: MECQuantConfig, owner: str) -> None:
        self.config = config
        self.owner = owner
        self.regularizer: MECRegularizer | None = None
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._warned: set[str] = set()
        self.converted = False  # by `convert`, at the end of a train()
        self.skipped_steps = 0  # non-finite steps dropped under on_nonfinite='skip'

    # ---- set-up ----------------------------------------------------------------------------
    def setup(self, trainer: Any, model: nn.Module) -> None:
        """Make the teacher if needed, prepare the model unless it is, build the regularizer.

        Raises:
            ValueError: the Trainer got `optimizers=` or `model_init` and the model is not
                prepared; the teacher view or distillation with an already prepared model.
        """
        prepared = any(is_fake_quantized(m) for m in model.modules())
        if not prepared:
            why = internals.check_trainer_builds_nothing(trainer)
            if why is not None:
                raise ValueError(_PREPARE_FIRST.format(owner=self.owner, why=why))
        teacher = None
        needs = self.config.teacher_needs()
        if needs:
            if prepared:
                raise ValueError(
                    f"{' and '.join(needs)} needs the full-precision model as teacher: pass the unprepared model "
                    f"to the Trainer ({self.owner} makes the teacher, then prepares), or build the term yourself "
                    "with MECRegularizer(model, config, teacher=make_teacher(float_model))."
                )
            teacher = make_teacher(model)
        if not prepared:
            # TrainingArguments(disable_tqdm=True) turns off the preparation's progress bar too.
            quiet = bool(getattr(getattr(trainer, "args", None), "disable_tqdm", False))
            prepare_model(model, self.config, progress=False if quiet else None)
        self.attach(model, teacher)
        if internals.model_drops_loss_kwargs(model):
            internals.stop_passing_loss_kwargs(trainer, model)

    def attach(self, model: nn.Module, teacher: nn.Module | None = None) -> None:
        """Build the regularizer on an already prepared model."""
        self.regularizer = MECRegularizer(model, self.config, teacher=teacher)
        if len(self.regularizer.gates):
            # Gates are trained with the model: registering them makes the Trainer's optimizer own
            # them and its checkpoints hold them (removed again at convert).
            model.mec_gates = self.regularizer.gates

    # ---- the term --------------------------------------------------------------------------
    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    @torch.compiler.disable
    def add_to(
        self, loss: torch.Tensor, divisor: float, *, logits: Any = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`loss + term / divisor` for the last training forward, or `loss` unchanged (with a
        one-time warning) when the term is not finite; records the term's statistics. `logits`
        (the model output) and `labels` feed distillation and the label-aware term.

        Runs eagerly under torch.compile (`Trainer(torch_compile=True)` traces the model's forward
        hooks, this one included): the term reads Python statistics and a step-dependent schedule,
        which would break the graph or recompile every step; the model's own graph stays whole."""
        term = self.regularizer(logits=logits, labels=labels)
        if not torch.isfinite(term).all():
            self.warn_once("nonfinite", f"{self.owner}: non-finite MEC-Quant term; skipped for this step.")
            return loss
        stats = self.regularizer.last_stats
        for key, value in stats.items():  # every statistic, each averaged over the steps that had it
            if math.isfinite(value):
                self._sums[key] = self._sums.get(key, 0.0) + value
                self._counts[key] = self._counts.get(key, 0) + 1
        # The adaptive lambda holds the spectral radius at its target by construction; with a fixed
        # lambda the Frobenius bound is the only guard users have.
        if self.config.mec_lambda_mode == "fixed" and stats.get("spectral_bound", 0.0) >= 1.0:
            self.warn_once(
                "bound",
                f"{self.owner}: spectral bound ||C||_F = {stats['spectral_bound']:.2f} >= 1, the Taylor "
                "series of log det may diverge; use mec_lambda_mode='adaptive' or a larger mec_eps2_per_dim.",
            )
        return loss + term / divisor

    # ---- guards ----------------------------------------------------------------------------
    def check_can_train(self) -> None:
        """Refuse to train a model this term converted at the end of a previous `train()`.

        Raises:
            RuntimeError: the model holds torchao int weights now; training it would update only
                the float norms and activation step sizes.
        """
        if self.converted:
            raise RuntimeError(
                f"{self.owner}: the model was converted to torchao int weights at the end of the previous train(); "
                "a second train() would update only its norms and activation step sizes. Build a new Trainer from "
                "the float model (or a training checkpoint), or turn the conversion off (MECQuantCallback("
                "convert_on_train_end=False) / mec_convert_on_train_end=False) and call convert_model(model) after "
                "the last train()."
            )

    def guard_step(self, trainer: Any, model: nn.Module, step: int) -> None:
        """Before the optimizer step: stop (`on_nonfinite='stop'`) or drop the update (`'skip'`)
        when a gradient is NaN/inf, so NaN never reaches the weights or the step sizes.

        Raises:
            FloatingPointError: non-finite gradients under 'stop'; non-finite BatchNorm running
                statistics under either policy (the forward wrote them: skipping cannot undo that).
        """
        if internals.grad_scaler_active(trainer):
            return  # fp16 mixed precision: the GradScaler skips non-finite steps itself
        grads = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
        finite = not grads or bool(torch.stack([torch.isfinite(g).all() for _, g in grads]).all())
        statistics = nonfinite_running_statistics(model)
        if finite and not statistics:
            return
        bad = [name for name, g in grads if not torch.isfinite(g).all()]
        problems = []
        if bad:
            problems.append(f"non-finite gradients in {len(bad)} parameter(s) ({_shown(bad)})")
        if statistics:
            problems.append(
                f"non-finite running statistics in {_shown(statistics)} (written by the forward: skipping the "
                "update cannot undo them)"
            )
        what = f"{self.owner}, step {step}: " + "; ".join(problems)
        if self.config.on_nonfinite == "stop" or statistics:
            raise FloatingPointError(
                f"{what}. Training stopped before the optimizer step, so this step changed no weight or step size. "
                "Look for NaN/inf in the batch or a too-high learning rate"
                + ("." if statistics else "; MECQuantConfig(on_nonfinite='skip') drops such steps instead.")
            )
        for p in model.parameters():
            p.grad = None  # torch optimizers leave parameters without a gradient (and their state) alone
        self.skipped_steps += 1
        logger.warning(
            "%s: skipped step %d (on_nonfinite='skip'): %s; weights, step sizes and optimizer state unchanged "
            "(%d step(s) skipped so far).", self.owner, step, "; ".join(problems), self.skipped_steps,
        )

    def set_progress(self, step: int, max_steps: int) -> None:
        if self.regularizer is not None:
            self.regularizer.set_progress(step, max(max_steps, 1))

    def pop_log(self) -> dict[str, float]:
        """`mec/<key>`: the mean of every statistic since the last call (empty if none)."""
        out = {f"mec/{key}": round(total / self._counts[key], 6) for key, total in self._sums.items()}
        self._sums, self._counts = {}, {}
        return out

    # ---- end -------------------------------------------------------------------------------
    def detach(self, model: nn.Module) -> None:
        """Remove the capture hooks and the gates from the model."""
        if self.regularizer is not None:
            self.regularizer.remove()
        if "mec_gates" in model._modules:
            del model._modules["mec_gates"]

    def convert(self, model: nn.Module, run_info: dict[str, Any], log_history: list[dict[str, Any]]) -> None:
        """Detach, convert to torchao int weights and make `save_pretrained` write a torchao checkpoint.

        A model sharded by FSDP2 (DTensor parameters) is left unconverted, with a warning: its shards
        cannot be converted in place; the Trainer's save gathers the float weights and step sizes,
        which `mec-quant convert` (or `convert_model` on the reloaded full model) turns into int weights."""
        self.detach(model)
        sharded = sharded_parameter_names(model)
        if sharded:
            warnings.warn(
                f"{self.owner}: not converted at the end of training. "
                + sharded_model_message("Converting", sharded),
                stacklevel=2,
            )
            return
        convert_model(model)
        info = dict(run_info)
        info.setdefault("base_model", getattr(getattr(model, "config", None), "_name_or_path", None) or None)
        if log_history:
            info.setdefault("metrics", {k: v for k, v in log_history[-1].items() if isinstance(v, (int, float))})
        make_saveable(model, self.config, run_info=info)
        self.converted = True
        logger.info("%s: converted the model to torchao int weights at the end of training.", self.owner)


def nonfinite_running_statistics(model: nn.Module) -> list[str]:
    """Names of the BatchNorm-style running statistics (`running_mean` / `running_var`) holding NaN/inf."""
    return [
        f"{name}.{key}" if name else key
        for name, mod in model.named_modules()
        for key in ("running_mean", "running_var")
        if isinstance(getattr(mod, key, None), torch.Tensor) and not torch.isfinite(getattr(mod, key)).all()
    ]


def _shown(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f", ... (+{len(names) - limit})" if len(names) > limit else "")


class MECQuantCallback(TrainerCallback):
    """Quantization-aware training with the MEC coding-length term for `transformers.Trainer`.

    Args:
        config: quantization bits, layer policy and `mec_*` objective settings.
        convert_on_train_end: convert to torchao int weights at the end of training, so
            `trainer.save_model()` / `trainer.push_to_hub()` write the quantized model.
        run_info: extra facts for the model card (e.g. {"base_model": ..., "dataset": ...}).

    Logged through the Trainer (progress bar, TensorBoard, any `report_to`): every statistic of
    the regularizer (`MECStats.to_dict()`: `mec/loss`, `mec/coding_length`, `mec/spectral_bound`,
    `mec/lambda`, per-tap and per-expert values, the gate balance, the teacher's cost,
    `mec/layer/*`, `mec/label/loss`, `mec/distill/loss`, `mec/total`), averaged over the logging
    interval. Each `mec/*loss` is the amount its term adds to the training loss, weight applied
    and >= 0 (`MECRegularizer`), and they sum to `mec/total`: the logged `loss` is the task loss
    plus `mec/total`, never below the task loss.

    Example:
        >>> trainer = Trainer(model, args, train_dataset=ds, callbacks=[MECQuantCallback(MECQuantConfig())])

    Every checkpoint the Trainer saves also gets the run's config (`mec_quant_train_config.json`),
    from which `convert_checkpoint` and `mec-quant eval` rebuild the quantized model; resuming from
    a checkpoint that lacks any weight or step size of the model, or with other quantization
    settings than the checkpoint's run, raises a ValueError.

    Before every optimizer step it checks the gradients: NaN/inf stops training with a
    FloatingPointError, or drops that update with `MECQuantConfig(on_nonfinite="skip")`.

    Raises:
        ValueError: the Trainer got `optimizers=` or `model_init` and the model is not prepared
            (the message says to call `prepare_model` first).
        TransformersInternalsError: a transformers internal the callback relies on is missing
            (the message names it; `MECQuantTrainerMixin` avoids them).
        FloatingPointError: (from `train()`) a step with NaN/inf gradients, under on_nonfinite='stop'.
        RuntimeError: (from `train()`) a second train() after the model was converted at the end
            of the first.
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
        self.term = MECTrainingTerm(self.config, "MECQuantCallback")
        self._eager_warmup = EagerUntilCalibrated()  # torch_compile: compile only the calibrated model
        self.trainer: Any = None
        self._hook: Any = None

    @property
    def regularizer(self) -> MECRegularizer | None:
        """The `MECRegularizer` built at `on_init_end` (None before)."""
        return self.term.regularizer

    # ---- set-up ----------------------------------------------------------------------------
    def on_init_end(self, args, state, control, model=None, **kwargs):
        trainer = internals.calling_trainer()
        self.trainer = trainer
        self.term.setup(trainer, model)
        self._hook = model.register_forward_hook(self._add_term, with_kwargs=True)
        internals.exclude_from_weight_decay(trainer, quantization_parameter_names)
        internals.run_callback_first(trainer, self)  # our on_log adds the mec/* keys the reporters read
        # the Trainer's create_model_card() / push_to_hub() write their card over ours: merge ours back in
        internals.after_create_model_card(trainer, lambda readme: update_model_card(trainer.model, readme))
        # resume_from_checkpoint: load the keys the Trainer skips (renamed on load, e.g. ViT's) and fail
        # on any weight or step size the checkpoint lacks, or on other quantization settings than its run's
        internals.after_checkpoint_load(trainer, self._check_resumed)
        return control

    def _check_resumed(self, model: nn.Module, checkpoint: str) -> None:
        check_same_quantization(checkpoint, self.config)
        load_checkpoint_state(model, checkpoint)

    def attach(self, model: nn.Module, teacher: nn.Module | None = None) -> None:
        """Build the regularizer and the loss hook on an already prepared model (outside a Trainer)."""
        self.term.attach(model, teacher)
        self._hook = model.register_forward_hook(self._add_term, with_kwargs=True)

    # ---- the term --------------------------------------------------------------------------
    def _add_term(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if self.regularizer is None or not module.training or not torch.is_grad_enabled():
            return None
        loss = output.get("loss") if isinstance(output, dict) else None
        if loss is None:
            self.regularizer.capture.clear()  # drop this forward's features: nothing may pile up
            self.term.warn_once(
                "no-loss",
                "MECQuantCallback: the model returned no loss (no labels in the batch?); training "
                "continues WITHOUT the coding-length term.",
            )
            return None
        passed = kwargs.get("num_items_in_batch") is not None
        divisor = 1.0 if self.trainer is None else internals.hook_loss_divisor(self.trainer, passed)
        output["loss"] = self.term.add_to(loss, divisor, logits=output, labels=kwargs.get("labels"))
        return output

    # ---- schedule, logging, end ------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.term.check_can_train()
        self._eager_warmup.start(args, model)
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._eager_warmup.step_done(model)
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.term.guard_step(self.trainer, model, state.global_step + 1)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self.term.set_progress(state.global_step, state.max_steps)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        ours = self.term.pop_log() if logs is not None and "loss" in logs else {}
        if ours:
            logs.update(ours)  # what the reporters (progress bar, TensorBoard, ...) receive
            internals.add_to_logged_entry(state, ours)  # the Trainer appended its copy before on_log
        return control

    def detach(self, model: nn.Module) -> None:
        """Remove the loss hook, the capture hooks and the gates from the model."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.term.detach(model)

    def on_save(self, args, state, control, **kwargs):
        # the run's config in every checkpoint: convert_checkpoint and `mec-quant eval` read it
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if state.is_world_process_zero and os.path.isdir(folder):
            write_train_config(folder, self.config)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._eager_warmup.stop()
        if not self.convert_on_train_end or model is None:
            return control
        self.detach(model)
        self.term.convert(model, self.run_info, state.log_history)
        return control
