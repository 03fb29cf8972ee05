"""`mec-quant`: MEC-Quant quantization-aware training from the command line.

    mec-quant train                                   # the built-in default: Fashion-MNIST, FP -> W2A2
    mec-quant train --model HuggingFaceTB/SmolLM2-135M-Instruct --dataset austen-lm --task causal-lm \\
        --weight-bits 4 --act-bits 8 --max-steps 200 --output-dir outputs/smollm2-w4a8
    mec-quant eval --model outputs/smollm2-w4a8 --dataset austen-lm --task causal-lm
    mec-quant convert --model outputs/smollm2-w4a8/checkpoint-100 --output-dir outputs/smollm2-w4a8-ckpt100

`train` is the standard `transformers.Trainer` with `MECQuantCallback(config)`; the options come
from the dataclasses in `cli/arguments.py` and `MECQuantConfig` through `transformers.HfArgumentParser`,
so every option is accepted as `--weight-bits` and `--weight_bits`. Any other
`transformers.TrainingArguments` field can be given too (e.g. `--lr_scheduler_type cosine`, `--bf16`).

Datasets: a Hub name (`load_dataset(name)`), a local file (.json/.jsonl/.csv/.txt/.parquet), a local
folder (`save_to_disk` output, an image folder for image-classification, or data files), or one of
the built-in names that run offline: `fashion_mnist`, `austen` (which-novel classification) and
`austen-lm` (held-out-chapter language modelling).
"""

from __future__ import annotations

import logging
import sys

from .arguments import (
    ConvertArguments,
    DataArguments,
    EvalArguments,
    RunArguments,
    TrainOptions,
    _fill,
    _quant_arguments_class,
    build_parsers,
)
from .checkpoint import convert_checkpoint
from .commands import cmd_convert, cmd_eval, cmd_train, logger
from .common import BUILTIN_DATASETS, DATA_EXTENSIONS, DEFAULT_DEMO_DIR, TASKS, TRAIN_CONFIG_FILE, CLIError
from .data import load_raw_dataset, train_eval_splits
from .models import infer_task, load_for_eval
from .tasks import Prepared, evaluate, prepare_task

__all__ = [
    "BUILTIN_DATASETS",
    "DATA_EXTENSIONS",
    "DEFAULT_DEMO_DIR",
    "TASKS",
    "TRAIN_CONFIG_FILE",
    "CLIError",
    "ConvertArguments",
    "DataArguments",
    "EvalArguments",
    "Prepared",
    "RunArguments",
    "TrainOptions",
    "build_parsers",
    "cmd_convert",
    "cmd_eval",
    "cmd_train",
    "convert_checkpoint",
    "evaluate",
    "infer_task",
    "load_for_eval",
    "load_raw_dataset",
    "logger",
    "main",
    "prepare_task",
    "train_eval_splits",
]


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
