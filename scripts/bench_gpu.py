"""One-GPU trainer benchmark: ringtrain against a plain transformers loop, tokens/s, MFU and peak memory by context.

    python scripts/bench_gpu.py                  # TinyLlama-shaped 1.1B Llama, bf16; ringtrain 8K-128K, plain to OOM
    python scripts/bench_gpu.py --quick          # a tiny model and short contexts: a smoke run (CPU too)
    python scripts/bench_gpu.py --max-context 524288 --max-context-limit 524288 --recompute full+tiled+offload
                                                 # one step at 512K with tiled MLP and offloaded layer inputs

One process, a world of one (NCCL on CUDA, gloo on CPU): sequence parallelism needs several GPUs
(`torchrun --nproc-per-node N scripts/bench_attention.py --backend nccl`; on one GPU, `--virtual-ring`).
What one GPU shows is the CUDA path of the trainer and how far one device's memory reaches:

- ringtrain = `build_trainer` + `Trainer.train_step` (ring attention on the CUDA flash kernel, activation
  checkpointing, chunked loss, FSDP2), data loader bypassed with the same seeded tokens every step;
- plain = `AutoModelForCausalLM.from_config(..., attn_implementation="sdpa")`, `model(ids, labels=ids)`,
  backward, clip, the same AdamW (`ringtrain.bench.plain_step`, scripts/bench_train.py's loop too), on the same
  weights and tokens (both print their first-step loss).

Each loop builds its model once and runs its contexts in ascending order; peak = the allocator's high-water mark of
live tensors during a context's steps (`torch.cuda.max_memory_allocated`, reset before them: weights, gradients,
AdamW state, activations). Step time = wall time of a step with the device synchronised,
median over --steps after --warmup (`ringtrain.bench.measure`). MFU uses the trainer's FLOP count (6 x params +
6 x layers x S x hidden per token, `ringtrain.model.flops`) against the card's dense bf16 peak. The plain loop stops
at its first out-of-memory context. A ringtrain loop is named by its recompute policy with features: `full+tiled`
adds train.tiled_mlp, `+offload` train.offload_activations. Every ringtrain record also carries `ringtrain plan`'s
predicted peak for the same config, so a lease checks the planner too.
No figure is asserted: this prints tables (and --json writes the raw records, after every context: "complete" is
false in the file of a run stopped before its end).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import statistics
import tempfile
import time

import torch

from ringtrain.bench import (
    GIB,
    add_common_flags,
    device_name,
    markdown_table,
    measure,
    meta_model,
    model_spec,
    plain_model,
    plain_step,
    seeded_tokens,
    trainer_overrides,
    write_json,
)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_steps(step_fn, device: torch.device, warmup: int, steps: int) -> dict:
    """Warm-up and timed steps; returns per-step seconds, losses, and the peak over all of them (the first step's
    allocations, AdamW's state among them, count). CUDA only: on CPU the resident set also holds the interpreter and
    its libraries, nothing to set beside the planner's tensors (and a sampling thread would cost the step time)."""
    m = measure(step_fn, repeats=steps, warmup=warmup, device=device, memory=device.type == "cuda",
                memory_from_warmup=True)
    return {"peak_bytes": m.peak_bytes, "step_s": statistics.median(m.timed_wall_s), "step_s_all": m.wall_s,
            "losses": m.results}


FEATURES = {"tiled": "train.tiled_mlp=true", "offload": "train.offload_activations=true"}


def loop_overrides(variant: str) -> tuple[str, list[str]]:
    """'full+tiled+offload' -> ('full', [the overrides that turn the features on])."""
    policy, *features = variant.split("+")
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise SystemExit(f"--recompute {variant!r}: unknown feature {unknown[0]!r} (known: {', '.join(FEATURES)})")
    return policy, [FEATURES[f] for f in features]


def predicted_peak_bytes(spec: dict, args, device: torch.device) -> float:
    """`ringtrain plan`'s peak for this loop's config at spec['seq_len'] (no device involved)."""
    from ringtrain.planner import model_shape, predict, setup_from_config
    from ringtrain.validate import load_validated_config

    cfg = load_validated_config(None, [*trainer_overrides(spec, 1, "unused"), f"model.dtype={args.dtype}"])
    return predict(model_shape(cfg.model), setup_from_config(cfg, 1, device.type))["peak_bytes"]


def build_loop(kind: str, mesh, spec: dict, args, out: str) -> dict:
    """The objects one loop keeps across contexts: a Trainer, or the plain model and its AdamW."""
    if kind == "ringtrain":
        from ringtrain.train.trainer import build_trainer
        from ringtrain.validate import load_validated_config

        cfg = load_validated_config(None, [*trainer_overrides(spec, 1, out), f"model.dtype={args.dtype}"])
        return {"trainer": build_trainer(cfg, mesh)}
    from ringtrain.model.causal_lm import DTYPES

    return dict(zip(("model", "optimizer"), plain_model(spec, DTYPES[args.dtype], mesh.device), strict=True))


def measure_context(kind: str, held: dict, mesh, seq_len: int, vocab: int, args) -> dict:
    ids = seeded_tokens(seq_len, vocab)
    if kind == "ringtrain":
        held["trainer"].loader = itertools.repeat({"input_ids": ids})  # the loader, bypassed: same tokens

        def step() -> float:
            return held["trainer"].train_step()["loss"]
    else:
        ids = ids.to(mesh.device)

        def step() -> float:
            return plain_step(held["model"], held["optimizer"], ids)

    return measure_steps(step, mesh.device, args.warmup, args.repeats)


def run_loop(kind: str, mesh, model: dict, contexts: list[int], args, recompute: str = "full",
             time_limit_s: float = 0.0, on_record=lambda records: None) -> list[dict]:
    """One model per loop, contexts in ascending order, each with its own peak; stops at the first out-of-memory
    context, or (with `time_limit_s`) before a context whose step would not finish in what is left: a step's time
    is predicted as 4x the last one's (attention grows with the square of the context). `on_record(records)` after
    each context, so a run that gpu_check.sh stops at its time limit keeps what it measured."""
    records: list[dict] = []
    if not contexts:
        return records
    contexts = sorted(contexts)
    start = time.perf_counter()
    policy, overrides = loop_overrides(recompute)
    spec = {"seq_len": contexts[-1], "model": model, "layout": "zigzag", "ac": policy, "loss_chunk": 0,
            "overrides": overrides}
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        held = build_loop(kind, mesh, spec, args, out)
        print(f"  {kind}: built in {time.perf_counter() - t0:.0f}s", flush=True)
        for seq_len in contexts:
            t0 = time.perf_counter()
            last = next((r for r in reversed(records) if "step_s" in r), None)
            if time_limit_s and last is not None:
                predicted = 4 * last["step_s"] * (args.warmup + args.repeats)
                if t0 - start + predicted > time_limit_s:
                    records.append({"kind": kind, "recompute": recompute, "seq_len": seq_len, "not_tried":
                                    f"predicted {predicted:.0f}s, {time_limit_s - (t0 - start):.0f}s left"})
                    print(f"  {kind} S={seq_len}: not tried ({records[-1]['not_tried']})", flush=True)
                    break
            try:
                res = measure_context(kind, held, mesh, seq_len, model["vocab_size"], args)
            except torch.OutOfMemoryError as e:
                res = {"oom": str(e).splitlines()[0][:160]}
            _free(mesh.device)  # outside the except clause: the traceback's frames hold the attempt's tensors
            res.update(kind=kind, seq_len=seq_len, elapsed_s=time.perf_counter() - t0,
                       recompute=recompute if kind == "ringtrain" else "none")
            if kind == "ringtrain":
                res["predicted_peak_bytes"] = predicted_peak_bytes({**spec, "seq_len": seq_len}, args, mesh.device)
            records.append(res)
            on_record(records)
            if "oom" in res:
                print(f"  {kind} S={seq_len}: out of memory ({res['elapsed_s']:.0f}s)", flush=True)
                break
            print(f"  {kind} S={seq_len}: step {res['step_s']:.3f}s (all {[round(t, 3) for t in res['step_s_all']]}),"
                  f" peak {res['peak_bytes'] / GIB:.1f} GiB, losses {[round(x, 5) for x in res['losses']]} "
                  f"({res['elapsed_s']:.0f}s)", flush=True)
        held.clear()
    _free(mesh.device)
    return records


def report(records: list[dict], card: str, args, lm_meta) -> str:
    """Markdown tables; TFLOP/s = the trainer's model FLOPs per token x tokens / synchronised step time, both loops."""
    from ringtrain.model.flops import device_peak_tflops, model_flops_per_token

    n_params = sum(p.numel() for p in lm_meta.parameters())
    peak = device_peak_tflops(card)
    rows = []
    for r in records:
        name = f"ringtrain SP=1 (recompute {r['recompute']}, chunked loss, FSDP2)" if r["kind"] == "ringtrain" else \
            "plain transformers (sdpa, full logits, no recompute)"
        planned = f"{r['predicted_peak_bytes'] / GIB:.1f}" if "predicted_peak_bytes" in r else "-"
        if "not_tried" in r:
            rows.append([name, f"{r['seq_len']:,}", f"not tried: {r['not_tried']}", *["-"] * 6])
            continue
        if "oom" in r:
            rows.append([name, f"{r['seq_len']:,}", "OOM", "-", "-", "-", f"> {args.gpu_gib:.0f}", planned, "-"])
            continue
        tflops = r["seq_len"] * model_flops_per_token(lm_meta, r["seq_len"]) / r["step_s"] / 1e12
        mfu = tflops / peak if peak else None
        rows.append([name, f"{r['seq_len']:,}", f"{r['step_s']:.3f}", f"{r['seq_len'] / r['step_s']:,.0f}",
                     f"{tflops:.1f}", "-" if mfu is None else f"{mfu:.1%}", f"{r['peak_bytes'] / GIB:.1f}", planned,
                     f"{r['losses'][0]:.5f}"])
    lines = [
        f"one-GPU trainer benchmark on {card}, torch {torch.__version__}: Llama {n_params / 1e9:.2f}B "
        f"({args.model}), {args.dtype}, batch 1, median of {args.repeats} step(s) after {args.warmup} warm-up",
        "",
        markdown_table(["loop", "context", "step s", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "planner GiB",
                        "first loss"], rows),
    ]
    done = [r for r in records if "step_s" in r]
    plain = {r["seq_len"]: r for r in done if r["kind"] == "plain"}
    pairs = [r for r in done if r["kind"] == "ringtrain" and r["seq_len"] in plain]
    if pairs:
        ratios = []
        for rt in sorted(pairs, key=lambda r: (r["recompute"], r["seq_len"])):
            pl = plain[rt["seq_len"]]
            mem = f"{rt['peak_bytes'] / pl['peak_bytes']:.2f}x" if pl["peak_bytes"] else "- (CPU: not measured)"
            ratios.append([rt["recompute"], f"{rt['seq_len']:,}", f"{pl['step_s'] / rt['step_s']:.2f}x", mem])
        lines += ["", markdown_table(["recompute", "context", "ringtrain / plain tokens/s",
                                      "ringtrain / plain peak memory"], ratios)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["1b", "tiny"], default="1b")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--ringtrain-contexts", type=int, nargs="*", default=[8192, 32768, 131072])
    p.add_argument("--plain-contexts", type=int, nargs="*", default=[8192, 32768, 65536],
                   help="the plain loop stops at the first that runs out of memory")
    add_common_flags(p, repeats=2, repeats_flags=("--repeats", "--steps"), warmup=1,
                     json_help="also write the raw records here, after every context (stamped with the machine)",
                     quick_help="tiny model, contexts 256 and 1,024, fp32: a smoke run")
    p.add_argument("--recompute", default="full",
                   help="comma-separated train.activation_checkpointing policies (+tiled, +offload: tiled MLP and "
                        "offloaded layer inputs, e.g. full+tiled+offload), one ringtrain loop each "
                        "(e.g. none,every:2,full); 128K runs only with the last")
    p.add_argument("--max-context", type=int, default=0, metavar="S",
                   help="instead: the longest context that trains one step, doubling from S (the last --recompute)")
    p.add_argument("--max-context-limit", type=int, default=1 << 20, help="--max-context: the largest tried")
    p.add_argument("--time-limit", type=float, default=100.0,
                   help="--max-context: seconds; a context whose predicted step would not fit is not tried")
    args = p.parse_args()
    for variant in args.recompute.split(","):
        loop_overrides(variant)  # an unknown feature fails before any device time is spent
    if args.quick:
        args.model, args.dtype = "tiny", "float32"
        args.ringtrain_contexts, args.plain_contexts = [256, 1024], [256, 1024]
    if args.max_context:
        args.ringtrain_contexts, args.plain_contexts = [], []
        size = args.max_context
        while size <= args.max_context_limit:
            args.ringtrain_contexts.append(size)
            size *= 2
        args.warmup, args.repeats = 0, 1

    from ringtrain.config import ParallelConfig
    from ringtrain.log import setup_logging
    from ringtrain.parallel.distributed import init_distributed, teardown_distributed

    setup_logging()
    mesh = init_distributed(ParallelConfig(sp_size=1))
    dev = mesh.device
    if dev.type == "cpu":
        # The CPU smoke run: one thread, like the CPU benchmarks (on a shared CPU more threads made a tiny step many
        # times slower, and the smoke run's time limits then stopped the doubling early).
        torch.set_num_threads(1)
    card = device_name(dev)
    args.gpu_gib = torch.cuda.get_device_properties(dev).total_memory / GIB if dev.type == "cuda" else 0.0
    model = model_spec(args.model, max_position_embeddings=max([*args.ringtrain_contexts, *args.plain_contexts]))
    records = []
    policies = args.recompute.split(",")

    def save(loop_records=(), complete=False) -> None:
        if args.json:  # atomic: a timeout's SIGTERM mid-write leaves the previous file whole
            write_json(args.json, {"complete": complete, "records": [*records, *loop_records],
                                   "max_context": bool(args.max_context)}, device=dev)

    try:
        if args.max_context:
            records += run_loop("ringtrain", mesh, model, args.ringtrain_contexts, args, policies[-1], args.time_limit,
                                on_record=save)
        else:
            for i, policy in enumerate(policies):
                # The longest context only with the last policy (full recompute: the one that reaches it).
                contexts = args.ringtrain_contexts if i == len(policies) - 1 else args.ringtrain_contexts[:-1]
                records += run_loop("ringtrain", mesh, model, contexts, args, policy, on_record=save)
            records += run_loop("plain", mesh, model, args.plain_contexts, args, on_record=save)
    finally:
        teardown_distributed()
    lm_meta = meta_model(model)  # shapes only: parameter count and config for the FLOP formula
    print(report(records, card, args, lm_meta))
    if args.max_context:
        trained = [r["seq_len"] for r in records if "step_s" in r]
        print(f"longest context that trained one step: {max(trained) if trained else 'none'}")
    save(complete=True)


if __name__ == "__main__":
    main()
