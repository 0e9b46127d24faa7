"""Hybrid model step under sequence parallelism: SP=2 against SP=1 on the same total tokens, on CPU.

    python scripts/bench_hybrid.py             # docs/benchmarks.md, "Hybrid models under sequence parallelism"
    python scripts/bench_hybrid.py --quick     # a smoke run

A random-weight Qwen3.5 text model (gated DeltaNet in 3 of every 4 layers, softmax attention in the 4th, fp32) built
from a config; one forward + backward of the chunked token loss over one sequence of --seq-len tokens (packed into
--docs documents of equal length, so the recurrence restarts per document), through `apply_ring_attention` and
`shard_batch` at SP=1 (one process, the mixers' per-document path without exchanges) and SP=2 (two ranks, zigzag ring
for the softmax layer, the head-parallel all-to-all for DeltaNet). Each configuration is a fresh spawned world
(`ringtrain.testing.run_distributed`), one torch thread per rank, SP=1 and SP=2 interleaved over --rounds. Step time
is the slowest rank's wall time (ranks start each step after a barrier), CPU time is each rank's process time per
step; the load average before and after each run is printed, so a contended figure is visible. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from ringtrain.bench import add_common_flags, markdown_table, measure, seeded_tokens, write_json
from ringtrain.testing import run_distributed


def model_config(args: argparse.Namespace):
    from transformers import AutoConfig

    layers = ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * (args.layers // 4)
    return AutoConfig.for_model(
        "qwen3_5_text", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        num_hidden_layers=len(layers), layer_types=layers, num_attention_heads=4, num_key_value_heads=2,
        head_dim=args.hidden // 4, linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=32,
        linear_value_head_dim=32, linear_conv_kernel_dim=4, max_position_embeddings=args.seq_len)


def rank(mesh, args: argparse.Namespace) -> dict:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from ringtrain.hf import apply_ring_attention, shard_batch
    from ringtrain.model.causal_lm import CausalLMWithChunkedLoss

    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(model_config(args)).float()
    apply_ring_attention(lm, mesh.sp)
    model = CausalLMWithChunkedLoss(lm, 0)
    ids = seeded_tokens(args.seq_len, args.vocab)  # [1, S]
    docs = torch.arange(args.docs).repeat_interleave(args.seq_len // args.docs)[None]
    batch = shard_batch({"input_ids": ids, "document_ids": docs}, mesh.sp)

    def step() -> float:
        loss = model(batch["input_ids"], batch["position_ids"], batch["shift_labels"],
                     document_ids=batch["documents"]) / batch["num_label_tokens"]
        loss.backward()
        lm.zero_grad(set_to_none=True)
        return float(loss.detach())  # this rank's part of the mean: the parts add up over the ranks

    barrier = dist.barrier if dist.is_initialized() else None
    m = measure(step, repeats=args.repeats, warmup=args.warmup, barrier=barrier, memory=False)
    return {"wall": m.timed_wall_s, "cpu": m.timed_cpu_s, "loss": m.results[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    add_common_flags(parser, repeats=3, warmup=1, json_help="write the figures here",
                     quick_help="1024 tokens, one round, one timed step")
    args = parser.parse_args()
    if args.quick:
        args.seq_len, args.rounds, args.repeats = 1024, 1, 1
    runs: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for sp in (1, 2):
            load_before = os.getloadavg()[0]
            per_rank = run_distributed(rank, sp, args, timeout=1800)
            wall = [max(ws) for ws in zip(*(r["wall"] for r in per_rank), strict=True)]  # the slowest rank per step
            runs[sp].append({"wall_median": statistics.median(wall), "wall_best": min(wall),
                             "cpu_per_rank": statistics.median(c for r in per_rank for c in r["cpu"]),
                             "loss": sum(r["loss"] for r in per_rank), "load_before": load_before,
                             "load_after": os.getloadavg()[0]})
    rows = []
    for sp, rs in runs.items():
        for i, r in enumerate(rs):
            rows.append([sp, i + 1, f"{r['wall_median']:.2f}", f"{r['wall_best']:.2f}", f"{r['cpu_per_rank']:.2f}",
                         f"{r['cpu_per_rank'] * sp:.2f}", f"{r['loss']:.5f}",
                         f"{r['load_before']:.2f} / {r['load_after']:.2f}"])
    print(f"Qwen3.5 text, hidden {args.hidden}, {args.layers} layers (3/4 gated DeltaNet), {args.seq_len} tokens in "
          f"{args.docs} documents, fp32, 1 thread per rank")
    print(markdown_table(["SP", "round", "step s (median)", "step s (best)", "CPU s per rank", "CPU s all ranks",
                          "first loss", "load avg before / after"], rows))
    one = statistics.median(r["wall_median"] for r in runs[1])
    two = statistics.median(r["wall_median"] for r in runs[2])
    print(f"SP=2 step / SP=1 step: {two / one:.3f}")
    if args.json:
        write_json(args.json, {"args": vars(args) | {"json": str(args.json)}, "runs": runs, "ratio": two / one})


if __name__ == "__main__":
    main()
