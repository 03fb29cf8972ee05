"""The torchao artifact (issue 12, Build 1): embeddings gather before dequantizing, int8 zero points,
fp16 scales, a warning for group sizes no export stores exactly, and exact save/reload."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from testing_utils import TINY_MODELS
from torch import nn
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
    IntxUnpackedToInt8Tensor,
)

import mec_quant_plugin
from mec_quant_plugin import MECQuantConfig, convert_model, make_saveable, prepare_model
from mec_quant_plugin.quantized_embedding import GatheringEmbedding, use_gathering_embeddings

_SETTINGS = {
    "W1": dict(weight_bits=1),
    "ternary": dict(weight_bits=2, ternary=True),
    "W2": dict(weight_bits=2),
    "W4-group32": dict(weight_bits=4, weight_granularity="per_group", group_size=32),
    "W8": dict(weight_bits=8),
}


def _prepared_stack(setting: str, dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(40, 64, padding_idx=0), nn.Linear(64, 64), nn.Linear(64, 8)).to(dtype)
    prepare_model(model, MECQuantConfig(act_bits=None, edge_layers="same", **_SETTINGS[setting]))
    with torch.no_grad():  # learned-looking steps, not the initial ones
        for mod in model:
            mod.weight_fake_quantizer.scale.mul_(1 + 0.1 * torch.rand_like(mod.weight_fake_quantizer.scale))
    return model


# ---- embeddings gather rows before dequantizing -------------------------------------------------
@pytest.mark.parametrize("setting", sorted(_SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gathered_embedding_equals_dequantize_then_embed(setting, dtype, monkeypatch):
    model = convert_model(_prepared_stack(setting, dtype))
    emb = model[0]
    assert isinstance(emb, GatheringEmbedding) and isinstance(emb, nn.Embedding)
    ids = torch.tensor([[0, 3, 39, 3], [7, 0, 1, 2]])
    expected = F.embedding(ids, emb.weight.dequantize())
    dequantized = []
    original = IntxUnpackedToInt8Tensor.dequantize
    monkeypatch.setattr(IntxUnpackedToInt8Tensor, "dequantize",
                        lambda self: dequantized.append(self.numel()) or original(self))
    out = emb(ids)
    assert out.dtype == dtype and torch.equal(out, expected)
    assert dequantized == [ids.numel() * 64]  # the 8 looked-up rows, not the 40-row table


def test_convert_and_plugin_reload_gather_plain_reload_stays_nn_embedding(tmp_path):
    model, batch = TINY_MODELS["llama"]()
    config = MECQuantConfig(weight_bits=2, act_bits=None)
    prepare_model(model, config)
    convert_model(model.eval())
    assert type(model.get_input_embeddings()) is GatheringEmbedding
    with torch.no_grad():
        ref = model(**batch).logits
        plain = copy.deepcopy(model)
        plain.get_input_embeddings().__class__ = nn.Embedding  # torchao's full-table dequantize
        assert torch.equal(plain(**batch).logits, ref)
    make_saveable(model, config).save_pretrained(tmp_path)
    again = mec_quant_plugin.from_pretrained(str(tmp_path))
    assert type(again.get_input_embeddings()) is GatheringEmbedding
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, ref)
    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert type(reloaded.get_input_embeddings()) is nn.Embedding  # plain reload: unchanged class
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, ref)
    assert use_gathering_embeddings(reloaded) == 1
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, ref)


def test_subclassed_or_max_norm_embeddings_are_left_alone():
    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2

    model = nn.Sequential(Scaled(10, 32), nn.Embedding(10, 32, max_norm=1.0), nn.Embedding(10, 32))
    assert use_gathering_embeddings(model) == 0  # float weights: nothing to gather
    w = IntxUnpackedToInt8Tensor.from_hp(torch.randn(10, 32), (1, 32), torch.int4)
    for mod in model:
        mod.weight = nn.Parameter(w, requires_grad=False)
    assert use_gathering_embeddings(model) == 1
    assert [type(m) for m in model] == [Scaled, nn.Embedding, GatheringEmbedding]


# ---- what is stored ------------------------------------------------------------------------------
@pytest.mark.parametrize("setting", sorted(_SETTINGS))
def test_scales_are_fp16_and_zero_points_int8(setting):
    model = convert_model(_prepared_stack(setting))
    for mod in model:
        w = mod.weight
        assert w.scale.dtype == torch.float16
        if setting == "W1":  # binary: q in {-1, 0}, zero point -0.5 (exact in fp16)
            assert w.zero_point.dtype == torch.float16 and bool((w.zero_point == -0.5).all())
        else:
            assert w.zero_point.dtype == torch.int8 and not w.zero_point.any()


@pytest.mark.parametrize("setting", sorted(_SETTINGS))
def test_converted_outputs_equal_the_fp16_scale_reference(setting):
    model = _prepared_stack(setting)
    ids = torch.randint(0, 40, (3, 5))
    reference = nn.Sequential(nn.Embedding(40, 64), nn.Linear(64, 64), nn.Linear(64, 8))
    with torch.no_grad():
        for ref, mod in zip(reference, model):
            affine = mod.weight_fake_quantizer.to_affine(mod.weight)
            codes = affine.codes  # the codes training used, with fp16-rounded scales
            rounded = type(affine)(codes, affine.scale.half().float(), affine.zero_point, affine.block_size,
                                   affine.dtype, affine.group_size)
            ref.weight.copy_(rounded.dequantize())
            if isinstance(ref, nn.Linear):
                ref.bias.copy_(mod.bias)
        convert_model(model)
        assert torch.equal(model(ids), reference(ids))


def test_a_scale_fp16_cannot_hold_stays_fp32_with_a_warning():
    model = nn.Sequential(nn.Linear(32, 4))
    with torch.no_grad():
        model[0].weight[1] *= 1e-5  # that row's step falls below fp16's normal range
    prepare_model(model, MECQuantConfig(weight_bits=4, act_bits=None, edge_layers="same"))
    x = torch.randn(3, 32)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match="below fp16's normal range"):
        convert_model(model)
    assert model[0].weight.scale.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("bits", [2, 4])
def test_saved_folder_stores_int8_zero_points_and_fp16_scales(bits, tmp_path):
    model, _ = TINY_MODELS["bert"]()
    config = MECQuantConfig(weight_bits=bits, act_bits=None)
    prepare_model(model, config)
    convert_model(model.eval())
    make_saveable(model, config).save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        kinds = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    zero_points = {k: v for k, v in kinds.items() if k.endswith("zero_point")}
    scales = {k: v for k, v in kinds.items() if k.endswith("_scale")}
    assert zero_points and set(zero_points.values()) == {"I8"}, zero_points
    assert scales and set(scales.values()) == {"F16"}, scales


_PLAIN = textwrap.dedent("""
    import json, sys, torch, transformers
    cls = getattr(transformers, json.load(open(sys.argv[1] + "/config.json"))["architectures"][0])
    model = cls.from_pretrained(sys.argv[1])
    assert "mec_quant_plugin" not in sys.modules
    with torch.no_grad():
        torch.save(model(input_ids=torch.tensor([[2, 5, 7, 1]])).logits, sys.argv[2])
""")


def test_plain_transformers_reloads_the_new_storage_in_a_fresh_process(tmp_path):
    model, _ = TINY_MODELS["bert"]()
    config = MECQuantConfig(weight_bits=2, act_bits=None)
    prepare_model(model, config)
    convert_model(model.eval())
    make_saveable(model, config).save_pretrained(tmp_path / "m")
    subprocess.run([sys.executable, "-c", _PLAIN, str(tmp_path / "m"), str(tmp_path / "out.pt")], check=True)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([[2, 5, 7, 1]])).logits
    assert torch.equal(torch.load(tmp_path / "out.pt"), ref)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]["quant_method"] == "torchao"


# ---- the group-size warning at prepare ------------------------------------------------------------
@pytest.mark.parametrize("group_size, why", [(16, "multiple of 32"), (8, "multiple of 32.*power-of-two"),
                                             (48, "multiple of 32.*power-of-two"), (96, "power-of-two")])
def test_prepare_warns_for_a_group_size_no_export_stores_exactly(group_size, why):
    model = nn.Sequential(nn.Linear(8, 192), nn.Linear(192, 192), nn.Linear(192, 2))  # body: the middle one
    config = MECQuantConfig(weight_bits=2, act_bits=None, weight_granularity="per_group", group_size=group_size,
                            edge_layers="float")
    with pytest.warns(UserWarning, match=rf"group_size={group_size} cannot be exported exactly: .*{why}"):
        prepare_model(model, config)


@pytest.mark.parametrize("granularity", [dict(weight_granularity="per_group", group_size=32),
                                         dict(weight_granularity="per_group", group_size=128), {}])
def test_prepare_does_not_warn_for_exportable_steps(granularity):
    model = nn.Sequential(nn.Linear(128, 128), nn.Linear(128, 128), nn.Linear(128, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=None, **granularity))
