"""`mec-quant`: MEC-Quant quantization-aware training from the command line.

    mec-quant train                                   # the built-in default: Fashion-MNIST, FP -> W2A2
    mec-quant train --model HuggingFaceTB/SmolLM2-135M-Instruct --dataset austen-lm --task causal-lm \\
        --weight-bits 4 --act-bits 8 --max-steps 200 --output-dir outputs/smollm2-w4a8
    mec-quant eval --model outputs/smollm2-w4a8 --dataset austen-lm --task causal-lm
    mec-quant convert --model outputs/smollm2-w4a8/checkpoint-100 --output-dir outputs/smollm2-w4a8-ckpt100

`train` is the standard `transformers.Trainer` with `MECQuantCallback(config)`; the options come
from the dataclasses below and `MECQuantConfig` through `transformers.HfArgumentParser`, so every
option is accepted as `--weight-bits` and `--weight_bits`. Any other `transformers.TrainingArguments`
field can be given too (e.g. `--lr_scheduler_type cosine`, `--bf16`).

Datasets: a Hub name (`load_dataset(name)`), a local file (.json/.jsonl/.csv/.txt/.parquet), a local
folder (`save_to_disk` output, an image folder for image-classification, or data files), or one of
the built-in names that run offline: `fashion_mnist`, `austen` (which-novel classification) and
`austen-lm` (held-out-chapter language modelling).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

TASKS = ("image-classification", "causal-lm", "text-classification")
BUILTIN_DATASETS = {
    "fashion_mnist": "image-classification",
    "fashion-mnist": "image-classification",
    "austen": "text-classification",
    "austen-lm": "causal-lm",
}
DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".txt": "text", ".parquet": "parquet"}
TRAIN_CONFIG_FILE = "mec_quant_train_config.json"  # the MECQuantConfig of a run, for `convert` of checkpoints
DEFAULT_DEMO_DIR = "outputs/mec-quant-demo"

logger = logging.getLogger("mec_quant_plugin")


class CLIError(Exception):
    """An expected failure (bad data path, unloadable model, ...): reported as a usage error."""


# ---------------------------------------------------------------------------------------------
# Option dataclasses (HfArgumentParser turns each field into --name and --name-with-dashes)
# ---------------------------------------------------------------------------------------------


@dataclass
class DataArguments:
    """What to train on."""

    _argument_group_name = "model and data"

    model: str | None = field(
        default=None,
        metadata={"help": "Hub id or local folder of the model (omit with --dataset for the built-in default job)."},
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset name, local file (.json/.jsonl/.csv/.txt/.parquet), local folder (save_to_disk, "
            "imagefolder, data files), or built-in: fashion_mnist, austen, austen-lm."
        },
    )
    task: Literal["image-classification", "causal-lm", "text-classification"] | None = field(
        default=None, metadata={"help": "Task; inferred from a built-in dataset or the model's architecture if omitted."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    train_split: str = field(default="train", metadata={"help": "Training split."})
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Evaluation split (default: validation, else test, else 10%% held out of train)."},
    )
    text_column: str | None = field(default=None, metadata={"help": "Text column (default: text, else the first string column)."})
    label_column: str | None = field(default=None, metadata={"help": "Label column (default: label or labels)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (default: image, img or pixel_values)."})
    block_size: int = field(default=128, metadata={"help": "causal-lm: tokens per training block (texts are concatenated)."})
    max_length: int = field(default=128, metadata={"help": "text-classification: truncation length in tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training examples (blocks for causal-lm)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use at most this many evaluation examples."})


@dataclass
class RunArguments:
    """Where the result goes."""

    _argument_group_name = "output"

    output_dir: str | None = field(
        default=None,
        metadata={"help": f"Output folder (default: {DEFAULT_DEMO_DIR} for the built-in job, else outputs/mec-quant-<model>)."},
    )
    push_to_hub: str | None = field(default=None, metadata={"help": "After training, push the quantized model to this Hub repo."})
    quick: bool = field(default=False, metadata={"help": "Built-in default job only: a few steps on a few hundred images (smoke test)."})


@dataclass
class TrainOptions:
    """The most used `transformers.TrainingArguments` (any other one is accepted as well)."""

    _argument_group_name = "training (transformers.TrainingArguments; any other field of it is accepted too)"

    learning_rate: float = field(default=5e-5, metadata={"help": "Peak learning rate (AdamW)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs (ignored when --max-steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides --num-train-epochs when > 0."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Training batch size per device."})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "Evaluation batch size per device."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (never applied to step sizes)."})
    warmup_steps: float = field(default=0, metadata={"help": "Warm-up steps (a value < 1 is a fraction of training)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})
    save_steps: float = field(default=500, metadata={"help": "Save a (not yet converted) checkpoint every N steps."})
    save_total_limit: int | None = field(default=None, metadata={"help": "Keep at most this many checkpoints."})
    seed: int = field(default=0, metadata={"help": "Random seed."})
    report_to: str = field(default="none", metadata={"help": "Where to report logs: none, tensorboard, wandb, ..."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "Resume training from this checkpoint folder."})


def _quant_arguments_class():
    """MECQuantConfig as an option group, with its torchao-only `step` field hidden."""
    from .config import MECQuantConfig

    @dataclass
    class QuantArguments(MECQuantConfig):
        _argument_group_name = "quantization and MEC objective (mec_quant_plugin.MECQuantConfig)"
        step: str = field(default="prepare", metadata={"help": argparse.SUPPRESS})

    return QuantArguments


@dataclass
class EvalArguments:
    """`mec-quant eval`."""

    _argument_group_name = "evaluation"

    model: str = field(metadata={"help": "Folder or Hub id of the model (a saved MEC-Quant model or any model)."})
    dataset: str = field(metadata={"help": "Dataset, as for `mec-quant train`."})
    task: Literal["image-classification", "causal-lm", "text-classification"] | None = field(
        default=None, metadata={"help": "Task; inferred from a built-in dataset or the model's architecture if omitted."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Configuration name of a Hub dataset."})
    split: str | None = field(default=None, metadata={"help": "Split (default: validation, else test, else 10%% held out of train)."})
    text_column: str | None = field(default=None, metadata={"help": "Text column."})
    label_column: str | None = field(default=None, metadata={"help": "Label column."})
    image_column: str | None = field(default=None, metadata={"help": "Image column."})
    block_size: int = field(default=128, metadata={"help": "causal-lm: tokens per block."})
    max_length: int = field(default=128, metadata={"help": "text-classification: truncation length."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate at most this many examples."})
    batch_size: int = field(default=8, metadata={"help": "Batch size."})
    seed: int = field(default=0, metadata={"help": "Seed of the held-out split when the dataset has only train."})


@dataclass
class ConvertArguments:
    """`mec-quant convert`."""

    _argument_group_name = "conversion"

    model: str = field(metadata={"help": "A checkpoint folder written during MEC-Quant training (prepared, not converted)."})
    output_dir: str = field(metadata={"help": "Where to save the converted (torchao int weights) model."})
    config: str | None = field(
        default=None,
        metadata={"help": f"MECQuantConfig JSON of the run (default: {TRAIN_CONFIG_FILE} in the checkpoint or its parent)."},
    )


# ---------------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------------

_NONE_FIELDS = ("weight_bits", "act_bits", "group_size", "mec_order")


def _int_or_none(text: str) -> int | None:
    if text.lower() in ("none", "null", "float"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def _hf_parser(dataclass_types: list, **kwargs: Any):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types, **kwargs)
    for action in parser._actions:
        if action.dest in _NONE_FIELDS:  # `--act-bits none` for a float (unquantized) setting
            action.type = _int_or_none
        # show `--weight-bits` first in --help; `--weight_bits` is accepted all the same
        action.option_strings.sort(key=lambda o: ("_" in o, o.startswith("--no")))
        action.metavar = None if action.nargs == 0 else (action.metavar or action.dest.split("_")[-1].upper())
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only when there is one worth showing."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=110)

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or action.help == argparse.SUPPRESS:
            return action.help or ""
        return super()._get_help_string(action)


def build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    top = argparse.ArgumentParser(
        prog="mec-quant",
        description="MEC-Quant quantization-aware training (1-8 bit) with transformers, torchao and datasets.",
        epilog="`mec-quant train` without --model/--dataset runs the built-in default job (Fashion-MNIST, FP -> W2A2).",
    )
    from . import __version__

    top.add_argument("--version", action="version", version=f"mec-quant {__version__}")
    sub = top.add_subparsers(dest="command", metavar="{train,eval,convert}")
    sub.required = True
    fmt = _HelpFormatter
    parsers = {
        "train": sub.add_parser(
            "train", help="quantization-aware training with the Trainer + MECQuantCallback", formatter_class=fmt,
            usage="mec-quant train [--model MODEL --dataset DATASET --task TASK] [--weight-bits N] [--act-bits N] "
            "[--output-dir DIR] [--push-to-hub REPO] [options]",
            description="Quantization-aware training (transformers.Trainer + MECQuantCallback); saves the converted "
            "model (torchao int weights) to --output-dir. Without --model/--dataset: the built-in default job.",
        ),
        "eval": sub.add_parser(
            "eval", help="accuracy / perplexity of a saved model", formatter_class=fmt,
            description="Accuracy (classification) or perplexity (causal-lm) of a saved model.",
        ),
        "convert": sub.add_parser(
            "convert", help="convert a mid-training checkpoint to a saved quantized model", formatter_class=fmt,
            description="Convert a checkpoint saved during MEC-Quant training (prepared, not converted) into a "
            "quantized model loadable with mec_quant_plugin.from_pretrained.",
        ),
    }
    return top, parsers


def _fill(parser: argparse.ArgumentParser, dataclass_types: list) -> argparse.ArgumentParser:
    """Add the dataclasses' options to an (already created) sub-parser."""
    hf = _hf_parser(dataclass_types, add_help=False)
    for group in hf._action_groups:
        if group.title in ("positional arguments", "options", "optional arguments") and not group._group_actions:
            continue
        target = parser if group.title in ("options", "optional arguments") else parser.add_argument_group(group.title)
        for action in group._group_actions:
            target._add_action(action)
    return parser


def _dataclass_from(ns: argparse.Namespace, cls: type) -> Any:
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(ns, f.name)})


def _extra_training_arguments(parser: argparse.ArgumentParser, rest: list[str]) -> dict[str, Any]:
    """Any other TrainingArguments field given on the command line (only those explicitly given)."""
    if not rest:
        return {}
    from transformers import TrainingArguments

    hf = _hf_parser([TrainingArguments], add_help=False)
    for action in hf._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    ns, unknown = hf.parse_known_args(rest)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return vars(ns)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~"))
        or Path(name).suffix.lower() in DATA_EXTENSIONS
        or os.sep in name and os.path.exists(name.split(os.sep)[0]) and not os.path.exists(name)
    )


def load_raw_dataset(
    name: str, task: str, *, config: str | None = None, max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
):
    """A `datasets.DatasetDict` (or Dataset) for a built-in name, local path or Hub name."""
    import datasets

    key = name.lower()
    if key in ("fashion_mnist", "fashion-mnist"):
        from .data.fashion_mnist import CLASSES, load_fashion_mnist

        features = datasets.Features(
            {"image": datasets.Array2D((28, 28), "uint8"), "label": datasets.ClassLabel(names=list(CLASSES))}
        )
        splits = {}
        for split, limit in (("train", max_train_samples), ("test", max_eval_samples)):
            x, y = load_fashion_mnist(split, limit=limit, normalize=False)
            splits[split] = datasets.Dataset.from_dict({"image": x[:, 0].numpy(), "label": y.numpy()}, features=features)
        return datasets.DatasetDict(splits)
    if key in ("austen", "austen-lm"):
        from .data.austen import austen_classification, austen_language_modeling

        if key == "austen" and task == "text-classification":
            return austen_classification()
        return austen_language_modeling()
    path = Path(name).expanduser()
    if path.is_file():
        builder = DATA_EXTENSIONS.get(path.suffix.lower())
        if builder is None:
            raise CLIError(f"dataset file {name!r}: unknown extension (use one of {sorted(DATA_EXTENSIONS)}).")
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        return datasets.load_dataset(builder, data_files={"train": str(path)}, **kwargs)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        if task == "image-classification":
            return datasets.load_dataset("imagefolder", data_dir=str(path))
        return datasets.load_dataset(str(path))
    if _looks_like_path(name):
        raise CLIError(f"dataset {name!r} not found: no such file or folder.")
    try:
        return datasets.load_dataset(name, config)
    except Exception as exc:  # offline, unknown name, gated: all reported the same way
        raise CLIError(
            f"could not load dataset {name!r} ({type(exc).__name__}: {_first_line(exc)}). Give a Hub dataset name, a "
            f"local file/folder, or one of {sorted(BUILTIN_DATASETS)}."
        ) from exc


def train_eval_splits(raw, train_split: str, eval_split: str | None, seed: int):
    """(train, eval) Datasets: the named splits, else validation/test, else 10% held out of train."""
    import datasets

    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({"train": raw})
    if train_split not in raw:
        raise CLIError(f"the dataset has no split {train_split!r} (splits: {list(raw)}).")
    if eval_split is not None:
        if eval_split not in raw:
            raise CLIError(f"the dataset has no split {eval_split!r} (splits: {list(raw)}).")
        return raw[train_split], raw[eval_split]
    for candidate in ("validation", "valid", "test"):
        if candidate in raw and candidate != train_split:
            return raw[train_split], raw[candidate]
    parts = raw[train_split].train_test_split(test_size=0.1, seed=seed)
    return parts["train"], parts["test"]


def _pick_column(ds, wanted: str | None, candidates: tuple[str, ...], what: str, option: str, kind: str | None = None) -> str:
    if wanted is not None:
        if wanted not in ds.column_names:
            raise CLIError(f"no {what} column {wanted!r} in the dataset (columns: {ds.column_names}).")
        return wanted
    for c in candidates:
        if c in ds.column_names:
            return c
    if kind == "string":
        import datasets

        for c, feat in ds.features.items():
            if isinstance(feat, datasets.Value) and feat.dtype in ("string", "large_string"):
                return c
    raise CLIError(f"cannot tell the {what} column among {ds.column_names}: pass {option}.")


def _label_encoding(train, evals, column: str) -> tuple[list[str], dict[Any, int] | None]:
    """Class names and, for non-ClassLabel columns, a value -> id mapping."""
    import datasets

    feat = train.features[column]
    if isinstance(feat, datasets.ClassLabel):
        return list(feat.names), None
    values = sorted({*train[column], *(evals[column] if evals is not None and column in evals.column_names else [])},
                    key=lambda v: (isinstance(v, str), v))
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values) and values and values[0] >= 0:
        return [str(i) for i in range(max(values) + 1)], None
    return [str(v) for v in values], {v: i for i, v in enumerate(values)}


def _limit(ds, n: int | None):
    return ds if n is None or n >= len(ds) else ds.select(range(n))


# ---------------------------------------------------------------------------------------------
# Models and per-task preprocessing
# ---------------------------------------------------------------------------------------------


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


def _image_transform(model_config, processor, image_column: str, label_column: str, label_map, fashion: bool):
    """A `with_transform` function: images -> `pixel_values` (model's channels and size) + `labels`."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    channels = getattr(model_config, "num_channels", 3)
    size = getattr(model_config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = tuple(size[-2:])
    elif isinstance(size, int):
        size = (size, size)
    if fashion:
        from .data.fashion_mnist import MEAN, STD

        mean, std = MEAN, STD
    else:
        mean, std = 0.5, 0.5

    def to_chw(img) -> torch.Tensor:
        arr = np.asarray(img.convert("RGB" if channels == 3 else "L") if hasattr(img, "convert") else img)
        t = torch.as_tensor(arr)
        if t.ndim == 2:
            t = t.unsqueeze(0)
        elif t.ndim == 3 and t.shape[-1] in (1, 3, 4) and t.shape[0] not in (1, 3, 4):
            t = t.permute(2, 0, 1)
        t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
        if t.shape[0] == 4:
            t = t[:3]
        if t.shape[0] == 1 and channels == 3:
            t = t.expand(3, -1, -1)
        elif t.shape[0] == 3 and channels == 1:
            t = t.mean(0, keepdim=True)
        return t

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        images = batch[image_column]
        if processor is not None:
            from PIL import Image

            pil = [im if hasattr(im, "convert") else Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]
            pil = [im.convert("RGB" if channels == 3 else "L") for im in pil]
            pixels = list(processor(images=pil, return_tensors="pt")["pixel_values"])
        else:
            tensors = [to_chw(im) for im in images]
            target = size or tuple(tensors[0].shape[-2:])
            pixels = [
                ((F.interpolate(t[None], size=target, mode="bilinear", align_corners=False)[0]
                  if tuple(t.shape[-2:]) != target else t) - mean) / std
                for t in tensors
            ]
        labels = batch[label_column]
        if label_map is not None:
            labels = [label_map[v] for v in labels]
        return {"pixel_values": pixels, "labels": [int(v) for v in labels]}

    return transform


@dataclass
class Prepared:
    """Everything a task needs: model, processing class, datasets ready for the model, collator."""

    model: Any
    processing_class: Any
    train: Any
    eval: Any
    collator: Any
    task: str


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


def prepare_task(
    task: str, model_name: str, data: DataArguments | EvalArguments, *, seed: int, model=None,
    train_split: str = "train", eval_split: str | None = None, for_training: bool = True,
) -> Prepared:
    """Load the model (unless given) and turn the dataset into model inputs for `task`."""
    from transformers import DataCollatorWithPadding, default_data_collator

    from .data.models import resolve_model_path

    path = resolve_model_path(model_name)
    max_train = getattr(data, "max_train_samples", None) if for_training else 0
    fashion = data.dataset.lower().startswith("fashion")
    raw = load_raw_dataset(data.dataset, task, config=data.dataset_config,
                           max_train_samples=max_train if fashion else None,
                           max_eval_samples=data.max_eval_samples if fashion else None)
    train, evals = train_eval_splits(raw, train_split, eval_split, seed)
    if not for_training:
        train = None
    elif data.max_train_samples is not None and task != "causal-lm":
        train = _limit(train.shuffle(seed=seed), data.max_train_samples)
    if data.max_eval_samples is not None and task != "causal-lm":
        evals = _limit(evals, data.max_eval_samples)
    ref = train if train is not None else evals

    if task in ("image-classification", "text-classification"):
        label_col = _pick_column(ref, data.label_column, ("label", "labels"), "label", "--label-column")
        names, label_map = _label_encoding(ref, evals, label_col)
        if model is None:
            kwargs = {}
            if for_training:
                kwargs = dict(num_labels=len(names), id2label=dict(enumerate(names)),
                              label2id={n: i for i, n in enumerate(names)}, ignore_mismatched_sizes=True)
            model = _load_model(task, path, model_name, **kwargs)

    if task == "image-classification":
        image_col = _pick_column(ref, data.image_column, ("image", "img", "pixel_values"), "image", "--image-column")
        processor = _load_image_processor(path)
        fn = _image_transform(model.config, processor, image_col, label_col, label_map,
                              fashion=data.dataset.lower().startswith("fashion"))
        train = train.with_transform(fn) if train is not None else None
        evals = evals.with_transform(fn)
        return Prepared(model, processor, train, evals, default_data_collator, task)

    tokenizer = _load_tokenizer(path)
    text_col = _pick_column(ref, data.text_column, ("text", "sentence", "content"), "text", "--text-column", kind="string")
    if task == "text-classification":
        if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id

        def tokenize(batch):
            out = tokenizer(batch[text_col], truncation=True, max_length=data.max_length)
            labels = batch[label_col]
            out["labels"] = [label_map[v] for v in labels] if label_map is not None else [int(v) for v in labels]
            return out

        def encode(ds):
            return ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="tokenizing")

        return Prepared(model, tokenizer, encode(train) if train is not None else None, encode(evals),
                        DataCollatorWithPadding(tokenizer), task)

    # causal-lm: concatenate the texts (EOS between documents) and cut blocks of block_size tokens
    if model is None:
        model = _load_model(task, path, model_name)
    limit = min(data.block_size, getattr(model.config, "max_position_embeddings", None) or data.block_size)
    if tokenizer.model_max_length and tokenizer.model_max_length < 1e9:
        limit = min(limit, tokenizer.model_max_length)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def tokenize_lm(batch):
        ids = tokenizer(batch[text_col], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [x + eos for x in ids]}

    def group(batch):
        flat = [t for seq in batch["input_ids"] for t in seq]
        n = len(flat) // limit * limit
        blocks = [flat[i : i + limit] for i in range(0, n, limit)]
        return {"input_ids": blocks, "attention_mask": [[1] * limit for _ in blocks], "labels": [list(b) for b in blocks]}

    def blocks(ds, n):
        ds = ds.map(tokenize_lm, batched=True, remove_columns=ds.column_names, desc="tokenizing")
        ds = ds.map(group, batched=True, batch_size=1000, desc=f"grouping into blocks of {limit}")
        return _limit(ds, n)

    train = blocks(train, data.max_train_samples) if train is not None else None
    evals = blocks(evals, data.max_eval_samples)
    if (train is not None and len(train) == 0) or len(evals) == 0:
        raise CLIError(f"the texts are shorter than one block of {limit} tokens: lower --block-size.")
    return Prepared(model, tokenizer, train, evals, default_data_collator, task)


def evaluate(model, dataset, collator, task: str, batch_size: int = 8) -> dict[str, float]:
    """Accuracy (+ loss) for classification, perplexity (+ loss) for causal-lm; no Trainer needed."""
    import torch
    from torch.utils.data import DataLoader

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            n = batch["labels"].shape[0]
            loss_sum += float(out.loss) * n
            count += n
            if task != "causal-lm":
                correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    metrics = {"eval_loss": round(loss, 6), "eval_samples": count}
    if task == "causal-lm":
        metrics["eval_perplexity"] = round(math.exp(min(loss, 50.0)), 4)
    else:
        metrics["eval_accuracy"] = round(correct / max(count, 1), 6)
    return metrics


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def _save_train_config_callback(config):
    from transformers import TrainerCallback

    class SaveMECConfig(TrainerCallback):
        """Writes the run's MECQuantConfig into every checkpoint, for `mec-quant convert`."""

        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                if folder.is_dir():
                    (folder / TRAIN_CONFIG_FILE).write_text(config.to_json())
            return control

    return SaveMECConfig()


def _run_builtin_default(parser, run: RunArguments, config, opts: TrainOptions, data: DataArguments) -> int:
    from .config import MECQuantConfig

    ignored = [
        f.name for f in dataclasses.fields(MECQuantConfig)
        if f.name not in ("weight_bits", "act_bits", "step") and getattr(config, f.name) != f.default
    ]
    if data.task not in (None, "image-classification") or any(
        getattr(data, n) is not None for n in ("dataset_config", "eval_split", "max_train_samples")
    ):
        parser.error("the built-in default job takes no data options: give --model and --dataset for your own job.")
    if ignored:
        logger.warning("The built-in default job uses only --weight-bits, --act-bits, --seed, --output-dir, --quick; "
                       "ignored: %s", ", ".join(ignored))
    from .data.fashion_mnist import FashionMNISTNotFound
    from .recipes.fashion_mnist import run_default

    try:
        results = run_default(output_dir=run.output_dir or DEFAULT_DEMO_DIR, weight_bits=config.weight_bits,
                              act_bits=config.act_bits, seed=opts.seed, quick=run.quick)
    except FashionMNISTNotFound as exc:
        print(f"mec-quant train: error: {exc}", file=sys.stderr)
        return 1
    if run.push_to_hub:
        logger.warning("--push-to-hub is not used by the built-in default job; push %s yourself.",
                       f"{run.output_dir or DEFAULT_DEMO_DIR}/mec-quant")
    if results is not None:
        print(json.dumps(results, indent=2, default=str))
    return 0


def _resolve_task(parser: argparse.ArgumentParser, model: str, dataset: str | None, task: str | None) -> str:
    """Check that a local model folder exists and infer the task when not given (train and eval)."""
    from .data.models import resolve_model_path

    path = resolve_model_path(model)
    if not os.path.isdir(path) and _looks_like_path(model):
        parser.error(f"model folder {model!r} not found.")
    task = task or infer_task(dataset, path)
    if task is None:
        parser.error(f"cannot infer the task: pass --task (one of {', '.join(TASKS)}).")
    return task


def cmd_train(parser: argparse.ArgumentParser, ns: argparse.Namespace, rest: list[str]) -> int:
    from .config import MECQuantConfig

    data = _dataclass_from(ns, DataArguments)
    run = _dataclass_from(ns, RunArguments)
    opts = _dataclass_from(ns, TrainOptions)
    try:
        config = MECQuantConfig.from_dict(
            {f.name: getattr(ns, f.name) for f in dataclasses.fields(MECQuantConfig) if hasattr(ns, f.name)}
        )
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    extra = _extra_training_arguments(parser, rest)
    if data.model is None and data.dataset is None:
        if extra:
            parser.error("the built-in default job takes no TrainingArguments: give --model and --dataset for your own job.")
        return _run_builtin_default(parser, run, config, opts, data)
    if data.model is None or data.dataset is None:
        parser.error("give both --model and --dataset (or neither, for the built-in default job).")
    for name in ("block_size", "max_length"):
        if getattr(data, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(data, name)}.")
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(data, name) is not None and getattr(data, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(data, name)}.")

    task = _resolve_task(parser, data.model, data.dataset, data.task)
    output_dir = run.output_dir or f"outputs/mec-quant-{Path(data.model.rstrip('/')).name}"
    try:
        prepared = prepare_task(task, data.model, data, seed=opts.seed, train_split=data.train_split,
                                eval_split=data.eval_split)
    except CLIError as exc:
        parser.error(str(exc))
    except FileNotFoundError as exc:  # the built-in data sets say how to get them
        parser.error(_first_line(exc))

    from transformers import Trainer, TrainingArguments

    from .integrations.trainer import MECQuantCallback

    targs = {f.name: getattr(opts, f.name) for f in dataclasses.fields(TrainOptions) if f.name != "resume_from_checkpoint"}
    targs.update(output_dir=output_dir, remove_unused_columns=task != "image-classification")
    targs.update(extra)
    try:
        args = TrainingArguments(**targs)
    except (TypeError, ValueError) as exc:
        parser.error(f"invalid training arguments: {_first_line(exc)}")
    run_info = {"base_model": data.model, "dataset": data.dataset, "task": task}
    if run.push_to_hub:
        run_info["repo_id"] = run.push_to_hub
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / TRAIN_CONFIG_FILE).write_text(config.to_json())
    trainer = Trainer(
        model=prepared.model, args=args, train_dataset=prepared.train, data_collator=prepared.collator,
        processing_class=prepared.processing_class,
        callbacks=[MECQuantCallback(config, run_info=run_info), _save_train_config_callback(config)],
    )
    trainer.train(resume_from_checkpoint=opts.resume_from_checkpoint)
    model = trainer.model  # converted to torchao int weights by the callback at the end of training
    metrics = evaluate(model, prepared.eval, prepared.collator, task, args.per_device_eval_batch_size)
    info = model.__dict__.get("_mec_quant_run_info")
    if isinstance(info, dict):
        info.setdefault("metrics", {}).update(metrics)
    if trainer.is_world_process_zero():
        trainer.save_model(output_dir)
        (Path(output_dir) / "eval_results.json").write_text(json.dumps(metrics, indent=2))
        print(json.dumps({"output_dir": output_dir, **metrics}, indent=2))
        if run.push_to_hub:
            try:
                model.push_to_hub(run.push_to_hub)
                if prepared.processing_class is not None:
                    prepared.processing_class.push_to_hub(run.push_to_hub)
            except Exception as exc:
                print(f"mec-quant train: error: the model is saved in {output_dir}, but pushing to "
                      f"{run.push_to_hub!r} failed: {_first_line(exc)}", file=sys.stderr)
                return 1
            print(f"pushed to https://huggingface.co/{run.push_to_hub}")
    return 0


def load_for_eval(path: str, task: str):
    """A saved MEC-Quant model (`from_pretrained` of this package) or any model of `task`."""
    from .data.models import resolve_model_path
    from .integrations.hub import MEC_CONFIG_FILE

    local = resolve_model_path(path)
    if (Path(local) / MEC_CONFIG_FILE).is_file():
        from .integrations.hub import from_pretrained

        try:
            return from_pretrained(local)
        except Exception as exc:
            raise CLIError(f"cannot load the MEC-Quant model in {path!r}: {_first_line(exc)}") from exc
    return _load_model(task, local, path).eval()


def cmd_eval(parser: argparse.ArgumentParser, ns: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args = _dataclass_from(ns, EvalArguments)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}.")
    task = _resolve_task(parser, args.model, args.dataset, args.task)
    try:
        model = load_for_eval(args.model, task)
        prepared = prepare_task(task, args.model, args, seed=args.seed, model=model, eval_split=args.split,
                                for_training=False)
    except CLIError as exc:
        parser.error(str(exc))
    except FileNotFoundError as exc:
        parser.error(_first_line(exc))
    metrics = evaluate(prepared.model, prepared.eval, prepared.collator, task, args.batch_size)
    print(json.dumps({"model": args.model, "dataset": args.dataset, "task": task, **metrics}, indent=2))
    return 0


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
        raise CLIError(f"{folder} has no model.safetensors: not a checkpoint folder.")
    return load_file(str(single))


def convert_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike, config_path: str | None = None) -> Path:
    """Load a prepared (mid-training) checkpoint, convert it to torchao int weights and save it."""
    import transformers

    from .api import convert_model, prepare_model
    from .config import MECQuantConfig
    from .integrations.hub import MEC_CONFIG_FILE, make_saveable
    from .modules.registry import is_fake_quantized

    folder = Path(checkpoint)
    if not (folder / "config.json").is_file():
        raise CLIError(f"{checkpoint!r} is not a model folder (no config.json).")
    if (folder / MEC_CONFIG_FILE).is_file():
        raise CLIError(f"{checkpoint!r} is already converted (it has {MEC_CONFIG_FILE}); load it with "
                       "mec_quant_plugin.from_pretrained.")
    candidates = [Path(config_path)] if config_path else [folder / TRAIN_CONFIG_FILE, folder.parent / TRAIN_CONFIG_FILE]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise CLIError(f"no MECQuantConfig for {checkpoint!r}: looked for {', '.join(map(str, candidates))}; pass "
                       "--config FILE (a MECQuantConfig JSON, e.g. MECQuantConfig(...).to_json()).")
    try:
        config = MECQuantConfig.from_json(found.read_text())
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{found}: not a valid MECQuantConfig: {_first_line(exc)}") from exc
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise CLIError(f"config.json of {checkpoint!r} names architectures={archs}: not a transformers model class.")
    state = {k: v for k, v in _read_state_dict(folder).items() if not k.startswith("mec_gates.")}
    if not any("fake_quantizer" in k for k in state):
        raise CLIError(f"{checkpoint!r} holds no fake-quantizer state: it is not a MEC-Quant training checkpoint.")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the quantizer keys are "unexpected" to the float class
    try:
        model = cls.from_pretrained(str(folder))
    finally:
        transformers.logging.set_verbosity(verbosity)
    prepare_model(model, config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise CLIError(f"the checkpoint does not match a model prepared with {found}: unexpected keys {unexpected[:5]}...")
    quant_missing = [k for k in missing if "fake_quantizer" in k]
    if quant_missing:
        raise CLIError(f"the checkpoint does not match a model prepared with {found}: missing {quant_missing[:5]}...")
    if not any(is_fake_quantized(m) for m in model.modules()):
        raise CLIError("the configuration quantizes no layer of this model.")
    model = convert_model(model.eval())
    make_saveable(model, config, run_info={"base_model": getattr(model.config, "_name_or_path", None) or None,
                                           "checkpoint": str(folder)})
    out = Path(output_dir)
    model.save_pretrained(out)
    for item in folder.iterdir():  # tokenizer / image processor files saved with the checkpoint
        is_processing = item.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template",
                                              "preprocessor_config", "processor_config"))
        if is_processing and item.is_file() and not (out / item.name).exists():
            shutil.copy2(item, out / item.name)
    return out


def cmd_convert(parser: argparse.ArgumentParser, ns: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args = _dataclass_from(ns, ConvertArguments)
    if not Path(args.model).is_dir():
        parser.error(f"checkpoint folder {args.model!r} not found.")
    try:
        out = convert_checkpoint(args.model, args.output_dir, args.config)
    except CLIError as exc:
        parser.error(str(exc))
    print(f"converted {args.model} -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mec-quant`; returns the exit status (argument errors exit 2 via SystemExit)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    top, parsers = build_parsers()
    _fill(parsers["train"], [DataArguments, RunArguments, _quant_arguments_class(), TrainOptions])
    _fill(parsers["eval"], [EvalArguments])
    _fill(parsers["convert"], [ConvertArguments])
    argv = list(sys.argv[1:] if argv is None else argv)
    ns, rest = top.parse_known_args(argv)
    command = {"train": cmd_train, "eval": cmd_eval, "convert": cmd_convert}[ns.command]
    return command(parsers[ns.command], ns, rest)


if __name__ == "__main__":
    sys.exit(main())
