"""Validate `ringtrain plan` on CPU: predicted against measured peak memory per rank, for several configurations.

    python scripts/validate_plan.py                       # 5 configurations x 2 contexts
    python scripts/validate_plan.py --contexts 1024 2048 --configs 2   # a smoke run

Each (configuration, context) is a fresh spawned process (`ringtrain.testing.run_distributed`, gloo, --threads per
rank) that builds the real trainer (`ringtrain.bench.ringtrain_rank`, scripts/bench_train.py's run, on its model
`MODEL_SPECS['20m']`: d=256, 4 layers, 4 heads, MLP 1024, 32K vocab, fp32) and runs --steps `train_step` calls on the
same seeded tokens; measured peak = the process's VmHWM, the largest rank's.
glibc's mmap threshold is pinned at 1 MiB (--malloc-mmap-threshold) so a freed buffer leaves the RSS and the
peak follows live tensors, which is what the planner predicts.

The process baseline: a CPU process carries the interpreter, torch, transformers and the data pipeline, which the
planner does not model. A baseline process per configuration builds the same trainer and runs no step; its
peak also holds the parameters, so "measured tensors" = peak - baseline + the planner's parameter bytes (what the
baseline already counted). The figure the planner is held to is the growth between the two contexts, where the
baseline cancels exactly: (measured peak at S2 - at S1) against (predicted peak at S2 - at S1).
No figure is asserted here: this prints the table (and --json writes the raw records).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from ringtrain.bench import (
    GIB,
    add_common_flags,
    markdown_table,
    model_spec,
    ringtrain_rank,
    trainer_overrides,
    write_json,
)
from ringtrain.testing import run_distributed

# (name, world, ulysses, overrides)
CONFIGS = [
    ("SP=1, recompute full", 1, 1, ["train.activation_checkpointing=full"]),
    ("SP=1, recompute none", 1, 1, ["train.activation_checkpointing=none"]),
    ("SP=2 ring, recompute full", 2, 1, ["train.activation_checkpointing=full"]),
    ("SP=1, recompute full, tiled MLP", 1, 1, ["train.activation_checkpointing=full", "train.tiled_mlp=true"]),
    ("SP=2 Ulysses 2, recompute full", 2, 2, ["train.activation_checkpointing=full", "parallel.ulysses_size=2"]),
]


def _spec(seq_len: int, steps: int, overrides: list[str]) -> dict:
    model = model_spec("20m", max_position_embeddings=seq_len)
    return {"seq_len": seq_len, "model": model, "layout": "zigzag", "ac": "full", "loss_chunk": 0, "steps": steps,
            "warmup": 0, "overrides": overrides}


def predicted(spec: dict, world: int) -> dict:
    from ringtrain.planner import model_shape, predict, setup_from_config
    from ringtrain.validate import load_validated_config

    with tempfile.TemporaryDirectory() as out:
        cfg = load_validated_config(None, [*trainer_overrides(spec, world, out), "model.dtype=float32"])
    shape = model_shape(cfg.model)
    pred = predict(shape, setup_from_config(cfg, world, "cpu"))
    pred["parameter_bytes"] = pred["moments"]["optimizer step"] / 5  # parameters, as the baseline holds them
    return pred


def measure(spec: dict, world: int, ulysses: int, args: argparse.Namespace) -> dict:
    t0 = time.perf_counter()
    ranks = run_distributed(ringtrain_rank, world, spec, sp_size=world, ulysses_size=ulysses, threads=args.threads,
                            timeout=args.timeout)
    return {"peak_bytes": max(r["end"]["hwm"] for r in ranks), "elapsed_s": time.perf_counter() - t0,
            "cpu_s": [sum(x["cpu_s"] for x in r["records"]) for r in ranks],
            "losses": [x["loss"] for x in ranks[0]["records"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs=2, default=[4096, 12288])
    p.add_argument("--steps", type=int, default=2, help="train steps per process (>= 2: the peak with AdamW state)")
    p.add_argument("--configs", type=int, default=len(CONFIGS), help="run the first N configurations")
    p.add_argument("--malloc-mmap-threshold", type=int, default=1 << 20)
    p.add_argument("--timeout", type=float, default=3600.0)
    add_common_flags(p, threads=1, json_help="also write the raw records here (stamped with the machine and versions)")
    p.add_argument("--from-json", type=Path, help="no runs: re-predict the measurements of an earlier --json")
    args = p.parse_args()
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        for row in data["rows"]:
            name, world, _, overrides = next(c for c in CONFIGS if c[0] == row["config"])
            for run in row["runs"]:
                pred = predicted(_spec(run["seq_len"], args.steps, overrides), world)
                run.update(predicted_bytes=pred["peak_bytes"], predicted_moment=pred["peak_moment"],
                           parameter_bytes=pred["parameter_bytes"])
        report(data["rows"], data["contexts"])
        return
    if args.malloc_mmap_threshold:  # read by glibc at process start: applies to the spawned ranks
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    t0, c0 = time.perf_counter(), time.process_time()
    print(f"{os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.2f}; contexts {args.contexts}, "
          f"{args.steps} steps; MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'default'}", flush=True)
    rows = []
    for name, world, ulysses, overrides in CONFIGS[:args.configs]:
        base = measure(_spec(args.contexts[0], 0, overrides), world, ulysses, args)
        row = {"config": name, "world": world, "baseline_bytes": base["peak_bytes"], "runs": []}
        for seq_len in args.contexts:
            spec = _spec(seq_len, args.steps, overrides)
            pred = predicted(spec, world)
            got = measure(spec, world, ulysses, args)
            tensors = got["peak_bytes"] - base["peak_bytes"] + pred["parameter_bytes"]
            row["runs"].append({"seq_len": seq_len, "predicted_bytes": pred["peak_bytes"],
                                "parameter_bytes": pred["parameter_bytes"],
                                "predicted_moment": pred["peak_moment"], "measured_peak_bytes": got["peak_bytes"],
                                "measured_tensor_bytes": tensors, **{k: got[k] for k in ("elapsed_s", "cpu_s")}})
            print(f"  {name} S={seq_len}: predicted {pred['peak_bytes'] / GIB:.3f} GiB ({pred['peak_moment']}), "
                  f"measured peak {got['peak_bytes'] / GIB:.3f} GiB (baseline {base['peak_bytes'] / GIB:.3f}, "
                  f"tensors {tensors / GIB:.3f}), {got['elapsed_s']:.0f}s", flush=True)
        rows.append(row)
    report(rows, args.contexts)
    print(f"\nwall {time.perf_counter() - t0:.0f}s (this process's CPU {time.process_time() - c0:.0f}s); load average at "
          f"end {os.getloadavg()[0]:.2f}")
    if args.json:
        write_json(args.json, {"contexts": args.contexts, "rows": rows})


def report(rows: list[dict], contexts: list[int]) -> None:
    for row in rows:
        r1, r2 = row["runs"]
        row["growth_predicted"] = r2["predicted_bytes"] - r1["predicted_bytes"]
        row["growth_measured"] = r2["measured_peak_bytes"] - r1["measured_peak_bytes"]
        row["growth_error"] = row["growth_predicted"] / row["growth_measured"] - 1
    s1, s2 = contexts
    table = []
    for row in rows:
        r1, r2 = row["runs"]
        table.append([row["config"], f"{row['baseline_bytes'] / GIB:.3f}",
                      f"{r1['predicted_bytes'] / GIB:.3f} / {r2['predicted_bytes'] / GIB:.3f}",
                      f"{r1['measured_tensor_bytes'] / GIB:.3f} / {r2['measured_tensor_bytes'] / GIB:.3f}",
                      f"{row['growth_predicted'] / GIB:.3f}", f"{row['growth_measured'] / GIB:.3f}",
                      f"{row['growth_error']:+.1%}"])
    print("\n" + markdown_table(["configuration", "baseline GiB", f"predicted GiB at {s1:,} / {s2:,}",
                                 f"measured tensors GiB at {s1:,} / {s2:,}", "growth predicted GiB",
                                 "growth measured GiB", "error"], table))


if __name__ == "__main__":
    main()
