"""export_onnx: every MatMulNBits / GatherBlockQuantized node decodes (run by onnxruntime itself on
an identity input / every index) to exactly our codes x fp16 steps, per bit-width; the whole graph
agrees with the torch converted model; layers no block layout stores exactly are refused by name
(or kept float only when asked)."""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="export_onnx needs the `export-onnx` extra: pip install -e '.[export-onnx]'")
ort = pytest.importorskip("onnxruntime", reason="running the exported file needs onnxruntime (extra `export-onnx`)")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mec_quant_plugin import MECQuantConfig, convert_model, prepare_model  # noqa: E402
from mec_quant_plugin.export.codes import quantized_weights  # noqa: E402
from mec_quant_plugin.export.onnx import ONNXExportError, export_onnx  # noqa: E402

# Float activations (accuracy_level 0): onnxruntime and torch sum the same float32 products in a
# different order. Measured max |difference| on these logits (|logits| <= 0.023): 3.7e-9 (W2),
# 5.6e-9 (W4, W8), i.e. <= 2.5e-7 of the largest logit; allowed: 1e-5 of it.
RELATIVE_TOLERANCE = 1e-5
# (weight_bits, ternary) -> the MatMulNBits bits expected for the body's Linear layers.
BITS = {(1, False): 2, (2, True): 2, (2, False): 2, (3, False): 4, (4, False): 4, (8, False): 8}


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg).eval()


@functools.cache
def converted(weight_bits: int, ternary: bool = False, **extra) -> torch.nn.Module:
    config = MECQuantConfig(weight_bits=weight_bits, ternary=ternary, act_bits=None, **extra)
    return convert_model(prepare_model(tiny_bert(), config, progress=False))


@functools.cache
def exported(tmp_root: str, weight_bits: int, ternary: bool = False):
    model = converted(weight_bits, ternary)
    return model, export_onnx(model, f"{tmp_root}/w{weight_bits}{'t' if ternary else ''}.onnx")


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("onnx"))


def single_node_output(node, graph_inits: dict, feed_name: str, feed: np.ndarray) -> np.ndarray:
    """Run `node` alone in onnxruntime, its constant inputs taken from the exported file."""
    consts = [numpy_helper.from_array(graph_inits[i], i) for i in node.input if i in graph_inits]
    elem = TensorProto.FLOAT if feed.dtype == np.float32 else TensorProto.INT64
    graph = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info(feed_name, elem, None)],
        [helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)],
        consts,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {feed_name: feed})[0]


def expected_weight(weight) -> np.ndarray:
    """Our codes x fp16(scale) from the torchao tensor, written independently of the exporter."""
    rows, cols = weight.qdata.shape
    scale = weight.scale.float().reshape(rows, -1).half().float()
    zero = weight.zero_point.float().reshape(rows, -1)
    group = cols // scale.shape[1]
    return ((weight.qdata.float() - zero.repeat_interleave(group, 1)) * scale.repeat_interleave(group, 1)).numpy()


@pytest.mark.parametrize("weight_bits,ternary", list(BITS))
def test_nodes_decode_to_our_codes(tmp_root, weight_bits, ternary):
    model, result = exported(tmp_root, weight_bits, ternary)
    proto = onnx.load(result.path)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    ops = {n.name: n for n in proto.graph.node if n.domain == "com.microsoft"}
    by_layer = {layer.name: layer for layer in result.layers}
    params = dict(model.named_parameters())
    checked = set()
    for node in ops.values():
        layer = node.input[1 if node.op_type == "MatMulNBits" else 0].rsplit(".", 2)[0]
        want = expected_weight(params[layer])
        if node.op_type == "MatMulNBits":
            k = want.shape[1]
            got = single_node_output(node, inits, node.input[0], np.eye(k, dtype=np.float32)).T
        else:
            got = single_node_output(node, inits, node.input[1], np.arange(want.shape[0], dtype=np.int64))
        assert np.abs(got - want).max() == 0.0, layer
        checked.add(layer)
    body = [n for n in checked if ".encoder." in n]
    assert body and all(by_layer[n].bits == BITS[(weight_bits, ternary)] for n in body)
    # Every quantized weight the logits use is a quantized node; the 8-bit embeddings are gathered quantized.
    assert checked == {layer.name for layer in result.layers} and not result.kept_float
    assert {"bert.embeddings.word_embeddings.weight"} <= {
        n for n in checked if by_layer[n].op == "GatherBlockQuantized"
    }
    assert not result.not_in_graph


@pytest.mark.parametrize("weight_bits", [2, 4, 8])
def test_outputs_match_the_torch_model(tmp_root, weight_bits):
    model, result = exported(tmp_root, weight_bits, False)
    # Default session options: float activations. (`mlas.use_lut_gemm=1`, 2-bit's fast path, quantizes the
    # activations: not equal to torch, see export_onnx's docstring and benchmarks/deploy_onnx.py.)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    torch.manual_seed(1)
    ids = torch.randint(0, 64, (3, 13))  # another length than the traced one, with padding
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    got = session.run(None, {name: feed[name].numpy() for name in result.input_names})[0]
    with torch.no_grad():
        want = model(**{name: feed[name] for name in result.input_names}).logits.numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= RELATIVE_TOLERANCE * np.abs(want).max()


def test_refuses_groups_no_block_holds(tmp_path):
    model = converted(4, weight_granularity="per_group", group_size=8)
    with pytest.raises(ONNXExportError, match=r"encoder\.layer\.0\.attention\.self\.query\.weight.*one step per 8"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    result = export_onnx(model, tmp_path / "m.onnx", unexportable="float")
    assert "bert.encoder.layer.0.attention.self.query.weight" in result.kept_float
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 64, (2, 8))
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    got = session.run(None, {n: feed[n].numpy() for n in result.input_names})[0]
    with torch.no_grad():
        want = model(**{n: feed[n] for n in result.input_names}).logits.numpy()
    assert np.abs(got - want).max() <= RELATIVE_TOLERANCE * np.abs(want).max()


def test_vit_matches_the_torch_model(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=96,
        num_labels=5,
    )
    model = convert_model(
        prepare_model(
            ViTForImageClassification(cfg).eval(), MECQuantConfig(weight_bits=4, act_bits=None), progress=False
        )
    )
    result = export_onnx(model, tmp_path / "vit.onnx")
    assert result.input_names == ["pixel_values"]
    assert {layer.op for layer in result.layers} == {"MatMulNBits"}
    assert len(result.layers) == len(quantized_weights(model, skip_non_2d=True))
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(pixel_values=x).logits.numpy()
    got = session.run(None, {"pixel_values": x.numpy()})[0]
    assert np.abs(got - want).max() <= RELATIVE_TOLERANCE * np.abs(want).max()


def test_existing_file_and_missing_package(tmp_path, monkeypatch):
    target = tmp_path / "m.onnx"
    target.write_text("user data")
    with pytest.raises(ValueError, match="overwrite=True"):
        export_onnx(converted(4), target)
    assert target.read_text() == "user data"
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"export-onnx"):
        export_onnx(converted(4), tmp_path / "other.onnx")


def initializers(path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_a_saved_folder_exports_the_same_codes(tmp_root, tmp_path):
    from mec_quant_plugin import make_saveable

    config = MECQuantConfig(weight_bits=4, act_bits=None)
    model = convert_model(prepare_model(tiny_bert(), config, progress=False))  # same seed: the same codes
    make_saveable(model, config)
    model.save_pretrained(tmp_path / "folder")
    result = export_onnx(tmp_path / "folder", tmp_path / "m.onnx")
    _, direct = exported(tmp_root, 4, False)
    ours, theirs = initializers(result.path), initializers(direct.path)
    quantized = [name for name in theirs if name.endswith((".q", ".scales"))]
    assert quantized and all(np.array_equal(ours[name], theirs[name]) for name in quantized)


def test_activation_quantizers_are_dropped_with_a_warning(tmp_path, caplog):
    from mec_quant_plugin.export.onnx import float_copy

    model = convert_model(prepare_model(tiny_bert(), MECQuantConfig(weight_bits=4, act_bits=8), progress=False))
    ids = torch.randint(0, 64, (2, 8))
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        model(**feed)  # calibrates the activation steps
    with caplog.at_level("WARNING", logger="mec_quant_plugin"):
        result = export_onnx(model, tmp_path / "m.onnx")
    assert "activation quantizers are not exported" in caplog.text
    assert {layer.op for layer in result.layers} == {"MatMulNBits", "GatherBlockQuantized"}
    weights_only = float_copy(model, quantized_weights(model, skip_non_2d=True))
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = session.run(None, {n: feed[n].numpy() for n in result.input_names})[0]
    with torch.no_grad():
        want = weights_only(**{n: feed[n] for n in result.input_names}).logits.numpy()
    assert np.abs(got - want).max() <= RELATIVE_TOLERANCE * np.abs(want).max()


def test_a_tied_embedding_is_gathered_and_multiplied(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    model = convert_model(prepare_model(BertForMaskedLM(cfg).eval(), MECQuantConfig(weight_bits=4, act_bits=None),
                                        progress=False))
    result = export_onnx(model, tmp_path / "mlm.onnx")
    word = "bert.embeddings.word_embeddings.weight"
    assert {layer.op for layer in result.layers if layer.name == word} == {"GatherBlockQuantized", "MatMulNBits"}
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 64, (2, 11))
    feed = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    got = session.run(None, {n: feed[n].numpy() for n in result.input_names})[0]
    with torch.no_grad():
        want = model(**{n: feed[n] for n in result.input_names}).logits.numpy()
    assert np.abs(got - want).max() <= RELATIVE_TOLERANCE * np.abs(want).max()
