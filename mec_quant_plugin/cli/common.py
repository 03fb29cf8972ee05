"""Shared by the `mec-quant` modules: task and data-set names, file names, `CLIError`."""

from __future__ import annotations

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


class CLIError(Exception):
    """An expected failure (bad data path, unloadable model, ...): reported as a usage error."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]
