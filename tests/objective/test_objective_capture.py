"""Feature capture on tiny offline models: shapes, padding, eval, sub-sampling, checkpointing."""

from __future__ import annotations

import warnings

import pytest
import torch
from testing_utils import TINY_MODELS, TinyMLP
from torch import nn
from torch.utils.checkpoint import checkpoint

from mec_quant_plugin.objective import FeatureCapture, resolve_taps
from mec_quant_plugin.objective.capture import to_rows


def _width(model) -> int:
    """The feature width the head sees, from the model's config."""
    cfg = model.config
    return cfg.hidden_sizes[-1] if hasattr(cfg, "hidden_sizes") else cfg.hidden_size


def _expected_rows(name: str, batch: dict, side: str, model) -> int:
    if "pixel_values" in batch:
        n = batch["pixel_values"].shape[0]
        if name == "vit" and side == "output":  # ViT blocks: one row per patch, plus CLS
            return n * ((model.config.image_size // model.config.patch_size) ** 2 + 1)
        return n  # spatial maps are average-pooled; the head sees the pooled row
    if name == "bert" and side == "input":
        return batch["input_ids"].shape[0]  # the classifier sees the pooled [CLS] row
    return int(batch["attention_mask"].sum())


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_head_and_block_taps_give_rows_of_the_documented_shape(name):
    model, batch = TINY_MODELS[name]()
    taps = resolve_taps(model, "head+blocks")
    assert taps[-1][1] == "input" and all(side == "output" for _, side in taps[:-1]) and len(taps) == 3
    capture = FeatureCapture(model, taps)
    model.train()
    model(**batch)
    rows = capture.pop()
    assert set(rows) == {n for n, _ in taps}
    head = taps[-1][0]
    assert rows[head].shape == (_expected_rows(name, batch, "input", model), _width(model))
    for block, _ in taps[:-1]:
        assert rows[block].dim() == 2 and rows[block].shape[0] == _expected_rows(name, batch, "output", model)
        assert rows[block].requires_grad
    assert capture.pop() == {}  # popped: nothing is kept


def test_default_head_is_found_through_the_model_api():
    llama, _ = TINY_MODELS["llama"]()
    assert resolve_taps(llama) == [("lm_head", "input")]  # get_output_embeddings()
    resnet, _ = TINY_MODELS["resnet"]()
    assert resolve_taps(resnet) == [("classifier.1", "input")]
    assert resolve_taps(resnet, tap_modules=["resnet.pooler"]) == [("resnet.pooler", "input")]


def test_token_rows_exclude_padding_exactly():
    model, batch = TINY_MODELS["llama"]()
    capture = FeatureCapture(model, [("lm_head", "input")])
    model.train()
    torch.manual_seed(1)
    out = model(**batch, output_hidden_states=True)
    rows = capture.pop()["lm_head"]
    expected = out.hidden_states[-1][batch["attention_mask"].bool()]
    torch.testing.assert_close(rows, expected)


def test_spatial_maps_are_average_pooled_and_bad_shapes_are_refused():
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(to_rows(x), x.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="supported are"):
        to_rows(torch.randn(2, 3, 4, 5, 6))


def test_eval_forwards_are_ignored_and_nothing_accumulates():
    model = TinyMLP()
    capture = FeatureCapture(model, [("head", "input"), ("body.1", "output")])
    model.eval()
    model(torch.randn(5, 6))
    assert capture.pop() == {} and capture.inputs is None
    model.train()
    for n in (3, 4, 7):  # three forwards without pop: only the last is kept
        model(torch.randn(n, 6))
    rows = capture.pop()
    assert {k: v.shape[0] for k, v in rows.items()} == {"head": 7, "body.1": 7}


def test_token_rows_are_subsampled_deterministically_per_step():
    model, batch = TINY_MODELS["llama"]()
    model.train()
    capture = FeatureCapture(model, [("lm_head", "input")], max_rows=5)
    picks = []
    for step in (3, 3, 4):  # the tiny Llama has no dropout: rows differ only by the choice
        capture.set_step(step)
        model(**batch)
        picks.append(capture.pop()["lm_head"].detach())
    assert picks[0].shape == (5, _width(model))
    torch.testing.assert_close(picks[0], picks[1])
    assert not torch.equal(picks[0], picks[2])


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)
        self.reentrant = reentrant
        self.calls = 0

    def forward(self, x):
        def run(t):
            self.calls += 1
            return self.block(t)

        return self.head(checkpoint(run, x, use_reentrant=self.reentrant))


def test_non_reentrant_checkpointing_does_not_double_count():
    model = _Checkpointed(reentrant=False).train()
    capture = FeatureCapture(model, [("block", "output"), ("head", "input")])
    out = model(torch.randn(4, 6))
    rows = capture.pop()
    assert {k: v.shape for k, v in rows.items()} == {"block": (4, 8), "head": (4, 8)}
    loss = out.sum() + rows["block"].pow(2).sum()
    loss.backward()  # recomputes `block` during backward: its hook fires again
    assert model.calls == 2
    assert capture.pop() == {}  # ... but the recomputation was not captured


def test_reentrant_checkpointing_warns_and_skips_features_without_grad():
    model = _Checkpointed(reentrant=True).train()
    capture = FeatureCapture(model, [("block", "output"), ("head", "input")])
    x = torch.randn(4, 6, requires_grad=True)
    with pytest.warns(UserWarning, match="use_reentrant"):
        model(x)
    rows = capture.pop()
    assert set(rows) == {"head"} and rows["head"].requires_grad


def test_hf_gradient_checkpointing_with_block_taps():
    model, batch = TINY_MODELS["llama"]()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    # transformers checkpoints a block's `forward` (its own hooks stay outside); a module inside
    # the block, like the attention, is re-run during backward with its hooks.
    taps = resolve_taps(model, "blocks") + [("model.layers.0.self_attn", "output")]
    capture = FeatureCapture(model, taps)
    calls = []
    model.get_submodule(taps[-1][0]).register_forward_hook(lambda *args: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = model(**batch)
    rows = capture.pop()
    assert all(rows[n].requires_grad and rows[n].shape[0] == int(batch["attention_mask"].sum()) for n, _ in taps)
    (out.loss + sum(r.pow(2).mean() for r in rows.values())).backward()
    assert len(calls) == 2  # the block really was recomputed during backward
    assert capture.pop() == {}


def test_unknown_tap_names_are_reported_with_the_available_ones():
    model = TinyMLP()
    with pytest.raises(ValueError, match="No module named 'classifier'.*head"):
        FeatureCapture(model, [("classifier", "input")])
    with pytest.raises(ValueError, match="side"):
        FeatureCapture(model, [("head", "weights")])
    capture = FeatureCapture(model, [("head", "input")])
    capture.remove()
    model.train()(torch.randn(3, 6))
    assert capture.pop() == {}
