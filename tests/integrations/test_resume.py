"""An interrupted and resumed run ends with the same weights as an uninterrupted one, for every model
family (ViT's checkpoints use old key names, GPT-2 ties its embeddings); a checkpoint that does not
hold every weight and step size of the model is an error, not a silent restart of those layers."""

from __future__ import annotations

import pytest
import torch
from testing_utils import make_trainer
from transformers import TrainerCallback

from mec_quant_plugin import MECQuantConfig


class _StopAt(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def _run(tmp, config, stop_at=None, resume=None, name="llama"):
    torch.manual_seed(0)
    trainer, cb, _ = make_trainer(name, str(tmp), config, max_steps=4, save_strategy="no",
                                  learning_rate=1e-2, weight_decay=0.01, rows=16)
    cb.convert_on_train_end = False
    if stop_at is not None:
        trainer.add_callback(_StopAt(stop_at))
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize(("name", "view"), [("llama", "self"), ("llama", "teacher"), ("vit", "self"), ("bert", "self"),
                                            ("gpt2", "self"), ("resnet", "self")])
def test_resume_equals_uninterrupted(name, view, tmp_path):
    config = MECQuantConfig(weight_bits=2, act_bits=4, mec_view=view, mec_weight=0.5)
    full = _run(tmp_path / "full", config, name=name)
    part = _run(tmp_path / "part", config, stop_at=2, name=name)
    assert part.state.global_step == 2
    ckpt = tmp_path / "part" / "checkpoint-2"
    assert ckpt.exists()
    resumed = _run(tmp_path / "part", config, resume=str(ckpt), name=name)
    assert resumed.state.global_step == 4
    a = dict(full.model.named_parameters())
    b = dict(resumed.model.named_parameters())
    assert a.keys() == b.keys()
    assert any("activation_fake_quantizer.scale" in k for k in a)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    for k, buf in full.model.named_buffers():
        assert torch.equal(buf, dict(resumed.model.named_buffers())[k]), k


def test_resume_from_a_checkpoint_missing_step_sizes_fails_loudly(tmp_path):
    """The Trainer itself only logs missing keys and trains on from the fresh initial values."""
    from safetensors.torch import load_file, save_file

    config = MECQuantConfig(weight_bits=2, act_bits=4)
    _run(tmp_path / "part", config, stop_at=2)
    weights = tmp_path / "part" / "checkpoint-2" / "model.safetensors"
    state = load_file(str(weights))
    dropped = [k for k in state if k.startswith("model.layers.1.") and "fake_quantizer.scale" in k]
    save_file({k: v for k, v in state.items() if k not in dropped}, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing from the checkpoint") as exc:
        _run(tmp_path / "part", config, resume=str(weights.parent))
    assert len(dropped) > 5 and f"({len(dropped)} in all)" in str(exc.value)
    assert sum(k in str(exc.value) for k in dropped) == 5  # the first five named


def test_resume_with_other_quantization_settings_fails_loudly(tmp_path):
    """W4 step sizes have the same keys as W2 ones: without the check, a W2A4 checkpoint resumed with
    W4A4 settings trains on silently with the 2-bit steps applied at 4 bits."""
    _run(tmp_path / "part", MECQuantConfig(weight_bits=2, act_bits=4), stop_at=2)
    with pytest.raises(ValueError, match="weight_bits: checkpoint 2, now 4"):
        _run(tmp_path / "part", MECQuantConfig(weight_bits=4, act_bits=4), resume=str(tmp_path / "part" / "checkpoint-2"))
    # the MEC term's settings may change on resume
    resumed = _run(tmp_path / "part", MECQuantConfig(weight_bits=2, act_bits=4, mec_weight=0.1),
                   resume=str(tmp_path / "part" / "checkpoint-2"))
    assert resumed.state.global_step == 4
