"""prepare_model / quantize_ on tiny Hugging Face models and plain modules."""

from __future__ import annotations

import logging

import pytest
import torch
from testing_utils import TINY_MODELS, fp16_scales
from torch import nn
from torchao.quantization import quantize_
from transformers.pytorch_utils import Conv1D

from mec_quant_plugin import MECQuantConfig, is_supported_layer, prepare_model, quantization_report
from mec_quant_plugin.modules import FakeQuantizedModule

# The layers each tiny model must keep as edges (first input layers + head), by the policy rule.
EXPECTED_EDGES = {
    "llama": {"model.embed_tokens", "lm_head"},
    "gpt2": {"transformer.wte", "transformer.wpe", "lm_head"},
    "bert": {"bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings",
             "bert.embeddings.token_type_embeddings", "classifier"},
    "vit": {"vit.embeddings.patch_embeddings.projection", "classifier"},
    "resnet": {"resnet.embedder.embedder.convolution", "classifier.1"},
    "convnext": {"convnext.embeddings.patch_embeddings", "classifier"},
}


def _supported_names(model):
    return {n for n, m in model.named_modules() if is_supported_layer(m, n)}


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_prepare_swaps_exactly_the_supported_layers(name):
    model, batch = TINY_MODELS[name]()
    supported = _supported_names(model)
    params_before = {n: p for n, p in model.named_parameters()}
    prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2))
    fq = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantizedModule)}
    assert set(fq) == supported
    edges = {n for n, m in fq.items() if m.weight_fake_quantizer.bits == 8}
    assert edges == EXPECTED_EDGES[name]
    for n, m in fq.items():
        want_w = 8 if n in EXPECTED_EDGES[name] else 2
        assert m.weight_fake_quantizer.bits == want_w
        if isinstance(m, nn.Embedding):
            assert m.activation_fake_quantizer is None
        else:
            assert m.activation_fake_quantizer.bits == want_w
    # same Parameter objects, same names; only quantizer parameters are new
    after = dict(model.named_parameters())
    for n, p in params_before.items():
        assert after[n] is p
    new = set(after) - set(params_before)
    assert new and all("fake_quantizer" in n for n in new)
    model.train()
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for n, m in fq.items():
        assert m.weight_fake_quantizer.scale.grad is not None, n
        assert m.weight.grad is not None, n


def test_edge_policy_float_and_same():
    model, _ = TINY_MODELS["vit"]()
    prepare_model(model, MECQuantConfig(weight_bits=3, act_bits=4, edge_layers="float"))
    assert not isinstance(model.classifier, FakeQuantizedModule)
    assert not isinstance(model.vit.embeddings.patch_embeddings.projection, FakeQuantizedModule)
    model2, _ = TINY_MODELS["vit"]()
    prepare_model(model2, MECQuantConfig(weight_bits=3, act_bits=4, edge_layers="same"))
    assert model2.classifier.weight_fake_quantizer.bits == 3
    assert model2.classifier.activation_fake_quantizer.bits == 4


def test_prepare_logs_which_layers_got_which_bits(caplog):
    model, _ = TINY_MODELS["resnet"]()
    with caplog.at_level(logging.INFO, logger="mec_quant_plugin"):
        prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2))
    text = caplog.text
    assert "W2A2: 5 layers" in text and "W8A8: 2 layers" in text
    assert "BatchNorm2d x6" in quantization_report(model)


def test_disabled_quantizers_equal_float_module_exactly():
    torch.manual_seed(0)
    for layer, x in [
        (nn.Linear(8, 5), torch.randn(3, 8)),
        (nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), torch.randn(2, 4, 9, 9)),
        (nn.Embedding(10, 4), torch.randint(0, 10, (3, 5))),
        (Conv1D(5, 8), torch.randn(2, 3, 8)),
    ]:
        ref = layer(x)
        model = nn.Sequential(layer)
        quantize_(model, MECQuantConfig(weight_bits=None, act_bits=None), filter_fn=is_supported_layer)
        assert isinstance(model[0], FakeQuantizedModule)
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("conv", [
    dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=2, dilation=2, groups=4),  # depthwise
    dict(in_channels=4, out_channels=6, kernel_size=(1, 3), padding="same", padding_mode="reflect"),
])
def test_conv2d_variants_match_float_conv_on_quantized_weight(conv):
    layer = nn.Conv2d(**conv)
    x = torch.randn(2, 4, 10, 10)
    model = nn.Sequential(layer)
    quantize_(model, MECQuantConfig(weight_bits=2, act_bits=None), filter_fn=is_supported_layer)
    fq = model[0]
    wq = fq.weight_fake_quantizer(fq.weight)
    ref = nn.Conv2d(**conv)
    ref.weight.data.copy_(wq)
    ref.bias.data.copy_(layer.bias)
    assert torch.allclose(model(x), ref(x), atol=1e-6)


def test_quantize_with_torchao_default_filter_only_touches_linear():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    quantize_(model, MECQuantConfig(weight_bits=4, act_bits=4))
    assert not isinstance(model[0], FakeQuantizedModule)
    assert isinstance(model[2], FakeQuantizedModule)


def test_unsupported_module_named_explicitly_is_a_type_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(TypeError, match="cannot quantize LayerNorm.*supported layer types"):
        quantize_(model, MECQuantConfig(), filter_fn=lambda m, n: isinstance(m, nn.LayerNorm))


def test_activation_bits_for_embedding_named_explicitly_is_a_value_error():
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(ValueError, match="activation quantization does not apply"):
        quantize_(model, MECQuantConfig(weight_bits=2, act_bits=2), filter_fn=is_supported_layer)


def test_group_size_that_does_not_divide():
    model = nn.Sequential(nn.Linear(30, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="does not divide"):
        prepare_model(model, MECQuantConfig(weight_granularity="per_group", group_size=8))


def test_nan_weights_at_initialization():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        prepare_model(model, MECQuantConfig())


def test_model_without_supported_layers():
    with pytest.raises(ValueError, match="no layer the plugin can quantize"):
        prepare_model(nn.Sequential(nn.ReLU()), MECQuantConfig())


def test_prepare_twice_does_not_requantize():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    prepare_model(model, MECQuantConfig())
    q = model[1].weight_fake_quantizer
    prepare_model(model, MECQuantConfig())
    assert model[1].weight_fake_quantizer is q


def test_to_float_shares_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    w = model[1].weight
    prepare_model(model, MECQuantConfig())
    back = model[1].to_float()
    assert type(back) is nn.Linear and back.weight is w
    assert set(dict(back.named_parameters())) == {"weight", "bias"}


@pytest.mark.parametrize("layer,x", [
    (nn.Linear(12, 7), torch.randn(3, 5, 12)),
    (nn.Conv2d(3, 6, 3, padding=1, groups=3), torch.randn(2, 3, 8, 8)),
])
def test_recomputed_operands_give_identical_gradients(layer, x):
    # The layer recomputes its fake-quantized operands in backward instead of saving them;
    # gradients must equal those of the plain composition, bit for bit.
    model = nn.Sequential(layer)
    quantize_(model, MECQuantConfig(weight_bits=2, act_bits=3, act_signedness="signed"), filter_fn=is_supported_layer)
    fq = model[0]
    fq.train()
    fq.activation_fake_quantizer.calibrate(x)
    grads = []
    for use_module in (True, False):
        for p in fq.parameters():
            p.grad = None
        xi = x.clone().requires_grad_(True)
        if use_module:
            out = fq(xi)
        else:
            xq, wq = fq.activation_fake_quantizer(xi), fq.weight_fake_quantizer(fq.weight)
            out = nn.functional.linear(xq, wq, fq.bias) if isinstance(fq, nn.Linear) else fq._conv_forward(xq, wq, fq.bias)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        grads.append([xi.grad.clone()] + [p.grad.clone() for p in fq.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_recompute_composes_with_activation_checkpointing():
    from torch.utils.checkpoint import checkpoint

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2))
    x = torch.randn(4, 8)
    model.train()
    model(x)  # calibrate
    ref = model(x).sum()
    ref.backward()
    g_ref = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    checkpoint(model, x, use_reentrant=False).sum().backward()
    assert sum(g is not None for g in g_ref) >= 9
    for a, p in zip(g_ref, model.parameters()):
        assert (a is None and p.grad is None) or torch.equal(a, p.grad)


def _quantized(model):
    """name -> W/A label of every layer with a weight or activation quantizer."""
    return {n: m.bits_summary() for n, m in model.named_modules() if isinstance(m, FakeQuantizedModule)
            and (m.weight_fake_quantizer is not None or m.activation_fake_quantizer is not None)}


def test_no_bits_means_float_edges_too_unless_8bit_is_asked_explicitly():
    # weight_bits=None, act_bits=None used to quantize the stem and the classifier to W8A8 anyway.
    model, _ = TINY_MODELS["vit"]()
    prepare_model(model, MECQuantConfig(weight_bits=None, act_bits=None))
    assert _quantized(model) == {}
    assert "W8" not in quantization_report(model)
    # Only what the body quantizes, the edges quantize (at 8 bits): activations here.
    model, _ = TINY_MODELS["vit"]()
    prepare_model(model, MECQuantConfig(weight_bits=None, act_bits=4))
    assert _quantized(model)["classifier"] == "WfloatA8"
    # Asked explicitly, the edges are 8-bit whatever the body does.
    model, _ = TINY_MODELS["vit"]()
    prepare_model(model, MECQuantConfig(weight_bits=None, act_bits=None, edge_layers="8bit"))
    assert _quantized(model) == {n: "W8Afloat" for n in EXPECTED_EDGES["vit"]}


def test_edge_layers_default_and_configs_saved_with_8bit():
    assert MECQuantConfig().edge_layers is None
    saved = MECQuantConfig(weight_bits=None, act_bits=None, edge_layers="8bit").to_dict()
    assert MECQuantConfig.from_dict(saved).edge_layers == "8bit"  # an old config keeps what it trained
    assert MECQuantConfig.from_json(MECQuantConfig().to_json()) == MECQuantConfig()


def test_prepare_again_with_other_settings_is_an_error():
    # A second prepare_model with other bits used to be silently ignored.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2))
    for other in (MECQuantConfig(weight_bits=4, act_bits=4), MECQuantConfig(weight_bits=2, act_bits=None),
                  MECQuantConfig(weight_bits=2, act_bits=2, edge_layers="float")):
        with pytest.raises(ValueError, match=r"already prepared with other settings \(\d: W\dA\d, asked (W|float)"):
            prepare_model(model, other)
    with pytest.raises(ValueError, match="already prepared"):  # torchao's own entry point too
        quantize_(model, MECQuantConfig(weight_bits=4, act_bits=4))
    assert model[1].bits_summary() == "W2A2"
    prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2))  # the same settings: a no-op


def test_prepare_a_converted_model_is_an_error():
    from mec_quant_plugin import convert_model

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=None))
    convert_model(model)
    with pytest.raises(ValueError, match="converted"):
        prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=None))


class _AttentionBlock(nn.Module):
    """nn.MultiheadAttention between two Linear layers: MHA reads out_proj.weight directly."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.head(self.attn(h, h, h, need_weights=False)[0])


def test_layers_whose_forward_the_parent_bypasses_stay_float_with_a_report_line(caplog):
    # MHA's out_proj used to be reported as W2A2 while it trained in float, and convert_model then
    # broke the model.
    from mec_quant_plugin import convert_model

    model = _AttentionBlock()
    with caplog.at_level(logging.WARNING, logger="mec_quant_plugin"):
        prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2, edge_layers="same"))
    assert "attn.out_proj" in caplog.text
    assert not isinstance(model.attn.out_proj, FakeQuantizedModule)
    report = quantization_report(model)
    assert "W2A2: 2 layers" in report and "attn.out_proj" not in report.split("\n")[0]
    assert "forward bypassed by its parent: 1 layers (attn.out_proj" in report
    x = torch.randn(2, 5, 8)
    model.train()
    model(x).sum().backward()
    model.eval()
    with torch.no_grad(), fp16_scales():  # convert stores fp16 scales
        before = model(x)
    convert_model(model)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)
    with pytest.raises(TypeError, match="forward is bypassed by its parent"):  # torchao's entry point, named explicitly
        quantize_(_AttentionBlock(), MECQuantConfig(), filter_fn=lambda m, n: n == "attn.out_proj")


def _bn_dropout_mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 16),
                         nn.ReLU(), nn.Linear(16, 4))


def test_calibrate_activations_changes_only_the_activation_quantizers():
    # It ran a train-mode forward: BatchNorm running statistics moved, dropout drew random numbers,
    # an attached regularizer captured features (and warned about grad being off).
    import warnings

    from mec_quant_plugin import ActivationFakeQuantizer, MECRegularizer, calibrate_activations

    model = _bn_dropout_mlp()
    config = MECQuantConfig(weight_bits=2, act_bits=2)
    prepare_model(model, config)
    regularizer = MECRegularizer(model, config)
    model.eval()
    x = torch.randn(32, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        calibrate_activations(model, x)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".activation_fake_quantizer." in k for k in changed), changed
    assert all(bool(m.initialized) for m in model.modules() if isinstance(m, ActivationFakeQuantizer))
    assert not model.training and torch.equal(torch.get_rng_state(), rng)
    assert regularizer.capture.pop() == {}


def test_calibrate_activations_names_the_quantizers_a_degenerate_batch_left_uncalibrated():
    from mec_quant_plugin import calibrate_activations

    model = _bn_dropout_mlp()
    prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2))
    with pytest.warns(UserWarning, match=r"still uncalibrated.*\b0\b"):
        calibrate_activations(model, torch.zeros(4, 8))
