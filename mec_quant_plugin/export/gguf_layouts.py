"""Per-architecture parts of a GGUF file: llama.cpp's metadata keys and tensor conventions.

Follows llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel`, `BertModel`); tensor names themselves
come from `gguf.get_tensor_name_map`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger("mec_quant_plugin")

POOLING = {"none": 0, "mean": 1, "cls": 2}  # gguf.PoolingType values


@dataclass(frozen=True)
class Layout:
    """How one model family is written.

    Attributes:
        arch: llama.cpp's architecture name (`general.architecture`).
        metadata: writes the hyper-parameters: (writer, model config, options) -> None.
        row_order: the output-row permutation llama.cpp expects for a tensor, or None.
        source_name: the parameter name to look up in gguf's tensor map, or None to leave the
            tensor out (task heads llama.cpp does not run).
    """

    arch: str
    metadata: Callable[[Any, Any, dict[str, Any]], None]
    row_order: Callable[[str, Any, int], torch.Tensor | None]
    source_name: Callable[[str], str | None]


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"export_gguf writes Llama models with the default rotary embedding, not {rope_type!r}.")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def _llama_metadata(w: Any, cfg: Any, options: dict[str, Any]) -> None:
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    if head_dim != cfg.hidden_size // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def _llama_row_order(name: str, cfg: Any, rows: int) -> torch.Tensor | None:
    """HF Llama rotates the two halves of each head (rotate_half); llama.cpp rotates adjacent
    pairs, so q/k rows are interleaved per head (convert_hf_to_gguf.py `LlamaModel.permute`)."""
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        heads = cfg.num_attention_heads
    elif name.endswith(("k_proj.weight", "k_proj.bias")):
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    else:
        return None
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(rows)


def _bert_metadata(w: Any, cfg: Any, options: dict[str, Any]) -> None:
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_layer_norm_eps(cfg.layer_norm_eps)
    w.add_causal_attention(False)
    pooling = options.get("pooling") or "mean"
    if pooling not in POOLING:
        raise ValueError(f"pooling={pooling!r}: allowed values are {sorted(POOLING)}.")
    w.add_uint32("bert.pooling_type", POOLING[pooling])


def _bert_source_name(name: str) -> str | None:
    """BertModel names as they are; `bert.` of task models stripped; pooler and heads left out
    (llama.cpp runs BERT as an embedding model, as its converter does)."""
    name = name.removeprefix("bert.")
    if name.startswith(("pooler.", "cls.", "classifier.")):
        return None
    return name


LAYOUTS: dict[str, Layout] = {
    "llama": Layout("llama", _llama_metadata, _llama_row_order, lambda name: name),
    "bert": Layout("bert", _bert_metadata, lambda name, cfg, rows: None, _bert_source_name),
}
