"""The options of `mec-quant`: the option dataclasses and the argparse / HfArgumentParser parsers."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..checkpoint import TRAIN_CONFIG_FILE
from .common import DEFAULT_DEMO_DIR

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
            "imagefolder, data files), or the built-in fashion_mnist."
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
    augment: bool = field(
        default=True,
        metadata={
            "help": "image-classification: random crop after 4-pixel zero padding + horizontal flip of the TRAINING "
            "images (the CIFAR literature's augmentation); --no-augment turns it off. Evaluation images are never augmented."
        },
    )


@dataclass
class RunArguments:
    """Where the result goes."""

    _argument_group_name = "output"

    output_dir: str | None = field(
        default=None,
        metadata={"help": f"Output folder (default: {DEFAULT_DEMO_DIR} for the built-in job, else outputs/mec-quant-<model>)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Train into a non-empty --output-dir that is not a mec-quant run (its files may be replaced). "
                  "The --model folder is never written to."},
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


def quant_arguments_class():
    """MECQuantConfig as an option group, with its torchao-only `step` field hidden."""
    from ..config import MECQuantConfig

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

    model: str = field(metadata={"help": "A checkpoint folder written during MEC-Quant training (prepared, not converted), "
                                         "or, with --format gguf|onnx, a saved (converted) MEC-Quant model folder."})
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where to save the converted (torchao int weights) model and its exported file (needed for a "
                          "checkpoint); for a converted --model: where the exported file goes (default: beside it)."},
    )
    config: str | None = field(
        default=None,
        metadata={"help": f"MECQuantConfig JSON of the run (default: {TRAIN_CONFIG_FILE} in the checkpoint or its parent)."},
    )
    format: Literal["torchao", "gguf", "onnx"] = field(
        default="torchao",
        metadata={"metavar": "{torchao,gguf,onnx}", "help": "torchao: the converted model only; gguf: also model.gguf for llama.cpp (Llama family, BERT; "
                          "extra mec-quant-plugin[export]); onnx: also model.onnx for ONNX Runtime (BERT family, ViT; "
                          "extra mec-quant-plugin[export-onnx]). Written from the trained codes, exactly."},
    )
    push_to_hub: str | None = field(
        default=None,
        metadata={"metavar": "REPO",
                  "help": "Then upload the converted model with its exported files and model card to this Hub repo."},
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
    from .. import __version__

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
            "model (torchao int weights) to --output-dir. Without --model/--dataset: the built-in default job. "
            "With --weight-bits none --act-bits none: plain full-precision fine-tuning (no quantizer, no MEC term) "
            "that saves a normal transformers model, e.g. the FP start of a later low-bit run "
            "(--edge-layers 8bit keeps W8 edges instead).",
        ),
        "eval": sub.add_parser(
            "eval", help="accuracy / perplexity of a saved model", formatter_class=fmt,
            description="Accuracy (classification) or perplexity (causal-lm) of a saved model.",
        ),
        "convert": sub.add_parser(
            "convert", help="convert a mid-training checkpoint to a saved quantized model", formatter_class=fmt,
            usage="mec-quant convert --model FOLDER [--output-dir DIR] [--format {torchao,gguf,onnx}] "
            "[--push-to-hub REPO] [options]",
            description="Convert a checkpoint saved during MEC-Quant training (prepared, not converted) into a "
            "quantized model loadable with mec_quant_plugin.from_pretrained; with --format gguf|onnx also export it "
            "(or an already converted model folder) to model.gguf (llama.cpp) / model.onnx (ONNX Runtime) from the "
            "trained codes, listed in mec_quant_exports.json and the model card; --push-to-hub uploads them all.",
        ),
    }
    return top, parsers


def add_options(parser: argparse.ArgumentParser, dataclass_types: list) -> argparse.ArgumentParser:
    """Add the dataclasses' options to an (already created) sub-parser."""
    hf = _hf_parser(dataclass_types, add_help=False)
    for group in hf._action_groups:
        if group.title in ("positional arguments", "options", "optional arguments") and not group._group_actions:
            continue
        target = parser if group.title in ("options", "optional arguments") else parser.add_argument_group(group.title)
        for action in group._group_actions:
            target._add_action(action)
    return parser


def dataclass_from(ns: argparse.Namespace, cls: type) -> Any:
    """An instance of the option dataclass `cls` from the parsed namespace."""
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(ns, f.name)})


def extra_training_arguments(parser: argparse.ArgumentParser, rest: list[str]) -> dict[str, Any]:
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
