"""`export_gguf`: a converted model as one GGUF file that llama.cpp runs as it is.

Every quantized weight is written from OUR codes and learned steps (rounded to fp16) in a GGUF
block type that stores them exactly (`gguf_blocks.py`), chosen per layer: by default the fast
one on x86 CPUs (Q4_0 for codes of up to 4 bits, Q8_0 above), with `prefer="size"` the smallest
exact one (Q1_0 binary, TQ1_0 ternary, TQ2_0 2-bit, Q3_K 3-bit where rows are multiples of 256;
Q4_0 otherwise). Every written block is decoded again with gguf's own decoder and compared with
`codes x fp16(step)`: a difference is an error, never a silent approximation. A layer no type
stores exactly (groups smaller than a block, steps that differ inside a 256-block, steps that
underflow fp16) is refused by name unless `requantize=True`, which writes it as Q8_0 of the
trained weights and says so (returned `GGUFExport.requantized`, a warning, and the file's
`mec_quant.requantized` key). Activation quantizers are not exported: llama.cpp runs the weights
with its own 8-bit / float activations.

Architectures (`gguf_layouts.py`): Llama (causal LM; SmolLM2) and BERT encoders (run by llama.cpp
as embedding models: pooler and task heads left out, with a warning). Tensor names, the q/k row
order of the rotary embedding, metadata and tokenizer follow llama.cpp's `convert_hf_to_gguf.py`.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import nn

from .codes import LayerCodes, quantized_weights
from .gguf_blocks import BLOCK_TYPES, SIZE_ORDER, SPEED_ORDER, BlockType, dequantize_q1_0, dequantize_q2_0
from .gguf_layouts import LAYOUTS, Layout
from .gguf_vocab import add_tokenizer

logger = logging.getLogger("mec_quant_plugin")

EXTRA = "export"


def _import_gguf() -> Any:
    try:
        import gguf
    except ImportError as err:
        raise ImportError(
            "export_gguf needs the `gguf` package: pip install 'mec-quant-plugin[export]' (or pip install gguf)."
        ) from err
    return gguf


class GGUFExportError(ValueError):
    """A layer cannot be written exactly (the message names it and says what is allowed)."""


@dataclass(frozen=True)
class ExportedTensor:
    """One tensor of the written file."""

    name: str
    gguf_name: str
    gguf_type: str
    shape: tuple[int, ...]
    nbytes: int
    exact: bool


@dataclass
class GGUFExport:
    """What `export_gguf` wrote.

    Attributes:
        path: the GGUF file.
        tensors: every tensor, in file order.
        requantized: names of quantized layers NOT written from their own codes (requantize=True).
    """

    path: Path
    tensors: list[ExportedTensor] = field(default_factory=list)
    requantized: list[str] = field(default_factory=list)

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    def type_counts(self) -> dict[str, int]:
        """GGUF type -> number of tensors written in it."""
        return dict(Counter(t.gguf_type for t in self.tensors))

    def summary(self) -> str:
        """One line per type, plus the re-quantized layers if any."""
        lines = [f"{self.path} ({self.file_size / 1e6:.1f} MB)"]
        for gtype, count in sorted(self.type_counts().items()):
            size = sum(t.nbytes for t in self.tensors if t.gguf_type == gtype)
            lines.append(f"  {gtype}: {count} tensor(s), {size / 1e6:.2f} MB")
        if self.requantized:
            lines.append(f"  RE-QUANTIZED (not the trained codes): {', '.join(self.requantized)}")
        return "\n".join(lines)


# ---- choosing a type --------------------------------------------------------------------------
def _steps_uniform_per_block(lc: LayerCodes, block: int) -> bool:
    group = lc.group_size
    if group % block == 0:
        return True
    if block % group:
        return False
    step = lc.step.reshape(lc.step.shape[0], -1, block // group)
    return bool((step == step[..., :1]).all())


def fit(lc: LayerCodes, btype: BlockType) -> tuple[int | None, str]:
    """(sign, "") when `btype` stores `lc` exactly (sign -1: codes and steps mirrored), else (None, why)."""
    rows, cols = lc.codes.shape
    if cols % btype.block:
        return None, f"{btype.name} needs rows of a multiple of {btype.block} weights, this one has {cols}"
    if not _steps_uniform_per_block(lc, btype.block):
        return None, (
            f"{btype.name} has one step per {btype.block} weights, the layer has groups of {lc.group_size} "
            "with different steps"
        )
    kmin, kmax = int(lc.codes.min()), int(lc.codes.max())
    sign = btype.mirror_for(kmin, kmax, bool((lc.codes == 0).any()))
    if sign is None:
        return None, f"{btype.name} holds codes in [{btype.lo}, {btype.hi}], the layer has [{kmin}, {kmax}]"
    return sign, ""


def choose_type(lc: LayerCodes, order: tuple[str, ...]) -> tuple[BlockType, int] | list[str]:
    """The first type of `order` that stores `lc` exactly, with its sign; else the reasons."""
    reasons = []
    for name in order:
        sign, why = fit(lc, BLOCK_TYPES[name])
        if sign is not None:
            return BLOCK_TYPES[name], sign
        reasons.append(why)
    return reasons


def encode_exact(lc: LayerCodes, btype: BlockType, sign: int) -> np.ndarray:
    """`lc` as `btype` blocks, uint8 (rows, bytes per row)."""
    rows, cols = lc.codes.shape
    nblocks = cols // btype.block
    k = (sign * lc.codes).numpy().astype(np.int32).reshape(rows * nblocks, btype.block)
    step = lc.step.repeat_interleave(lc.group_size, dim=1)[:, :: btype.block]  # one per block
    d = (sign * step).numpy().astype(np.float16).reshape(-1)
    return btype.encode(k, d).reshape(rows, nblocks * btype.bytes_per_block)


def decode(gguf: Any, data: np.ndarray, type_name: str) -> np.ndarray:
    """Decode blocks with gguf's own decoder (Q1_0: the ggml reference loop)."""
    own = {"Q1_0": dequantize_q1_0, "Q2_0": dequantize_q2_0}.get(type_name)
    if own is not None:
        return own(data.reshape(-1, BLOCK_TYPES[type_name].bytes_per_block)).reshape(data.shape[0], -1)
    return gguf.quants.dequantize(data, gguf.GGMLQuantizationType[type_name])


# ---- the export ---------------------------------------------------------------------------------
def _load(model_or_folder: nn.Module | str | os.PathLike, tokenizer: Any) -> tuple[nn.Module, Any]:
    if isinstance(model_or_folder, nn.Module):
        model, folder = model_or_folder, None
    else:
        from ..integrations import from_pretrained

        folder = Path(model_or_folder)
        model = from_pretrained(str(folder))
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        source = tokenizer if tokenizer is not None else folder
        if source is None:
            raise ValueError(
                "export_gguf(model, ...) needs tokenizer= (a fast tokenizer or its folder): "
                "llama.cpp reads the vocabulary from the GGUF file."
            )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source))
    return model, tokenizer


def _forced_type(name: str, types: Mapping[str, str] | None) -> str | None:
    for pattern, type_name in (types or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            if type_name not in BLOCK_TYPES:
                raise ValueError(f"types[{pattern!r}] = {type_name!r}: allowed types are {sorted(BLOCK_TYPES)}.")
            if type_name not in _import_gguf().GGMLQuantizationType.__members__:
                raise ValueError(f"types[{pattern!r}] = {type_name!r}: the installed gguf package cannot write it.")
            return type_name
    return None


def _quantized_tensor(
    gguf: Any, lc: LayerCodes, order: tuple[str, ...], requantize: bool
) -> tuple[np.ndarray, str, bool, str]:
    """(bytes or float array, type name, exact, why-not) for one quantized weight."""
    choice = choose_type(lc, order) if lc.source_exact else ["its steps underflow or overflow fp16"]
    if isinstance(choice, tuple):
        btype, sign = choice
        data = encode_exact(lc, btype, sign)
        decoded = decode(gguf, data, btype.name)
        expected = lc.dequantize().numpy()
        if not np.array_equal(decoded, expected):
            raise AssertionError(
                f"{lc.name}: {btype.name} blocks decode with max error "
                f"{np.abs(decoded - expected).max()} (an encoder bug: please report it)."
            )
        return data, btype.name, True, ""
    why = "; ".join(dict.fromkeys(choice))
    if not requantize:
        raise GGUFExportError(
            f"{lc.name} ({lc.bits}-bit, group size {lc.group_size}, shape {tuple(lc.codes.shape)}) cannot be written "
            f"exactly in any of {list(order)}: {why}. Train with per-channel steps or a group size that is a multiple "
            "of 32 (256 for the 2-bit K / ternary types), or pass requantize=True to write it as Q8_0 of the "
            "trained weights (not exact)."
        )
    weight = lc.dequantize().numpy()
    if weight.shape[1] % 32 == 0:
        return gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0), "Q8_0", False, why
    return weight.astype(np.float16), "F16", False, why


def _folder_pooling(folder: Path) -> str | None:
    """The pooling of a sentence-transformers folder (modules.json), as llama.cpp's converter reads it."""
    import json

    modules = folder / "modules.json"
    if not modules.is_file():
        return None
    for module in json.loads(modules.read_text()):
        if module.get("type", "").endswith("Pooling"):
            conf = json.loads((folder / module["path"] / "config.json").read_text())
            if conf.get("pooling_mode_mean_tokens"):
                return "mean"
            if conf.get("pooling_mode_cls_token"):
                return "cls"
    return None


def _add_tensors(
    gguf: Any,
    writer: Any,
    model: nn.Module,
    layout: Layout,
    result: GGUFExport,
    order: tuple[str, ...],
    types: Mapping[str, str] | None,
    requantize: bool,
    float_type: str,
) -> None:
    """Every parameter of `model` llama.cpp uses, quantized ones from their codes; fills `result`."""
    cfg = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[layout.arch.upper()], cfg.num_hidden_layers)
    codes = quantized_weights(model)
    left_out = []
    for name, param in model.named_parameters():
        if "fake_quantizer" in name:
            continue
        source = layout.source_name(name)
        if source is None:
            left_out.append(name)
            continue
        gguf_name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"export_gguf: no llama.cpp tensor for {name!r} ({layout.arch}).")
        if name in codes:
            lc = codes[name]
            rows = layout.row_order(name, cfg, lc.codes.shape[0])
            lc = lc if rows is None else lc.permute_rows(rows)
            forced = _forced_type(name, types)
            data, type_name, exact, why = _quantized_tensor(gguf, lc, (forced,) if forced else order, requantize)
            if not exact:
                result.requantized.append(name)
                logger.warning("export_gguf: %s RE-QUANTIZED as %s (not the trained codes): %s", name, type_name, why)
            shape = tuple(lc.codes.shape)
        else:
            tensor = param.detach().float()
            rows = layout.row_order(name, cfg, tensor.shape[0])
            tensor = tensor if rows is None else tensor[rows]
            keep32 = tensor.dim() == 1 or float_type == "f32"
            data = tensor.numpy().astype(np.float32 if keep32 else np.float16)
            type_name, exact, shape = ("F32" if keep32 else "F16"), True, tuple(tensor.shape)
        raw = gguf.GGMLQuantizationType[type_name]
        writer.add_tensor(gguf_name, data, raw_dtype=raw if data.dtype == np.uint8 else None)
        result.tensors.append(ExportedTensor(name, gguf_name, type_name, shape, data.nbytes, exact))
    if left_out:
        logger.warning("export_gguf: left out (llama.cpp runs %s without them): %s", layout.arch, ", ".join(left_out))
    quant_types = Counter(t.gguf_type for t in result.tensors if t.name in codes)
    if quant_types:
        file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{quant_types.most_common(1)[0][0]}", None)
        if file_type is not None:
            writer.add_file_type(int(file_type))
    writer.add_string("mec_quant.export", "exact" if not result.requantized else "requantized layers")
    if result.requantized:
        writer.add_array("mec_quant.requantized", result.requantized)


def export_gguf(
    model_or_folder: nn.Module | str | os.PathLike,
    path: str | os.PathLike,
    *,
    tokenizer: Any = None,
    prefer: Literal["speed", "size"] = "speed",
    types: Mapping[str, str] | None = None,
    requantize: bool = False,
    float_type: Literal["f16", "f32"] = "f16",
    pooling: Literal["mean", "cls", "none"] | None = None,
    overwrite: bool = False,
) -> GGUFExport:
    """Write a converted model (or a folder saved by the plugin) as a GGUF file for llama.cpp.

    Args:
        model_or_folder: a converted (or still fake-quantized) model, or a folder saved by the
            plugin (`save_pretrained` after `convert_model`).
        path: the .gguf file to write (atomically: a temporary file renamed at the end).
        tokenizer: a fast tokenizer or its folder; default the folder's own.
        prefer: "speed" (default: Q4_0 for codes of up to 4 bits, Q8_0 above) or "size" (the
            smallest exact type per layer).
        types: force a type per layer: {fnmatch pattern of the weight name: GGUF type name},
            e.g. {"*.mlp.*": "Q2_K"}; the first matching pattern wins; still refused if not exact.
        requantize: write layers no type stores exactly as Q8_0 of the trained weights instead of
            refusing them (listed in the result, a warning and the file's metadata).
        float_type: how float 2-D weights are stored ("f16" or "f32"); 1-D weights are always F32.
        pooling: BERT only: how llama.cpp pools token embeddings ("mean", "cls", "none");
            default the folder's sentence-transformers pooling, else "mean".
        overwrite: replace an existing file at `path`.

    Returns:
        A `GGUFExport` naming every tensor, its type and size (`summary()` for a text table).

    Example:
        >>> export_gguf(convert_model(model), "model.gguf", tokenizer=tokenizer, prefer="size").summary()

    Raises:
        ImportError: the `gguf` package is missing (extra `export`).
        GGUFExportError: a quantized layer cannot be written exactly (and requantize is False).
        ValueError: an unsupported architecture or tokenizer, an unknown type, or an existing `path`
            without overwrite=True.
    """
    gguf = _import_gguf()
    if prefer not in ("speed", "size"):
        raise ValueError(f"prefer={prefer!r}: allowed values are 'speed' and 'size'.")
    if float_type not in ("f16", "f32"):
        raise ValueError(f"float_type={float_type!r}: allowed values are 'f16' and 'f32'.")
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists: pass overwrite=True to replace it.")
    model, tokenizer = _load(model_or_folder, tokenizer)
    cfg = model.config
    layout = LAYOUTS.get(getattr(cfg, "model_type", None))
    if layout is None:
        raise ValueError(
            f"export_gguf supports model types {sorted(LAYOUTS)}, got {getattr(cfg, 'model_type', None)!r}."
        )
    if pooling is None and not isinstance(model_or_folder, nn.Module):
        pooling = _folder_pooling(Path(model_or_folder))
    if any(getattr(m, "activation_fake_quantizer", None) is not None for m in model.modules()):
        logger.warning(
            "export_gguf: activation quantizers are not exported; llama.cpp runs the weights with its "
            "own 8-bit / float activations."
        )
    result = GGUFExport(path=path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, layout.arch)
    try:
        writer.add_name(Path(str(getattr(cfg, "_name_or_path", "") or "model")).name)
        layout.metadata(writer, cfg, {"pooling": pooling})
        known = gguf.GGMLQuantizationType.__members__  # Q2_0 only in gguf newer than PyPI's 0.19.0
        order = tuple(n for n in (SPEED_ORDER if prefer == "speed" else SIZE_ORDER) if n in known)
        _add_tensors(gguf, writer, model, layout, result, order, types, requantize, float_type)
        add_tokenizer(writer, tokenizer, cfg.vocab_size, cfg)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it private; a new file is not
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    logger.info("export_gguf: %s", result.summary())
    return result
