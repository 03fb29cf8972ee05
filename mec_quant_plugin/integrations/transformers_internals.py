"""Every transformers internal the plugin relies on, in one module.

The Trainer gives a callback no handle on itself, and a converted torchao model has no public
way to be saved by `save_pretrained`; the plugin therefore reaches into transformers at the
places below. Each was checked against transformers `CHECKED_WITH` (5.24); when one is missing
in the installed version, `TransformersInternalsError` names it and the way out, rather than
the plugin silently skipping what it does there.

| function                      | internal it relies on                                          |
|-------------------------------|----------------------------------------------------------------|
| `calling_trainer`             | the Trainer's frame is on the stack during `on_init_end`       |
| `model_drops_loss_kwargs`     | model forwards call `self.loss_function(..., **kwargs)`        |
| `stop_passing_loss_kwargs`    | `Trainer.model_accepts_loss_kwargs`, `model.accepts_loss_kwargs` |
| `check_trainer_builds_nothing`| `Trainer.model_init`, `Trainer.optimizer` set in `__init__`    |
| `exclude_from_weight_decay`   | `Trainer.get_decay_parameter_names`, patched on the instance   |
| `run_callback_first`          | `Trainer.callback_handler.callbacks`, a list in call order     |
| `hook_loss_divisor`           | how `Trainer.compute_loss` scales a loss given `num_items_in_batch` |
| `compute_loss_divisor`        | how `Trainer.training_step` scales `compute_loss`'s result     |
| `add_to_logged_entry`         | `Trainer.log` appends its copy to `log_history` before `on_log` |
| `grad_scaler_active`          | `Trainer.accelerator.scaler`: accelerate's fp16 GradScaler     |
| `attach_torchao_quantizer`    | `model.hf_quantizer` / `is_quantized`, the quantizer's `get_state_dict_and_metadata` |
| `wrap_save_pretrained`        | `Trainer.save_model` / `push_to_hub` call `model.save_pretrained` |
| `forget_load_only_conversions`| `model._weight_conversions`, reverted by `save_pretrained`     |
| `after_create_model_card`     | `Trainer.create_model_card` writes `args.output_dir/README.md`; `push_to_hub` calls it |
| `before_hub_upload`           | `model.push_to_hub` writes its card, then calls `_upload_modified_files(folder, ...)` |
| `checkpoint_key_renamer`      | `conversion_mapping.get_model_conversion_mapping`, `core_model_loading.rename_source_key` |
| `after_checkpoint_load`       | `Trainer._load_from_checkpoint` loads a resumed run's weights  |

`make_saveable` uses the four saving ones; `MECQuantCallback` every Trainer one but
`compute_loss_divisor`. `MECQuantTrainerMixin` overrides public Trainer methods (`compute_loss`,
`get_decay_parameter_names`, `log`, `train`, `create_model_card`) and needs only the two loss-kwargs ones,
`check_trainer_builds_nothing`, `compute_loss_divisor` and `grad_scaler_active`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

logger = logging.getLogger("mec_quant_plugin")

CHECKED_WITH = "5.24"

_WAY_OUT = (
    "Subclass the Trainer with MECQuantTrainerMixin (class MyTrainer(MECQuantTrainerMixin, Trainer)), "
    f"which overrides public Trainer methods only, or install transformers {CHECKED_WITH}."
)


class TransformersInternalsError(RuntimeError):
    """A transformers internal the plugin relies on is missing from the installed version."""


def _missing(what: str, way_out: str = _WAY_OUT) -> TransformersInternalsError:
    import transformers

    return TransformersInternalsError(
        f"mec_quant_plugin relies on the transformers internal {what} (checked with transformers "
        f"{CHECKED_WITH}); transformers {transformers.__version__} does not have it. {way_out}"
    )


def _require(obj: Any, attr: str, what: str) -> Any:
    if not hasattr(obj, attr):
        raise _missing(what)
    return getattr(obj, attr)


# ---- the Trainer, seen from a callback ------------------------------------------------------
def calling_trainer() -> Any:
    """The Trainer whose `__init__` is running the callbacks' `on_init_end`.

    Why: callbacks never receive the Trainer, but three things need it before training starts:
    the weight-decay grouping (the optimizer is built later from `get_decay_parameter_names`),
    the loss-kwargs flag, and the callback order. The Trainer's own frame (`self`) is a few
    levels up the stack at that point.

    Raises:
        TransformersInternalsError: no Trainer on the call stack.
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
    raise _missing("Trainer.__init__ on the call stack during on_init_end")


def model_drops_loss_kwargs(model: nn.Module) -> bool:
    """True unless the model's forward passes **kwargs on to `self.loss_function(...)`.

    Why: models that compute their loss without `num_items_in_batch` (transformers' ResNet /
    ConvNeXt call loss_function without it, BERT uses CrossEntropyLoss) still accept **kwargs,
    so the Trainer would neither divide their loss by the accumulation steps nor let them
    normalize it (measured: BERT's logged loss doubles at accumulation 2). Erring towards True
    only changes how micro-batches are weighted (mean of means), never the scale. A forward
    whose source cannot be read (compiled, generated) is assumed to pass them, with a warning.
    """
    try:
        src = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        warnings.warn(
            f"Cannot read the source of {type(model).__name__}.forward to tell whether it passes "
            "num_items_in_batch to its loss; assuming it does (set model.accepts_loss_kwargs = False "
            "before building the Trainer if its loss ignores it).",
            stacklevel=2,
        )
        return False
    calls = re.findall(r"self\.loss_function\(([^)]*)\)", src)
    return not any("**kwargs" in c for c in calls)


def stop_passing_loss_kwargs(trainer: Any, model: nn.Module) -> None:
    """Make the Trainer treat the model as one whose loss ignores `num_items_in_batch` (if it
    did not already): it then divides the loss by the accumulation steps itself.

    Raises:
        TransformersInternalsError: the Trainer has no `model_accepts_loss_kwargs`.
    """
    if _require(trainer, "model_accepts_loss_kwargs", "Trainer.model_accepts_loss_kwargs"):
        model.accepts_loss_kwargs = False
        trainer.model_accepts_loss_kwargs = False


def check_trainer_builds_nothing(trainer: Any) -> str | None:
    """Why the model cannot be prepared at the end of `Trainer.__init__`, or None.

    A Trainer with `model_init` builds a fresh model at `train()`, and one given `optimizers=`
    already holds an optimizer that would not own the learnable step sizes.

    Raises:
        TransformersInternalsError: the Trainer has no `model_init` / `optimizer` attribute.
    """
    if _require(trainer, "model_init", "Trainer.model_init") is not None:
        return "the Trainer builds the model with model_init"
    if _require(trainer, "optimizer", "Trainer.optimizer") is not None:
        return "the Trainer got a ready optimizer (optimizers=...)"
    return None


def exclude_from_weight_decay(trainer: Any, exempt: Callable[[nn.Module], set[str]]) -> None:
    """Remove `exempt(model)`'s parameter names from the weight-decay group the Trainer builds.

    Raises:
        TransformersInternalsError: the Trainer has no `get_decay_parameter_names`.
    """
    original = _require(trainer, "get_decay_parameter_names", "Trainer.get_decay_parameter_names")

    def get_decay_parameter_names(opt_model: nn.Module) -> list[str]:
        names = exempt(opt_model)
        return [n for n in original(opt_model) if n not in names]

    trainer.get_decay_parameter_names = get_decay_parameter_names


def run_callback_first(trainer: Any, callback: Any) -> None:
    """Move `callback` to the front, so its `on_log` adds keys before the reporters read them.

    Raises:
        TransformersInternalsError: the Trainer has no `callback_handler.callbacks` list.
    """
    handler = _require(trainer, "callback_handler", "Trainer.callback_handler")
    callbacks = _require(handler, "callbacks", "Trainer.callback_handler.callbacks")
    if callback in callbacks:
        callbacks.remove(callback)
        callbacks.insert(0, callback)


# ---- the loss scale under gradient accumulation and data parallelism ------------------------
def hook_loss_divisor(trainer: Any, num_items_passed: bool) -> float:
    """The divisor of a per-batch-mean term added to the MODEL's loss (inside its forward).

    When the Trainer passes `num_items_in_batch` to the forward, it neither divides the loss by
    the accumulation steps nor keeps it per process (`compute_loss` multiplies it by the number
    of processes before DDP averages); undo both for the term.
    """
    if not num_items_passed:
        return 1.0
    steps = getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps
    divisor = float(steps)
    if trainer.args.average_tokens_across_devices:
        divisor *= trainer.accelerator.num_processes
    return divisor


def compute_loss_divisor(trainer: Any, num_items_in_batch: Any) -> float:
    """The divisor of a per-batch-mean term added to `compute_loss`'s result (after the
    Trainer's own scaling): the accumulation steps when `training_step` will not divide the
    loss itself (`loss_is_scaled_for_ga`, decided as `training_step` decides it), else 1.

    Raises:
        TransformersInternalsError: the Trainer has no `model_accepts_loss_kwargs`.
    """
    scaled = trainer.loss_is_scaled_for_ga
    if scaled is None:
        accepts = _require(trainer, "model_accepts_loss_kwargs", "Trainer.model_accepts_loss_kwargs")
        scaled = (accepts and num_items_in_batch is not None) or trainer.compute_loss_func is not None
    if not scaled:
        return 1.0
    return float(getattr(trainer, "current_gradient_accumulation_steps", None) or trainer.args.gradient_accumulation_steps)


def grad_scaler_active(trainer: Any) -> bool:
    """True when the Trainer's accelerator runs an fp16 GradScaler: it skips steps with inf/NaN
    gradients itself (and lowers its scale), so such gradients are expected there, not an error."""
    return getattr(getattr(trainer, "accelerator", None), "scaler", None) is not None


def add_to_logged_entry(state: Any, logs: dict[str, float]) -> None:
    """Add keys, from a callback's `on_log`, to the entry `Trainer.log` appended to
    `state.log_history` before calling `on_log` (the reporters get `logs` itself)."""
    if state.log_history and state.log_history[-1].get("step") == state.global_step:
        state.log_history[-1].update(logs)


# ---- saving a converted model ---------------------------------------------------------------
def attach_torchao_quantizer(model: nn.Module, quantization_config: Any, state_dict_view: Callable[[nn.Module], Any]) -> None:
    """Attach the torchao HF quantizer that `save_pretrained` needs for torchao tensors.

    `state_dict_view(model)` stands in for the model where the quantizer's saver calls
    `model.state_dict()` (the plugin drops tied duplicates and activation steps there).

    Raises:
        TransformersInternalsError: the quantizer has no `get_state_dict_and_metadata`.
    """
    from transformers.quantizers import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(quantization_config, pre_quantized=False)
    flatten = _require(
        quantizer, "get_state_dict_and_metadata", "the torchao HfQuantizer's get_state_dict_and_metadata"
    )
    quantizer.get_state_dict_and_metadata = lambda m: flatten(state_dict_view(m))
    model.config.quantization_config = quantization_config
    model.hf_quantizer = quantizer
    model.is_quantized = True


_SAVE_MARK = "_mec_quant_save_wrapped"


def wrap_save_pretrained(
    model: nn.Module, save: Callable[[nn.Module, Callable[[str | os.PathLike], Any], str | os.PathLike], Any]
) -> None:
    """Make `model.save_pretrained` (which `Trainer.save_model` and `push_to_hub` call) go through
    `save(model, write_weights, folder)` on the main process, where `write_weights(dir)` is
    transformers' own save into `dir` (so `save` can write elsewhere first and swap the folder in);
    wrapping twice is a no-op."""
    if getattr(model.save_pretrained, _SAVE_MARK, False):
        return
    original = type(model).save_pretrained

    @functools.wraps(original)
    def save_pretrained(save_directory: str | os.PathLike, *args: Any, **kwargs: Any):
        if not kwargs.get("is_main_process", True):
            return original(model, save_directory, *args, **kwargs)
        return save(model, lambda folder: original(model, folder, *args, **kwargs), save_directory)

    setattr(save_pretrained, _SAVE_MARK, True)
    model.save_pretrained = save_pretrained


def forget_load_only_conversions(model: nn.Module) -> None:
    """Drop, from the key conversions `from_pretrained` recorded on the model, those that only
    load (torchao's deserialization of flattened int tensors has no reverse).

    Why: `save_pretrained` reverses every recorded conversion, and one without a reverse raises
    a bare NotImplementedError after config.json is written, so a reloaded torchao model could
    not be saved again. The plugin's saver flattens the int tensors itself; renamings stay.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if not conversions:
        return
    kept = []
    for conversion in conversions:
        try:
            conversion.reverse_transform()
        except (NotImplementedError, ValueError):
            continue
        kept.append(conversion)
    model._weight_conversions = kept


def after_create_model_card(trainer: Any, after: Callable[[str], None]) -> None:
    """Call `after(readme_path)` each time `trainer.create_model_card()` has written its card
    (`push_to_hub` calls it after saving, before uploading); wrapping twice is a no-op.

    Why: the Trainer writes its card from scratch over `args.output_dir/README.md`, so the
    plugin's card written by `save_model` would be lost; `after` merges it back in.

    Raises:
        TransformersInternalsError: the Trainer has no `create_model_card`.
    """
    original = _require(trainer, "create_model_card", "Trainer.create_model_card")
    if getattr(original, _SAVE_MARK, False):
        return

    @functools.wraps(original)
    def create_model_card(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if trainer.is_world_process_zero():
            after(os.path.join(trainer.args.output_dir, "README.md"))
        return result

    setattr(create_model_card, _SAVE_MARK, True)
    trainer.create_model_card = create_model_card


def before_hub_upload(model: nn.Module, before: Callable[[str], None]) -> None:
    """Call `before(folder)` when `model.push_to_hub()` has filled the folder it uploads, just
    before the upload; wrapping twice is a no-op.

    Why: after `save_pretrained` (which writes the plugin's card), `push_to_hub` writes over
    README.md the repo's existing card or transformers' template, so the plugin's card would be
    lost; `before` merges it back in.

    Raises:
        TransformersInternalsError: the model has no `_upload_modified_files`.
    """
    original = _require(model, "_upload_modified_files", "PushToHubMixin._upload_modified_files")
    if getattr(original, _SAVE_MARK, False):
        return

    @functools.wraps(original)
    def upload_modified_files(working_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        before(str(working_dir))
        return original(working_dir, *args, **kwargs)

    setattr(upload_modified_files, _SAVE_MARK, True)
    model._upload_modified_files = upload_modified_files


# ---- loading a training checkpoint ----------------------------------------------------------
def checkpoint_key_renamer(model: nn.Module) -> Callable[[str], str]:
    """The renaming `from_pretrained` applies to a checkpoint's keys for `model`.

    Why: transformers 5 saves some models under their original key names and renames them on
    load (ViT: `vit.encoder.layer.0.attention.attention.query` is `vit.layers.0.attention.q_proj`),
    but `Trainer._load_from_checkpoint` and a plain `load_state_dict` do not rename: those layers
    (weights and step sizes) would silently keep their initial values. The returned function maps
    a checkpoint key to the model's name for it.

    Raises:
        TransformersInternalsError: transformers has no `get_model_conversion_mapping` /
            `rename_source_key`.
        ValueError: (from the returned function) a key that transformers loads through a tensor
            conversion (fused or split weights), not a renaming: not supported for training checkpoints.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError as exc:
        raise _missing("transformers.conversion_mapping.get_model_conversion_mapping and "
                       "core_model_loading.rename_source_key", f"Install transformers {CHECKED_WITH}.") from exc
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(key: str) -> str:
        renamed, converter = rename_source_key(key, renamings, converters)
        if converter is not None:
            raise ValueError(f"checkpoint key {key!r} of {type(model).__name__} is loaded by transformers through a "
                             f"tensor conversion ({converter!r}), not a renaming: training checkpoints of this model "
                             "cannot be loaded by mec_quant_plugin.")
        return renamed

    return rename


_LOAD_MARK = "_mec_quant_load_wrapped"


def after_checkpoint_load(trainer: Any, after: Callable[[nn.Module, str], None]) -> None:
    """Call `after(model, folder)` each time `trainer.train(resume_from_checkpoint=folder)` has
    loaded the checkpoint's weights into the (unwrapped) model; wrapping twice is a no-op.
    Not under DeepSpeed or FSDP, which load sharded states themselves.

    Why: `Trainer._load_from_checkpoint` loads with `load_state_dict(strict=False)` and only logs
    missing keys, so a resumed run whose checkpoint does not fit the model silently restarts
    those layers from their initial weights and step sizes; `after` checks (and completes) it.

    Raises:
        TransformersInternalsError: the Trainer has no `_load_from_checkpoint`.
    """
    original = _require(trainer, "_load_from_checkpoint", "Trainer._load_from_checkpoint")
    if getattr(original, _LOAD_MARK, False):
        return

    @functools.wraps(original)
    def _load_from_checkpoint(resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        original(resume_from_checkpoint, model)
        sharded = getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False)
        if not sharded:
            after(model if model is not None else trainer.model, resume_from_checkpoint)

    setattr(_load_from_checkpoint, _LOAD_MARK, True)
    trainer._load_from_checkpoint = _load_from_checkpoint
