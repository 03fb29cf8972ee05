"""Data sets for `mec-quant`: loading (built-in, local file/folder, Hub), splits, columns, labels."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .common import BUILTIN_DATASETS, DATA_EXTENSIONS, CLIError, first_line


def looks_like_path(name: str) -> bool:
    """Whether `name` is meant as a local path (so "not found" is the error, not a Hub lookup)."""
    return (
        name.startswith(("/", "./", "../", "~"))
        or Path(name).suffix.lower() in DATA_EXTENSIONS
        or os.sep in name and os.path.exists(name.split(os.sep)[0]) and not os.path.exists(name)
    )


MIRROR_ENV = "MEC_QUANT_DATASETS_DIR"


def local_mirror(name: str) -> Path | None:
    """The user's local copy of Hub dataset `name`, when `$MEC_QUANT_DATASETS_DIR` is set: the folder
    `$MEC_QUANT_DATASETS_DIR/<owner>/<name>` or `$MEC_QUANT_DATASETS_DIR/<name>` (e.g. the parquet files
    of `uoft-cs/cifar10` in `.../cifar10/`), loaded through the same `datasets` path as the Hub copy."""
    root = os.environ.get(MIRROR_ENV)
    if not root:
        return None
    for candidate in (Path(root) / name, Path(root) / name.split("/")[-1]):
        if candidate.is_dir():
            return candidate
    return None


def load_raw_dataset(
    name: str, task: str, *, config: str | None = None, max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
):
    """A `datasets.DatasetDict` (or Dataset) for a built-in name, local path or Hub name."""
    import datasets

    key = name.lower()
    if key in ("fashion_mnist", "fashion-mnist"):
        from ..data.fashion_mnist import CLASSES, load_fashion_mnist

        features = datasets.Features(
            {"image": datasets.Array2D((28, 28), "uint8"), "label": datasets.ClassLabel(names=list(CLASSES))}
        )
        splits = {}
        for split, limit in (("train", max_train_samples), ("test", max_eval_samples)):
            x, y = load_fashion_mnist(split, limit=limit, normalize=False)
            splits[split] = datasets.Dataset.from_dict({"image": x[:, 0].numpy(), "label": y.numpy()}, features=features)
        return datasets.DatasetDict(splits)
    path = Path(name).expanduser()
    if path.is_file():
        builder = DATA_EXTENSIONS.get(path.suffix.lower())
        if builder is None:
            raise CLIError(f"dataset file {name!r}: unknown extension (use one of {sorted(DATA_EXTENSIONS)}).")
        kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
        if builder == "text":  # one text, as in transformers' run_clm: the lines keep their line ends
            kwargs = {"keep_linebreaks": True}
        return datasets.load_dataset(builder, data_files={"train": str(path)}, **kwargs)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return datasets.load_from_disk(str(path))
        if task == "image-classification":
            return datasets.load_dataset("imagefolder", data_dir=str(path))
        files = [f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")]
        if files and all(f.suffix.lower() == ".txt" for f in files):
            return datasets.load_dataset("text", data_dir=str(path), keep_linebreaks=True)
        return datasets.load_dataset(str(path))
    if looks_like_path(name):
        raise CLIError(f"dataset {name!r} not found: no such file or folder.")
    mirror = local_mirror(name)
    if mirror is not None:
        import logging

        logging.getLogger("mec_quant_plugin").warning("dataset %s: reading the local copy %s ($%s)", name, mirror, MIRROR_ENV)
        return datasets.load_dataset(str(mirror), config)
    try:
        return datasets.load_dataset(name, config)
    except Exception as exc:  # offline, unknown name, gated: all reported the same way
        raise CLIError(
            f"could not load dataset {name!r} ({type(exc).__name__}: {first_line(exc)}). Give a Hub dataset name, a "
            f"local file/folder, or one of {sorted(BUILTIN_DATASETS)}."
        ) from exc


def is_line_text(ds) -> bool:
    """Whether `ds` holds the lines of text files (the `text` builder): one text, not documents."""
    return getattr(getattr(ds, "info", None), "builder_name", None) == "text"


def train_eval_splits(raw, train_split: str, eval_split: str | None, seed: int, *, eval_option: str = "--eval-split"):
    """(train, eval, what eval is): the named splits, else validation/test, else 10% held out of train:
    the first 10% of the lines of text files (contiguous, as run_clm holds out a slice), 10% of the
    rows at random (seeded) otherwise.

    Raises:
        CLIError: a named split is missing, or train has fewer than 2 rows to hold 10% out of (the
            message names `eval_option`, the option that names an evaluation split instead).
    """
    import datasets

    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({"train": raw})
    if train_split not in raw:
        raise CLIError(f"the dataset has no split {train_split!r} (splits: {list(raw)}).")
    if eval_split is not None:
        if eval_split not in raw:
            raise CLIError(f"the dataset has no split {eval_split!r} (splits: {list(raw)}).")
        return raw[train_split], raw[eval_split], f"split {eval_split!r}"
    for candidate in ("validation", "valid", "test"):
        if candidate in raw and candidate != train_split:
            return raw[train_split], raw[candidate], f"split {candidate!r}"
    full = raw[train_split]
    rows = len(full)
    if rows < 2:
        raise CLIError(f"the {train_split!r} split has {rows} row{'s' if rows != 1 else ''} and the dataset has no "
                       f"validation or test split: 10% cannot be held out for evaluation; name a split with "
                       f"{eval_option} (splits: {list(raw)}) or give at least 2 rows.")
    if is_line_text(full):
        k = max(1, round(rows * 0.1))
        return (full.select(range(k, rows)), full.select(range(k)),
                f"the first {k} of {rows} lines of split {train_split!r} (10% held out, contiguous)")
    parts = full.train_test_split(test_size=0.1, seed=seed)
    return (parts["train"], parts["test"],
            f"{len(parts['test'])} of {rows} rows of split {train_split!r} held out at random (10%, seed {seed})")


def pick_column(ds, wanted: str | None, candidates: tuple[str, ...], what: str, option: str, kind: str | None = None) -> str:
    """`wanted` if given (it must exist), else the first of `candidates` present, else (`kind="string"`)
    the first string column; otherwise a CLIError that names `option`."""
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


def label_encoding(train, evals, column: str) -> tuple[list[str], dict[Any, int] | None]:
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


def take_first(ds, n: int | None):
    """The first `n` rows of `ds` (all of them when `n` is None)."""
    return ds if n is None or n >= len(ds) else ds.select(range(n))
