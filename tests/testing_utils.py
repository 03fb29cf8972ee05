"""Shared test code: the one registry of tiny models (built from configs, no downloads, each with a
matching input batch), a tiny plain MLP, the Trainer helpers (datasets shaped like a model's
batch, a two-step CPU Trainer) and `fp16_scales`, the reference a converted model equals."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import torch
from datasets import Dataset
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments

from mec_quant_plugin import MECQuantCallback, MECQuantConfig
from mec_quant_plugin.modules import FakeQuantizedModule


@contextlib.contextmanager
def fp16_scales() -> Iterator[None]:
    """Inside, weight fake quantizers compute with their training codes times fp16-rounded scales:
    what convert stores (scales fp16 cannot hold stay fp32, see `convert.fp16_scale`), so the
    fake-quantized model's outputs are the reference a converted model equals. No gradients."""
    from mec_quant_plugin.convert import fp16_scale
    from mec_quant_plugin.quantizers import WeightFakeQuantizer

    def forward(self: WeightFakeQuantizer, weight: Tensor) -> Tensor:
        a = self.to_affine(weight)
        rounded = fp16_scale(a.scale, a.codes, a.block_size)
        scale = a.scale if rounded is None else rounded.float()
        return dataclasses.replace(a, scale=scale).dequantize().to(weight.dtype)

    with mock.patch.object(WeightFakeQuantizer, "forward", forward):
        yield


# --- tiny models -------------------------------------------------------------------------------


def tiny_llama() -> tuple[nn.Module, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    mask[1, 6:] = 0  # right padding
    return LlamaForCausalLM(cfg), {"input_ids": ids, "attention_mask": mask, "labels": ids}


def tiny_gpt2() -> tuple[nn.Module, dict]:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    ids = torch.randint(0, 64, (2, 8))
    return GPT2LMHeadModel(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def tiny_bert() -> tuple[nn.Module, dict]:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    return BertForSequenceClassification(cfg), {"input_ids": ids, "attention_mask": mask,
                                                "labels": torch.tensor([0, 2])}


def tiny_vit() -> tuple[nn.Module, dict]:
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=5)
    return ViTForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 16, 16),
                                            "labels": torch.tensor([1, 4])}


def tiny_resnet() -> tuple[nn.Module, dict]:
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                       layer_type="basic", num_labels=5)
    return ResNetForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 32, 32),
                                               "labels": torch.tensor([0, 3])}


def tiny_convnext() -> tuple[nn.Module, dict]:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    cfg = ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)
    return ConvNextForImageClassification(cfg), {"pixel_values": torch.randn(2, 3, 32, 32),
                                                 "labels": torch.tensor([2, 1])}


TINY_MODELS: dict[str, Callable[[], tuple[nn.Module, dict]]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "vit": tiny_vit,
    "resnet": tiny_resnet,
    "convnext": tiny_convnext,
}


class TinyMLP(nn.Module):
    """Linear-ReLU-Linear-ReLU-Linear classifier: the last Linear is the head."""

    def __init__(self, d_in: int = 6, hidden: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


# --- Trainer helpers -------------------------------------------------------------------------


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
