"""`mec-quant convert --format torchao|gguf|onnx` (issue 12 §4): a training checkpoint or an already
converted folder -> model.gguf / model.onnx beside the torchao files, written from the trained
codes (the GGUF decodes to them; the ONNX file runs in onnxruntime like the torch model); the files
are recorded in mec_quant_exports.json (mec_quant_config.json and its fingerprint untouched) and
listed in the model card with how to run them; `--push-to-hub` uploads them with the model;
unsupported combinations are one usage line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gguf", reason="needs the `export` extra: pip install -e '.[export]'")
ort = pytest.importorskip("onnxruntime", reason="needs the `export-onnx` extra: pip install -e '.[export-onnx]'")

from mec_quant_plugin import MECQuantConfig, convert_model, from_pretrained, make_saveable, prepare_model  # noqa: E402
from mec_quant_plugin.checkpoint import TRAIN_CONFIG_FILE  # noqa: E402
from tests.export import test_gguf, test_onnx  # noqa: E402
from tests.test_cli import expect_usage_error, run_cli  # noqa: E402

tokenizer = test_gguf.tokenizer  # the fixture: a byte-level BPE trained in memory (llama.cpp reads it)


def one_line_error(argv: list, capsys, *needles: str) -> str:
    """The CLI exits 2 with exactly one `error:` line holding every needle."""
    err = expect_usage_error(argv, capsys, *needles)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and all(n in lines[0] for n in needles), err
    return lines[0]


@pytest.fixture
def llama_checkpoint(tmp_path, tokenizer) -> Path:
    """A prepared (not converted) tiny Llama saved as a training checkpoint with its run's config."""
    config = MECQuantConfig(weight_bits=4, act_bits=None)
    model = prepare_model(test_gguf.tiny_llama(), config, progress=False)
    folder = tmp_path / "run" / "checkpoint-1"
    model.save_pretrained(folder)
    (folder / TRAIN_CONFIG_FILE).write_text(config.to_json())
    tokenizer.save_pretrained(folder)
    return folder


def saved_bert(folder: Path, weight_bits: int = 2) -> Path:
    """A converted tiny BERT saved by the plugin (what `mec-quant train` leaves)."""
    config = MECQuantConfig(weight_bits=weight_bits, act_bits=None)
    model = convert_model(prepare_model(test_onnx.tiny_bert(), config, progress=False))
    make_saveable(model, config)
    model.save_pretrained(folder)
    return folder


def card_section(folder: Path) -> str:
    card = (folder / "README.md").read_text()
    assert "<!-- mec-quant-plugin: start" in card
    return card.partition("<!-- mec-quant-plugin: start")[2].partition("<!-- mec-quant-plugin: end -->")[0]


def test_a_checkpoint_converts_and_exports_gguf_in_one_command(llama_checkpoint, tmp_path, capsys):
    import gguf

    out = tmp_path / "int"
    assert run_cli(["convert", "--model", llama_checkpoint, "--output-dir", out, "--format", "gguf"]) == 0
    assert "exported" in capsys.readouterr().out
    model = from_pretrained(str(out))  # the torchao folder still loads: its fingerprint is untouched
    assert set(gguf.GGUFReader(out / "model.gguf").fields) >= {"tokenizer.ggml.tokens", "general.architecture"}
    types = test_gguf.check_exact(model, out / "model.gguf")  # every quantized tensor decodes to the trained codes
    assert types["model.layers.0.mlp.up_proj"] == "Q4_0"

    [entry] = json.loads((out / "mec_quant_exports.json").read_text())["files"]
    assert (entry["file"], entry["format"], entry["bytes"]) == ("model.gguf", "gguf", (out / "model.gguf").stat().st_size)
    section = card_section(out)
    assert re.search(r"\| `model.gguf` \| gguf \| [0-9.]+ MB \| llama.cpp \|", section), section
    assert 'llama-cli -m model.gguf -p "' in section

    # again into the same folder: refused before converting (the model and its file stay as they are)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    one_line_error(["convert", "--model", llama_checkpoint, "--output-dir", out, "--format", "gguf"], capsys,
                   "model.gguf exists")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_converted_folder_exports_onnx_that_runs_like_the_torch_model(tmp_path, capsys, monkeypatch):
    folder = saved_bert(tmp_path / "bert-w2")
    config_before = (folder / "mec_quant_config.json").read_bytes()
    assert run_cli(["convert", "--model", folder, "--format", "onnx"]) == 0
    assert (folder / "mec_quant_config.json").read_bytes() == config_before
    model = from_pretrained(str(folder))

    torch.manual_seed(1)
    input_ids = torch.randint(0, 64, (2, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    with torch.no_grad():
        want = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits.numpy()

    section = card_section(folder)
    assert re.search(r"\| `model.onnx` \| onnx \| [0-9.]+ MB \| ONNX Runtime \|", section), section
    [code] = re.findall(r"^```python\n(import onnxruntime.*?)^```$", section, flags=re.S | re.M)
    assert 'add_session_config_entry("mlas.use_lut_gemm", "1")' in code  # W2: the fast kernel's option
    # The card's snippet as printed, run with default options (float activations: equal to torch).
    monkeypatch.chdir(folder)
    scope = {name: t.numpy() for name, t in
             {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}.items()}
    exec(code.replace('so.add_session_config_entry("mlas.use_lut_gemm", "1")', "pass"), scope)
    got = scope["output"]
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= test_onnx.RELATIVE_TOLERANCE * np.abs(want).max()

    # the card regenerated from the model (as after Trainer.create_model_card) keeps the listing
    from mec_quant_plugin.integrations.model_card import update_model_card

    update_model_card(model, folder / "README.md")
    assert card_section(folder).count("`model.onnx` with ONNX Runtime") == 1

    # an existing file is never overwritten
    monkeypatch.chdir(tmp_path)
    (folder / "model.onnx").write_bytes(b"mine")
    one_line_error(["convert", "--model", folder, "--format", "onnx"], capsys, "model.onnx exists")
    assert (folder / "model.onnx").read_bytes() == b"mine"


def test_output_dir_takes_the_file_and_leaves_the_model_folder_alone(tmp_path, capsys):
    folder = saved_bert(tmp_path / "bert-w4", weight_bits=4)
    card = (folder / "README.md").read_text()
    assert run_cli(["convert", "--model", folder, "--format", "onnx", "--output-dir", tmp_path / "deploy"]) == 0
    assert (tmp_path / "deploy" / "model.onnx").is_file()
    ort.InferenceSession(str(tmp_path / "deploy" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert (folder / "README.md").read_text() == card and not (folder / "mec_quant_exports.json").exists()


def test_unsupported_combinations_are_one_usage_line(tmp_path, llama_checkpoint, capsys, monkeypatch):
    import sys

    bert = saved_bert(tmp_path / "bert")
    one_line_error(["convert", "--model", bert], capsys, "already converted", "--format gguf")
    one_line_error(["convert", "--model", llama_checkpoint, "--format", "onnx", "--output-dir", tmp_path / "o"],
                   capsys, "--format onnx exports encoders", "LlamaForCausalLM")
    assert not (tmp_path / "o").exists()  # refused before converting
    one_line_error(["convert", "--model", llama_checkpoint, "--format", "gguf"], capsys, "--output-dir is required")
    one_line_error(["convert", "--model", bert, "--format", "onnx", "--output-dir", tmp_path / "d", "--push-to-hub",
                    "me/bert"], capsys, "--push-to-hub uploads the exported file beside the model")
    one_line_error(["convert", "--model", bert, "--format", "pt"], capsys, "invalid choice")

    from transformers import ViTConfig, ViTForImageClassification

    vit = tmp_path / "vit"
    config = MECQuantConfig(weight_bits=4, act_bits=None)
    model = convert_model(prepare_model(ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64, num_labels=3)), config, progress=False))
    make_saveable(model, config)
    model.save_pretrained(vit)
    one_line_error(["convert", "--model", vit, "--format", "gguf"], capsys, "--format gguf writes model types",
                   "'vit'")

    for module, extra in (("gguf", "mec-quant-plugin[export]"), ("onnx", "mec-quant-plugin[export-onnx]")):
        monkeypatch.setitem(sys.modules, module, None)  # not installed
        target = bert if module == "onnx" else llama_checkpoint
        one_line_error(["convert", "--model", target, "--format", module, "--output-dir", tmp_path / "x"],
                       capsys, f"pip install '{extra}'")
        monkeypatch.delitem(sys.modules, module)
    assert not (tmp_path / "x").exists() and not (bert / "model.onnx").exists()


def test_push_uploads_the_model_its_exported_files_and_the_card(tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    uploaded: dict = {}

    def create_repo(self, repo_id, **kwargs):
        uploaded["repo"] = repo_id
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        uploaded["files"] = set(filter_repo_objects(files, allow_patterns=allow_patterns,
                                                    ignore_patterns=ignore_patterns))
        uploaded["readme"] = (Path(folder_path) / "README.md").read_text()

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    folder = saved_bert(tmp_path / "bert-w2")
    (folder / "checkpoint-1").mkdir()  # a training run's leftovers: not uploaded
    (folder / "checkpoint-1" / "model.safetensors").write_bytes(b"x")
    (folder / "training_args.bin").write_bytes(b"pickle")
    assert run_cli(["convert", "--model", folder, "--format", "onnx", "--push-to-hub", "me/bert-w2"]) == 0
    assert uploaded["repo"] == "me/bert-w2"
    assert {"model.onnx", "mec_quant_exports.json", "README.md", "model.safetensors", "config.json",
            "mec_quant_config.json", "mec_quant_activations.safetensors"} == uploaded["files"]
    assert "`model.onnx`" in uploaded["readme"] and "onnxruntime.InferenceSession" in uploaded["readme"]
    assert "pushed" in capsys.readouterr().out
