"""The torchao artifact's size and speed, FP vs converted side by side in one run (issue 12, Build 1).

Per model (a MiniLM-sized BERT: hidden 384, 12 layers, intermediate 1536, vocabulary 30522; a small
Llama shaped like SmolLM2-135M with 8 layers; both built from configs, random weights) and per
`--bits` (weight-only, per channel, edge layers at 8 bits, no training: size and speed do not
depend on the values):
- folder size of `save_pretrained` (model.safetensors + config) against the physical limit: every
  quantized weight at its bit-width, one fp16 scale per group, float tensors as stored;
- forward time, median over `--repeats` at 1 thread, of FP, the converted model (quantized
  embeddings gather rows before dequantizing, what `convert_model` and the plugin's
  `from_pretrained` give) and the converted model with plain `nn.Embedding` (torchao dequantizes the
  whole table per call: what plain transformers + torchao reload gives). Variants run round-robin
  inside each repeat, so a load change on the shared machine hits them alike.

    python benchmarks/artifact.py                       # W2 W4, 16 and 128 tokens, 20 repeats
    python benchmarks/artifact.py --models bert --bits W4 --repeats 5 --out /tmp/smoke.json

Writes benchmarks/results/artifact.json (command, commit, machine, one entry per model x bits).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from mec_quant_plugin import MECQuantConfig, convert_model, make_saveable, prepare_model

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import commit, machine, parse_bits  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "artifact.json"


def minilm() -> nn.Module:
    """all-MiniLM-L12-sized BERT encoder (33M parameters, 11.7M of them the word embedding)."""
    return BertModel(BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                                intermediate_size=1536, max_position_embeddings=512), add_pooling_layer=False)


def small_llama() -> nn.Module:
    """SmolLM2-135M's widths (576 hidden, 1536 MLP, 9 heads / 3 KV heads, 49152 tied vocabulary), 8 layers."""
    return LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                        num_hidden_layers=8, num_attention_heads=9, num_key_value_heads=3,
                                        tie_word_embeddings=True, max_position_embeddings=2048))


MODELS = {"bert": minilm, "llama": small_llama}


def folder_bytes(folder: Path) -> int:
    """Bytes of the weights and config a reload needs (the plugin's small JSON files and card left out)."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors" and "activations" not in f.name
               or f.name == "config.json")


def physical_limit(model: nn.Module) -> int:
    """Every distinct weight at its stored bit-width (torchao int tensors: `target_dtype` bits per
    code plus 2 bytes per scale; float tensors at their dtype), a tied weight once."""
    total, seen = 0, set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if hasattr(tensor, "qdata"):
            bits = 8 if tensor.target_dtype == torch.int8 else int(str(tensor.target_dtype).removeprefix("torch.int"))
            total += tensor.qdata.numel() * bits // 8 + tensor.scale.numel() * 2
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def saved_size(model: nn.Module, config: MECQuantConfig | None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        if config is not None:
            make_saveable(model, config)
        model.save_pretrained(tmp)
        return folder_bytes(Path(tmp))


def full_table(model: nn.Module) -> nn.Module:
    """A copy whose quantized embeddings are plain nn.Embedding again (torchao's whole-table path)."""
    plain = copy.deepcopy(model)
    for mod in plain.modules():
        if isinstance(mod, nn.Embedding) and type(mod) is not nn.Embedding:
            mod.__class__ = nn.Embedding
    return plain


@torch.no_grad()
def forward_times(variants: dict[str, nn.Module], ids: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per forward of each variant, run round-robin (rotating order) per repeat."""
    names = list(variants)
    for name in names:  # warm-up
        variants[name](input_ids=ids)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            variants[name](input_ids=ids)
            seconds[name].append(time.perf_counter() - start)
    return {n: statistics.median(s) for n, s in seconds.items()}


def run(model_name: str, bits: list[str], tokens: list[int], repeats: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    fp = MODELS[model_name]().eval()
    params = sum(p.numel() for p in fp.parameters())
    fp_size = saved_size(fp, None)
    entries = []
    for text in bits:
        wbits, _ = parse_bits(text)
        config = MECQuantConfig(weight_bits=wbits, act_bits=None)
        converted = convert_model(prepare_model(copy.deepcopy(fp), config).eval())
        gathering = sum(type(m).__name__ == "GatheringEmbedding" for m in converted.modules())
        variants = {"fp": fp, "converted": converted, "converted_full_table": full_table(converted)}
        timing = {}
        for n in tokens:
            ids = torch.randint(0, fp.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
            t = forward_times(variants, ids, repeats)
            timing[f"{n}_tokens"] = {
                "fp_ms": round(t["fp"] * 1e3, 2),
                "converted_ms": round(t["converted"] * 1e3, 2),
                "converted_full_table_ms": round(t["converted_full_table"] * 1e3, 2),
                "converted_over_fp": round(t["converted"] / t["fp"], 2),
                "full_table_over_fp": round(t["converted_full_table"] / t["fp"], 2),
            }
        size = saved_size(converted, config)
        limit = physical_limit(converted)
        entry = {
            "model": model_name, "params": params, "bits": text,
            "config": {k: config.to_dict()[k] for k in ("weight_bits", "act_bits", "weight_granularity", "edge_layers")},
            "gathering_embeddings": gathering,
            "fp_folder_mb": round(fp_size / 1e6, 2), "folder_mb": round(size / 1e6, 2),
            "physical_limit_mb": round(limit / 1e6, 2), "folder_over_limit": round(size / limit, 2),
            "timing": timing,
        }
        print(json.dumps(entry), flush=True)
        entries.append(entry)
    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--bits", nargs="+", default=["W2", "W4"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[16, 128])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()
    entries = [e for name in args.models for e in run(name, args.bits, args.tokens, args.repeats)]
    result = {
        "command": " ".join(["python", *sys.argv]),
        "commit": commit("benchmarks/artifact.py"),
        "machine": machine(),
        "seconds": round(time.time() - started, 1),
        "target": "MiniLM converted/FP forward time <= 1.7x (issue 12)",
        "entries": entries,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
