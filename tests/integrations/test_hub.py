"""Save -> reload (plugin-free in a fresh process, and through the plugin), model card, push."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from testing_utils import TINY_MODELS, make_trainer, saveable_converted

import mec_quant_plugin
from mec_quant_plugin import MECQuantConfig, convert_model, make_saveable, prepare_model, quantization_report


def _trained_and_saved(name: str, folder: Path, act_bits=4):
    trainer, cb, ds = make_trainer(name, str(folder / "run"), MECQuantConfig(weight_bits=2, act_bits=act_bits))
    trainer.train()
    trainer.save_model(str(folder / "final"))
    return trainer.model.eval(), {k: v[:4] for k, v in ds[:4].items()}


@pytest.mark.parametrize("name", ["llama", "gpt2", "vit", "resnet"])
def test_plugin_reload_reproduces_outputs_exactly(name, tmp_path):
    model, batch = _trained_and_saved(name, tmp_path)
    with torch.no_grad():
        ref = model(**batch).logits
    reloaded = mec_quant_plugin.from_pretrained(str(tmp_path / "final"))
    with torch.no_grad():
        out = reloaded(**batch).logits
    assert torch.equal(out, ref)
    files = set(os.listdir(tmp_path / "final"))
    assert {"config.json", "model.safetensors", "mec_quant_config.json", "mec_quant_activations.safetensors",
            "README.md"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files - {"training_args.bin"})


_PLAIN_RELOAD = textwrap.dedent("""
    import json, sys, torch, transformers
    assert "mec_quant_plugin" not in sys.modules
    folder, out = sys.argv[1], sys.argv[2]
    cfg = json.load(open(folder + "/config.json"))
    cls = getattr(transformers, cfg["architectures"][0])
    model = cls.from_pretrained(folder)
    assert "mec_quant_plugin" not in sys.modules
    state = {}
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if hasattr(w, "qdata"):
            state[name + ".qdata"] = w.qdata
            state[name + ".scale"] = w.scale
            state[name + ".zero_point"] = w.zero_point
    torch.save(state, out)
""")


@pytest.mark.parametrize("name", ["llama", "gpt2", "resnet", "bert"])
def test_plugin_free_reload_in_a_fresh_process_gives_the_same_int_weights(name, tmp_path):
    model, _ = _trained_and_saved(name, tmp_path, act_bits=None)
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert "IntxWeightOnlyConfig" in json.dumps(config["quantization_config"])
    out = tmp_path / "weights.pt"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _PLAIN_RELOAD, str(tmp_path / "final"), str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain = torch.load(out, weights_only=True)
    ours = {}
    for n, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if hasattr(w, "qdata"):
            ours.update({n + ".qdata": w.qdata, n + ".scale": w.scale, n + ".zero_point": w.zero_point})
    assert plain.keys() == ours.keys() and len(ours) > 3
    for k in ours:
        assert torch.equal(plain[k], ours[k]), k


def test_model_card_content(tmp_path):
    _trained_and_saved("vit", tmp_path)
    card = (tmp_path / "final" / "README.md").read_text()
    for needle in ("- mec-quant", "- torchao", "- qat", "W2A4", "W8A8", "mec_quant_plugin.from_pretrained",
                   "WEIGHT-ONLY", '"mec_weight"', "train_loss"):
        assert needle in card, needle


def test_activation_steps_kept_out_of_the_transformers_file(tmp_path):
    _trained_and_saved("llama", tmp_path)
    with safe_open(str(tmp_path / "final" / "model.safetensors"), "pt") as f:
        assert not any("fake_quantizer" in k for k in f.keys())
    with safe_open(str(tmp_path / "final" / "mec_quant_activations.safetensors"), "pt") as f:
        assert any(k.endswith("activation_fake_quantizer.scale") for k in f.keys())


def test_push_to_hub_uploads_exactly_the_saved_files(tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = repo_id
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        calls["commit_repo"] = repo_id
        calls["files"] = sorted(op.path_in_repo for op in operations)
        return None

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    model, _ = TINY_MODELS["resnet"]()
    cfg = MECQuantConfig(weight_bits=2, act_bits=2)
    prepare_model(model, cfg)
    model.train()
    model(pixel_values=torch.randn(2, 3, 32, 32))
    convert_model(model)
    make_saveable(model, cfg, run_info={"repo_id": "me/resnet-w2a2"})
    model.push_to_hub("me/resnet-w2a2", token="dummy")
    assert calls["repo"] == calls["commit_repo"] == "me/resnet-w2a2"
    assert calls["files"] == ["README.md", "config.json", "mec_quant_activations.safetensors",
                              "mec_quant_config.json", "model.safetensors"]


def test_make_saveable_needs_a_converted_model():
    model, _ = TINY_MODELS["resnet"]()
    prepare_model(model, MECQuantConfig())
    with pytest.raises(ValueError, match="convert_model"):
        make_saveable(model, MECQuantConfig())


def test_from_pretrained_of_a_folder_not_saved_by_the_plugin(tmp_path):
    model, _ = TINY_MODELS["resnet"]()
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not saved by mec_quant_plugin"):
        mec_quant_plugin.from_pretrained(str(tmp_path))


def test_model_class_from_config(tmp_path):
    from mec_quant_plugin.integrations import model_class_from_config

    model, _ = TINY_MODELS["resnet"]()
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp_path)
    assert model_class_from_config(tmp_path) is type(model)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["NoSuchModel"]}))
    with pytest.raises(ValueError, match="NoSuchModel"):
        model_class_from_config(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        model_class_from_config(tmp_path / "missing")


# ---- trust in a saved folder (issue 10) ---------------------------------------------------------
def _saveable(name: str = "llama", seed: int = 0, **bits):
    return saveable_converted(name, MECQuantConfig(**(bits or {"weight_bits": 2, "act_bits": 4})), seed=seed)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _edit_meta(folder: Path, edit) -> None:
    path = folder / "mec_quant_config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta, indent=2))


def test_from_pretrained_refuses_edited_quantization_settings(tmp_path):
    model, batch = _saveable()
    model.save_pretrained(tmp_path)

    def act_bits_4_to_8(meta):
        meta["mec_quant_config"]["act_bits"] = 8
        for spec in meta["activation_quantizers"].values():
            spec["bits"] = 8

    _edit_meta(tmp_path, act_bits_4_to_8)
    with pytest.raises(ValueError, match="settings .* changed after"):
        mec_quant_plugin.from_pretrained(str(tmp_path))


def test_from_pretrained_ignores_formatting_and_run_info_edits(tmp_path):
    model, batch = _saveable()
    model.save_pretrained(tmp_path)
    _edit_meta(tmp_path, lambda meta: meta.setdefault("run_info", {}).update(note="edited by hand"))
    assert torch.equal(_logits(mec_quant_plugin.from_pretrained(str(tmp_path)), batch), _logits(model, batch))


@pytest.mark.parametrize("version", [99, "1", None])
def test_from_pretrained_refuses_an_unknown_format_version(tmp_path, version):
    model, _ = _saveable()
    model.save_pretrained(tmp_path)
    _edit_meta(tmp_path, lambda meta: meta.update(format_version=version))
    with pytest.raises(ValueError, match=rf"format_version {re.escape(repr(version))}.*reads format_version 1, 2"):
        mec_quant_plugin.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("legacy", ["no fingerprint", "weights fingerprint"])
def test_folders_saved_before_fingerprints_still_load(tmp_path, legacy):
    from mec_quant_plugin.integrations.hub import weights_fingerprint

    model, batch = _saveable()
    model.save_pretrained(tmp_path)

    def as_version_1(meta):
        meta.pop("fingerprint")
        meta.pop("run_info", None)
        meta["format_version"] = 1
        if legacy == "weights fingerprint":
            meta["weights_fingerprint"] = weights_fingerprint(tmp_path)

    _edit_meta(tmp_path, as_version_1)
    assert torch.equal(_logits(mec_quant_plugin.from_pretrained(str(tmp_path)), batch), _logits(model, batch))


def test_from_pretrained_refuses_activation_steps_of_another_save(tmp_path):
    model, _ = _saveable(seed=0)
    other, _ = _saveable(seed=1)
    model.save_pretrained(tmp_path / "a")
    other.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "mec_quant_activations.safetensors").replace(tmp_path / "a" / "mec_quant_activations.safetensors")
    with pytest.raises(ValueError, match="mec_quant_activations.safetensors .* mixes two saves"):
        mec_quant_plugin.from_pretrained(str(tmp_path / "a"))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_reloaded_model_saves_again_and_reloads_to_the_same_outputs(tmp_path, name):
    model, batch = _saveable(name)
    model.save_pretrained(tmp_path / "first")
    reloaded = mec_quant_plugin.from_pretrained(str(tmp_path / "first"))
    reloaded.save_pretrained(tmp_path / "second")
    again = mec_quant_plugin.from_pretrained(str(tmp_path / "second"))
    assert torch.equal(_logits(again, batch), _logits(model, batch))
    first, second = (json.loads((tmp_path / f / "mec_quant_config.json").read_text()) for f in ("first", "second"))
    assert first["mec_quant_config"] == second["mec_quant_config"]
    assert first["activation_quantizers"] == second["activation_quantizers"]
    assert quantization_report(again) == quantization_report(model)
    assert "| W2A4 |" in (tmp_path / "second" / "README.md").read_text()


def _advertised_bits(folder: Path) -> str | None:
    qconfig = json.loads((folder / "config.json").read_text()).get("quantization_config")
    if qconfig is None:
        return None
    return qconfig["quant_type"]["default"]["_data"]["weight_dtype"]["_data"].removeprefix("int")


def _stored_bits(model) -> set[str]:
    return {str(m.weight.target_dtype).removeprefix("torch.int") for m in model.modules()
            if hasattr(getattr(m, "weight", None), "target_dtype")}


@pytest.mark.parametrize("bits", [
    {"weight_bits": None, "act_bits": 4},
    {"weight_bits": None, "act_bits": 4, "edge_layers": "8bit"},
    {"weight_bits": 4, "act_bits": None},
    {"weight_bits": 4, "act_bits": None, "edge_layers": "float"},
])
def test_config_json_advertises_only_the_int_weights_stored(tmp_path, bits):
    model, batch = _saveable(**bits)
    model.save_pretrained(tmp_path)
    stored = _stored_bits(model)
    advertised = _advertised_bits(tmp_path)
    if stored:
        assert advertised in stored
        assert advertised == str(bits["weight_bits"] or 8)
    else:
        assert advertised is None  # float weights: a plain transformers model, no torchao config
    assert torch.equal(_logits(mec_quant_plugin.from_pretrained(str(tmp_path)), batch), _logits(model, batch))


def test_from_pretrained_never_unpickles_training_args(tmp_path):
    model, batch = _saveable()
    model.save_pretrained(tmp_path)
    (tmp_path / "training_args.bin").write_bytes(b"not a pickle: loading it would fail")
    assert torch.equal(_logits(mec_quant_plugin.from_pretrained(str(tmp_path)), batch), _logits(model, batch))


def test_from_pretrained_refuses_a_damaged_config_file(tmp_path):
    model, _ = _saveable()
    model.save_pretrained(tmp_path)
    (tmp_path / "mec_quant_config.json").write_text('{"format_version": 2, ')
    with pytest.raises(ValueError, match="not valid JSON"):
        mec_quant_plugin.from_pretrained(str(tmp_path))
