"""quantization_report: per layer group, the bits and what the weight tensor stores."""

from __future__ import annotations

import pytest
from testing_utils import TINY_MODELS

from mec_quant_plugin import MECQuantConfig, convert_model, make_saveable, prepare_model, quantization_report


def test_report_of_a_model_reloaded_with_plain_transformers(tmp_path):
    # It used to say "float (not quantized): 16 layers" for the int4 model it had just saved.
    model, _ = TINY_MODELS["llama"]()
    config = MECQuantConfig(weight_bits=4, act_bits=None)
    prepare_model(model, config)
    convert_model(model)
    make_saveable(model, config)
    model.save_pretrained(str(tmp_path))
    reloaded = type(model).from_pretrained(str(tmp_path))  # transformers + torchao, no plugin code
    report = quantization_report(reloaded)
    assert "float (not quantized)" not in report
    assert "W4Afloat: 14 layers, int4 codes + float16 scales per channel (torchao IntxUnpackedToInt8Tensor)" in report
    assert "W8Afloat: 2 layers, int8 codes + float16 scales per channel" in report


@pytest.mark.parametrize("act_bits", [None, 4])
def test_report_says_what_each_layer_stores_before_and_after_convert(act_bits):
    model, _ = TINY_MODELS["gpt2"]()
    prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=act_bits, weight_granularity="per_group", group_size=16))
    a = "float" if act_bits is None else act_bits
    assert f"W2A{a}: 8 layers, float weights fake-quantized for training (learned step sizes)" in quantization_report(model)
    convert_model(model)
    report = quantization_report(model)
    # GPT-2's Conv1D keeps a float weight (torchao has no kernel for its layout): say so.
    assert f"W2A{a}: 8 layers, float32 weights holding the 2-bit levels (no torchao int kernel for Conv1D)" in report
    edges = 3 if act_bits is None else 2  # wte, wpe (and the tied lm_head when it has no input quantizer)
    assert f"W8Afloat: {edges} layers, int8 codes + float16 scales per channel (torchao IntxUnpackedToInt8Tensor)" in report
    assert "float (not quantized)" not in report


def test_report_lists_every_float_parameter_holder():
    model, _ = TINY_MODELS["vit"]()
    prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2))
    report = quantization_report(model)
    # ViT's cls token / position embeddings live on ViTEmbeddings itself, not on a leaf module
    assert "left in float (type not quantizable): LayerNorm x5, ViTEmbeddings x1" in report
