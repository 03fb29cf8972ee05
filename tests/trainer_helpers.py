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
    cb = callback or MECQuantCallback(config or MECQuantConfig(weight_bits=2, act_bits=4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=training_arguments(out_dir, **arg_overrides), train_dataset=ds,
                          eval_dataset=ds, callbacks=[cb])
    return trainer, cb, ds


def training_arguments(out_dir: str, **overrides: Any) -> TrainingArguments:
    """Two CPU steps of batch 4, logged every step, nothing saved or reported."""
    args = dict(
        output_dir=out_dir, per_device_train_batch_size=4, per_device_eval_batch_size=4, max_steps=2,
        logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no",
        learning_rate=1e-3, seed=0, data_seed=0,
    )
    args.update(overrides)
    return TrainingArguments(**args)


def check_trained_with_the_term(trainer: Trainer) -> None:
    """After `trainer.train()` with MEC-Quant: mec/* statistics in every training log, step sizes
    never weight-decayed, and the model converted (no weight fake quantizer left)."""
    from mec_quant_plugin.modules import FakeQuantizedModule

    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all(k in logs[0] for k in ("mec/loss", "mec/coding_length", "mec/spectral_bound", "mec/rows"))
    groups = trainer.optimizer.param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    steps = [p for n, p in trainer.model.named_parameters() if "fake_quantizer" in n]
    assert steps and all(id(p) in no_decay and id(p) not in decayed for p in steps)
    # converted at the end of training: weights are torchao int tensors, no weight quantizers
    assert not any(isinstance(m, FakeQuantizedModule) and m.weight_fake_quantizer is not None
                   for m in trainer.model.modules())
