"""`export_onnx`: a converted encoder (BERT family, ViT) as one ONNX file for ONNX Runtime, each
quantized weight written from OUR codes and fp16 steps.

How: the model is exported to ONNX as a float graph (torch's TorchScript exporter) holding the
dequantized weights `codes x step`, then every MatMul / Gemm whose weight is a quantized Linear
becomes a com.microsoft `MatMulNBits` node and every Gather from a quantized embedding table a
`GatherBlockQuantized` node, filled with the layer's own codes (stored unsigned: `k + 2^(bits-1)`,
the ops' default zero point) and its steps (float32 holding the fp16 values: exact). Each layer
takes the smallest of 2/4/8 bits that holds its codes (3-bit codes go in 4 bits, binary and
ternary in 2) and a block of 16..2^n inputs holding one step (`onnx_pack.choose_block`). A layer
no block stores exactly is refused by name (`ONNXExportError`), or kept as a float MatMul of the
same dequantized numbers with `unexportable="float"` (exact, not smaller; listed in the result).

Activation quantizers are not exported: ONNX Runtime runs the weights with float activations
(or 8-bit ones with `accuracy_level=4`); no runtime executes 2-4-bit activations.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .codes import LayerCodes, quantized_weights
from .onnx_pack import choose_block, onnx_bits, pack

logger = logging.getLogger("mec_quant_plugin")

MS_DOMAIN = "com.microsoft"
OPSET = 17


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as err:
        raise ImportError(
            "export_onnx needs the `onnx` package (and `onnxruntime` to run the file): "
            "pip install 'mec-quant-plugin[export-onnx]' (or pip install onnx onnxruntime)."
        ) from err
    return onnx


class ONNXExportError(ValueError):
    """A quantized layer cannot be written exactly (the message names it and says what is allowed)."""


@dataclass(frozen=True)
class ExportedLayer:
    """One quantized weight in the written graph."""

    name: str
    op: str  # "MatMulNBits", "GatherBlockQuantized" or "float" (kept as dequantized floats)
    bits: int | None
    block_size: int | None
    nbytes: int


@dataclass
class ONNXExport:
    """What `export_onnx` wrote.

    Attributes:
        path: the .onnx file.
        layers: every quantized weight found in the graph and how it was written.
        not_in_graph: quantized weights the exported output does not use (e.g. a pooler).
        input_names: the graph's inputs, in order.
    """

    path: Path
    layers: list[ExportedLayer] = field(default_factory=list)
    not_in_graph: list[str] = field(default_factory=list)
    input_names: list[str] = field(default_factory=list)

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    @property
    def kept_float(self) -> list[str]:
        """Quantized layers written as float weights (unexportable="float")."""
        return [layer.name for layer in self.layers if layer.op == "float"]

    def summary(self) -> str:
        """One line per (op, bits, block), plus the layers kept float or left out."""
        lines = [f"{self.path} ({self.file_size / 1e6:.2f} MB), inputs {self.input_names}"]
        kinds: dict[tuple, list[ExportedLayer]] = {}
        for layer in self.layers:
            kinds.setdefault((layer.op, layer.bits, layer.block_size), []).append(layer)
        for (op, bits, block), group in sorted(kinds.items(), key=str):
            what = op if op == "float" else f"{op} {bits}-bit, block {block}"
            lines.append(f"  {what}: {len(group)} weight(s), {sum(x.nbytes for x in group) / 1e6:.2f} MB")
        if self.kept_float:
            lines.append(f"  KEPT FLOAT (no exact block layout): {', '.join(self.kept_float)}")
        if self.not_in_graph:
            lines.append(f"  not used by the exported output: {', '.join(self.not_in_graph)}")
        return "\n".join(lines)


# ---- the float graph ----------------------------------------------------------------------------
class _Outputs0(nn.Module):
    """The model called with keyword inputs, returning its first output (logits / hidden states)."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, inputs)))
        return out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out


def float_copy(model: nn.Module, codes: dict[str, LayerCodes]) -> nn.Module:
    """A float copy of `model` whose quantized weights are `codes x step` (quantizers dropped,
    eager attention so that the traced graph holds for every length and padding)."""
    from ..modules.base import FakeQuantizedModule
    from ..quantized_embedding import GatheringEmbedding

    copied = copy.deepcopy(model).eval()
    for name, module in list(copied.named_modules()):
        if isinstance(module, FakeQuantizedModule):
            module = _replace(copied, name, module.to_float())
        if isinstance(module, GatheringEmbedding):
            module.__class__ = nn.Embedding
        key = f"{name}.weight" if name else "weight"
        if key in codes:
            module._parameters["weight"] = nn.Parameter(codes[key].dequantize(), requires_grad=False)
        elif isinstance(module._parameters.get("weight"), torch.Tensor) and hasattr(module.weight, "dequantize"):
            module._parameters["weight"] = nn.Parameter(module.weight.dequantize(), requires_grad=False)
    if hasattr(copied, "set_attn_implementation"):
        copied.set_attn_implementation("eager")
    return copied


def _replace(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
    return new


def _example_inputs(model: nn.Module) -> tuple[list[str], tuple[torch.Tensor, ...], dict[str, dict[int, str]]]:
    cfg = model.config
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        pixels = torch.zeros(1, cfg.num_channels, size, size)
        return ["pixel_values"], (pixels,), {"pixel_values": {0: "batch"}}
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in inspect.signature(model.forward).parameters and getattr(cfg, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    ids = torch.ones(2, 8, dtype=torch.long)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # padding traced, not assumed absent
    tensors = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    return names, tuple(tensors[n] for n in names), {n: {0: "batch", 1: "sequence"} for n in names}


def _float_graph(model: nn.Module, onnx: Any) -> tuple[Any, list[str]]:
    names, inputs, dynamic = _example_inputs(model)
    wrapper = _Outputs0(model, names)
    with torch.no_grad():
        rank = wrapper(*inputs).dim()
    out_axes = {0: "batch", 1: "sequence"} if names[0] != "pixel_values" and rank == 3 else {0: "batch"}
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # The tracer's notes on Python branches (mask padding, image size checks) hold for every
        # batch and length of an encoder (tests run other lengths with padding); the legacy-exporter
        # deprecation note is not the user's business.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*(legacy TorchScript|aten::index).*")
        target = os.path.join(tmp, "float.onnx")
        with torch.no_grad():
            torch.onnx.export(
                wrapper,
                inputs,
                target,
                input_names=names,
                output_names=["output"],
                dynamic_axes={**dynamic, "output": out_axes},
                opset_version=OPSET,
                dynamo=False,
            )
        return onnx.load(target), names


# ---- rewriting ----------------------------------------------------------------------------------
def _key(array: np.ndarray) -> tuple:
    return array.shape, hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def _attr(node: Any, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return a.f if a.type == a.FLOAT else a.i
    return default


def _quantized_uses(graph: Any, inits: dict[str, np.ndarray], by_value: dict[tuple, str]) -> Iterator[tuple]:
    """(node, layer name, "matmul" | "gather" | "gemm") for every node reading a quantized weight."""
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            name = by_value.get(_key(inits[node.input[1]].T))
            if name:
                yield node, name, "matmul"
        elif node.op_type == "Gemm" and node.input[1] in inits:
            plain = _attr(node, "alpha", 1.0) == 1.0 and _attr(node, "beta", 1.0) == 1.0
            if plain and not _attr(node, "transA", 0):
                b = inits[node.input[1]]
                name = by_value.get(_key(b if _attr(node, "transB", 0) else b.T))
                if name:
                    yield node, name, "gemm"
        elif node.op_type == "Gather" and node.input[0] in inits and _attr(node, "axis", 0) == 0:
            name = by_value.get(_key(inits[node.input[0]]))
            if name:
                yield node, name, "gather"


def _rewrite(
    model_proto: Any,
    codes: dict[str, LayerCodes],
    block_size: int | None,
    accuracy_level: int,
    unexportable: str,
) -> tuple[list[ExportedLayer], list[str]]:
    from onnx import helper, numpy_helper

    graph = model_proto.graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    by_value = {_key(lc.dequantize().numpy()): name for name, lc in codes.items()}
    uses = list(_quantized_uses(graph, inits, by_value))

    plans: dict[tuple[str, str], tuple[int, int]] = {}
    refused = []
    for _node, name, kind in uses:
        lc = codes[name]
        plan_key = (name, "gather" if kind == "gather" else "matmul")
        if plan_key in plans:
            continue
        bits = onnx_bits(lc)
        block, why = choose_block(lc, block_size, divide=kind == "gather")
        if not lc.source_exact:
            why = f"{name}: its steps do not fit fp16 (the converted model kept fp32 steps)"
        elif bits is None:
            why = f"{name}: codes {int(lc.codes.min())}..{int(lc.codes.max())} do not fit 8 bits"
        if why:
            refused.append(why)
        else:
            plans[plan_key] = (bits, block)
    if refused and unexportable == "error":
        raise ONNXExportError(
            "These layers cannot be written exactly as MatMulNBits / GatherBlockQuantized:\n  - "
            + "\n  - ".join(refused)
            + '\nUse a group size that is a power of two >= 16 (or per-channel steps), or pass unexportable="float" '
            "to keep them as float weights (the same numbers, not compressed)."
        )

    written: dict[tuple[str, str], tuple[str, str]] = {}  # plan key -> (packed name, scales name)
    layers: dict[tuple[str, str], ExportedLayer] = {}  # a tied weight: once as a gather, once as a matmul
    new_inits = []
    replaced: dict[int, list] = {}
    for node, name, kind in uses:
        plan_key = (name, "gather" if kind == "gather" else "matmul")
        if plan_key not in plans:
            layers.setdefault(plan_key, ExportedLayer(name, "float", None, None, codes[name].dequantize().numel() * 4))
            continue
        bits, block = plans[plan_key]
        lc = codes[name]
        rows, cols = lc.codes.shape
        if plan_key not in written:
            packed = pack(lc, bits, block)
            data = packed.gather_data(cols) if kind == "gather" else packed.packed
            base = f"{name}.{'gbq' if kind == 'gather' else 'nbits'}"
            new_inits += [
                numpy_helper.from_array(data, f"{base}.q"),
                numpy_helper.from_array(packed.scales, f"{base}.scales"),
            ]
            written[plan_key] = (f"{base}.q", f"{base}.scales")
            op = "GatherBlockQuantized" if kind == "gather" else "MatMulNBits"
            layers[plan_key] = ExportedLayer(name, op, bits, block, data.nbytes + packed.scales.nbytes)
        q_name, s_name = written[plan_key]
        out = node.output[0]
        if kind == "gather":
            new = [
                helper.make_node(
                    "GatherBlockQuantized",
                    [q_name, node.input[1], s_name],
                    [out],
                    name=f"{node.name}_gbq",
                    domain=MS_DOMAIN,
                    gather_axis=0,
                    quantize_axis=1,
                    block_size=block,
                    bits=bits,
                )
            ]
        else:
            mm_out = out if kind == "matmul" else f"{out}_nbits"
            new = [
                helper.make_node(
                    "MatMulNBits",
                    [node.input[0], q_name, s_name],
                    [mm_out],
                    name=f"{node.name}_nbits",
                    domain=MS_DOMAIN,
                    K=cols,
                    N=rows,
                    bits=bits,
                    block_size=block,
                    accuracy_level=accuracy_level,
                )
            ]
            if kind == "gemm" and len(node.input) > 2 and node.input[2]:
                new.append(helper.make_node("Add", [mm_out, node.input[2]], [out], name=f"{node.name}_bias"))
            elif kind == "gemm":
                new.append(helper.make_node("Identity", [mm_out], [out], name=f"{node.name}_out"))
        replaced[id(node)] = new

    nodes = []
    for node in graph.node:
        nodes.extend(replaced.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for node in graph.node for i in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    if replaced and not any(o.domain == MS_DOMAIN for o in model_proto.opset_import):
        model_proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return list(layers.values()), sorted(set(codes) - {name for _n, name, _k in uses})


def _load(model_or_folder: nn.Module | str | os.PathLike) -> nn.Module:
    if isinstance(model_or_folder, nn.Module):
        return model_or_folder
    from ..integrations import from_pretrained

    return from_pretrained(str(model_or_folder))


def export_onnx(
    model_or_folder: nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    *,
    block_size: int | None = None,
    accuracy_level: int = 0,
    unexportable: Literal["error", "float"] = "error",
    overwrite: bool = False,
) -> ONNXExport:
    """Write a converted encoder (BERT family, ViT; or a folder saved by the plugin) as an ONNX file
    whose quantized Linear layers are com.microsoft `MatMulNBits` nodes and quantized embedding
    tables `GatherBlockQuantized` nodes, holding our own codes and fp16 steps (exact).

    The graph's inputs are `input_ids`, `attention_mask` (and `token_type_ids` where the model has
    them) for text models, `pixel_values` for image models; its output `output` is the model's
    first output (logits, or the last hidden state of a bare encoder), batch and sequence dynamic.

    Running it (onnxruntime on CPU)::

        so = onnxruntime.SessionOptions()
        so.add_session_config_entry("mlas.use_lut_gemm", "1")  # 2-bit layers: the fast LUT kernel
        session = onnxruntime.InferenceSession("model.onnx", so, providers=["CPUExecutionProvider"])
        logits = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    With default session options (and `accuracy_level=0`) ONNX Runtime computes with float
    activations: the outputs equal the torch converted model up to float summation order (tests:
    <= 1e-5 relative; MiniLM-sized W4: 2.1e-6). 4- and 8-bit layers are fast that way. 2-bit layers
    are not: ONNX Runtime (1.32) runs them through a slow generic path (2.8x torch FP time on a
    MiniLM-sized encoder at 16 tokens) unless the session option `mlas.use_lut_gemm=1` is set (as
    above; onnxruntime >= 1.23), whose table-lookup kernel is fast but quantizes the activations,
    so the outputs move by about as much as with int8 activations (MiniLM-sized W2: 0.023 on the
    last hidden state; W4 with accuracy_level=4: 0.027). `benchmarks/deploy_onnx.py` measures both.

    Args:
        model_or_folder: a converted (or still fake-quantized) model, or a folder saved by the
            plugin (`save_pretrained` after `convert_model`).
        path: the .onnx file to write (atomically: a temporary file renamed at the end).
        block_size: force one block size (a power of two >= 16) for every quantized weight;
            default per layer the largest of 128/64/32/16 dividing its rows that holds one step.
        accuracy_level: MatMulNBits' attribute: 0 (default) computes with float activations (the
            torch model's numbers); 4 lets ONNX Runtime quantize activations to int8 (faster,
            no longer equal to the torch model).
        unexportable: "error" (default) refuses layers no block layout stores exactly; "float"
            writes them as float weights of the same dequantized numbers (listed in the result).
        overwrite: replace an existing file at `path`.

    Returns:
        An `ONNXExport` naming every quantized weight, its op, bits and block (`summary()`).

    Example:
        >>> export_onnx(convert_model(model), "model.onnx").summary()

    Raises:
        ImportError: the `onnx` package is missing (extra `export-onnx`).
        ONNXExportError: a quantized layer cannot be written exactly (unexportable="error").
        ValueError: bad arguments, or an existing `path` without overwrite=True.
    """
    onnx = _import_onnx()
    if unexportable not in ("error", "float"):
        raise ValueError(f"unexportable={unexportable!r}: allowed values are 'error' and 'float'.")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level={accuracy_level!r}: allowed values are 0, 1, 2, 3 and 4.")
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists: pass overwrite=True to replace it.")
    model = _load(model_or_folder)
    if getattr(model, "config", None) is None:
        raise ValueError("export_onnx needs a transformers model (with .config): BERT-family encoders or ViT.")
    if any(getattr(m, "activation_fake_quantizer", None) is not None for m in model.modules()):
        logger.warning(
            "export_onnx: activation quantizers are not exported; ONNX Runtime runs the quantized weights with "
            "float activations (or int8 ones with accuracy_level=4)."
        )
    codes = quantized_weights(model, skip_non_2d=True)  # convolutions stay float (dequantized, exact)
    proto, names = _float_graph(float_copy(model, codes), onnx)
    layers, unused = _rewrite(proto, codes, block_size, accuracy_level, unexportable)
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(proto, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    result = ONNXExport(path, layers, unused, names)
    if result.kept_float:
        logger.warning("export_onnx: kept as float weights (no exact block layout): %s", ", ".join(result.kept_float))
    return result
