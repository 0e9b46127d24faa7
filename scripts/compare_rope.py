"""Helpers of scripts/compare_rope.sh: LongRoPE factors, the perplexity text, the results table and figure.

    python scripts/compare_rope.py longrope-factors CONFIG FACTOR      # rope.short_factor=[...] rope.long_factor=[...]
    python scripts/compare_rope.py ppl-text OUT.jsonl                  # held-out long documents of the task mix
    python scripts/compare_rope.py merge DIR                           # DIR/len_*/results.json -> DIR/results.json
    python scripts/compare_rope.py report RUN [--markdown OUT.md] [--figure OUT.png]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from ringtrain.bench import markdown_table, write_json
from ringtrain.config.data import PASSKEY_TASKS
from ringtrain.config.eval import RETRIEVAL_EVAL_TASKS

LENGTHS = (128, 256, 512, 1024, 2048)  # the evaluation grid of compare_rope.sh, up to the x16 target
ORIGINAL = 128  # the short model's trained length
METHODS = ("linear", "dynamic", "yarn", "llama3", "longrope", "theta")


def longrope_factors(config: str, factor: float) -> str:
    """LongRoPE needs per-pair factors from its evolutionary search, which this comparison cannot afford. Its search
    starts from PI, NTK and YaRN factors; we take YaRN's per-pair scales (computed by transformers for this model) as
    long_factor and 1.0 as short_factor (no change within the original length). What is then measured is LongRoPE's
    mechanism in ringtrain and transformers (its attention factor, the short/long switch), not its search."""
    import copy

    from ringtrain.config import RopeConfig
    from ringtrain.hf.rope import apply_rope_scaling, rope_report
    from ringtrain.model.causal_lm import build_model_config
    from ringtrain.validate import load_validated_config

    model_config = build_model_config(load_validated_config(config, ["rope.method=none", "rope.factor=null"]).model)
    theta = model_config.rope_parameters["rope_theta"]
    original = model_config.max_position_embeddings
    yarn = copy.deepcopy(model_config)
    apply_rope_scaling(yarn, RopeConfig(method="yarn", factor=factor))
    scales = [round(r["scale"], 6) for r in rope_report(yarn, pretrained_theta=theta, original_length=original)]
    ones = [1.0] * len(scales)
    return f"rope.short_factor={json.dumps(ones).replace(' ', '')} rope.long_factor={json.dumps(scales).replace(' ', '')}"


def ppl_text(out: str, documents: int, tokens: int, seed: int) -> None:
    """`documents` documents of `tokens` bytes each, drawn from the training task mix with documents no run saw
    (their own seed): the text the perplexity-by-length evaluation slides its windows over."""
    from ringtrain.data import build_tokenizer
    from ringtrain.data.synthetic import generate_passkey_documents

    tok = build_tokenizer("bytes")
    docs, _ = generate_passkey_documents(tok, documents, tokens, tokens, seed,
                                         tasks=PASSKEY_TASKS)  # the mix configs/rope_short.yaml trains on
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for ids in docs:
            f.write(json.dumps({"text": tok.decode(ids.tolist())}) + "\n")


def merge(folder: Path) -> None:
    """One results.json (and table.txt) from evaluations of one length each under folder/len_*/: the grids side by
    side in length order, perplexity rows and documents concatenated."""
    from ringtrain.eval.report import format_table

    parts = sorted((json.loads(p.read_text()) for p in folder.glob("len_*/results.json")),
                   key=lambda r: next(iter(r["retrieval"].values()))["lengths"][0])
    out = {**parts[0], "retrieval": {}, "perplexity": [], "documents": [], "time_s": sum(p["time_s"] for p in parts)}
    for task, first in parts[0]["retrieval"].items():
        grids = [p["retrieval"][task] for p in parts]
        merged = {"lengths": [n for g in grids for n in g["lengths"]], "depths": first["depths"]}
        for key in ("accuracy", "answer_nll"):
            merged[key] = [[x for g in grids for x in g[key][i]] for i in range(len(first["depths"]))]
        merged["accuracy_by_length"] = [x for g in grids for x in g["accuracy_by_length"]]
        merged["accuracy_mean"] = statistics.fmean(merged["accuracy_by_length"])
        out["retrieval"][task] = merged
    for p in parts:
        out["perplexity"] += p["perplexity"]
        out["documents"] += p["documents"]
    write_json(folder / "results.json", out, stamp=False)  # the evaluations' own format, whole or not at all
    (folder / "table.txt").write_text(format_table(out) + "\n")


# --------------------------------------------------------------------------------------------------
# Report


def _runs(run: Path) -> list[dict]:
    """Every evaluation under RUN/eval/<method>_x<factor>_<stage>/results.json, stage = zeroshot or s<seed>."""
    out = []
    for path in sorted(run.glob("eval/*/results.json")):
        method, factor, stage = path.parent.name.split("_")
        out.append({"method": method, "factor": int(factor[1:]), "stage": stage,
                    "results": json.loads(path.read_text())})
    return out


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else math.nan


def _cell(runs: list[dict], length: int, what: str, task: str | None = None) -> tuple[float, float]:
    """(mean over seeds, spread = max - min over seeds) of a number at `length`: accuracy or answer NLL (over the
    retrieval tasks, or one task), or perplexity."""
    values = []
    for r in runs:
        res = r["results"]
        if what == "ppl":
            values += [p["ppl"] for p in res["perplexity"] if p["length"] == length]
            continue
        tasks = [task] if task else [t for t in RETRIEVAL_EVAL_TASKS if t in res["retrieval"]]
        per_task = []
        for t in tasks:
            g = res["retrieval"][t]
            j = g["lengths"].index(length)
            per_task.append(g["accuracy_by_length"][j] if what == "acc"
                            else _mean([row[j] for row in g["answer_nll"]]))
        values.append(_mean(per_task))
    if not values:
        return math.nan, math.nan
    return _mean(values), max(values) - min(values)


def _fmt(value: float, spread: float, what: str, seeds: int) -> str:
    if math.isnan(value):
        return "-"
    text = f"{100 * value:.0f}" if what == "acc" else f"{value:.2f}" if what == "nll" else f"{value:.3f}"
    if seeds > 1 and what == "acc":
        text += f" ±{100 * spread / 2:.0f}"
    return text


def report(run: Path, markdown: str | None, figure: str | None) -> str:
    runs = _runs(run)
    if not runs:
        raise SystemExit(f"no evaluations under {run}/eval: run the comparison first")
    lines: list[str] = []
    groups: dict[tuple[int, str], dict[str, list[dict]]] = {}
    for r in runs:
        if r["method"] != "none":
            kind = "zero-shot" if r["stage"] == "zeroshot" else "fine-tuned"
            groups.setdefault((r["factor"], kind), {}).setdefault(r["method"], []).append(r)
    # dynamic has no target length (its frequencies follow each length): its x8 runs, evaluated up to 2,048, are
    # its x16 runs too.
    for (factor, kind), by_method in groups.items():
        if factor == 16 and "dynamic" not in by_method and "dynamic" in groups.get((8, kind), {}):
            by_method["dynamic"] = groups[(8, kind)]["dynamic"]
    reference = [r for r in runs if r["method"] == "none"]
    for by_method in groups.values():  # the unscaled short model: a reference row of every table
        if reference:
            by_method["none"] = reference
    for (factor, kind), by_method in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] != "fine-tuned")):
        lengths = [n for n in LENGTHS if n <= ORIGINAL * factor]
        seeds = max(len(v) for v in by_method.values())
        lines += [f"### x{factor}, {kind}" + (f" (mean of {seeds} seeds, ± half the spread)" if seeds > 1 else ""), ""]
        head = ["method"] + [f"acc@{n}" for n in lengths] + [f"nll@{n}" for n in lengths] + [
            f"ppl@{n}" for n in lengths]
        order = [m for m in (*METHODS, "none") if m in by_method]
        rows = []
        for m in order:
            cells = [m]
            for what in ("acc", "nll", "ppl"):
                cells += [_fmt(*_cell(by_method[m], n, what), what, len(by_method[m])) for n in lengths]
            rows.append(cells)
        lines += [markdown_table(head, rows), ""]
        target = lengths[-1]
        by_task = [[m] + [_fmt(*_cell(by_method[m], target, "acc", t), "acc", 1) for t in RETRIEVAL_EVAL_TASKS]
                   for m in order]
        lines += [f"Exact match by task at {target} tokens (%):", "",
                  markdown_table(["method", *RETRIEVAL_EVAL_TASKS], by_task), ""]
    text = "\n".join(lines)
    if markdown:
        Path(markdown).write_text(text + "\n")
    if figure:
        _figure(groups, figure)
    return text


def _figure(groups: dict, out: str) -> None:
    """Mean exact match over the retrieval tasks by context length, one panel per (factor, fine-tuned/zero-shot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(groups, key=lambda k: (k[1] != "fine-tuned", k[0]))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.8), dpi=100, squeeze=False)
    styles = dict(zip(METHODS, ("o-", "s--", "D-", "^-", "v--", "x-"), strict=True))
    for ax, key in zip(axes[0], keys, strict=True):
        by_method = groups[key]
        for m in (*METHODS, "none"):
            if m not in by_method:
                continue
            lengths = [n for n in LENGTHS if n <= ORIGINAL * key[0]]
            ys = [100 * _cell(by_method[m], n, "acc")[0] for n in lengths]
            ax.plot(lengths, ys, styles.get(m, "k:"), label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.axvline(128, color="grey", lw=0.8, ls=":")
        ax.set_ylim(-3, 103)
        ax.set_title(f"x{key[0]}, {key[1]}", fontsize=10)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact match, mean of 5 retrieval tasks (%)")
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("longrope-factors")
    p.add_argument("config")
    p.add_argument("factor", type=float)
    p = sub.add_parser("ppl-text")
    p.add_argument("out")
    p.add_argument("--documents", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=777)
    p = sub.add_parser("merge")
    p.add_argument("folder")
    p = sub.add_parser("report")
    p.add_argument("run")
    p.add_argument("--markdown")
    p.add_argument("--figure")
    args = parser.parse_args()
    if args.command == "longrope-factors":
        sys.stdout.write(longrope_factors(args.config, args.factor) + "\n")
    elif args.command == "merge":
        merge(Path(args.folder))
    elif args.command == "ppl-text":
        ppl_text(args.out, args.documents, args.tokens, args.seed)
    else:
        sys.stdout.write(report(Path(args.run), args.markdown, args.figure) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
