"""The Fashion-MNIST benchmark's models (`accuracy.py --arch`): the demo's ResNet, a small ViT and
the pretrained EfficientNet-Lite0, with their cached full-precision starts.

Data, training and metrics are those of the built-in demo job (`mec_quant_plugin.demo`), so the
benchmark and `make demo` measure the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import ViTConfig, ViTForImageClassification

from mec_quant_plugin.data.fashion_mnist import CLASSES
from mec_quant_plugin.demo.fashion_mnist import build_resnet, label_mappings, train
from mec_quant_plugin.demo.fashion_mnist import pretrain_fp as pretrain_saved_fp


def build_vit(seed: int = 0) -> ViTForImageClassification:
    """A small ViT for 1x28x28 inputs: 4x4 patches (49 tokens + CLS), width 64, 4 layers, 4 heads
    (206k parameters), randomly initialized. Linear-heavy, unlike the ResNet: where torchao's own
    QAT (Linear layers only) applies."""
    torch.manual_seed(seed)
    config = ViTConfig(
        image_size=28, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=10,
        **label_mappings(),
    )
    return ViTForImageClassification(config)


def build_efficientnet(seed: int = 0, pretrained: bool = True) -> nn.Module:
    """The ImageNet-pretrained EfficientNet-Lite0 with a new 10-way head, grayscale 28x28 inputs
    repeated to RGB and upsampled to 32x32 in forward (the CPU-friendly size, see
    `harness/efficientnet.py`); needs the packages of `benchmarks/requirements.txt`."""
    from .efficientnet import build_efficientnet_lite0

    torch.manual_seed(seed)
    return build_efficientnet_lite0(num_labels=len(CLASSES), pretrained=pretrained, in_channels=1, image_size=32)


ARCHITECTURES = {"resnet": build_resnet, "vit": build_vit, "efficientnet-lite0": build_efficientnet}
FP_LEARNING_RATES = {"resnet": 3e-3, "vit": 3e-3, "efficientnet-lite0": 1e-3}  # from scratch vs fine-tuning
PLAIN_WEIGHTS = "fp_weights.safetensors"  # the FP start of a plain nn.Module (no save_pretrained)


def _check(arch: str) -> str:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}.")
    return arch


def build_model(seed: int = 0, arch: str = "resnet") -> nn.Module:
    """A randomly initialized Fashion-MNIST classifier: `arch` is one of `ARCHITECTURES`."""
    return ARCHITECTURES[_check(arch)](seed)


def pretrain_fp(output_dir: str, train_ds: Dataset, *, steps: int, seed: int = 0, arch: str = "resnet") -> nn.Module:
    """The converged FP starting point, cached in `output_dir/fp` (`fp-<arch>` for other
    architectures than the ResNet; reused when present)."""
    folder = Path(output_dir) / ("fp" if _check(arch) == "resnet" else f"fp-{arch}")
    if arch != "efficientnet-lite0":  # transformers models: saved with save_pretrained
        return pretrain_saved_fp(folder, train_ds, steps=steps, seed=seed, build=ARCHITECTURES[arch],
                                 lr=FP_LEARNING_RATES[arch])
    if (folder / PLAIN_WEIGHTS).exists():
        model = build_efficientnet(seed, pretrained=False)
        model.load_state_dict(load_file(str(folder / PLAIN_WEIGHTS)))
        return model
    model, _ = train(build_model(seed, arch), train_ds, str(folder / "run"), max_steps=steps,
                     lr=FP_LEARNING_RATES[arch], seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / PLAIN_WEIGHTS))
    return model
