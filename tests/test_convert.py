"""convert: torchao int weights with the learned scales (rounded to fp16); outputs equal the
fake-quant model computing with the same codes and fp16-rounded scales."""

from __future__ import annotations

import pytest
import torch
from testing_utils import TINY_MODELS, _train_a_little, fp16_scales
from torch import nn
from torchao.quantization import quantize_
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
    IntxUnpackedToInt8Tensor,
)

from mec_quant_plugin import (
    MECQuantConfig,
    convert_model,
    is_fake_quantized,
    is_supported_layer,
    prepare_model,
)
from mec_quant_plugin.modules import FakeQuantizedModule


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
@pytest.mark.parametrize("act_bits", [None, 4])
def test_convert_equals_fake_quant_output(name, act_bits):
    model, batch = TINY_MODELS[name]()
    prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=act_bits))
    _train_a_little(model, batch, steps=3)
    model.eval()
    with torch.no_grad(), fp16_scales():
        before = model(**batch).logits
    convert_model(model)
    with torch.no_grad():
        after = model(**batch).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    for n, m in model.named_modules():
        if isinstance(m, FakeQuantizedModule):
            assert m.weight_fake_quantizer is None
            assert m.activation_fake_quantizer is not None and act_bits is not None
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            assert isinstance(m.weight, IntxUnpackedToInt8Tensor), n
    if act_bits is None:
        assert not any(is_fake_quantized(m) for m in model.modules())


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("kind", ["linear", "conv", "embedding"])
def test_every_bit_width_converts_exactly(bits, kind):
    layer, x = {
        "linear": (nn.Linear(16, 6), torch.randn(3, 16)),
        "conv": (nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 5, 5)),
        "embedding": (nn.Embedding(12, 8), torch.randint(0, 12, (2, 5))),
    }[kind]
    model = nn.Sequential(layer)
    quantize_(model, MECQuantConfig(weight_bits=bits, act_bits=None), filter_fn=is_supported_layer)
    with torch.no_grad(), fp16_scales():
        ref = model(x)
        codes = model[0].weight_fake_quantizer.to_affine(model[0].weight).codes
    quantize_(model, MECQuantConfig(step="convert"), filter_fn=is_fake_quantized)
    w = model[0].weight
    assert isinstance(w, IntxUnpackedToInt8Tensor)
    assert len(torch.unique(w.qdata)) <= 2**bits
    assert torch.equal(w.qdata, codes)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_binary_and_ternary_codes():
    lin = nn.Linear(32, 4)
    model = nn.Sequential(lin)
    quantize_(model, MECQuantConfig(weight_bits=1, act_bits=None), filter_fn=is_supported_layer)
    alpha = model[0].weight_fake_quantizer.scale.detach().squeeze()
    convert_model(model)
    w = model[0].weight
    assert set(w.qdata.unique().tolist()) <= {-1, 0}
    deq = w.dequantize()
    for c in range(4):
        assert set(deq[c].abs().unique().tolist()) == {(2 * alpha[c]).half().item() / 2}  # scale 2*alpha, fp16
    model = nn.Sequential(nn.Linear(32, 4))
    quantize_(model, MECQuantConfig(weight_bits=2, ternary=True, act_bits=None), filter_fn=is_supported_layer)
    convert_model(model)
    assert set(model[0].weight.qdata.unique().tolist()) <= {-1, 0, 1}


def test_per_group_convert():
    model = nn.Sequential(nn.Linear(32, 4))
    quantize_(model, MECQuantConfig(weight_bits=3, act_bits=None, weight_granularity="per_group",
                                    group_size=8), filter_fn=is_supported_layer)
    x = torch.randn(2, 32)
    with torch.no_grad(), fp16_scales():
        ref = model(x)
    convert_model(model)
    assert model[0].weight.block_size == (1, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), ref, atol=1e-5)


def test_convert_without_prepare_is_an_error():
    with pytest.raises(ValueError, match="call prepare_model first"):
        convert_model(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("where", ["weight", "weight step", "activation step", "activation offset"])
def test_convert_refuses_non_finite_weights_and_step_sizes(where):
    # convert (and save) used to succeed with NaN scales.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2, act_signedness="signed"))
    model.train()
    model(torch.randn(8, 4))  # calibrate
    layer = model[1]
    tensor = {"weight": layer.weight, "weight step": layer.weight_fake_quantizer.scale,
              "activation step": layer.activation_fake_quantizer.scale,
              "activation offset": layer.activation_fake_quantizer.offset}[where]
    with torch.no_grad():
        tensor.view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*\b1\.(weight|weight_fake_quantizer\.scale|activation_fake_quantizer\.(scale|offset))\b"):
        convert_model(model)
    assert all(m.weight_fake_quantizer is not None for m in model)  # nothing was converted
    with pytest.raises(ValueError, match="non-finite"):  # torchao's entry point
        quantize_(model, MECQuantConfig(step="convert"), filter_fn=is_fake_quantized)
