"""A checkpoint saved during MEC-Quant training (prepared, not converted) -> a saved quantized model.

`mec-quant convert` is this function on the command line.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

TRAIN_CONFIG_FILE = "mec_quant_train_config.json"  # the MECQuantConfig of a run, written into its checkpoints


def _read_state_dict(folder: Path) -> dict:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict = {}
        for name in files:
            state.update(load_file(str(folder / name)))
        return state
    single = folder / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has no model.safetensors: not a checkpoint folder.")
    return load_file(str(single))


def convert_checkpoint(
    checkpoint: str | os.PathLike, output_dir: str | os.PathLike, config_path: str | os.PathLike | None = None
) -> Path:
    """Load a prepared (mid-training) checkpoint, convert it to torchao int weights and save it.

    The checkpoint is a folder written by `Trainer` during MEC-Quant training (float weights plus the
    fake quantizers' state); the run's `MECQuantConfig` is read from `config_path`, else from
    `TRAIN_CONFIG_FILE` in the checkpoint or its parent folder (`mec-quant train` writes it there).
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
            converted, not a MEC-Quant checkpoint, an invalid config, or a checkpoint that does not
            match the model prepared with that config.
    """
    import transformers

    from .api import convert_model, prepare_model
    from .config import MECQuantConfig
    from .integrations.hub import MEC_CONFIG_FILE, make_saveable
    from .modules.registry import is_fake_quantized

    folder = Path(checkpoint)
    out = Path(output_dir)
    if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
        raise ValueError(f"output folder {str(output_dir)!r} is inside the checkpoint {str(checkpoint)!r}: converting in "
                         "place would replace the training weights (and break resuming); choose another output folder.")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint!r} is not a model folder (no config.json).")
    if (folder / MEC_CONFIG_FILE).is_file():
        raise ValueError(f"{checkpoint!r} is already converted (it has {MEC_CONFIG_FILE}); load it with "
                         "mec_quant_plugin.from_pretrained.")
    candidates = [Path(config_path)] if config_path else [folder / TRAIN_CONFIG_FILE, folder.parent / TRAIN_CONFIG_FILE]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"no MECQuantConfig for {checkpoint!r}: looked for {', '.join(map(str, candidates))}; pass config_path "
            "(`--config FILE` on the command line): a MECQuantConfig JSON, e.g. MECQuantConfig(...).to_json()."
        )
    try:
        config = MECQuantConfig.from_json(found.read_text())
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{found}: not a valid MECQuantConfig: {exc}") from exc
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ValueError(f"config.json of {checkpoint!r} names architectures={archs}: not a transformers model class.")
    state = {k: v for k, v in _read_state_dict(folder).items() if not k.startswith("mec_gates.")}
    if not any("fake_quantizer" in k for k in state):
        raise ValueError(f"{checkpoint!r} holds no fake-quantizer state: it is not a MEC-Quant training checkpoint.")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the quantizer keys are "unexpected" to the float class
    try:
        model = cls.from_pretrained(str(folder))
    finally:
        transformers.logging.set_verbosity(verbosity)
    prepare_model(model, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"the checkpoint does not match a model prepared with {found}: unexpected keys {unexpected[:5]}...")
    quant_missing = [k for k in missing if "fake_quantizer" in k]
    if quant_missing:
        raise ValueError(f"the checkpoint does not match a model prepared with {found}: missing {quant_missing[:5]}...")
    if not any(is_fake_quantized(m) for m in model.modules()):
        raise ValueError("the configuration quantizes no layer of this model.")
    model = convert_model(model.eval())
    make_saveable(model, config, run_info={"base_model": getattr(model.config, "_name_or_path", None) or None,
                                           "checkpoint": str(folder)})
    model.save_pretrained(out)
    for item in folder.iterdir():  # tokenizer / image processor files saved with the checkpoint
        is_processing = item.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template",
                                              "preprocessor_config", "processor_config"))
        if is_processing and item.is_file() and not (out / item.name).exists():
            shutil.copy2(item, out / item.name)
    return out
