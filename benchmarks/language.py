"""Language benchmarks on real Jane Austen text: FP, PTQ, plain QAT, MEC-Quant and torchao QAT.

Two tasks, both through the same data path as `mec-quant train` (`mec_quant_plugin.cli.tasks.prepare_task`,
on the Austen data set built by `harness/austen.py` and saved to the work folder) and the same training
path as a user's (`transformers.Trainer` + `MECQuantCallback`):

* `classify`: pretrained all-MiniLM-L6-v2 fine-tuned to tell which of the six novels a 128-word
  passage comes from (chapters split between train and test, so test passages are unseen); metric:
  test accuracy.
* `perplexity`: pretrained SmolLM2-135M language modelling on held-out Austen chapters; metric:
  perplexity, and the share of the PTQ degradation that QAT recovers, (PTQ - QAT) / (PTQ - FP).

Protocol (benchmarks/README.md): one FP start (for `classify`, the pretrained model fine-tuned
`--fp-steps` steps, cached; for `perplexity`, the pretrained model itself); every method trains
`--qat-steps` steps from it with the same data order per seed; the FP model trained for the same
steps is the fair reference. Each finished run is appended to the results JSON at once
(resumable), with the command, commit, machine, seconds, median step time and peak GPU memory.

    python benchmarks/language.py classify --bits W2A2 --seeds 0 1 2 --methods fp ptq plain mec torchao
    python benchmarks/language.py perplexity --bits W4 W2 --seeds 0 --methods fp ptq plain mec

Methods: `fp`, `ptq` (round to nearest, MSE-searched steps, activations calibrated on one batch),
`plain` (our quantizers, mec_weight=0), `mec[:field=value,...]` (MECQuantConfig overrides) and
`torchao` (torchao's QATConfig on the same Linear layers: int-b per-channel symmetric weights,
int-b per-token asymmetric dynamic activations; torchao has no 1-bit QAT; the edge layers that
ours keep at 8 bits get torchao int8 weights and activations; evaluated fake-quantized, which is
what its convert step reproduces).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from mec_quant_plugin import MECQuantCallback, MECQuantConfig, calibrate_activations, convert_model, prepare_model
from mec_quant_plugin.cli.arguments import DataArguments
from mec_quant_plugin.cli.tasks import evaluate, prepare_task
from mec_quant_plugin.demo.fashion_mnist import model_bytes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, commit, machine, parse_bits, parse_method, torchao_prepare  # noqa: E402
from harness.austen import save_austen  # noqa: E402
from harness.models import resolve_model_path  # noqa: E402

TASKS: dict[str, dict[str, Any]] = {
    "classify": {"task": "text-classification", "model": "sentence-transformers/all-MiniLM-L6-v2",
                 "dataset": "austen", "metric": "eval_accuracy", "fp_steps": 420, "qat_steps": 280,
                 "lr": 1e-4, "batch_size": 32, "length": 256},
    "perplexity": {"task": "causal-lm", "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                   "dataset": "austen-lm", "metric": "eval_perplexity", "fp_steps": 0, "qat_steps": 100,
                   "lr": 2e-5, "batch_size": 4, "length": 128},
}


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (the device synchronized), to report the median."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._last = 0.0

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._last = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(self._now() - self._last)

    def median(self) -> float:
        steady = self.times[3:] or self.times  # the first steps include allocator / init work
        return statistics.median(steady) if steady else float("nan")


def training_args(output_dir: str, *, steps: int, lr: float, seed: int, batch_size: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, logging_steps=max(steps // 5, 1),
        save_strategy="no", report_to=[], seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True,
    )


def fit(model: nn.Module, prepared, output_dir: str, *, steps: int, lr: float, seed: int, batch_size: int,
        callbacks: list[TrainerCallback] | None = None) -> tuple[nn.Module, dict[str, float]]:
    """Train with the Trainer; returns the (converted, if quantized) model and its cost figures."""
    timer = StepTimer()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        trainer = Trainer(model=model, args=training_args(output_dir, steps=steps, lr=lr, seed=seed,
                                                          batch_size=batch_size),
                          train_dataset=prepared.train, data_collator=prepared.collator,
                          callbacks=[*(callbacks or []), timer])
    start = time.perf_counter()
    trainer.train()
    cost = {"train_seconds": round(time.perf_counter() - start, 2), "step_seconds": round(timer.median(), 5)}
    if torch.cuda.is_available():
        cost["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    return trainer.model, cost


def first_batch(prepared, n: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(prepared.train), generator=generator)[:n].tolist()
    return prepared.collator([prepared.train[i] for i in idx])


def run_one(method: str, overrides: dict[str, Any], bits: tuple[int, int | None], seed: int, fp: nn.Module,
            prepared, work: Path, spec: dict[str, Any], steps: int, lr: float) -> dict[str, Any]:
    wbits, abits = bits
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    cost: dict[str, float] = {}
    base = None if method == "fp" else MECQuantConfig(weight_bits=wbits, act_bits=abits,
                                                       weight_granularity="per_channel")
    common = dict(steps=steps, lr=lr, seed=seed, batch_size=spec["batch_size"])
    if method == "fp":
        model, cost = fit(copy.deepcopy(fp), prepared, str(work / "fp-ft"), **common)
    elif method == "ptq":
        model = prepare_model(copy.deepcopy(fp).to(device), base)
        batch = {k: v.to(device) for k, v in first_batch(prepared, spec["batch_size"], seed).items()}
        calibrate_activations(model, **batch)
        model = convert_model(model)
    elif method == "torchao":
        model, cost = fit(torchao_prepare(copy.deepcopy(fp), wbits, abits), prepared, str(work / "torchao"), **common)
    else:
        cfg = base.replace(mec_weight=0.0) if method == "plain" else base.replace(**overrides)
        model, cost = fit(copy.deepcopy(fp), prepared, str(work / "qat"), callbacks=[MECQuantCallback(cfg)], **common)
    model.to(device)
    metrics = evaluate(model, prepared.eval, prepared.collator, prepared.task, batch_size=16)
    return {"metric": metrics[spec["metric"]], "eval_loss": metrics["eval_loss"], "bytes": model_bytes(model),
            "seconds": round(time.perf_counter() - start, 1), **cost}


def fp_start(spec: dict[str, Any], args, prepared, work: Path) -> nn.Module:
    """The converged FP start: for classification, the pretrained model fine-tuned (cached)."""
    if args.fp_steps <= 0:
        return prepared.model
    folder = work / "fp"
    cls = type(prepared.model)
    if (folder / "config.json").exists():
        return cls.from_pretrained(str(folder))
    model, _ = fit(prepared.model, prepared, str(folder / "run"), steps=args.fp_steps, lr=args.lr, seed=0,
                   batch_size=spec["batch_size"])
    model.save_pretrained(str(folder))
    return model.cpu()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("--model", help="Hub id or local folder (default: the task's model)")
    parser.add_argument("--bits", nargs="+", default=["W2A2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["fp", "ptq", "plain", "mec"])
    parser.add_argument("--fp-steps", type=int, help="FP fine-tuning steps before quantizing (the FP start)")
    parser.add_argument("--qat-steps", type=int, help="steps of every method after the FP start")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--max-train-samples", type=int, help="cap on training examples / blocks (smoke tests)")
    parser.add_argument("--max-eval-samples", type=int, help="cap on evaluation examples / blocks")
    parser.add_argument("--out", help="results JSON (default: benchmarks/results/<task>.json)")
    parser.add_argument("--work-dir", help="cache of the FP start and scratch space")
    args = parser.parse_args(argv)
    spec = TASKS[args.task]
    args.fp_steps = spec["fp_steps"] if args.fp_steps is None else args.fp_steps
    steps = spec["qat_steps"] if args.qat_steps is None else args.qat_steps
    args.lr = spec["lr"] if args.lr is None else args.lr
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    methods = [(m, *parse_method(m)) for m in args.methods]
    model_name = args.model or spec["model"]
    model_path = resolve_model_path(model_name)  # the offline copy when one is installed (harness/models.py)
    work = Path(args.work_dir or f"outputs/bench-{args.task}")
    dataset_dir = save_austen(spec["dataset"], work / spec["dataset"])
    data = DataArguments(model=model_path, dataset=dataset_dir, task=spec["task"], max_length=spec["length"],
                         block_size=spec["length"], max_train_samples=args.max_train_samples,
                         max_eval_samples=args.max_eval_samples)
    prepared = prepare_task(spec["task"], model_path, data, seed=0)
    fp = fp_start(spec, args, prepared, work)
    out = Path(args.out or ROOT / "results" / f"{args.task}.json")
    results = json.loads(out.read_text()) if out.exists() else {"runs": []}  # appended to, resumable
    results.update(protocol={"model": model_name, "dataset": spec["dataset"], "fp_steps": args.fp_steps,
                             "qat_steps": steps, "lr": args.lr, "batch_size": spec["batch_size"],
                             "length": spec["length"], "train_examples": len(prepared.train),
                             "eval_examples": len(prepared.eval), "metric": spec["metric"],
                             "weight_granularity": "per_channel", "edge_layers": "8bit"})
    print(f"{args.task}: {len(prepared.train)} train / {len(prepared.eval)} eval examples", flush=True)
    if "fp_start_metric" not in results:  # the FP start itself, before any of the methods' steps
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        results["fp_start_metric"] = evaluate(copy.deepcopy(fp).to(device), prepared.eval, prepared.collator,
                                              prepared.task, batch_size=16)[spec["metric"]]
        print(f"FP start: {spec['metric']} {results['fp_start_metric']:.4f}", flush=True)
    for seed in args.seeds:  # seed-major: an interrupted run still leaves complete tables for the first seeds
        for bits in args.bits:
            for label, method, overrides in methods:
                if (method == "ptq" and seed != args.seeds[0]) or (method == "fp" and bits != args.bits[0]):
                    continue  # PTQ is deterministic; the FP reference does not depend on the bits
                label_bits = "FP" if method == "fp" else bits
                if any((r["bits"], r["method"], r["seed"]) == (label_bits, label, seed) for r in results["runs"]):
                    print(f"{label_bits:>5} {label:<36} seed {seed}: already in {out.name}, skipped", flush=True)
                    continue
                try:
                    res = run_one(method, overrides, (32, 32) if method == "fp" else parse_bits(bits), seed, fp,
                                  prepared, work, spec, steps, args.lr)
                except Exception:  # one failing method must not cost the others' results
                    traceback.print_exc()
                    print(f"{label_bits:>5} {label:<36} seed {seed}: FAILED (not recorded; rerun resumes)", flush=True)
                    continue
                entry = {"bits": label_bits, "method": label, "seed": seed, **res,
                         "command": " ".join(["language.py", *(argv if argv is not None else sys.argv[1:])]),
                         "commit": commit("benchmarks/language.py"), "machine": machine()}
                results["runs"].append(entry)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=2))
                value = res["metric"] * (100 if spec["metric"] == "eval_accuracy" else 1)
                print(f"{label_bits:>5} {label:<36} seed {seed}: {spec['metric']} {value:.2f} "
                      f"({res['seconds']:.0f} s, step {res.get('step_seconds', math.nan) * 1e3:.0f} ms)", flush=True)


if __name__ == "__main__":
    main()
