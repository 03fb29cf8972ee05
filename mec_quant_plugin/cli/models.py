"""Models for `mec-quant`: task inference, model / tokenizer / image-processor loading."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .common import BUILTIN_DATASETS, CLIError, _first_line


def _auto_class(task: str):
    import transformers

    return {
        "image-classification": transformers.AutoModelForImageClassification,
        "causal-lm": transformers.AutoModelForCausalLM,
        "text-classification": transformers.AutoModelForSequenceClassification,
    }[task]


def infer_task(dataset: str | None, model_path: str | None) -> str | None:
    if dataset is not None and dataset.lower() in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[dataset.lower()]
    if model_path is not None and (Path(model_path) / "config.json").is_file():
        archs = json.loads((Path(model_path) / "config.json").read_text()).get("architectures") or []
        for arch in archs:
            if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
                return "causal-lm"
            if arch.endswith("ForImageClassification"):
                return "image-classification"
            if arch.endswith("ForSequenceClassification"):
                return "text-classification"
    return None


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise CLIError(f"cannot load a tokenizer from {path!r}: {_first_line(exc)}") from exc
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def _load_image_processor(path: str):
    """The model's AutoImageProcessor when it has one, else None (plain resize/normalize)."""
    from transformers import AutoImageProcessor

    if os.path.isdir(path) and not (Path(path) / "preprocessor_config.json").is_file():
        return None
    try:
        return AutoImageProcessor.from_pretrained(path)
    except Exception:
        return None


def _load_model(task: str, path: str, name: str, **kwargs: Any):
    # Trained weights stay float32 (the optimizer's master copy; --bf16/--fp16 autocast the compute):
    # transformers 5 otherwise loads a checkpoint in its stored dtype, and fp16 weights trained
    # without a loss scaler turn to NaN within a few steps (seen on all-MiniLM-L6-v2 stored in fp16).
    import torch

    kwargs.setdefault("dtype", torch.float32)
    try:
        return _auto_class(task).from_pretrained(path, **kwargs)
    except Exception as exc:
        raise CLIError(f"cannot load model {name!r} for {task}: {_first_line(exc)}") from exc


def load_for_eval(path: str, task: str):
    """A saved MEC-Quant model (`from_pretrained` of this package) or any model of `task`."""
    from ..data.models import resolve_model_path
    from ..integrations.hub import MEC_CONFIG_FILE

    local = resolve_model_path(path)
    if (Path(local) / MEC_CONFIG_FILE).is_file():
        from ..integrations.hub import from_pretrained

        try:
            return from_pretrained(local)
        except Exception as exc:
            raise CLIError(f"cannot load the MEC-Quant model in {path!r}: {_first_line(exc)}") from exc
    return _load_model(task, local, path).eval()
