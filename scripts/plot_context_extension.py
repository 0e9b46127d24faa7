"""Before/after figure of the context-extension demo: two depth x length heatmaps and accuracy by length.

    python scripts/plot_context_extension.py BEFORE/results.json AFTER/results.json --out summary.png
"""

from __future__ import annotations

import argparse
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", default="passkey")
    parser.add_argument("--trained", type=int, default=128, help="the short model's trained length (marked)")
    args = parser.parse_args()
    runs = [("trained at 128 tokens", json.load(open(args.before))["retrieval"][args.task]),
            ("after YaRN x8 + SP=2 fine-tune", json.load(open(args.after))["retrieval"][args.task])]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), dpi=100, gridspec_kw={"width_ratios": [1, 1, 1.1]})
    for ax, (title, r) in zip(axes[:2], runs, strict=True):
        im = ax.imshow(r["accuracy"], cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(r["accuracy"]):
            for j, a in enumerate(row):
                ax.text(j, i, f"{100 * a:.0f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(r["lengths"])), [str(n) for n in r["lengths"]])
        ax.set_yticks(range(len(r["depths"])), [f"{d:.0%}" for d in r["depths"]])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=axes[1], label="exact match", fraction=0.05)
    ax = axes[2]
    for (title, r), style in zip(runs, ("o--", "s-"), strict=True):
        ax.plot(r["lengths"], [100 * a for a in r["accuracy_by_length"]], style, label=title)
    ax.axvline(args.trained, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xticks(runs[0][1]["lengths"], [str(n) for n in runs[0][1]["lengths"]])
    ax.set_ylim(-3, 103)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("passkey exact match, mean over depths (%)")
    ax.legend(fontsize=8, loc="center left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out)
    sys.stdout.write(f"wrote {args.out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
