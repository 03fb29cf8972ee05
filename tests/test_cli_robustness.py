"""`mec-quant` on ordinary mistakes and unlucky machines (issue 10): a full or unwritable output
folder, a `--group-size` that does not divide a layer, a model that cannot be loaded or a mistyped
path, a one-row data set, the built-in job's output folder, and a quiet `--version`: each ends in one
clear line and a nonzero exit, never a traceback. Tiny models, a few seconds each."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import test_cli
from tests.test_cli import expect_usage_error, run_cli, write_texts

tiny_llama_dir = test_cli.tiny_llama_dir  # the fixture: a tiny Llama + tokenizer saved into tmp_path


def train_argv(model: Path, data: Path, out: Path, *extra: str) -> list:
    return ["train", "--model", model, "--dataset", data, "--task", "causal-lm", "--weight-bits", "2",
            "--block-size", "16", "--max-train-samples", "8", "--max-steps", "1", "--save-steps", "100",
            "--per-device-train-batch-size", "4", "--output-dir", out, *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


# ---- 1. a full disk or an unwritable output folder ----------------------------------------------


def test_a_full_disk_at_the_final_save_is_one_line_and_exit_1(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    from mec_quant_plugin.integrations import hub

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hub, "save_file", full)
    data = write_texts(tmp_path / "texts.jsonl", 8)
    assert run_cli(train_argv(tiny_llama_dir, data, tmp_path / "run")) == 1
    line = one_error_line(capsys)
    assert line.startswith("mec-quant train: error:") and "no space left" in line.lower(), line


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_exit_1(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    import transformers

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.Trainer, "_save_checkpoint", full)
    data = write_texts(tmp_path / "texts.jsonl", 8)
    assert run_cli(train_argv(tiny_llama_dir, data, tmp_path / "run", "--save-steps", "1")) == 1
    line = one_error_line(capsys)
    assert "No space left on device" in line and str(tmp_path / "run") in line, line


def test_an_output_dir_that_cannot_be_created_is_one_usage_line(tmp_path, tiny_llama_dir, capsys):
    data = write_texts(tmp_path / "texts.jsonl", 8)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    expect_usage_error(train_argv(tiny_llama_dir, data, blocker / "run"), capsys, "cannot write", "a-file")


def test_a_read_only_output_dir_is_one_usage_line(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    data = write_texts(tmp_path / "texts.jsonl", 8)
    real_write_text = Path.write_text

    def read_only(self, *args, **kwargs):  # what a read-only file system answers (tests run as root)
        if self.parent == tmp_path / "run":
            raise PermissionError(errno.EROFS, "Read-only file system", str(self))
        return real_write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", read_only)
    expect_usage_error(train_argv(tiny_llama_dir, data, tmp_path / "run"), capsys, "cannot write",
                       "Read-only file system")


# ---- 2. --group-size that does not divide a layer -------------------------------------------------


def test_a_group_size_that_does_not_divide_a_layer_is_one_usage_line(tmp_path, tiny_llama_dir, capsys):
    data = write_texts(tmp_path / "texts.jsonl", 8)
    out = tmp_path / "run"
    err = expect_usage_error(train_argv(tiny_llama_dir, data, out, "--weight-granularity", "per_group",
                                        "--group-size", "24"), capsys, "group_size", "24")
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


# ---- 3. a model that cannot be loaded, a mistyped local path -------------------------------------


def test_an_unloadable_hub_model_says_so_not_cannot_infer_the_task(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # an empty Hub cache; HF_HUB_OFFLINE=1 (conftest)
    data = write_texts(tmp_path / "texts.jsonl", 8)
    for command in (["train", "--output-dir", tmp_path / "run"], ["eval"]):
        err = expect_usage_error([*command, "--model", "someone/no-such-model", "--dataset", data], capsys,
                                 "someone/no-such-model", "could not be loaded")
        assert "cannot infer the task" not in err


@pytest.mark.parametrize("name", ["models/tiny/llama-v2", "my model", "run-1/checkpoint-5/"])
def test_a_mistyped_local_path_says_it_does_not_exist(tmp_path, name, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = write_texts(tmp_path / "texts.jsonl", 8)
    err = expect_usage_error(["train", "--model", name, "--dataset", data, "--task", "causal-lm",
                              "--output-dir", tmp_path / "run"], capsys, name, "does not exist")
    assert "repo id" not in err.lower() and "cannot infer" not in err


def test_task_is_inferred_from_a_local_config_through_the_hub_helper(tiny_llama_dir, tmp_path):
    from mec_quant_plugin.cli.models import infer_task

    assert infer_task(None, str(tiny_llama_dir)) == "causal-lm"
    assert infer_task("fashion_mnist", str(tiny_llama_dir)) == "image-classification"
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text(json.dumps({"architectures": ["LlamaModel"]}))
    assert infer_task(None, str(tmp_path / "plain")) is None  # a base model: no task head to infer from


# ---- 5. a quiet --version --------------------------------------------------------------------------


def test_version_prints_one_line_and_nothing_else():
    proc = subprocess.run([sys.executable, "-m", "mec_quant_plugin.cli", "--version"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (proc.stdout + proc.stderr).strip().splitlines() == [proc.stdout.strip()], proc.stdout + proc.stderr
    assert proc.stdout.startswith("mec-quant ")


# ---- 6. the built-in job's output folder ----------------------------------------------------------


def _fake_run_default(monkeypatch) -> list:
    import mec_quant_plugin.demo

    calls = []

    def run_default(output_dir="outputs/mec-quant-demo", **kwargs):
        calls.append(output_dir)
        return {"mec_quant": 0.5}

    monkeypatch.setattr(mec_quant_plugin.demo, "run_default", run_default)
    return calls


def test_builtin_job_refuses_a_folder_that_is_not_its_own_before_training(tmp_path, monkeypatch, capsys):
    calls = _fake_run_default(monkeypatch)
    out = tmp_path / "someones-folder"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    expect_usage_error(["train", "--output-dir", out], capsys, "--overwrite-output-dir")
    assert calls == [] and [p.name for p in out.iterdir()] == ["README.md"]
    assert run_cli(["train", "--output-dir", out, "--overwrite-output-dir"]) == 0
    assert calls == [str(out)]


def test_builtin_job_reuses_its_own_folder(tmp_path, monkeypatch):
    calls = _fake_run_default(monkeypatch)
    earlier = tmp_path / "demo-before-markers"  # the layout of a demo run of an earlier version
    (earlier / "fp").mkdir(parents=True)
    (earlier / "fp" / "config.json").write_text("{}")
    (earlier / "results.json").write_text("{}")
    assert run_cli(["train", "--output-dir", earlier]) == 0
    marked = tmp_path / "demo"
    assert run_cli(["train", "--output-dir", marked]) == 0  # an empty or new folder: marked as ours
    (marked / "results.json").write_text("{}")
    assert run_cli(["train", "--output-dir", marked]) == 0
    assert calls == [str(earlier), str(marked), str(marked)]


def test_builtin_job_on_a_full_disk_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    import mec_quant_plugin.demo

    def full(output_dir, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", f"{output_dir}/fp/model.safetensors")

    monkeypatch.setattr(mec_quant_plugin.demo, "run_default", full)
    assert run_cli(["train", "--output-dir", tmp_path / "demo"]) == 1
    assert "No space left on device" in one_error_line(capsys)


# ---- 7. a one-row data set -------------------------------------------------------------------------


def test_a_one_row_dataset_without_an_eval_split_is_one_usage_line(tmp_path, tiny_llama_dir, capsys):
    data = write_texts(tmp_path / "one.jsonl", 1)
    out = tmp_path / "run"
    expect_usage_error(train_argv(tiny_llama_dir, data, out), capsys, "1 row", "--eval-split")
    expect_usage_error(["eval", "--model", tiny_llama_dir, "--dataset", data, "--task", "causal-lm"], capsys,
                       "1 row", "--split")


def test_a_one_row_dataset_with_its_split_named_trains(tmp_path, tiny_llama_dir, capsys):
    import datasets

    row = json.loads(write_texts(tmp_path / "x.jsonl", 1).read_text())
    folder = tmp_path / "one-row"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([row]),
                          "validation": datasets.Dataset.from_list([row])}).save_to_disk(str(folder))
    assert run_cli(train_argv(tiny_llama_dir, folder, tmp_path / "run", "--per-device-train-batch-size", "1")) == 0
