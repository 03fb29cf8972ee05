"""The built-in default job (`mec-quant train` with no model/dataset, `make demo`).

Protocol: a small ResNet (transformers ResNetConfig, so the standard Trainer / save_pretrained
path is exercised) is trained in full precision first; from that same start, plain QAT
(MECQuantConfig with mec_weight=0) and MEC-Quant train for the same steps on the same data order;
the FP model fine-tuned for those extra steps is the fair reference. Everything runs through
`transformers.Trainer`; the quantized runs add nothing but `callbacks=[MECQuantCallback(config)]`.
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import (
    AutoModelForImageClassification,
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainingArguments,
)

from ..config import MECQuantConfig
from ..data.fashion_mnist import CLASSES, MEAN, STD, load_fashion_mnist
from ..integrations.trainer import MECQuantCallback
from ..options import bits_label
from .provenance import machine


def build_resnet(seed: int = 0) -> ResNetForImageClassification:
    """A 3-stage basic-block ResNet for 1x28x28 inputs (78k parameters), randomly initialized."""
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=1, embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic",
        num_labels=10, downsample_in_first_stage=False, **label_mappings(),
    )
    return ResNetForImageClassification(config)


def label_mappings() -> dict[str, dict]:
    """`id2label` / `label2id` of the ten Fashion-MNIST classes, for a transformers config."""
    return {"id2label": dict(enumerate(CLASSES)), "label2id": {c: i for i, c in enumerate(CLASSES)}}


def fashion_mnist_datasets(train_limit: int | None = None, test_limit: int | None = None) -> tuple[Dataset, Dataset]:
    """Fashion-MNIST as `datasets.Dataset`s of uint8 `pixel_values` (1x28x28) and `labels`."""
    out = []
    for split, limit in (("train", train_limit), ("test", test_limit)):
        x, y = load_fashion_mnist(split, limit=limit, normalize=False)
        ds = Dataset.from_dict({"pixel_values": x.numpy(), "labels": y.numpy()})
        out.append(ds.with_format("torch"))
    return out[0], out[1]


def collate(features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack a batch and standardize pixels with the training statistics."""
    pixels = torch.stack([f["pixel_values"] for f in features]).float()
    return {
        "pixel_values": (pixels / 255.0 - MEAN) / STD,
        "labels": torch.stack([f["labels"] for f in features]).long(),
    }


def training_args(output_dir: str, *, max_steps: int, lr: float, seed: int, batch_size: int = 128) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=512, learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=0,
        weight_decay=0.0, logging_steps=max(max_steps // 10, 1), save_strategy="no", report_to=[],
        seed=seed, data_seed=seed, use_cpu=True, dataloader_num_workers=0, disable_tqdm=False,
    )


@torch.no_grad()
def accuracy(model: nn.Module, test: Dataset, batch_size: int = 512) -> float:
    """Top-1 test accuracy (a plain loop: transformers refuses to build a Trainer around a model
    that is already quantized, even for prediction)."""
    model.eval()
    correct = 0
    for start in range(0, len(test), batch_size):
        batch = collate([test[i] for i in range(start, min(start + batch_size, len(test)))])
        logits = model(pixel_values=batch["pixel_values"]).logits
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(test)


def train(
    model: nn.Module,
    train_ds: Dataset,
    output_dir: str,
    *,
    max_steps: int,
    lr: float,
    seed: int,
    config: MECQuantConfig | None = None,
) -> tuple[nn.Module, float]:
    """Train with the Trainer (plus MECQuantCallback when `config` is given); returns the model
    (converted when quantized) and the wall seconds."""
    model.accepts_loss_kwargs = False  # transformers' ResNet drops loss kwargs (docs/ecosystem-facts.md)
    callbacks = [MECQuantCallback(config)] if config is not None else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        trainer = Trainer(model=model, args=training_args(output_dir, max_steps=max_steps, lr=lr, seed=seed),
                          train_dataset=train_ds, data_collator=collate, callbacks=callbacks)
    start = time.perf_counter()
    trainer.train()
    return trainer.model, time.perf_counter() - start


def pretrain_fp(folder: str | Path, train_ds: Dataset, *, steps: int, seed: int = 0,
                build: Callable[[int], nn.Module] = build_resnet, lr: float = 3e-3) -> nn.Module:
    """The converged FP starting point: `build(seed)` trained `steps` steps and saved in `folder`
    (`save_pretrained`), or the model already saved there."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        return AutoModelForImageClassification.from_pretrained(str(folder))
    model, _ = train(build(seed), train_ds, str(folder / "run"), max_steps=steps, lr=lr, seed=seed)
    model.save_pretrained(str(folder))
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's tensors as stored (torchao int tensors count their int8 codes + scales)."""
    total = 0
    for t in model.state_dict().values():
        inner = [getattr(t, n) for n in ("qdata", "scale", "zero_point") if hasattr(t, n)]
        total += sum(i.numel() * i.element_size() for i in inner) if inner else t.numel() * t.element_size()
    return total


def run_default(
    output_dir: str = "outputs/mec-quant-demo",
    *,
    weight_bits: int = 2,
    act_bits: int | None = 2,
    seed: int = 0,
    quick: bool = False,
) -> dict[str, Any]:
    """FP pre-training, then plain QAT and MEC-Quant from the same start; prints a table, saves the
    MEC-Quant model (torchao int weights) to `output_dir/mec-quant`, returns the numbers.

    `quick` shrinks everything for tests (a few steps on a few hundred images).
    """
    os.makedirs(output_dir, exist_ok=True)
    train_ds, test_ds = fashion_mnist_datasets(
        train_limit=512 if quick else None, test_limit=256 if quick else None
    )
    fp_steps, qat_steps = (4, 4) if quick else (469, 235)  # 1 epoch FP, half an epoch of QAT
    start = time.perf_counter()
    fp = pretrain_fp(Path(output_dir) / "fp", train_ds, steps=fp_steps, seed=seed)
    results: dict[str, Any] = {"fp_start": accuracy(fp, test_ds)}
    ref, _ = train(copy.deepcopy(fp), train_ds, f"{output_dir}/fp-ft", max_steps=qat_steps, lr=1e-3, seed=seed)
    results["fp_finetuned"] = accuracy(ref, test_ds)
    results["fp_bytes"] = model_bytes(ref)
    base = MECQuantConfig(weight_bits=weight_bits, act_bits=act_bits)
    for name, cfg in (("plain_qat", base.replace(mec_weight=0.0)), ("mec_quant", base)):
        model, secs = train(copy.deepcopy(fp), train_ds, f"{output_dir}/{name}", max_steps=qat_steps, lr=1e-3,
                            seed=seed, config=cfg)
        results[name] = accuracy(model, test_ds)
        results[f"{name}_bytes"] = model_bytes(model)
        results[f"{name}_seconds"] = round(secs, 1)
        if name == "mec_quant":
            model.save_pretrained(f"{output_dir}/mec-quant")
    results.update(seconds=round(time.perf_counter() - start, 1), machine=machine(), weight_bits=weight_bits,
                   act_bits=act_bits, fp_steps=fp_steps, qat_steps=qat_steps)
    bits = bits_label(weight_bits, act_bits)
    rows = [
        (f"FP start ({fp_steps} steps)", results["fp_start"], results["fp_bytes"]),
        (f"FP fine-tuned +{qat_steps} steps (reference)", results["fp_finetuned"], results["fp_bytes"]),
        (f"plain LSQ QAT {bits}", results["plain_qat"], results["plain_qat_bytes"]),
        (f"MEC-Quant {bits}", results["mec_quant"], results["mec_quant_bytes"]),
    ]
    print(f"\nFashion-MNIST test accuracy ({len(test_ds)} images), seed {seed}:")
    print(f"| {'model':<40} | accuracy | bytes   |\n|{'-' * 42}|----------|---------|")
    for label, acc, size in rows:
        print(f"| {label:<40} | {100 * acc:7.2f}% | {size:>7} |")
    print(f"\nMEC-Quant model saved to {output_dir}/mec-quant ({results['seconds']:.0f} s in all)")
    (Path(output_dir) / "results.json").write_text(json.dumps(results, indent=2))
    return results
