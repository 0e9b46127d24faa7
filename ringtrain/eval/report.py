"""Evaluation output: a terminal table, results.json, and depth x length heatmaps (matplotlib, optional)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ringtrain.log import get_logger

logger = get_logger(__name__)


def _pct(x: float) -> str:
    return "  n/a" if math.isnan(x) else f"{100 * x:4.0f}%"


def format_table(results: dict[str, Any]) -> str:
    """Accuracy per task as a depth x length grid, then perplexity by context length (plain text)."""
    lines: list[str] = []
    for task, r in results["retrieval"].items():
        head = "depth \\ len " + "".join(f"{n:>8d}" for n in r["lengths"])
        lines += [f"{task} exact match ({results.get('mode', '')}, {results.get('samples_per_cell', '?')} "
                  "documents per cell)", head]
        for depth, row in zip(r["depths"], r["accuracy"], strict=True):
            lines.append(f"{depth:>11.2f} " + "".join(f"{_pct(a):>8s}" for a in row))
        lines.append(f"{'mean':>11s} " + "".join(f"{_pct(a):>8s}" for a in r["accuracy_by_length"]))
        lines.append("")
    if results["perplexity"]:
        lines.append("perplexity by context length (sliding window)")
        lines.append(f"{'length':>8s} {'stride':>7s} {'tokens':>8s} {'ppl':>9s}")
        for p in results["perplexity"]:
            lines.append(f"{p['length']:>8d} {p['stride']:>7d} {p['tokens']:>8d} {p['ppl']:>9.3f}")
    return "\n".join(lines).rstrip()


def write_heatmap(result: dict[str, Any], path: str | Path, title: str) -> Path | None:
    """A depth (rows) x length (columns) accuracy heatmap PNG, the usual needle-in-a-haystack plot.

    Returns the path, or None when matplotlib is missing (it is a dev extra, not a runtime dependency).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on training nodes
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no heatmap written (pip install 'ringtrain[dev]')")
        return None
    lengths, depths, acc = result["lengths"], result["depths"], result["accuracy"]
    fig, ax = plt.subplots(figsize=(1.1 * len(lengths) + 2.2, 0.5 * len(depths) + 1.6), dpi=100)
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            if not math.isnan(acc[i][j]):
                ax.text(j, i, f"{100 * acc[i][j]:.0f}", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="exact match", fraction=0.05)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_results(results: dict[str, Any], out_dir: str | Path, heatmap: bool = True) -> dict[str, Path]:
    """results.json, table.txt and <task>_heatmap.png under `out_dir`; returns what was written, by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"results": out_dir / "results.json", "table": out_dir / "table.txt"}
    written["results"].write_text(json.dumps(results, indent=1) + "\n")
    written["table"].write_text(format_table(results) + "\n")
    if heatmap:
        for task, r in results["retrieval"].items():
            step = results.get("step")
            title = f"{task}: exact match" + (f" (step {step})" if step is not None else "")
            png = write_heatmap(r, out_dir / f"{task}_heatmap.png", title)
            if png is not None:
                written[f"{task}_heatmap"] = png
    return written


def wandb_eval_media(results: dict[str, Any], written: dict[str, Path]) -> dict[str, Any]:
    """The W&B entries of one evaluation that are not scalars (`flat_metrics` has those), by key.

    Per retrieval task, in its panel section `eval_<task>/`: `heatmap` (the PNG `write_results` wrote, if any) and
    `grid` (a table: length, depth, accuracy, answer NLL per cell). In the `eval/` section: `acc_by_length` (every
    task's mean accuracy by length, one line each) and `ppl_by_length` (perplexity by window length, a table drawn as
    a line). Imports wandb: call it only when a run is active.
    """
    import wandb

    media: dict[str, Any] = {}
    tasks = list(results["retrieval"])
    for task, r in results["retrieval"].items():
        png = written.get(f"{task}_heatmap")
        if png is not None:
            media[f"eval_{task}/heatmap"] = wandb.Image(str(png), caption=f"{task}: exact match, depth x length")
        rows = [[length, depth, r["accuracy"][i][j], r["answer_nll"][i][j]]
                for j, length in enumerate(r["lengths"]) for i, depth in enumerate(r["depths"])]
        media[f"eval_{task}/grid"] = wandb.Table(columns=["length", "depth", "accuracy", "answer_nll"], data=rows)
    if tasks:
        first = results["retrieval"][tasks[0]]
        media["eval/acc_by_length"] = wandb.plot.line_series(
            xs=first["lengths"], ys=[results["retrieval"][t]["accuracy_by_length"] for t in tasks], keys=tasks,
            title="exact match by context length (mean over depths)", xname="context length (tokens)")
    if results["perplexity"]:
        table = wandb.Table(columns=["length", "stride", "tokens", "nll", "ppl"],
                            data=[[p["length"], p["stride"], p["tokens"], p["nll"], p["ppl"]]
                                  for p in results["perplexity"]])
        media["eval/ppl_by_length"] = wandb.plot.line(table, "length", "ppl", title="perplexity by context length")
    return media
