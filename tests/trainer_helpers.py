"""Shared pieces of the Trainer tests: tiny datasets from a model's example batch, and a Trainer."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from datasets import Dataset
from tiny_models import TINY_MODELS
from transformers import Trainer, TrainingArguments

from mec_quant_plugin import MECQuantCallback, MECQuantConfig


def dataset_like(batch: dict[str, torch.Tensor], rows: int = 16, seed: int = 0) -> Dataset:
    """`rows` examples shaped like one row of `batch`, with fresh random values."""
    g = torch.Generator().manual_seed(seed)
    data: dict[str, list] = {}
    for key, value in batch.items():
        one = value[0]
        if key in ("input_ids", "labels") and one.dim() > 0:
            vals = torch.randint(0, 64, (rows, *one.shape), generator=g)
        elif key == "labels":
            vals = torch.randint(0, int(batch["labels"].max()) + 1, (rows,), generator=g)
        elif key == "attention_mask":
            vals = torch.ones(rows, *one.shape, dtype=torch.long)
        else:
            vals = torch.randn(rows, *one.shape, generator=g)
        data[key] = vals.tolist()
    if "input_ids" in data and "labels" in data and len(batch["labels"].shape) > 1:
        data["labels"] = data["input_ids"]
    return Dataset.from_dict(data).with_format("torch")


def make_trainer(
    name: str,
    out_dir: str,
    config: MECQuantConfig | None = None,
    *,
    rows: int = 16,
    callback: MECQuantCallback | None = None,
    **arg_overrides: Any,
) -> tuple[Trainer, MECQuantCallback, Dataset]:
    model, batch = TINY_MODELS[name]()
    ds = dataset_like(batch, rows)
    args = dict(
        output_dir=out_dir, per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
        learning_rate=1e-3, seed=0, data_seed=0,
    )
    args.update(arg_overrides)
    cb = callback or MECQuantCallback(config or MECQuantConfig(weight_bits=2, act_bits=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=TrainingArguments(**args), train_dataset=ds, eval_dataset=ds, callbacks=[cb])
    return trainer, cb, ds
