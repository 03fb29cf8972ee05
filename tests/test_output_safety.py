"""Nothing a user already has is lost: `mec-quant train` output folders, in-place `convert`, and
interrupted, full-disk or non-finite saves (issue 10, "Data lost"). Tiny models, a few seconds each."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests import test_cli
from tests.test_cli import expect_usage_error, run_cli, write_texts

tiny_llama_dir = test_cli.tiny_llama_dir  # the fixture: a tiny Llama + tokenizer saved into tmp_path


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def train_argv(model: Path, data: Path, out: Path, *extra: str) -> list:
    return ["train", "--model", model, "--dataset", data, "--task", "causal-lm", "--weight-bits", "2",
            "--block-size", "16", "--max-train-samples", "8", "--max-steps", "1", "--save-steps", "1",
            "--per-device-train-batch-size", "4", "--output-dir", out, *extra]


def test_train_refuses_a_non_empty_output_dir_that_is_not_a_run(tmp_path, tiny_llama_dir, capsys):
    data = write_texts(tmp_path / "texts.jsonl", 8)
    out = tmp_path / "someones-folder"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    before = digest(out)
    expect_usage_error(train_argv(tiny_llama_dir, data, out), capsys, "--overwrite-output-dir")
    assert digest(out) == before and [p.name for p in out.iterdir()] == ["README.md"]


@pytest.mark.parametrize("inside", [False, True])
def test_train_never_writes_into_the_model_folder(tmp_path, tiny_llama_dir, capsys, inside):
    data = write_texts(tmp_path / "texts.jsonl", 8)
    out = tiny_llama_dir / "run" if inside else tiny_llama_dir
    before = digest(tiny_llama_dir)
    expect_usage_error(train_argv(tiny_llama_dir, data, out, "--overwrite-output-dir"), capsys, "--model folder")
    assert digest(tiny_llama_dir) == before and not (tiny_llama_dir / "run").exists()


def test_train_again_into_its_own_run_and_with_overwrite_output_dir(tmp_path, tiny_llama_dir, capsys):
    data = write_texts(tmp_path / "texts.jsonl", 8)
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("x")
    assert run_cli(train_argv(tiny_llama_dir, data, out, "--overwrite-output-dir")) == 0
    assert run_cli(train_argv(tiny_llama_dir, data, out)) == 0  # our own run: a marker says so


def _training_checkpoint(folder: Path) -> Path:
    from testing_utils import tiny_llama

    from mec_quant_plugin import MECQuantConfig, prepare_model
    from mec_quant_plugin.checkpoint import TRAIN_CONFIG_FILE

    model, _ = tiny_llama()
    config = MECQuantConfig(weight_bits=2, act_bits=None)
    prepare_model(model, config)
    model.save_pretrained(folder)
    (folder / TRAIN_CONFIG_FILE).write_text(config.to_json())
    return folder


@pytest.mark.parametrize("where", [".", "int", "int/deeper"])
def test_convert_refuses_to_write_into_the_training_checkpoint(tmp_path, where):
    from mec_quant_plugin.checkpoint import convert_checkpoint

    ckpt = _training_checkpoint(tmp_path / "checkpoint-1")
    before = digest(ckpt)
    with pytest.raises(ValueError, match="inside the checkpoint"):
        convert_checkpoint(ckpt, ckpt / where)
    assert digest(ckpt) == before and sorted(p.name for p in ckpt.iterdir()) == sorted(before)


def _saveable_llama(seed: int):
    from testing_utils import saveable_converted

    from mec_quant_plugin import MECQuantConfig

    return saveable_converted("llama", MECQuantConfig(weight_bits=4, act_bits=8), seed=seed)


def _outputs(model, batch):
    import torch

    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def test_an_interrupted_save_over_a_save_leaves_the_old_model_whole(tmp_path, monkeypatch):
    import torch

    from mec_quant_plugin import from_pretrained
    from mec_quant_plugin.integrations import hub

    old, batch = _saveable_llama(0)
    new, _ = _saveable_llama(1)
    out = tmp_path / "model"
    old.save_pretrained(out)
    before = digest(out)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hub, "write_model_card", killed)  # the last file of a save
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(out)
    assert digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind
    torch.testing.assert_close(_outputs(from_pretrained(str(out)), batch), _outputs(old, batch), rtol=0, atol=0)


def test_a_save_over_a_save_keeps_other_files_and_drops_stale_ones(tmp_path):
    old, batch = _saveable_llama(0)
    new, _ = _saveable_llama(1)
    out = tmp_path / "model"
    old.save_pretrained(out)
    (out / "checkpoint-3").mkdir()
    (out / "notes.txt").write_text("kept")
    (out / "model-00002-of-00002.safetensors").write_text("stale shard")
    new.save_pretrained(out)
    names = {p.name for p in out.iterdir()}
    assert {"checkpoint-3", "notes.txt", "model.safetensors", "mec_quant_config.json"} <= names
    assert "model-00002-of-00002.safetensors" not in names
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_save_over_a_save_drops_the_exports_of_the_old_weights(tmp_path, caplog):
    """model.gguf / model.onnx written by `mec-quant convert --format` belong to the weights they were
    exported from: a save of other weights over the folder must not leave them (they would be
    listed nowhere, yet pushed and run as this model)."""
    import json
    import logging

    old, _ = _saveable_llama(0)
    new, _ = _saveable_llama(1)
    out = tmp_path / "model"
    old.save_pretrained(out)
    (out / "model.gguf").write_bytes(b"GGUF of the old weights")
    (out / "mec_quant_exports.json").write_text(json.dumps({"format_version": 1, "files": [
        {"file": "model.gguf", "format": "gguf", "bytes": 23}]}))
    (out / "notes.txt").write_text("kept")
    with caplog.at_level(logging.WARNING, logger="mec_quant_plugin"):
        new.save_pretrained(out)
    names = {p.name for p in out.iterdir()}
    assert "model.gguf" not in names and "mec_quant_exports.json" not in names
    assert "notes.txt" in names
    assert "model.gguf" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_plugin_files_of_other_weights_are_refused(tmp_path):
    import shutil

    from mec_quant_plugin import from_pretrained

    a, _ = _saveable_llama(0)
    b, _ = _saveable_llama(1)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    shutil.copy2(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(ValueError, match="do not belong to the weights"):
        from_pretrained(str(tmp_path / "a"))


def test_non_finite_weights_are_refused_before_anything_is_written(tmp_path):
    import torch

    model, _ = _saveable_llama(0)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        model.save_pretrained(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_says_so_and_changes_nothing(tmp_path, monkeypatch):
    import errno

    from mec_quant_plugin.integrations import hub

    old, _ = _saveable_llama(0)
    new, _ = _saveable_llama(1)
    out = tmp_path / "model"
    old.save_pretrained(out)
    before = digest(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "write failed")

    monkeypatch.setattr(hub, "save_file", full)
    with pytest.raises(OSError, match="no space left") as exc:
        new.save_pretrained(out)
    assert "nothing was changed" in str(exc.value) and exc.value.errno == errno.ENOSPC
    assert digest(out) == before and [p.name for p in tmp_path.iterdir()] == ["model"]

