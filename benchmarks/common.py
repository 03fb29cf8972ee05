"""Pieces every benchmark script shares: method and bits parsing, and the stamp written beside every
result: `commit()` here, `machine()` from mec_quant_plugin/demo/provenance.py (the demo writes it too)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mec_quant_plugin.demo.provenance import machine  # noqa: F401 (the scripts import the stamp from here)
from mec_quant_plugin.layer_policy import find_head_layer, find_input_layers

ROOT = Path(__file__).resolve().parent
METHOD_NAMES = ("fp", "ptq", "plain", "mec", "torchao")
_STRING_VALUES = ("self", "teacher", "fixed", "adaptive", "head", "blocks", "magnitude", "gate", "features",
                  "head+blocks")


def parse_bits(text: str) -> tuple[int, int | None]:
    """'W2A2' -> (2, 2); 'W4' or 'W4A16' / 'W4Afloat' -> (4, None): weight-only."""
    w, _, a = text.upper().removeprefix("W").partition("A")
    return int(w), (None if a in ("", "FLOAT", "16", "32") else int(a))


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """'mec:mec_weight=1.0,mec_view=teacher' -> ('mec', {'mec_weight': 1.0, 'mec_view': 'teacher'})."""
    name, _, rest = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, value = item.split("=")
        overrides[key] = value if value in _STRING_VALUES else json.loads(value)
    if name not in METHOD_NAMES:
        raise SystemExit(f"unknown method {text!r}: use {', '.join(METHOD_NAMES[:-1])}[:field=value,...] or torchao")
    return name, overrides


def commit(*paths: str) -> str:
    """HEAD, marked '+uncommitted' when the package, the harness or the given benchmark files differ from it."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "mec_quant_plugin", "benchmarks/harness", *paths],
                               capture_output=True, text=True, cwd=ROOT.parent).stdout.strip()
        return (sha or "unknown") + ("+uncommitted" if dirty else "")
    except OSError:
        return "unknown"


def torchao_prepare(model: nn.Module, wbits: int, abits: int | None) -> nn.Module:
    """torchao's own QAT (QATConfig prepare) on the Linear layers ours quantize, edges at int8."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    if wbits < 2:
        raise SystemExit("torchao QAT supports int2+ weights only (no 1-bit): drop the torchao method for W1.")

    def cfg(w: int, a: int | None) -> QATConfig:
        wcfg = IntxFakeQuantizeConfig(getattr(torch, f"int{w}"), granularity="per_channel", is_symmetric=True)
        acfg = (IntxFakeQuantizeConfig(getattr(torch, f"int{a}"), granularity="per_token", is_symmetric=False)
                if a is not None else None)
        return QATConfig(activation_config=acfg, weight_config=wcfg, step="prepare")

    edges = {*find_input_layers(model), find_head_layer(model)}
    quantize_(model, cfg(8, 8 if abits is not None else None),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn in edges)
    quantize_(model, cfg(wbits, abits), filter_fn=lambda m, fqn: type(m) is nn.Linear and fqn not in edges)
    return model
