"""Tables (markdown, mean ± std over seeds), cost ratios and the accuracy-vs-bits plot from the
results of accuracy.py and language.py.

    python benchmarks/report.py benchmarks/results/ablation_w2a2.json
    python benchmarks/report.py benchmarks/results/bits_sweep.json --plot docs/accuracy_vs_bits.png
    python benchmarks/report.py benchmarks/results/classify.json --cost
    python benchmarks/report.py benchmarks/results/perplexity.json --recovered
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

Groups = dict[tuple[str, str], list[float]]


def _metric(results: dict) -> str:
    return results.get("protocol", {}).get("metric", "accuracy")


def _value(run: dict, metric: str) -> float:
    """Accuracies in percent; perplexities as they are."""
    value = run["accuracy"] if "accuracy" in run else run["metric"]
    return value if "perplexity" in metric else 100 * value


def load(paths: list[str]) -> tuple[list[dict], str]:
    runs, metrics = [], set()
    for path in paths:
        results = json.loads(Path(path).read_text())
        metrics.add(_metric(results))
        runs += results["runs"]
    if len(metrics) > 1:
        raise SystemExit(f"results with different metrics cannot share a table: {sorted(metrics)}")
    return runs, metrics.pop()


def summarize(paths: list[str], methods: list[str] | None = None) -> Groups:
    runs, metric = load(paths)
    groups: Groups = defaultdict(list)
    for run in runs:
        if methods is None or run["method"] in methods or run["bits"] == "FP":
            groups[(run["bits"], run["method"])].append(_value(run, metric))
    return groups


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(groups: Groups, metric: str = "accuracy", paired_with: str = "plain") -> str:
    name = "perplexity" if "perplexity" in metric else "test accuracy (%)"
    lines = [f"| bits | method | {name} | seeds | vs plain QAT |", "|---|---|---|---|---|"]
    for (bits, method), values in sorted(groups.items(), key=lambda kv: (kv[0][0] != "FP", kv[0][0], kv[0][1])):
        mean, std = _mean_std(values)
        base = groups.get((bits, paired_with))
        delta = f"{mean - statistics.mean(base):+.2f}" if base and method != paired_with else ""
        lines.append(f"| {bits} | `{method}` | {mean:.2f} ± {std:.2f} | {len(values)} | {delta} |")
    return "\n".join(lines)


def paired(paths: list[str], base: str) -> str:
    """Per-seed differences against `base` (same bits, same seed: same start and data order), so a
    gain that holds on every seed reads apart from one seed's luck."""
    runs, metric = load(paths)
    by_key = {(r["bits"], r["method"], r["seed"]): _value(r, metric) for r in runs}
    lines = [f"| bits | method | per seed vs `{base}` | mean | wins |", "|---|---|---|---|---|"]
    for bits, method in sorted({(b, m) for b, m, _ in by_key if m != base and b != "FP"}):
        deltas = [(seed, by_key[(bits, method, seed)] - by_key[(bits, base, seed)])
                  for b, m, seed in sorted(by_key) if (b, m) == (bits, method) and (bits, base, seed) in by_key]
        if deltas:
            cells = ", ".join(f"s{seed} {d:+.2f}" for seed, d in deltas)
            mean = statistics.mean(d for _, d in deltas)
            lines.append(f"| {bits} | `{method}` | {cells} | {mean:+.2f} | {sum(d > 0 for _, d in deltas)}/{len(deltas)} |")
    return "\n".join(lines)


def recovered(groups: Groups) -> str:
    """Share of the PTQ degradation each trained method recovers: (PTQ - QAT) / (PTQ - FP), against
    the FP model trained for the same steps (the fair reference)."""
    fp = groups.get(("FP", "fp"))
    if not fp:
        return "(no FP reference run: recovered share needs one)"
    fp_mean = statistics.mean(fp)
    lines = ["| bits | method | metric | PTQ | FP (same steps) | recovered share |", "|---|---|---|---|---|---|"]
    for (bits, method), values in sorted(groups.items()):
        ptq = groups.get((bits, "ptq"))
        if bits == "FP" or method == "ptq" or not ptq:
            continue
        q, p = statistics.mean(values), statistics.mean(ptq)
        share = (p - q) / (p - fp_mean) if p != fp_mean else float("nan")
        lines.append(f"| {bits} | `{method}` | {q:.2f} | {p:.2f} | {fp_mean:.2f} | {100 * share:.0f}% |")
    return "\n".join(lines)


def cost(paths: list[str]) -> str:
    """Median training-step time and peak GPU memory per method, and their ratios to FP."""
    runs, _ = load(paths)
    steps: dict[str, list[float]] = defaultdict(list)
    peaks: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        if run.get("step_seconds") is not None:
            steps[run["method"]].append(run["step_seconds"])
        if run.get("peak_gpu_bytes") is not None:
            peaks[run["method"]].append(run["peak_gpu_bytes"])
    if "fp" not in steps:
        return "(no FP run with step times)"
    fp_step = statistics.median(steps["fp"])
    fp_peak = statistics.median(peaks["fp"]) if peaks.get("fp") else None
    lines = ["| method | step time (ms, median over runs) | vs FP | peak GPU memory (GB) | vs FP |",
             "|---|---|---|---|---|"]
    for method in sorted(steps, key=lambda m: (m != "fp", m)):
        step = statistics.median(steps[method])
        peak = statistics.median(peaks[method]) if peaks.get(method) else None
        mem = f"{peak / 1e9:.2f} | {peak / fp_peak:.2f}" if peak and fp_peak else "- | -"
        lines.append(f"| `{method}` | {1e3 * step:.1f} | {step / fp_step:.2f} | {mem} |")
    return "\n".join(lines)


def plot(groups: Groups, out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits_order = sorted({b for b, _ in groups if b != "FP"}, key=lambda b: (-int(b[1]), -int(b.split("A")[1])))
    methods = sorted({m for b, m in groups if b != "FP"})
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in methods:
        xs, ys, es = [], [], []
        for i, bits in enumerate(bits_order):
            values = groups.get((bits, method))
            if values:
                mean, std = _mean_std(values)
                xs.append(i)
                ys.append(mean)
                es.append(std)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
    fp = groups.get(("FP", "fp"))
    if fp:
        ax.axhline(statistics.mean(fp), color="black", linestyle="--", label="FP fine-tuned (reference)")
    ax.set_xticks(range(len(bits_order)), bits_order)
    ax.set_xlabel("weight / activation bits")
    ax.set_ylabel("Fashion-MNIST test accuracy (%)")
    ax.set_title(title)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+")
    parser.add_argument("--plot", default=None, help="write the accuracy-vs-bits PNG here")
    parser.add_argument("--title", default="ResNet-16-32-64, same FP start and step budget, mean ± std over seeds")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (FP always kept)")
    parser.add_argument("--cost", action="store_true", help="also the step-time / peak-memory table")
    parser.add_argument("--recovered", action="store_true", help="also the recovered share of PTQ degradation")
    parser.add_argument("--paired", nargs="*", default=None, metavar="BASE",
                        help="also per-seed differences against these methods (default: plain)")
    args = parser.parse_args()
    groups = summarize(args.results, args.methods)
    print(table(groups, load(args.results)[1]))
    if args.recovered:
        print("\n" + recovered(groups))
    for base in ([] if args.paired is None else args.paired or ["plain"]):
        print("\n" + paired(args.results, base))
    if args.cost:
        print("\n" + cost(args.results))
    if args.plot:
        plot(groups, args.plot, args.title)
        print(f"\nplot written to {args.plot}")


if __name__ == "__main__":
    main()
