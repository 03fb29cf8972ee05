"""How long `prepare_model` takes on a small language model and a MiniLM-sized encoder, before and
after the batched weight-step search (issue 13 §3), measured side by side in one run.

Models (random weights: the time depends on the shapes, not the values), both W2A2 with the
default config (edge layers W8A8):
- a Llama with SmolLM2-135M's sizes (hidden 576, intermediate 1536, 30 layers, 9 heads, 3 kv
  heads, vocab 49152, tied embeddings), `LlamaForCausalLM`;
- a BERT with MiniLM-L12's sizes (hidden 384, 12 layers, 12 heads, intermediate 1536, vocab
  30522), `BertForSequenceClassification` (2 labels).

"before" is the former search (a Python loop over the 40 clipping ratios, kept here only, in
`_loop_init_scale`); "after" is the library's `mse_step_search`. For each model and thread count
the two run alternately on fresh copies of the same float model (`--repeats` pairs; the median
is reported), so the shared machine's load hits both alike. Each row also gives the time spent
in the weight-step initialization itself, and the 1-minute load average around it.

Run: `python benchmarks/prepare_time.py` (about 5-10 minutes on 2 busy cores); prints a table and
writes benchmarks/results/prepare_time.json. `--models llama` / `--threads 1` narrow it down.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

warnings.filterwarnings("ignore")

from mec_quant_plugin import MECQuantConfig, prepare_model  # noqa: E402
from mec_quant_plugin.quantizers import WeightFakeQuantizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "prepare_time.json"


def smollm2_135m_sized() -> nn.Module:
    """A randomly initialized Llama with SmolLM2-135M's shapes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=2048,
    ))


def minilm_sized() -> nn.Module:
    """A randomly initialized BERT with MiniLM-L12-H384's shapes, with a 2-class head."""
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536,
        vocab_size=30522, num_labels=2,
    ))


MODELS: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "llama": ("SmolLM2-135M-sized Llama", smollm2_135m_sized),
    "bert": ("MiniLM-sized BERT", minilm_sized),
}


@torch.no_grad()
def _loop_init_scale(self: WeightFakeQuantizer, w: torch.Tensor) -> torch.Tensor:
    """The weight-step search as it was before it was batched: one pass over the whole weight per
    clipping ratio (kept for this comparison only)."""
    absw = w.abs()
    if self.binary:
        return absw.mean(dim=-1, keepdim=True).clamp_min(1e-8)
    wmax = absw.amax(dim=-1, keepdim=True).clamp_min(1e-8)
    best_s = wmax / self.qmax
    best_err = torch.full_like(best_s, float("inf"))
    for r in torch.linspace(0.05, 1.0, 40).tolist():
        s = wmax * r / self.qmax
        err = ((torch.clamp(torch.round(w / s), self.qmin, self.qmax) * s - w) ** 2).sum(dim=-1, keepdim=True)
        better = err < best_err
        best_s = torch.where(better, s, best_s)
        best_err = torch.where(better, err, best_err)
    return best_s


@contextmanager
def _timed_init(variant: str, spent: list[float]) -> Iterator[None]:
    """Run `WeightFakeQuantizer._init_scale` as `variant` ('before' / 'after'), adding its time to `spent`."""
    library = WeightFakeQuantizer._init_scale
    inner = _loop_init_scale if variant == "before" else library

    def timed(self: WeightFakeQuantizer, w: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return inner(self, w)
        finally:
            spent.append(time.perf_counter() - start)

    WeightFakeQuantizer._init_scale = timed
    try:
        yield
    finally:
        WeightFakeQuantizer._init_scale = library


def _prepare_once(float_model: nn.Module, variant: str) -> tuple[float, float, dict[str, torch.Tensor]]:
    """(prepare seconds, init seconds, the step sizes) of one prepare of a fresh copy."""
    model = copy.deepcopy(float_model)
    spent: list[float] = []
    with _timed_init(variant, spent):
        start = time.perf_counter()
        prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2), progress=False)
        elapsed = time.perf_counter() - start
    steps = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("weight_fake_quantizer.scale")}
    return elapsed, sum(spent), steps


def measure(key: str, threads: int, repeats: int) -> dict:
    name, build = MODELS[key]
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    float_model = build().eval()
    times: dict[str, list[float]] = {"before": [], "after": []}
    inits: dict[str, list[float]] = {"before": [], "after": []}
    steps: dict[str, dict[str, torch.Tensor]] = {}
    load = [os.getloadavg()[0]]
    for _ in range(repeats):
        for variant in ("before", "after"):
            elapsed, init, steps[variant] = _prepare_once(float_model, variant)
            times[variant].append(elapsed)
            inits[variant].append(init)
            load.append(os.getloadavg()[0])
            print(f"  {name}, {threads} thread(s), {variant}: prepare {elapsed:.1f} s (weight-step init {init:.1f} s)",
                  flush=True)
    identical = steps["before"].keys() == steps["after"].keys() and all(
        torch.equal(steps["before"][n], steps["after"][n]) for n in steps["before"])
    before, after = statistics.median(times["before"]), statistics.median(times["after"])
    return {
        "model": name,
        "params_m": round(sum(p.numel() for p in float_model.parameters()) / 1e6, 1),
        "weight_quantizers": len(steps["after"]),
        "threads": threads,
        "repeats": repeats,
        "prepare_s_before": round(before, 2),
        "prepare_s_after": round(after, 2),
        "speedup": round(before / after, 2),
        "init_s_before": round(statistics.median(inits["before"]), 2),
        "init_s_after": round(statistics.median(inits["after"]), 2),
        "all_prepare_s": {k: [round(t, 2) for t in v] for k, v in times.items()},
        "step_sizes_identical": identical,
        "load_average_1min": [round(x, 2) for x in load],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["llama", "bert"])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1, help="before/after pairs per model and thread count")
    parser.add_argument("--runs", nargs="+", metavar="MODEL:THREADS",
                        help="only these pairs, e.g. llama:1 bert:1 bert:2 (default: every model x thread count)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    runs = [(k, t) for k in args.models for t in args.threads]
    if args.runs:
        runs = [(r.split(":")[0], int(r.split(":")[1])) for r in args.runs]
    rows = []
    for key, threads in runs:
        rows.append(measure(key, threads, args.repeats))
        _write(args.out, rows)  # after every row: a long run that is stopped keeps what it measured
    print(f"\n{'model':<28} {'threads':>7} {'before s':>9} {'after s':>8} {'speedup':>8} "
          f"{'init before':>12} {'init after':>11} {'identical':>9}")
    for r in rows:
        print(f"{r['model']:<28} {r['threads']:>7} {r['prepare_s_before']:>9.1f} {r['prepare_s_after']:>8.1f} "
              f"{r['speedup']:>7.1f}x {r['init_s_before']:>12.1f} {r['init_s_after']:>11.1f} "
              f"{str(r['step_sizes_identical']):>9}")
    print(f"wrote {args.out}")


def _write(out: Path, rows: list[dict]) -> None:
    """The results so far, with the commit and machine stamp, written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({
        "commit": commit("benchmarks/prepare_time.py"),
        "machine": machine(),
        "config": "MECQuantConfig(weight_bits=2, act_bits=2), default edge layers (W8A8)",
        "results": rows,
    }, indent=2) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
