"""Shared by the `mec-quant` modules: task and data-set names, file names, `CLIError`."""

from __future__ import annotations

TASKS = ("image-classification", "causal-lm", "text-classification")
BUILTIN_DATASETS = {"fashion_mnist": "image-classification", "fashion-mnist": "image-classification"}
DATA_EXTENSIONS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".txt": "text", ".parquet": "parquet"}
DEFAULT_DEMO_DIR = "outputs/mec-quant-demo"


class CLIError(Exception):
    """An expected failure (bad data path, unloadable model, ...): reported as a usage error."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 400 characters), for one-line errors."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]
