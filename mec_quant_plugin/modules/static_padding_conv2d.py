"""Fake-quantized static "same"-padding Conv2d (EfficientNet / TF ports), matched by structure.

Ports of TensorFlow models (efficientnet_pytorch, efficientnet_lite_pytorch, EfficientDet...)
subclass nn.Conv2d, hold a fixed padding module in `static_padding` (an nn.ZeroPad2d computed
for one image size, or an identity) and override forward as
`F.conv2d(self.static_padding(x), self.weight, self.bias, stride, padding, dilation, groups)`.
A plain FakeQuantizedConv2d would drop that padding, so such a subclass gets this class instead:
quantize the input, pad the quantized input, convolve with the quantized weight.

Why quantize before padding: the padded border then holds an exact zero (what an integer kernel
pads with: the zero point), as in FakeQuantizedConv2d, where nn.Conv2d pads after the quantizer;
and the activation step is calibrated on the real input, not on border zeros (which dominate the
2x2 feature maps of small images).

The match is structural, not by class name: any nn.Conv2d subclass with a `static_padding`
submodule whose own forward gives, on a probe input, what pad-then-conv gives. A subclass whose
forward does something else fails the probe and is refused like any other unknown forward.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .conv2d import FakeQuantizedConv2d
from .recompute import call_with_recomputed_operands
from .registry import register_fake_quantized

_CHECKED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


@torch.no_grad()
def _forward_is_pad_then_conv(module: nn.Conv2d) -> bool:
    """Run the class's own forward (hooks bypassed) on a small random input and compare it with
    static_padding followed by nn.Conv2d's convolution."""
    weight = module.weight
    if weight.device.type == "meta":
        return False
    kh, kw = ((k - 1) * d + 1 for k, d in zip(module.kernel_size, module.dilation))
    sh, sw = module.stride
    # different parities in height and width: asymmetric "same" padding shows up in one of them
    x = torch.randn(1, module.in_channels, kh + sh + 1, kw + sw, device=weight.device, dtype=weight.dtype)
    try:
        own = type(module).forward(module, x)
        ours = nn.Conv2d._conv_forward(module, module.static_padding(x), weight, module.bias)
    except Exception:  # a forward we cannot even call on a plain input is not one we reproduce
        return False
    if not isinstance(own, torch.Tensor) or own.shape != ours.shape:
        return False
    tol = 1e-5 if weight.dtype == torch.float32 else 2e-2
    return torch.allclose(own.float(), ours.float(), rtol=tol, atol=tol * (1.0 + ours.float().abs().max().item()))


def pads_then_convolves(module: nn.Module) -> bool:
    """True for an nn.Conv2d subclass with a `static_padding` module whose forward is
    pad-then-conv (checked once per module instance)."""
    if not isinstance(module, nn.Conv2d) or not isinstance(module._modules.get("static_padding"), nn.Module):
        return False
    known = _CHECKED.get(module)
    if known is None:
        known = _CHECKED[module] = _forward_is_pad_then_conv(module)
    return known


class _QuantizeThenPad:
    """The input operand's transform: fake-quantize, then apply the static padding. Passed to
    `call_with_recomputed_operands` as one quantizer, so the conv's saved input (the padded
    quantized tensor) is recomputed from the float input in backward instead of kept."""

    __slots__ = ("quantizer", "pad")

    def __init__(self, quantizer: nn.Module, pad: nn.Module) -> None:
        self.quantizer, self.pad = quantizer, pad

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.pad(self.quantizer(x))


@register_fake_quantized(nn.Conv2d, match=pads_then_convolves)
class FakeQuantizedStaticPaddingConv2d(FakeQuantizedConv2d):
    """A static-padding Conv2d subclass with LSQ fake-quantized weight (per output channel) and
    input: `conv(static_padding(q_a(x)), q_w(weight))`. Stride, dilation and groups (depthwise
    included) are nn.Conv2d's. `to_float()` / convert without an activation quantizer give back
    the original class (its own forward, holding the quantized weight)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        afq = self.activation_fake_quantizer
        if afq is None:
            x_operand = (None, self.static_padding(x))
        else:
            x_operand = (_QuantizeThenPad(afq, self.static_padding), x)
        return call_with_recomputed_operands(
            self._conv_forward, [x_operand, (self.weight_fake_quantizer, self.weight)], self.bias
        )
