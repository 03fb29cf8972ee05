"""Models for `mec-quant`: task inference, model / tokenizer / image-processor loading."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .common import BUILTIN_DATASETS, CLIError, first_line


def _auto_class(task: str):
    import transformers

    return {
        "image-classification": transformers.AutoModelForImageClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
        "text-classification": transformers.AutoModelForSequenceClassification,
    }[task]


def is_hub_id(name: str) -> bool:
    """Whether `name` has the form of a Hub model id ('name' or 'owner/name'); anything else can only
    be a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _task_of(cls: type) -> str | None:
    """The task of a transformers model class (its Auto mapping, else its name), or None (a base model)."""
    from transformers.models.auto import modeling_auto as auto

    def names(mapping: dict) -> set[str]:
        return {n for v in mapping.values() for n in ((v,) if isinstance(v, str) else v)}

    name = cls.__name__
    if name in names(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) or name.endswith(("ForCausalLM", "LMHeadModel")):
        return "causal-lm"
    if name in names(auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES) or name.endswith("ForImageClassification"):
        return "image-classification"
    if name in names(auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES) or name.endswith("ForSequenceClassification"):
        return "text-classification"
    return None


def infer_task(dataset: str | None, model_path: str | None) -> str | None:
    """The task of a built-in dataset, else the one the model's `architectures` name (its class from
    `integrations.hub.model_class_from_config`), else None.

    Raises:
        CLIError: the model is not a local folder and its config.json cannot be fetched from the Hub
            (or its cache): says which model and why.
    """
    if dataset is not None and dataset.lower() in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[dataset.lower()]
    if model_path is None:
        return None
    from ..integrations.hub import model_class_from_config

    folder = Path(model_path)
    if not folder.is_dir():
        from huggingface_hub import hf_hub_download

        try:
            folder = Path(hf_hub_download(model_path, "config.json")).parent
        except Exception as exc:
            raise CLIError(f"model {model_path!r} could not be loaded: {first_line(exc)}{_not_found_hint(model_path)}") from exc
    try:
        return _task_of(model_class_from_config(folder))
    except (FileNotFoundError, ValueError):  # no config.json, or an architecture transformers does not know
        return None


def _not_found_hint(name: str) -> str:
    """Why a model that is not a local folder may fail to load: it comes from the Hub (or its cache)."""
    if os.path.isdir(name):
        return ""
    from huggingface_hub import constants

    where = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub may be unreachable"
    return (f" ({name!r} is not a local folder, so it is loaded from the Hugging Face Hub or its cache; {where}: "
            f"download it where the Hub is reachable, e.g. `hf download {name}`, or pass a local folder)")


def load_tokenizer(path: str):
    """The model's tokenizer, with the EOS token as padding when it has no pad token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise CLIError(f"cannot load a tokenizer from {path!r}: {first_line(exc)}{_not_found_hint(path)}") from exc
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_image_processor(path: str):
    """The model's AutoImageProcessor when it has one, else None (plain resize/normalize)."""
    from transformers import AutoImageProcessor

    if os.path.isdir(path) and not (Path(path) / "preprocessor_config.json").is_file():
        return None
    try:
        return AutoImageProcessor.from_pretrained(path)
    except Exception:
        return None


def load_model(task: str, path: str, **kwargs: Any):
    """The model at `path` (local folder or Hub id) for `task`, in float32."""
    # Trained weights stay float32 (the optimizer's master copy; --bf16/--fp16 autocast the compute):
    # transformers 5 otherwise loads a checkpoint in its stored dtype, and fp16 weights trained
    # without a loss scaler turn to NaN within a few steps (seen on all-MiniLM-L6-v2 stored in fp16).
    import torch

    kwargs.setdefault("dtype", torch.float32)
    try:
        return _auto_class(task).from_pretrained(path, **kwargs)
    except Exception as exc:
        raise CLIError(f"model {path!r} could not be loaded for {task}: {first_line(exc)}{_not_found_hint(path)}") from exc


def load_for_eval(path: str, task: str):
    """A saved MEC-Quant model (`from_pretrained` of this package) or any model of `task`."""
    from ..integrations.hub import MEC_CONFIG_FILE

    if (Path(path) / MEC_CONFIG_FILE).is_file():
        from ..integrations.hub import from_pretrained

        try:
            return from_pretrained(path)
        except Exception as exc:
            raise CLIError(f"cannot load the MEC-Quant model in {path!r}: {first_line(exc)}") from exc
    return load_model(task, path).eval()
