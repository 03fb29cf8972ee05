"""`mec-quant train --weight-bits none --act-bits none` is plain full-precision fine-tuning: no
quantizer, no MEC term, a normal transformers model that a W2A2 run can start from (issue 10:
the FP-then-W2A2 workflow failed with "You cannot perform fine-tuning on purely quantized models")."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests import test_cli
from tests.test_cli import last_json, run_cli, write_texts

tiny_llama_dir = test_cli.tiny_llama_dir  # the fixture: a tiny Llama + tokenizer saved into tmp_path


def train_argv(model: Path, data: Path, out: Path, *bits: str) -> list:
    return ["train", "--model", model, "--dataset", data, "--task", "causal-lm", *bits, "--block-size", "16",
            "--max-train-samples", "16", "--max-steps", "2", "--per-device-train-batch-size", "4",
            "--learning-rate", "1e-3", "--logging-steps", "1", "--save-steps", "1", "--output-dir", out]


def test_fp_run_saves_a_plain_model_that_a_w2a2_run_trains_from(tmp_path, tiny_llama_dir, capsys):
    from transformers import AutoModelForCausalLM

    data = write_texts(tmp_path / "texts.jsonl", 40)
    fp = tmp_path / "fp"
    assert run_cli(train_argv(tiny_llama_dir, data, fp, "--weight-bits", "none", "--act-bits", "none")) == 0
    printed = capsys.readouterr().out
    assert "'loss'" in printed and "mec/" not in printed  # trained, without the term
    assert last_json(printed)["eval_perplexity"] > 1
    assert "quantization_config" not in json.loads((fp / "config.json").read_text())
    assert not (fp / "mec_quant_config.json").exists() and (fp / "checkpoint-1" / "model.safetensors").is_file()

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tuned = AutoModelForCausalLM.from_pretrained(fp)  # plain transformers, no plugin
    assert all(type(p) is torch.nn.Parameter for p in tuned.parameters())
    assert not torch.equal(base.model.layers[0].mlp.up_proj.weight, tuned.model.layers[0].mlp.up_proj.weight)

    w2a2 = tmp_path / "w2a2"
    assert run_cli(train_argv(fp, data, w2a2, "--weight-bits", "2", "--act-bits", "2")) == 0
    assert "mec/" in capsys.readouterr().out
    meta = json.loads((w2a2 / "mec_quant_config.json").read_text())["mec_quant_config"]
    assert (meta["weight_bits"], meta["act_bits"]) == (2, 2)


def test_fp_run_with_8bit_edges_asked_explicitly_still_quantizes(tmp_path, tiny_llama_dir, capsys):
    data = write_texts(tmp_path / "texts.jsonl", 40)
    out = tmp_path / "edges"
    assert run_cli(train_argv(tiny_llama_dir, data, out, "--weight-bits", "none", "--act-bits", "none",
                              "--edge-layers", "8bit")) == 0
    assert (out / "mec_quant_config.json").is_file()
