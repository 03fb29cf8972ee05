"""Tables (markdown, mean +- std over seeds) and the accuracy-vs-bits plot from accuracy.py results.

    python benchmarks/report.py benchmarks/results/ablation_w2a2.json
    python benchmarks/report.py benchmarks/results/bits_sweep.json --plot docs/accuracy_vs_bits.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def summarize(paths: list[str], methods: list[str] | None = None) -> dict[tuple[str, str], list[float]]:
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for path in paths:
        for run in json.loads(Path(path).read_text())["runs"]:
            if methods is None or run["method"] in methods or run["bits"] == "FP":
                groups[(run["bits"], run["method"])].append(100 * run["accuracy"])
    return groups


def table(groups: dict[tuple[str, str], list[float]], paired_with: str = "plain") -> str:
    lines = ["| bits | method | test accuracy (%) | seeds | vs plain QAT |", "|---|---|---|---|---|"]
    for (bits, method), accs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "FP", kv[0][0], kv[0][1])):
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        base = groups.get((bits, paired_with))
        delta = f"{mean - statistics.mean(base):+.2f}" if base and method != paired_with else ""
        lines.append(f"| {bits} | `{method}` | {mean:.2f} ± {std:.2f} | {len(accs)} | {delta} |")
    return "\n".join(lines)


def plot(groups: dict[tuple[str, str], list[float]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits_order = sorted({b for b, _ in groups if b != "FP"}, key=lambda b: (-int(b[1]), -int(b.split("A")[1])))
    methods = sorted({m for b, m in groups if b != "FP"})
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for method in methods:
        xs, ys, es = [], [], []
        for i, bits in enumerate(bits_order):
            accs = groups.get((bits, method))
            if accs:
                xs.append(i)
                ys.append(statistics.mean(accs))
                es.append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=method)
    fp = groups.get(("FP", "fp"))
    if fp:
        ax.axhline(statistics.mean(fp), color="black", linestyle="--", label="FP fine-tuned (reference)")
    ax.set_xticks(range(len(bits_order)), bits_order)
    ax.set_xlabel("weight / activation bits")
    ax.set_ylabel("Fashion-MNIST test accuracy (%)")
    ax.set_title("ResNet-16-32-64, same FP start and step budget, mean ± std over seeds")
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+")
    parser.add_argument("--plot", default=None, help="write the accuracy-vs-bits PNG here")
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (FP always kept)")
    args = parser.parse_args()
    groups = summarize(args.results, args.methods)
    print(table(groups))
    if args.plot:
        plot(groups, args.plot)
        print(f"\nplot written to {args.plot}")


if __name__ == "__main__":
    main()
