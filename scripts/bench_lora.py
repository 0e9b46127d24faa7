"""LoRA against full fine-tuning on CPU: peak memory per rank and step time of the same model and sequence.

    python scripts/bench_lora.py                 # docs/benchmarks.md, "LoRA against full fine-tuning"
    python scripts/bench_lora.py --quick         # a smoke run

Each configuration is a fresh pair of spawned gloo ranks (SP=2, zigzag ring, FSDP2, activation checkpointing, fp32,
one thread per rank) running the real Trainer (`ringtrain.bench.ringtrain_rank`) on the same seeded sequence:
full fine-tuning, LoRA as LongLoRA trains it (adapters on q/k/v/o plus the embeddings and norms: the default) and
LoRA alone (trainable_modules=[]). Peak = the rank's VmHWM over build and steps (what `ru_maxrss` reports), the
larger of the two ranks; step time = the median over the steps after the first, the slowest rank per step. The
configurations run interleaved (--repeats), and the best median per configuration is reported. No figure is
asserted: this prints them.
"""

from __future__ import annotations

import argparse
import statistics

from ringtrain.bench import GIB, add_common_flags, markdown_table, model_spec, ringtrain_rank, write_json
from ringtrain.testing import run_distributed

CONFIGS = {
    "full fine-tuning": ["peft.method=none"],
    "LoRA r=16 + embeddings, norms": ["peft.method=lora", "peft.r=16", "peft.alpha=32"],
    "LoRA r=16 alone": ["peft.method=lora", "peft.r=16", "peft.alpha=32", "peft.trainable_modules=[]"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="20m", help="ringtrain.bench.MODEL_SPECS entry (default 20m)")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=4)
    add_common_flags(parser, repeats=2, json_help="also write the figures here", quick_help="tiny model, short")
    args = parser.parse_args()
    if args.quick:
        args.model, args.seq_len, args.steps, args.repeats = "tiny", 512, 3, 1
    spec_model = model_spec(args.model, max_position_embeddings=args.seq_len)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name, overrides in CONFIGS.items():
            spec = {"model": spec_model, "seq_len": args.seq_len, "layout": "zigzag", "ac": True,
                    "steps": args.steps, "overrides": overrides}
            ranks = run_distributed(ringtrain_rank, 2, spec, timeout=3600)
            walls = [max(r["records"][i]["wall_s"] for r in ranks) for i in range(1, args.steps)]
            results[name].append({"step_s": statistics.median(walls),
                                  "peak_gib": max(r["end"]["hwm"] for r in ranks) / GIB,
                                  "built_gib": max(r["built"]["hwm"] for r in ranks) / GIB,
                                  "loss": ranks[0]["records"][0]["loss"]})
            print(name, results[name][-1], flush=True)
    full = min(results["full fine-tuning"], key=lambda r: r["step_s"])
    rows = []
    for name, runs in results.items():
        best = min(runs, key=lambda r: r["step_s"])
        peak = min(r["peak_gib"] for r in runs)
        rows.append([name, f"{peak:.3f}", f"{peak / min(r['peak_gib'] for r in results['full fine-tuning']):.2f}",
                     f"{best['step_s']:.2f}", f"{best['step_s'] / full['step_s']:.2f}", f"{best['loss']:.4f}"])
    print(f"\n{args.model} model, {args.seq_len} tokens, SP=2 (2 CPU ranks, 1 thread each), {args.steps} steps\n")
    print(markdown_table(["configuration", "peak GiB/rank", "vs full", "step s (median)", "vs full",
                          "first loss"], rows))
    if args.json:
        write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "results": results})


if __name__ == "__main__":
    main()
