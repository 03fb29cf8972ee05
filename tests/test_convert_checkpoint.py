"""`convert_checkpoint` / `mec-quant convert` on real Trainer checkpoints (Trainer + MECQuantCallback,
two steps, a checkpoint saved at step 2): every model family converts, the converted folder reloads
as exactly the model converted in memory, and a `--config` other than the run's is refused."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from testing_utils import TINY_MODELS, dataset_like, training_arguments
from transformers import Trainer

import mec_quant_plugin
from mec_quant_plugin import MECQuantCallback, MECQuantConfig, convert_model
from mec_quant_plugin.checkpoint import TRAIN_CONFIG_FILE, convert_checkpoint

CONFIG = MECQuantConfig(weight_bits=2, act_bits=4)


def tiny_tied_llama() -> tuple[torch.nn.Module, dict]:
    """The registry's tiny Llama with tied input/output embeddings (as SmolLM2 ties them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)
    ids = torch.randint(0, 64, (2, 8))
    return LlamaForCausalLM(cfg), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


MODELS = {**{name: TINY_MODELS[name] for name in ("vit", "bert", "gpt2", "resnet")}, "tied-llama": tiny_tied_llama}


def train_with_checkpoint(name: str, out: Path, config: MECQuantConfig = CONFIG) -> tuple[Trainer, dict, Path]:
    """Two Trainer steps with the callback (no conversion at the end); returns the trainer, a batch and
    the checkpoint saved at step 2 (the state the trainer's model holds)."""
    torch.manual_seed(0)
    model, batch = MODELS[name]()
    callback = MECQuantCallback(config, convert_on_train_end=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=training_arguments(str(out), save_strategy="steps", save_steps=2),
                          train_dataset=dataset_like(batch), callbacks=[callback])
        trainer.train()
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file()
    return trainer, batch, checkpoint


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache: dict[str, tuple[Trainer, dict, Path]] = {}

    def get(name: str) -> tuple[Trainer, dict, Path]:
        if name not in cache:
            cache[name] = train_with_checkpoint(name, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


def _logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**{k: v for k, v in batch.items() if k != "labels"}).logits


def copy_folder(source: Path, dest: Path) -> Path:
    dest.mkdir()
    for item in source.iterdir():
        if item.is_file():
            (dest / item.name).write_bytes(item.read_bytes())
    return dest


@pytest.mark.parametrize("name", list(MODELS))
def test_checkpoint_converts_and_reloads_as_the_model_converted_in_memory(name, trained, tmp_path):
    trainer, batch, checkpoint = trained(name)
    out = convert_checkpoint(checkpoint, tmp_path / "int")  # the run's config: written into the checkpoint
    reloaded = mec_quant_plugin.from_pretrained(str(out))
    in_memory = convert_model(copy.deepcopy(trainer.model).eval())
    expected, got = _logits(in_memory, batch), _logits(reloaded, batch)
    assert torch.equal(got, expected), f"{name}: max |diff| {(got - expected).abs().max().item():.3g}"
    assert mec_quant_plugin.quantization_report(reloaded) == mec_quant_plugin.quantization_report(in_memory)


def test_the_callback_writes_the_runs_config_into_every_checkpoint(trained):
    _, _, checkpoint = trained("bert")
    assert MECQuantConfig.from_json((checkpoint / TRAIN_CONFIG_FILE).read_text()) == CONFIG


def test_a_config_other_than_the_runs_is_refused(trained, tmp_path):
    _, _, checkpoint = trained("bert")
    other = tmp_path / "w4a8.json"
    other.write_text(CONFIG.replace(weight_bits=4, act_bits=8).to_json())
    with pytest.raises(ValueError, match="weight_bits: run 2, given 4") as exc:
        convert_checkpoint(checkpoint, tmp_path / "int", other)
    assert "act_bits: run 4, given 8" in str(exc.value) and TRAIN_CONFIG_FILE in str(exc.value)
    assert not (tmp_path / "int").exists()
    same = tmp_path / "same.json"
    same.write_text(CONFIG.to_json())
    convert_checkpoint(checkpoint, tmp_path / "int-same", same)  # the run's own settings: fine


def test_a_checkpoint_without_its_config_needs_one(trained, tmp_path):
    _, _, checkpoint = trained("bert")
    bare = copy_folder(checkpoint, tmp_path / "checkpoint-2")
    (bare / TRAIN_CONFIG_FILE).unlink()  # e.g. saved by an older version
    with pytest.raises(FileNotFoundError, match="--config"):
        convert_checkpoint(bare, tmp_path / "int")
    config_file = tmp_path / "run-config.json"
    config_file.write_text(CONFIG.to_json())
    convert_checkpoint(bare, tmp_path / "int", config_file)


def test_a_checkpoint_missing_quantizer_state_is_refused(trained, tmp_path):
    """A weight step size missing from the checkpoint would be converted at its fresh initial value."""
    from safetensors.torch import load_file, save_file

    _, _, checkpoint = trained("vit")
    damaged = copy_folder(checkpoint, tmp_path / "damaged")
    state = load_file(str(damaged / "model.safetensors"))
    dropped = next(k for k in state if k.endswith("weight_fake_quantizer.scale") and "layer" in k)
    del state[dropped]
    save_file(state, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing"):
        convert_checkpoint(damaged, tmp_path / "int")
