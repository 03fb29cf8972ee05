"""`mec-quant`: MEC-Quant quantization-aware training from the command line.

    mec-quant train                                   # the built-in default: Fashion-MNIST, FP -> W2A2
    mec-quant train --model HuggingFaceTB/SmolLM2-135M-Instruct --dataset texts.jsonl --task causal-lm \\
        --weight-bits 4 --act-bits 8 --max-steps 200 --output-dir outputs/smollm2-w4a8
    mec-quant train --model ./m --dataset texts.jsonl --task causal-lm --weight-bits none --act-bits none \\
        --output-dir outputs/m-fp                     # full-precision fine-tuning: a normal transformers model
    mec-quant train --model outputs/m-fp --dataset texts.jsonl --task causal-lm --weight-bits 2 --act-bits 2
    mec-quant eval --model outputs/smollm2-w4a8 --dataset texts.jsonl --task causal-lm
    mec-quant convert --model outputs/smollm2-w4a8/checkpoint-100 --output-dir outputs/smollm2-w4a8-ckpt100

`train` is the standard `transformers.Trainer` with `MECQuantCallback(config)`; the options come
from the dataclasses in `cli/arguments.py` and `MECQuantConfig` through `transformers.HfArgumentParser`,
so every option is accepted as `--weight-bits` and `--weight_bits`. Any other
`transformers.TrainingArguments` field can be given too (e.g. `--lr_scheduler_type cosine`, `--bf16`).

Models: a local folder, or a Hub id loaded from the Hub (or its cache): exactly the model named, or
a usage error saying why it could not be loaded.

Datasets: a Hub name (`load_dataset(name)`), a local file (.json/.jsonl/.csv/.txt/.parquet), a local
folder (`save_to_disk` output, an image folder for image-classification, or data files), or the
built-in `fashion_mnist` (the Debian package's files, else the Hub).
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
    add_options,
    build_parsers,
    quant_arguments_class,
)
from .commands import cmd_convert, cmd_eval, cmd_train

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mec-quant`; returns the exit status (argument errors exit 2 via SystemExit)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    top, parsers = build_parsers()
    add_options(parsers["train"], [DataArguments, RunArguments, quant_arguments_class(), TrainOptions])
    add_options(parsers["eval"], [EvalArguments])
    add_options(parsers["convert"], [ConvertArguments])
    argv = list(sys.argv[1:] if argv is None else argv)
    ns, rest = top.parse_known_args(argv)
    command = {"train": cmd_train, "eval": cmd_eval, "convert": cmd_convert}[ns.command]
    return command(parsers[ns.command], ns, rest)
