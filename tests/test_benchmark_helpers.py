"""The pieces benchmark numbers depend on: method/bits parsing, torchao's QAT as a baseline, the
report's recovered-share and cost arithmetic, the harness's architectures, float32 loading."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import common  # noqa: E402
import report  # noqa: E402
from harness.fashion_mnist import build_model  # noqa: E402
from testing_utils import tiny_bert, tiny_vit  # noqa: E402


def test_parse_bits_and_methods():
    assert common.parse_bits("W2A2") == (2, 2)
    assert common.parse_bits("w4") == (4, None)
    assert common.parse_bits("W4A16") == (4, None)
    assert common.parse_method("mec:mec_weight=1.0,mec_view=teacher") == (
        "mec", {"mec_weight": 1.0, "mec_view": "teacher"})
    assert common.parse_method("torchao") == ("torchao", {})
    with pytest.raises(SystemExit, match="unknown method"):
        common.parse_method("gptq")


def test_torchao_baseline_quantizes_inner_linears_low_bit_and_edges_at_int8():
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    model, batch = tiny_vit()
    model = common.torchao_prepare(model, 2, 2)
    fq = {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)}
    inner = [n for n in fq if n != "classifier"]
    assert inner and all(fq[n].weight_fake_quantizer.config.dtype == torch.int2 for n in inner)
    assert fq["classifier"].weight_fake_quantizer.config.dtype == torch.int8
    assert fq["classifier"].activation_fake_quantizer.config.dtype == torch.int8
    assert isinstance(model.vit.embeddings.patch_embeddings.projection, nn.Conv2d)  # torchao: no conv QAT
    assert torch.isfinite(model(**batch).loss)
    with pytest.raises(SystemExit, match="int2"):
        common.torchao_prepare(tiny_vit()[0], 1, 2)


def _results(tmp_path, runs, metric="eval_perplexity"):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"protocol": {"metric": metric}, "runs": runs}))
    return [str(path)]


def test_recovered_share_is_against_the_fp_reference(tmp_path):
    runs = [{"bits": "FP", "method": "fp", "seed": 0, "metric": 30.0, "step_seconds": 1.0},
            {"bits": "W4", "method": "ptq", "seed": 0, "metric": 130.0},
            {"bits": "W4", "method": "plain", "seed": 0, "metric": 60.0, "step_seconds": 2.0},
            {"bits": "W4", "method": "plain", "seed": 1, "metric": 50.0, "step_seconds": 4.0}]
    paths = _results(tmp_path, runs)
    text = report.recovered(report.summarize(paths))
    assert "| W4 | `plain` | 55.00 | 130.00 | 30.00 | 75% |" in text  # (130 - 55) / (130 - 30)
    cost = report.cost(paths)
    assert "| `plain` | 3000.0 | 3.00 |" in cost  # median of 2 and 4 s vs 1 s


def test_accuracy_tables_are_in_percent(tmp_path):
    runs = [{"bits": "FP", "method": "fp", "seed": s, "metric": v} for s, v in enumerate((0.9, 0.8))]
    groups = report.summarize(_results(tmp_path, runs, metric="eval_accuracy"))
    assert "| FP | `fp` | 85.00 ± 7.07 | 2 |" in report.table(groups, "eval_accuracy")


def test_paired_differences_match_seeds_and_skip_unpaired_runs(tmp_path):
    runs = [{"bits": "W2A2", "method": m, "seed": s, "accuracy": v}
            for m, s, v in (("plain", 0, 0.80), ("plain", 1, 0.81), ("kd", 1, 0.815), ("kd", 0, 0.79), ("kd", 2, 0.9))]
    text = report.paired(_results(tmp_path, runs, metric="accuracy"), "plain")
    assert "| W2A2 | `kd` | s0 -1.00, s1 +0.50 | -0.25 | 1/2 |" in text  # seed 2 has no plain run


def test_vit_recipe_builds_a_trainable_fashion_mnist_classifier():
    model = build_model(0, arch="vit")
    out = model(pixel_values=torch.randn(4, 1, 28, 28), labels=torch.tensor([0, 1, 2, 9]))
    assert out.logits.shape == (4, 10) and torch.isfinite(out.loss)
    out.loss.backward()
    with pytest.raises(ValueError, match="resnet, vit"):
        build_model(0, arch="mlp")


def test_cli_loads_half_precision_checkpoints_as_float32_for_training(tmp_path):
    from mec_quant_plugin.cli.models import load_model

    model, _ = tiny_bert()
    model.half().save_pretrained(str(tmp_path))
    loaded = load_model("text-classification", str(tmp_path))
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_cifar10_holdout_split_is_a_fixed_partition_of_the_training_set_only():
    import cifar10

    x = torch.arange(100, dtype=torch.uint8).reshape(100, 1, 1, 1).expand(100, 3, 2, 2)
    data = {"train": (x, torch.arange(100)), "test": (x[:10], torch.arange(10))}
    split = cifar10.holdout_split(data, 20)
    train_ids, held_ids = split["train"][1], split["test"][1]
    assert len(held_ids) == 20 and len(train_ids) == 80
    assert set(train_ids.tolist()).isdisjoint(held_ids.tolist()) and len(set(train_ids.tolist()) | set(held_ids.tolist())) == 100
    assert torch.equal(split["train"][0][:, 0, 0, 0].long(), train_ids)  # images stay with their labels
    assert torch.equal(cifar10.holdout_split(data, 20)["test"][1], held_ids)  # the same images every run
    with pytest.raises(SystemExit, match="--holdout must be between 1 and 99"):
        cifar10.holdout_split(data, 100)


def test_cifar10_methods_get_a_teacher_exactly_when_a_term_needs_one():
    import cifar10

    needs = {spec: cifar10.method_config(*cifar10.parse_method(spec), (2, 2)).teacher_needs()
             for spec in ("plain", "kd", "mec", "mec:mec_weight=0,mec_mi_weight=1")}
    assert needs == {"plain": [], "kd": ["distill_weight > 0"], "mec": [], "mec:mec_weight=0,mec_mi_weight=1": ["mec_mi_weight > 0"]}
