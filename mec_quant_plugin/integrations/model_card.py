"""The model card (README.md of a saved folder), generated from the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..config import MECQuantConfig
from ..modules.base import FakeQuantizedModule
from ..options import bits_label


def _bits_per_group(model: nn.Module) -> dict[str, list[str]]:
    """'W2A2' -> layer names, read off the converted model (int weights carry their dtype)."""
    groups: dict[str, list[str]] = {}
    for name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        target = getattr(weight, "target_dtype", None)
        if target is None:
            continue
        wbits = str(target).replace("torch.int", "")
        afq = mod.activation_fake_quantizer if isinstance(mod, FakeQuantizedModule) else None
        key = bits_label(wbits, None if afq is None else afq.bits)
        groups.setdefault(key, []).append(name)
    return groups


def write_model_card(model: nn.Module, config: MECQuantConfig, run_info: dict[str, Any], folder: Path) -> None:
    """Write README.md with YAML metadata (tags, base model, metrics) and how to load the model."""
    base = run_info.get("base_model")
    task = run_info.get("task", "")
    metrics = run_info.get("metrics", {})
    groups = _bits_per_group(model)
    has_act = any(not k.endswith("Afloat") for k in groups)
    header = ["---", "library_name: transformers", "tags:", "- mec-quant", "- torchao", "- qat"]
    if base:
        header.append(f"base_model: {base}")
    if task:
        header.append(f"pipeline_tag: {task}")
    if run_info.get("dataset"):
        header += ["datasets:", f"- {run_info['dataset']}"]
    header.append("---")
    name = folder.name or "model"
    lines = [
        *header,
        "",
        f"# {name}: MEC-Quant {bits_label(config.weight_bits, config.act_bits)}",
        "",
        "Quantization-aware trained with [mec-quant-plugin](https://pypi.org/project/mec-quant-plugin/)"
        + (f" from `{base}`" if base else "")
        + (f" for {task}" if task else "")
        + ". Weights are stored as torchao `IntxUnpackedToInt8Tensor` (one int8 byte per weight plus "
        "learned per-channel scales).",
        "",
        "## Bits per layer group",
        "",
        "| group | layers | examples |",
        "|---|---|---|",
    ]
    for key, names in groups.items():
        lines.append(f"| {key} | {len(names)} | {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} |")
    lines += ["", "## Method and objective settings", "", "```json", config.to_json(), "```", ""]
    if metrics:
        lines += ["## Metrics (from the Trainer)", "", "| metric | value |", "|---|---|"]
        for k, v in sorted(metrics.items()):
            lines.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines.append("")
    lines += [
        "## How to load",
        "",
        "With the plugin (int weights AND the learned low-bit activation quantizers, reproducing the",
        "trained model's outputs):",
        "",
        "```python",
        "import mec_quant_plugin",
        f'model = mec_quant_plugin.from_pretrained("{run_info.get("repo_id", name)}")',
        "```",
        "",
        "Without the plugin (plain transformers + torchao):",
        "",
        "```python",
        "from transformers import AutoModel  # or the task's Auto class",
        f'model = AutoModel.from_pretrained("{run_info.get("repo_id", name)}")',
        "```",
        "",
    ]
    if has_act:
        lines += [
            "> **Warning:** this model was trained with low-bit activations. Loaded without the plugin it",
            "> runs WEIGHT-ONLY (activations in float), which is not the trained model: its accuracy can",
            "> differ. Load it with `mec_quant_plugin.from_pretrained` to reproduce the trained numerics.",
            "",
        ]
    if run_info:
        extra = {k: v for k, v in run_info.items() if k not in ("metrics",)}
        lines += ["## Run", "", "```json", json.dumps(extra, indent=2, sort_keys=True, default=str), "```", ""]
    (folder / "README.md").write_text("\n".join(lines))
