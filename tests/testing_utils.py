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


def saveable_converted(name: str, config: MECQuantConfig, *, seed: int = 0,
                       run_info: dict | None = None) -> tuple[nn.Module, dict]:
    """Tiny model `name` (seeded), prepared with `config`, activation steps calibrated on its batch
    (train mode), converted and made saveable: what `trainer.save_model()` would save."""
    from mec_quant_plugin import convert_model, make_saveable, prepare_model

    torch.manual_seed(seed)
    model, batch = TINY_MODELS[name]()
    prepare_model(model, config)
    model.train()
    with torch.no_grad():
        model(**batch)  # calibrates the activation quantizers
    convert_model(model.eval())
    return make_saveable(model, config, run_info=run_info), batch


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
    """After `trainer.train()` with MEC-Quant (and weight decay on): mec/* statistics in every
    training log, step sizes never weight-decayed, and the model converted (no weight fake
    quantizer left)."""
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logs and all(k in logs[0] for k in ("mec/loss", "mec/coding_length", "mec/spectral_bound", "mec/rows"))
    groups = trainer.optimizer.param_groups
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    steps = [p for n, p in trainer.model.named_parameters() if "fake_quantizer" in n]
    assert decayed, "no parameter is weight-decayed: train with weight_decay > 0 or this check proves nothing"
    assert steps and all(id(p) in no_decay and id(p) not in decayed for p in steps)
    # converted at the end of training: weights are torchao int tensors, no weight quantizers
    assert not any(isinstance(m, FakeQuantizedModule) and m.weight_fake_quantizer is not None
                   for m in trainer.model.modules())


# --- the configs x tiny-models matrix: shared test bodies (PEFT style) --------------------------
# tests/test_matrix.py calls each `_test_*` body from a one-line parametrized test; another test
# file may call them for its own (config, model) pairs. Each body fails on a real defect: levels
# per channel, finite gradients of every step size, convert equal to fake-quant to tolerance, a
# reload equal to the converted model exactly.

MATRIX_CONFIGS: dict[str, MECQuantConfig] = {
    "W1A2": MECQuantConfig(weight_bits=1, act_bits=2),
    "W2A2-ternary": MECQuantConfig(weight_bits=2, act_bits=2, ternary=True),
    "W4A4-group8": MECQuantConfig(weight_bits=4, act_bits=4, weight_granularity="per_group", group_size=8),
    "W4-weight-only": MECQuantConfig(weight_bits=4, act_bits=None),
}
"""The bit settings of the matrix: binary, ternary, per-group and weight-only (group 8 divides the
input channels of every body layer of the tiny models but ConvNeXt's depthwise convs)."""

# The layer kinds each matrix model exercises (the matrix must cover Linear, Conv2d, Embedding, Conv1D).
MATRIX_MODELS: dict[str, tuple[str, ...]] = {
    "gpt2": ("Conv1D", "Embedding", "Linear"),
    "bert": ("Linear", "Embedding"),
    "resnet": ("Conv2d", "Linear"),
    "vit": ("Linear", "Conv2d"),
    "llama": ("Linear", "Embedding"),
    "convnext": ("Conv2d", "Linear"),
}


def _levels(wfq: nn.Module) -> int:
    """How many distinct weight values one step size may produce under `wfq`'s setting."""
    return 3 if wfq.ternary else 2**wfq.bits


def _most_values_per_step(weight: Tensor, channel_axis: int, group_size: int | None) -> int:
    """The largest number of distinct values among the weights that share one step size (an output
    channel, or a group of `group_size` inputs of one)."""
    w = weight.detach().float().movedim(channel_axis, 0)
    if group_size is None:
        rows = w.reshape(w.shape[0], -1)
    else:
        rows = w.reshape(w.shape[0], w.shape[1] // group_size, group_size, -1).reshape(-1, group_size * w[0, 0].numel())
    steps = rows.sort(dim=1).values.diff(dim=1) != 0  # a new value starts where the sorted row steps up
    return int(steps.sum(dim=1).max()) + 1


def _prepared(name: str, config: MECQuantConfig) -> tuple[nn.Module, dict, dict[str, FakeQuantizedModule]]:
    from mec_quant_plugin import prepare_model

    model, batch = TINY_MODELS[name]()
    prepare_model(model, config)
    fq = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantizedModule)}
    assert fq, f"{name}: prepare_model quantized no layer"
    return model, batch, fq


def _test_prepare_forward_backward(name: str, config: MECQuantConfig) -> None:
    """prepare_model quantizes the body layers at `config`'s bits, the fake-quantized weights take
    at most 2^bits (3 when ternary) values per step size, and one training step gives every step
    size a finite gradient."""
    model, batch, fq = _prepared(name, config)
    body = {n: m for n, m in fq.items() if m.weight_fake_quantizer.bits == config.weight_bits}
    assert body, f"{name}: no layer got weight_bits={config.weight_bits}"
    for n, m in body.items():
        wfq = m.weight_fake_quantizer
        assert wfq.ternary == config.ternary and wfq.group_size == config.group_size, n
        with torch.no_grad():
            most = _most_values_per_step(wfq(m.weight), m.weight_channel_axis, wfq.group_size)
        assert most <= _levels(wfq), f"{n}: {most} weight values per step size, at most {_levels(wfq)} allowed"
        if not isinstance(m, nn.Embedding):
            assert (m.activation_fake_quantizer is None) == (config.act_bits is None), n
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    for n, m in fq.items():
        for p_name, p in m.named_parameters():
            if "fake_quantizer" in p_name:
                assert p.grad is not None and torch.isfinite(p.grad).all(), f"{n}.{p_name}: grad {p.grad}"


def _train_a_little(model: nn.Module, batch: dict, steps: int = 2) -> None:
    """A few SGD steps, so the step sizes are learned ones, not their initial values."""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def _test_convert_matches_fake_quant(name: str, config: MECQuantConfig) -> None:
    """After a little training, convert_model gives torchao int weights with codes in the layer's
    range (GPT-2's Conv1D: a float weight holding at most 2^bits values per step size), the outputs
    equal the fake-quantized model's with fp16-rounded scales (`fp16_scales`, to float tolerance),
    no weight fake quantizer is left."""
    from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
        IntxUnpackedToInt8Tensor,
    )

    from mec_quant_plugin import convert_model

    model, batch, fq = _prepared(name, config)
    _train_a_little(model, batch)
    model.eval()
    spec = {n: (m.weight_channel_axis, m.weight_fake_quantizer) for n, m in fq.items()}
    with torch.no_grad(), fp16_scales():
        before = model(**batch).logits
    convert_model(model)
    with torch.no_grad():
        after = model(**batch).logits
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)
    for n, (axis, wfq) in spec.items():
        m = model.get_submodule(n)
        assert getattr(m, "weight_fake_quantizer", None) is None, n
        if axis == 0:
            assert isinstance(m.weight, IntxUnpackedToInt8Tensor), f"{n}: weight is {type(m.weight).__name__}"
            codes = m.weight.qdata
            assert wfq.qmin <= codes.min() and codes.max() <= wfq.qmax, f"{n}: codes outside [{wfq.qmin}, {wfq.qmax}]"
        else:  # Conv1D: torchao has no kernel for its layout, it keeps the levels as floats
            most = _most_values_per_step(m.weight, axis, wfq.group_size)
            assert most <= _levels(wfq), f"{n}: {most} weight values per step size, at most {_levels(wfq)} allowed"


def _test_save_reload_round_trip(name: str, config: MECQuantConfig, folder: str) -> None:
    """A converted model saved with save_pretrained and reloaded with the plugin's from_pretrained
    has the same int weights and learned activation steps, and gives exactly the converted model's
    outputs on a batch it was not calibrated on (a quantizer that calibrates itself on the compared
    batch would hide a lost step)."""
    import mec_quant_plugin
    from mec_quant_plugin import convert_model, make_saveable

    model, batch, _ = _prepared(name, config)
    model.train()
    with torch.no_grad():
        model(**batch)  # calibrates the activation step sizes
    model = make_saveable(convert_model(model.eval()), config)
    model.save_pretrained(folder)
    reloaded = mec_quant_plugin.from_pretrained(folder)
    _, other = TINY_MODELS[name]()  # fresh random inputs of the same shapes
    with torch.no_grad():
        ref, out = model(**other).logits, reloaded(**other).logits
    assert torch.equal(out, ref), f"max |diff| {(out - ref).abs().max().item():.3g}"
    ours, theirs = dict(model.named_modules()), dict(reloaded.named_modules())
    ints = [n for n, m in ours.items() if hasattr(getattr(m, "weight", None), "qdata")]
    acts = [n for n, m in ours.items() if getattr(m, "activation_fake_quantizer", None) is not None]
    assert ints and (acts or config.act_bits is None)
    for n in ints:
        w, w2 = ours[n].weight, theirs[n].weight
        assert torch.equal(w.qdata, w2.qdata) and torch.equal(w.scale, w2.scale), n
    for n in acts:
        state, state2 = ours[n].activation_fake_quantizer.state_dict(), theirs[n].activation_fake_quantizer.state_dict()
        assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state), n


def _test_trainer_two_steps(name: str, config: MECQuantConfig, out_dir: str) -> None:
    """Two Trainer steps with the callback (weight decay on): the mec/* statistics in every
    training log, every step size in a no-decay group while other weights decay, the loss finite,
    and the model converted at the end (no weight fake quantizer left)."""
    trainer, _, _ = make_trainer(name, out_dir, config, weight_decay=0.1)
    steps = {id(p) for n, p in trainer.model.named_parameters() if "fake_quantizer" in n}
    assert steps, f"{name}: the callback prepared no layer"
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and all(entry["loss"] == entry["loss"] for entry in logs)  # two finite steps
    assert all(k in entry for entry in logs for k in ("mec/loss", "mec/coding_length", "mec/rows"))
    groups = trainer.optimizer.param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed and steps <= no_decay and not steps & decayed
    assert not any(isinstance(m, FakeQuantizedModule) and m.weight_fake_quantizer is not None
                   for m in trainer.model.modules())
