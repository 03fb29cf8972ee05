"""`mec-quant eval` and `mec-quant convert` on a checkpoint saved during `mec-quant train` (issue 10):
eval scores the QUANTIZED model of a training checkpoint (it scored the float master weights), and
convert refuses a `--config` other than the run's (a W2A4 run converted as W4A8 was accepted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mec_quant_plugin.checkpoint import TRAIN_CONFIG_FILE
from tests import test_cli
from tests.test_cli import expect_usage_error, last_json, run_cli, write_texts

tiny_llama_dir = test_cli.tiny_llama_dir  # the fixture: a tiny Llama + tokenizer saved into tmp_path


@pytest.fixture
def w2a4_run(tmp_path, tiny_llama_dir, capsys) -> tuple[Path, Path, dict]:
    """A W2A4 run of two steps with a checkpoint at each: (run folder, data file, printed metrics)."""
    data = write_texts(tmp_path / "texts.jsonl", 40)
    out = tmp_path / "run"
    assert run_cli(["train", "--model", tiny_llama_dir, "--dataset", data, "--task", "causal-lm", "--weight-bits", "2",
                    "--act-bits", "4", "--block-size", "16", "--max-train-samples", "16", "--max-steps", "2",
                    "--save-steps", "1", "--per-device-train-batch-size", "4", "--learning-rate", "1e-2",
                    "--lr-scheduler-type", "constant", "--output-dir", out]) == 0
    return out, data, last_json(capsys.readouterr().out)


def eval_argv(model: Path, data: Path) -> list:
    return ["eval", "--model", model, "--dataset", data, "--task", "causal-lm", "--block-size", "16"]


def test_eval_of_a_training_checkpoint_scores_the_quantized_model(w2a4_run, tmp_path, capsys):
    out, data, final = w2a4_run
    # checkpoint-2 holds the state the final model was converted from: the same quantized model
    assert run_cli(eval_argv(out / "checkpoint-2", data)) == 0
    scored = last_json(capsys.readouterr().out)
    assert scored["eval_perplexity"] == pytest.approx(final["eval_perplexity"], rel=1e-4)

    for config in (out / "checkpoint-2" / TRAIN_CONFIG_FILE, out / TRAIN_CONFIG_FILE):
        config.unlink()  # a checkpoint that does not say how it was quantized: refused, not scored in float
    expect_usage_error(eval_argv(out / "checkpoint-2", data), capsys, "training checkpoint", "mec-quant convert")


def test_convert_refuses_a_config_other_than_the_runs(w2a4_run, tmp_path, capsys):
    out, data, _ = w2a4_run
    w4a8 = tmp_path / "w4a8.json"
    run_config = json.loads((out / "checkpoint-1" / TRAIN_CONFIG_FILE).read_text())
    w4a8.write_text(json.dumps({**run_config, "weight_bits": 4, "act_bits": 8}))
    err = expect_usage_error(["convert", "--model", out / "checkpoint-1", "--output-dir", tmp_path / "int",
                              "--config", w4a8], capsys, "weight_bits: run 2, given 4", "act_bits: run 4, given 8")
    assert "does not match" in err and not (tmp_path / "int").exists()
    same = tmp_path / "same.json"
    same.write_text(json.dumps(run_config))
    assert run_cli(["convert", "--model", out / "checkpoint-1", "--output-dir", tmp_path / "int", "--config", same]) == 0
    meta = json.loads((tmp_path / "int" / "mec_quant_config.json").read_text())["mec_quant_config"]
    assert (meta["weight_bits"], meta["act_bits"]) == (2, 4)
