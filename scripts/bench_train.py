"""Trainer benchmark: SP=1 vs SP=2 step throughput, and ringtrain against a plain transformers training loop.

    python scripts/bench_train.py            # full run (docs/benchmarks.md has its figures and times)
    python scripts/bench_train.py --quick    # small contexts, a smoke run
    python scripts/bench_train.py --parts memory --malloc-mmap-threshold 1048576   # live-tensor memory view

Everything runs on CPU, --threads (one) per rank, gloo, through `ringtrain.testing.run_distributed`, so every
configuration is a FRESH spawned process (CPU peak memory cannot be reset in a process that already ran one).
The model is a random-weight Llama built from a config (`ringtrain.bench.MODEL_SPECS['20m']` by default: d=256,
4 layers, 4 heads of 64, MLP 1024, 32K vocab), fp32, seeded; the tokens are seeded random ids, identical for every
configuration (the tables print the first-step loss of both loops: equal losses show that they train the same model
on the same tokens). The runs are `ringtrain.bench.ringtrain_rank` and the plain loop of `ringtrain.bench`.

1. SP throughput: ringtrain (`build_trainer` + `Trainer.train_step`, FSDP2, activation checkpointing, zigzag ring)
   at SP=1 and SP=2 on the same sequence, at a long context (attention-heavy) and a short one. Step time = the
   slowest rank's `train_step` wall time (ranks start each step after a barrier); median and best over --steps
   after --warmup steps; tokens/s = sequence tokens / median step; per rank = that / SP. SP=1 and SP=2 run
   interleaved (--repeats). Also the CPU-time ratio: SP=1 CPU seconds per step over the SP=2 slowest rank's.
   The attention share of FLOPs counts as the trainer's MFU does (`ringtrain.model.flops`).
2. Memory: ringtrain SP=1 (chunked loss + activation checkpointing) vs a plain transformers loop (same model with
   attn_implementation="sdpa", `model(input_ids, labels=input_ids).loss.backward()`, clip, the same AdamW; no chunked
   loss, no activation checkpointing) at two contexts, plus ringtrain with a smaller loss chunk at the larger one.
   Peak = the process's VmHWM (= ru_maxrss) over build + steps; a baseline process per loop builds the same model
   and optimizer and runs no step; over baseline = peak - baseline peak (so it includes gradients and AdamW state).
   Reported: over-baseline bytes per token at each context, and the slope between the two contexts (fixed costs
   cancel in the slope). The longest context in --budget-gib over baseline is EXTRAPOLATED linearly through the two
   measured points (not searched: ringtrain steps at the contexts it predicts take many minutes on one thread).
   A ringtrain SP=1 run at a context part 1 already ran (same config, fresh process) is reused, not rerun.
3. ringtrain SP=1 vs plain loop step throughput, from the same processes as part 2 (wall and CPU time).

Contention: wall-clock numbers are only meaningful with the cores free. Before each configuration the script waits
up to --quiet-wait seconds for the machine to go idle; each run records the CPU time its ranks got per step (cpu
share = CPU s / wall s, ~1.0 when a rank had a core to itself) and the CPU the rest of the machine used meanwhile
(from /proc/stat, "other load" in cores), so a contended measurement is visible in the tables.
No timing is asserted anywhere: this prints figures, tests check behaviour.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ringtrain.bench import (
    GIB,
    add_common_flags,
    markdown_table,
    meta_model,
    model_spec,
    plain_model,
    plain_step,
    ringtrain_rank,
    run_steps,
    seeded_tokens,
    write_json,
)
from ringtrain.model.flops import attention_flops_per_token, flops_per_token
from ringtrain.testing import run_distributed

# --------------------------------------------------------------------------------------------------
# Measurement helpers.


def _machine_busy_s() -> float:
    """CPU seconds all cores of the machine have spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def model_kwargs(args: argparse.Namespace) -> dict:
    """One model for every configuration (max_position_embeddings covers the longest context run)."""
    return model_spec("20m", max_position_embeddings=max(args.max_context, 2048), vocab_size=args.vocab,
                      hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, num_key_value_heads=args.heads)


def _plain_rank(mesh, spec: dict) -> dict:
    """The plain transformers loop: HF loss on full logits, sdpa, no activation checkpointing, same AdamW."""
    def build():
        model, optimizer = plain_model(spec, torch.float32, torch.device("cpu"))
        ids = seeded_tokens(spec["seq_len"], spec["model"]["vocab_size"])
        return lambda: plain_step(model, optimizer, ids)

    return run_steps(build, spec["steps"])


def wait_for_quiet(max_wait_s: float, threshold_cores: float = 0.3) -> float:
    """Wait (up to max_wait_s) until the rest of the machine uses < threshold_cores; return the seconds waited."""
    t0 = time.perf_counter()
    while max_wait_s > 0:
        b0 = _machine_busy_s()
        time.sleep(1.0)
        if _machine_busy_s() - b0 < threshold_cores or time.perf_counter() - t0 >= max_wait_s:
            return time.perf_counter() - t0
        time.sleep(4.0)
    return 0.0


def run_config(args: argparse.Namespace, kind: str, world: int, spec: dict) -> dict:
    """One configuration in fresh processes; per-step wall = slowest rank; plus the machine's other load."""
    fn = ringtrain_rank if kind == "ringtrain" else _plain_rank
    waited = wait_for_quiet(args.quiet_wait) if spec["steps"] else 0.0
    busy0, t0 = _machine_busy_s(), time.perf_counter()
    ranks = run_distributed(fn, world, spec, sp_size=world, threads=args.threads, timeout=args.timeout)
    elapsed, busy = time.perf_counter() - t0, _machine_busy_s() - busy0
    ours = sum(r["cpu_total_s"] for r in ranks)
    steps = [
        {"wall_s": max(r["records"][i]["wall_s"] for r in ranks),
         "cpu_s": max(r["records"][i]["cpu_s"] for r in ranks),
         "cpu_share": min(r["records"][i]["cpu_s"] / r["records"][i]["wall_s"] for r in ranks)}
        for i in range(len(ranks[0]["records"]))
    ]
    timed = steps[spec["warmup"]:]

    def med(key: str) -> float | None:
        return statistics.median(s[key] for s in timed) if timed else None

    return {
        "kind": kind, "world": world, "seq_len": spec["seq_len"], "spec": spec,
        "step_s": med("wall_s"), "best_step_s": min((s["wall_s"] for s in timed), default=None),
        "cpu_s": med("cpu_s"), "cpu_share": med("cpu_share"), "step_s_all": [s["wall_s"] for s in steps],
        "losses": [r["loss"] for r in ranks[0]["records"]],
        "peak_bytes": max(r["end"]["hwm"] for r in ranks),  # per rank: the largest
        "built_rss_bytes": max(r["built"]["rss"] for r in ranks),
        "elapsed_s": elapsed, "waited_for_quiet_s": waited,
        # Cores' worth of CPU used by everything else on the machine while this ran (0 = quiet machine).
        "other_load_cores": max(0.0, busy - ours) / elapsed,
    }


def _progress(tag: str, r: dict) -> None:
    print(f"  {tag}: step {r['step_s']:.2f}s (all {_fmt_list(r['step_s_all'])}), cpu {r['cpu_s']:.2f}s/step, "
          f"cpu share {r['cpu_share']:.2f}, other load {r['other_load_cores']:.2f} cores, "
          f"peak {r['peak_bytes'] / GIB:.2f} GiB/rank (waited {r['waited_for_quiet_s']:.0f}s for quiet)", flush=True)


# --------------------------------------------------------------------------------------------------
# The three parts.

def _spec(args: argparse.Namespace, seq_len: int, steps: int, warmup: int, loss_chunk: int) -> dict:
    return {"seq_len": seq_len, "model": model_kwargs(args), "layout": "zigzag", "ac": args.recompute,
            "loss_chunk": loss_chunk, "steps": steps, "warmup": warmup,
            "overrides": ["train.tiled_mlp=true"] if args.tiled_mlp else []}


def bench_sp(args: argparse.Namespace, log: list) -> tuple[list[dict], dict[int, dict]]:
    """Returns the table rows and the SP=1 runs by context (part 2 reuses them: same process, same config)."""
    rows, sp1_runs = [], {}
    for seq_len in args.sp_contexts:
        spec = _spec(args, seq_len, args.warmup + args.repeats, args.warmup, args.loss_chunk)
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(args.rounds):
            for world in (1, 2):  # interleaved, so a burst of load from elsewhere hits both
                r = run_config(args, "ringtrain", world, spec)
                runs[world].append(r)
                log.append(r)
                _progress(f"sp: S={seq_len} SP={world}", r)
        sp1_runs[seq_len] = runs[1][0]

        def agg(key: str, fn=statistics.median, runs=runs) -> dict[int, float]:
            return {w: fn(r[key] for r in runs[w]) for w in (1, 2)}

        step, best, cpu = agg("step_s"), agg("best_step_s", min), agg("cpu_s")
        rows.append({
            "seq_len": seq_len, "attention_flop_share": attention_flop_share(spec["model"], seq_len),
            "step_s": step, "best_step_s": best, "cpu_s": cpu,
            "tokens_per_s": {w: seq_len / step[w] for w in (1, 2)},
            "tokens_per_s_per_rank": {w: seq_len / step[w] / w for w in (1, 2)},
            "speedup": step[1] / step[2], "speedup_best": best[1] / best[2], "speedup_cpu": cpu[1] / cpu[2],
            "cpu_share": agg("cpu_share"),
            "other_load_cores": statistics.mean(r["other_load_cores"] for w in (1, 2) for r in runs[w]),
            "peak_gib_per_rank": {w: max(r["peak_bytes"] for r in runs[w]) / GIB for w in (1, 2)},
            "first_loss": {w: runs[w][0]["losses"][0] for w in (1, 2)},
        })
    return rows, sp1_runs


def attention_flop_share(model: dict, seq_len: int) -> float:
    """Share of the model's training FLOPs (no recomputation) spent in causal attention."""
    params = sum(p.numel() for p in meta_model(model).parameters())
    layers, hidden = model["num_hidden_layers"], model["hidden_size"]
    return attention_flops_per_token(layers, hidden, seq_len) / flops_per_token(params, layers, hidden, seq_len)


def bench_memory(args: argparse.Namespace, log: list, sp1_runs: dict[int, dict]) -> dict:
    loops = [("plain", 0, args.mem_contexts), ("ringtrain", args.loss_chunk, args.mem_contexts)]
    if args.small_loss_chunk:  # the same trainer with a smaller loss chunk, at the larger context only
        loops.append(("ringtrain", args.small_loss_chunk, args.mem_contexts[-1:]))
    out: dict = {"contexts": args.mem_contexts, "loops": []}
    baselines: dict[str, int] = {}
    for kind, chunk, contexts in loops:
        if kind not in baselines:
            base = run_config(args, kind, 1, _spec(args, args.mem_contexts[0], 0, 0, chunk))
            log.append(base)
            baselines[kind] = base["peak_bytes"]
        loop = {"kind": kind, "loss_chunk": chunk, "ac": args.recompute, "baseline_peak_bytes": baselines[kind],
                "runs": [], "overrides": _spec(args, 0, 0, 0, chunk)["overrides"] if kind == "ringtrain" else []}
        for seq_len in contexts:
            steps = args.mem_warmup + args.mem_steps
            reused = kind == "ringtrain" and chunk == args.loss_chunk and seq_len in sp1_runs
            if reused:
                r = sp1_runs[seq_len]
            else:
                r = run_config(args, kind, 1, _spec(args, seq_len, steps, args.mem_warmup, chunk))
                log.append(r)
            over = r["peak_bytes"] - baselines[kind]
            loop["runs"].append({
                "seq_len": seq_len, "peak_bytes": r["peak_bytes"], "over_baseline_bytes": over,
                "bytes_per_token": over / seq_len, "step_s": r["step_s"], "best_step_s": r["best_step_s"],
                "cpu_s": r["cpu_s"], "tokens_per_s": seq_len / r["step_s"], "cpu_share": r["cpu_share"],
                "other_load_cores": r["other_load_cores"], "first_loss": r["losses"][0], "reused_sp_run": reused,
            })
            _progress(f"memory: {kind} chunk={chunk or 'default'} S={seq_len}{' (part 1 run)' if reused else ''}", r)
        if len(loop["runs"]) >= 2:
            (s1, o1), (s2, o2) = [(x["seq_len"], x["over_baseline_bytes"]) for x in loop["runs"][:2]]
            loop["slope_bytes_per_token"] = slope = (o2 - o1) / (s2 - s1)
            loop["intercept_bytes"] = intercept = o1 - slope * s1
            loop["max_context_in_budget"] = int((args.budget_gib * GIB - intercept) / slope) if slope > 0 else None
        out["loops"].append(loop)
    return out


# --------------------------------------------------------------------------------------------------
# Report.

def _fmt_list(xs: list[float]) -> str:
    return "[" + ", ".join(f"{x:.2f}" for x in xs) + "]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    return markdown_table(header, rows, pad=True)  # read in a terminal while the run goes on


def _loop_name(loop: dict) -> str:
    if loop["kind"] == "plain":
        return "plain transformers (sdpa, full logits, no recompute)"
    tiled = ", tiled MLP" if "train.tiled_mlp=true" in loop.get("overrides", []) else ""
    return (f"ringtrain SP=1 (recompute {loop.get('ac', 'full')}{tiled}, FSDP2, "
            f"loss chunk {loop['loss_chunk'] or 'default'})")


def report(args: argparse.Namespace, sp_rows: list[dict], mem: dict | None) -> str:
    parts = []
    if sp_rows:
        rows = [[
            f"{r['seq_len']:,}", f"{r['attention_flop_share']:.0%}",
            f"{r['step_s'][1]:.2f} / {r['best_step_s'][1]:.2f}", f"{r['step_s'][2]:.2f} / {r['best_step_s'][2]:.2f}",
            f"{r['tokens_per_s'][1]:,.0f}", f"{r['tokens_per_s'][2]:,.0f}", f"{r['tokens_per_s_per_rank'][2]:,.0f}",
            f"{r['speedup']:.2f}x", f"{r['speedup_best']:.2f}x", f"{r['speedup_cpu']:.2f}x",
            f"{r['cpu_share'][1]:.2f} / {r['cpu_share'][2]:.2f}", f"{r['other_load_cores']:.2f}",
            f"{r['peak_gib_per_rank'][1]:.2f} / {r['peak_gib_per_rank'][2]:.2f}",
        ] for r in sp_rows]
        parts.append(
            "1. SP=1 vs SP=2: ringtrain train_step (FSDP2, activation checkpointing, zigzag ring). Step = slowest rank;\n"
            "   median / best over the timed steps; tok/s from the median. CPU-time ratio = SP=1 CPU s per step over\n"
            "   the SP=2 slowest rank's: the speedup two free cores would give if communication waits cost nothing.\n"
            + _table(["context", "attn FLOPs", "SP=1 step s", "SP=2 step s", "SP=1 tok/s", "SP=2 tok/s",
                      "SP=2 tok/s/rank", "SP=2/SP=1", "best/best", "CPU-time ratio", "cpu share 1/2", "other load",
                      "peak GiB/rank 1/2"], rows))
    if mem:
        loops = mem["loops"]
        rows = []
        for loop in loops:
            for r in loop["runs"]:
                rows.append([_loop_name(loop), f"{r['seq_len']:,}", f"{r['peak_bytes'] / GIB:.2f}",
                             f"{r['over_baseline_bytes'] / GIB:.2f}", f"{r['bytes_per_token'] / 1e3:.0f}",
                             f"{r['step_s']:.2f} / {r['best_step_s']:.2f}", f"{r['cpu_s']:.2f}",
                             f"{r['tokens_per_s']:,.0f}", f"{r['cpu_share']:.2f}", f"{r['other_load_cores']:.2f}"])
        base = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in
                         {lp["kind"]: lp["baseline_peak_bytes"] for lp in loops}.items())
        parts.append(f"2-3. Memory and throughput, one process, one thread. Baseline peak (model + optimizer built, "
                     f"no step): {base}.\n" + _table(
                         ["loop", "context", "peak GiB", "over baseline GiB", "KB/token over baseline",
                          "step s median / best", "CPU s/step", "tok/s", "cpu share", "other load"], rows))
        plain = loops[0]
        by_ctx = {r["seq_len"]: r for r in plain["runs"]}
        ratios = []
        for loop in loops[1:]:
            for r in loop["runs"]:
                p = by_ctx[r["seq_len"]]
                ratios.append([_loop_name(loop), f"{r['seq_len']:,}",
                               f"{r['bytes_per_token'] / p['bytes_per_token']:.3f}x",
                               f"{p['step_s'] / r['step_s']:.2f}x", f"{p['cpu_s'] / r['cpu_s']:.2f}x",
                               f"{p['first_loss']:.5f} / {r['first_loss']:.5f}"])
            if "slope_bytes_per_token" in loop:
                ratios.append([_loop_name(loop), "slope",
                               f"{loop['slope_bytes_per_token'] / plain['slope_bytes_per_token']:.3f}x", "", "", ""])
        parts.append("ringtrain / plain at equal context (memory: over-baseline bytes per token; throughput: "
                     "tokens/s from the median wall step, and from CPU s per step)\n" + _table(
                         ["loop", "context", "memory per token", "tokens/s (wall)", "tokens/s (CPU time)",
                          "first-step loss plain / ringtrain"], ratios))
        budget = [[_loop_name(lp), f"{lp['slope_bytes_per_token'] / 1e3:.1f}", f"{lp['intercept_bytes'] / GIB:.2f}",
                   f"{lp['max_context_in_budget']:,}" if lp["max_context_in_budget"] else "n/a"]
                  for lp in loops if "slope_bytes_per_token" in lp]
        parts.append(f"Longest context in {args.budget_gib:g} GiB over baseline: linear EXTRAPOLATION through the two "
                     f"measured contexts (over baseline = intercept + slope x context)\n" + _table(
                         ["loop", "slope KB/token", "intercept GiB", "max context"], budget))
    return "\n\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p, repeats=2, repeats_flags=("--steps",), warmup=1, threads=1,
                     json_help="also write every raw measurement here (stamped with the machine and versions)",
                     quick_help="small contexts and few steps: a smoke run")
    p.add_argument("--parts", default="sp,memory", help="comma-separated: sp, memory")
    p.add_argument("--sp-contexts", type=int, nargs="+", default=[2048, 16384], help="contexts for part 1")
    p.add_argument("--mem-contexts", type=int, nargs=2, default=[4096, 16384], help="two contexts for parts 2-3")
    p.add_argument("--repeats", dest="rounds", type=int, default=1,
                   help="interleaved SP=1 / SP=2 repetitions of part 1 (--steps: timed steps in each)")
    p.add_argument("--mem-warmup", type=int, default=1, help="untimed steps (parts 2-3)")
    p.add_argument("--mem-steps", type=int, default=1,
                   help="timed steps (parts 2-3); keep warmup + steps >= 2 so the peak includes the AdamW state")
    p.add_argument("--budget-gib", type=float, default=4.0, help="memory budget over baseline for the max context")
    model = model_spec("20m")
    p.add_argument("--vocab", type=int, default=model["vocab_size"])
    p.add_argument("--hidden", type=int, default=model["hidden_size"])
    p.add_argument("--intermediate", type=int, default=model["intermediate_size"])
    p.add_argument("--layers", type=int, default=model["num_hidden_layers"])
    p.add_argument("--heads", type=int, default=model["num_attention_heads"])
    p.add_argument("--loss-chunk", type=int, default=0, help="train.loss_chunk_tokens; 0 keeps the trainer default")
    p.add_argument("--recompute", default="full", help="ringtrain's train.activation_checkpointing (none, full, "
                                                       "every:K); the plain loop never recomputes")
    p.add_argument("--tiled-mlp", action="store_true", help="ringtrain with train.tiled_mlp=true")
    p.add_argument("--small-loss-chunk", type=int, default=512,
                   help="also measure ringtrain with this train.loss_chunk_tokens at the larger memory context (0: no)")
    p.add_argument("--quiet-wait", type=float, default=15.0,
                   help="before each configuration, wait up to this many seconds for other processes to go idle")
    p.add_argument("--malloc-mmap-threshold", type=int, default=0,
                   help="set MALLOC_MMAP_THRESHOLD_ (bytes) for the measured processes, e.g. 1048576: freed buffers "
                        "then leave the RSS, so the peak tracks live tensors instead of glibc's retained heap; "
                        "0 keeps glibc's default (what a user of the trainer gets)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per configuration before it is killed")
    args = p.parse_args()
    if args.quick:
        args.sp_contexts, args.mem_contexts, args.small_loss_chunk = [512, 2048], [1024, 2048], 256
        args.repeats, args.mem_steps, args.quiet_wait = 2, 1, 0.0
    args.max_context = max(*args.sp_contexts, *args.mem_contexts)
    if args.malloc_mmap_threshold:  # read by glibc at process start: applies to the spawned ranks, not to this one
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    parts = set(args.parts.split(","))

    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, gloo, {args.threads} thread(s) per rank; "
          f"model d={args.hidden}, {args.layers} layers, {args.heads} heads, MLP {args.intermediate}, vocab "
          f"{args.vocab}, fp32; "
          f"glibc MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'default'}; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    log: list[dict] = []
    sp_rows, sp1_runs = bench_sp(args, log) if "sp" in parts else ([], {})
    mem = bench_memory(args, log, sp1_runs) if "memory" in parts else None
    print()
    print(report(args, sp_rows, mem))
    print(f"\nwall time {time.perf_counter() - t0:.0f}s; load average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        write_json(args.json, {"args": {k: str(v) for k, v in vars(args).items()}, "sp": sp_rows, "memory": mem,
                               "runs": log}, default=str)


if __name__ == "__main__":
    main()
