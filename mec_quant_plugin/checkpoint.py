"""Checkpoints saved during MEC-Quant training (prepared, not converted): the run's config, loading
one into a prepared model the way `from_pretrained` loads (renamed keys, tied weights), and
converting one into a saved quantized model. `MECQuantCallback` writes the run's config into every
checkpoint (`write_train_config`), as `mec-quant train` does.

`mec-quant convert` is `convert_checkpoint` on the command line; `mec-quant eval` evaluates a
training checkpoint through `load_training_checkpoint`; `MECQuantCallback` checks a resumed run
with `load_checkpoint_state`.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from .config import MECQuantConfig

TRAIN_CONFIG_FILE = "mec_quant_train_config.json"  # the MECQuantConfig of a run, written into its checkpoints
_GATES = "mec_gates."  # the MEC term's gates: trained with the model, not part of the quantized model


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def _read_state_dict(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = _weight_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder} has no model.safetensors: not a checkpoint folder.")
    state: dict = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def is_training_checkpoint(folder: str | os.PathLike) -> bool:
    """True for a folder whose safetensors hold fake-quantizer state (a checkpoint of a MEC-Quant run,
    not converted); reads only the key names."""
    from safetensors import safe_open

    from .integrations.hub import MEC_CONFIG_FILE

    folder = Path(folder)
    if (folder / MEC_CONFIG_FILE).is_file():
        return False
    for file in _weight_files(folder):
        with safe_open(str(file), "pt") as f:
            if any("fake_quantizer" in key for key in f.keys()):
                return True
    return False


def _read_config(path: Path) -> MECQuantConfig:
    from .config import MECQuantConfig

    try:
        return MECQuantConfig.from_json(path.read_text())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a valid MECQuantConfig: {exc}") from exc


def write_train_config(folder: str | os.PathLike, config: MECQuantConfig) -> Path:
    """Write the run's config as `TRAIN_CONFIG_FILE` into a checkpoint (or run) folder, atomically
    (a temporary file renamed over it); returns its path."""
    path = Path(folder) / TRAIN_CONFIG_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(config.to_json())
    os.replace(tmp, path)
    return path


def run_config_file(checkpoint: str | os.PathLike) -> Path | None:
    """The run's own `TRAIN_CONFIG_FILE`: in the checkpoint, else in its parent (the run's output
    folder, where `mec-quant train` writes it first), else None."""
    folder = Path(checkpoint)
    return next((p for p in (folder / TRAIN_CONFIG_FILE, folder.parent / TRAIN_CONFIG_FILE) if p.is_file()), None)


def checkpoint_config(checkpoint: str | os.PathLike, config_path: str | os.PathLike | None = None) -> MECQuantConfig:
    """The `MECQuantConfig` a training checkpoint was trained with.

    The run's own file (`run_config_file`) wins; `config_path` is needed when there is none, and
    may be given besides only with the same settings.

    Raises:
        FileNotFoundError: the run wrote no config and `config_path` is None.
        ValueError: `config_path` differs from the run's config (the fields that differ are named),
            or a file is not a valid MECQuantConfig.
    """
    own_path = run_config_file(checkpoint)
    own = _read_config(own_path) if own_path is not None else None
    if config_path is None:
        if own is None:
            raise FileNotFoundError(
                f"no MECQuantConfig for {str(checkpoint)!r}: the run wrote no {TRAIN_CONFIG_FILE} into the checkpoint "
                "or its parent folder; pass the run's config (`--config FILE` on the command line, config_path in "
                "Python): a MECQuantConfig JSON, e.g. MECQuantConfig(...).to_json()."
            )
        return own
    given = _read_config(Path(config_path))
    if own is not None and given.to_dict() != own.to_dict():
        mine, theirs = own.to_dict(), given.to_dict()
        diff = ", ".join(f"{k}: run {mine[k]!r}, given {theirs[k]!r}" for k in mine if mine[k] != theirs[k])
        raise ValueError(
            f"--config {str(config_path)!r} does not match the settings the checkpoint was trained with ({own_path}): "
            f"{diff}. A model trained with one setting cannot be converted with another; leave out --config to use "
            "the run's own."
        )
    return given


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model or the settings it is loaded or resumed with (the message
    names the keys or fields and says what to do)."""


QUANTIZATION_FIELDS = ("weight_bits", "act_bits", "weight_granularity", "group_size", "ternary", "act_signedness",
                       "edge_layers")
"""The MECQuantConfig fields that decide what the step sizes of a checkpoint mean."""


def check_same_quantization(checkpoint: str | os.PathLike, config: MECQuantConfig) -> None:
    """Refuse to resume a checkpoint with other quantization settings than its run's (its own
    `TRAIN_CONFIG_FILE`, when it has one): W4 step sizes have the same names as W2 ones, so the
    keys alone cannot tell. The MEC term's settings may change.

    Raises:
        ValueError: a field of `QUANTIZATION_FIELDS` differs (named, with both values).
    """
    path = Path(checkpoint) / TRAIN_CONFIG_FILE
    if not path.is_file():
        return
    saved, now = _read_config(path).to_dict(), config.to_dict()
    diff = [f"{k}: checkpoint {saved[k]!r}, now {now[k]!r}" for k in QUANTIZATION_FIELDS if saved[k] != now[k]]
    if diff:
        raise CheckpointMismatchError(f"checkpoint {str(checkpoint)!r} was trained with other quantization settings ({path.name}): "
                         f"{'; '.join(diff)}. Resume with the run's settings, or start a new run from the float model.")


def _aliases(model: nn.Module) -> dict[str, set[str]]:
    """Every state-dict name -> all names of the same tensor (tied weights, shared step sizes)."""
    by_tensor: dict[int, set[str]] = {}
    named = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        by_tensor.setdefault(id(tensor), set()).add(name)
    return {name: names for names in by_tensor.values() for name in names}


def _shown(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_checkpoint_state(model: nn.Module, checkpoint: str | os.PathLike, *, ignore_gates: bool = False) -> None:
    """Load a training checkpoint's weights and quantizer state into the prepared `model`, with the
    key renaming `from_pretrained` applies (transformers 5 saves ViT under its old key names), and
    check that every entry of the model's state got a value: a tied weight or a shared step size is
    stored once, under one of its names. A folder without model safetensors (PEFT adapters) is left
    alone. `ignore_gates` skips the MEC term's gates (`mec_gates.*`) of the checkpoint.

    Raises:
        ValueError: the checkpoint and the model do not fit (keys missing from the checkpoint or
            unknown to the model, both named): e.g. another model or another MECQuantConfig.
    """
    from .integrations.transformers_internals import checkpoint_key_renamer

    folder = Path(checkpoint)
    if not _weight_files(folder):
        return
    known = set(model.state_dict())
    rename = checkpoint_key_renamer(model)
    state = {}
    for key, value in _read_state_dict(folder).items():
        if ignore_gates and key.startswith(_GATES):
            continue
        state[key if key in known else rename(key)] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    aliases = _aliases(model)
    missing = [k for k in missing if not aliases.get(k, {k}) & state.keys()]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing from the checkpoint (they would keep their initial values): {_shown(missing)}")
        if unexpected:
            problems.append(f"unknown to the model: {_shown(list(unexpected))}")
        raise CheckpointMismatchError(
            f"checkpoint {str(checkpoint)!r} does not fit the {type(model).__name__} prepared with this MECQuantConfig; "
            f"keys {'; '.join(problems)}. Load it into the model (and with the MECQuantConfig) it was trained with."
        )


def load_training_checkpoint(
    checkpoint: str | os.PathLike, config_path: str | os.PathLike | None = None
) -> tuple[nn.Module, MECQuantConfig]:
    """The model of a training checkpoint, prepared with its run's config (`checkpoint_config`) and
    holding the checkpoint's weights and step sizes, in eval mode: the fake-quantized model as
    training left it (`convert_model` turns it into torchao int weights).

    Example:
        >>> model, config = load_training_checkpoint("outputs/run/checkpoint-500")

    Raises:
        FileNotFoundError: not a model folder, or no MECQuantConfig found.
        ValueError: not a MEC-Quant training checkpoint, a config other than the run's, a config that
            quantizes no layer, or a checkpoint that does not fit the prepared model.
    """
    import transformers

    from .api import prepare_model
    from .integrations.hub import model_class_from_config
    from .modules.registry import is_fake_quantized

    folder = Path(checkpoint)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(checkpoint)!r} is not a model folder (no config.json).")
    config = checkpoint_config(folder, config_path)
    if not is_training_checkpoint(folder):
        raise ValueError(f"{str(checkpoint)!r} holds no fake-quantizer state: it is not a MEC-Quant training checkpoint.")
    cls = model_class_from_config(folder)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the quantizer keys are "unexpected" to the float class
    try:
        model = cls.from_pretrained(str(folder))
    finally:
        transformers.logging.set_verbosity(verbosity)
    prepare_model(model, config)
    if not any(is_fake_quantized(m) for m in model.modules()):
        raise ValueError("the configuration quantizes no layer of this model.")
    load_checkpoint_state(model, folder, ignore_gates=True)
    return model.eval(), config


def convert_checkpoint(
    checkpoint: str | os.PathLike, output_dir: str | os.PathLike, config_path: str | os.PathLike | None = None
) -> Path:
    """Load a prepared (mid-training) checkpoint, convert it to torchao int weights and save it.

    The checkpoint is a folder written by `Trainer` during MEC-Quant training (float weights plus the
    fake quantizers' state), loaded by `load_training_checkpoint`: the run's `MECQuantConfig` comes
    from `TRAIN_CONFIG_FILE` in the checkpoint or its parent folder (`mec-quant train` writes it
    there); `config_path` is needed when the run wrote none and must match it when it did.
    Tokenizer and image-processor files of the checkpoint are copied along.

    Example:
        >>> from mec_quant_plugin import convert_checkpoint, from_pretrained
        >>> out = convert_checkpoint("outputs/run/checkpoint-500", "outputs/run-500-int")
        >>> model = from_pretrained(out)

    Returns:
        The output folder, loadable with `mec_quant_plugin.from_pretrained`.

    Raises:
        FileNotFoundError: not a model folder, or no MECQuantConfig found.
        ValueError: the output folder is the checkpoint or inside it (in-place conversion), already
            converted, not a MEC-Quant checkpoint, an invalid config or one other than the run's, or a
            checkpoint that does not match the model prepared with that config.
    """
    from .api import convert_model
    from .integrations.hub import MEC_CONFIG_FILE, make_saveable

    folder = Path(checkpoint)
    out = Path(output_dir)
    if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
        raise ValueError(f"output folder {str(output_dir)!r} is inside the checkpoint {str(checkpoint)!r}: converting in "
                         "place would replace the training weights (and break resuming); choose another output folder.")
    if (folder / MEC_CONFIG_FILE).is_file():
        raise ValueError(f"{str(checkpoint)!r} is already converted (it has {MEC_CONFIG_FILE}); load it with "
                         "mec_quant_plugin.from_pretrained.")
    model, config = load_training_checkpoint(folder, config_path)
    model = convert_model(model)
    make_saveable(model, config, run_info={"base_model": getattr(model.config, "_name_or_path", None) or None,
                                           "checkpoint": str(folder)})
    model.save_pretrained(out)
    for item in folder.iterdir():  # tokenizer / image processor files saved with the checkpoint
        is_processing = item.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template",
                                              "preprocessor_config", "processor_config"))
        if is_processing and item.is_file() and not (out / item.name).exists():
            shutil.copy2(item, out / item.name)
    return out
