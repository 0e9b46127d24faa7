"""Preference pairs packed as two documents of one sequence against two padded sequences: the longest pair that fits a
fixed memory, and the step time, on CPU.

    python scripts/bench_preference.py                # docs/benchmarks.md, "Preference training (issue 29)"
    python scripts/bench_preference.py --quick        # a smoke run

A pair of length T is a prompt of `prompt_share` x T tokens and a chosen response of the rest; the rejected response
is `rejected_ratio` times the chosen one's length. Packed: one sequence holding prompt + chosen and prompt +
rejected as two documents (2 P + C + R tokens, EOS each). Padded: the usual DPO batch, two rows of P + max(C, R)
tokens, the shorter response padded. Both go through the same DPO step of the real Trainer (the reference: LoRA's
base with adapters disabled), in a fresh pair of spawned gloo ranks per configuration (SP=2, zigzag, activation
checkpointing, fp32, one thread per rank), so only the layout differs. Memory: a rank's high-water mark during the
steps above its resident set once built (`end hwm - built rss`), the larger of the two ranks; a layout "fits" a
length when that is within --budget-mib. Step time: the median of the steps after the first, the slower rank. No
figure is asserted: this prints them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from ringtrain.bench import (
    MIB,
    add_common_flags,
    markdown_table,
    model_spec,
    pin_malloc_mmap_threshold,
    run_steps,
    write_json,
)
from ringtrain.testing import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pair_tokens(length: int, prompt_share: float, rejected_ratio: float) -> tuple[int, int, int]:
    """(prompt, chosen, rejected) token counts of a pair of `length` = prompt + the longer response."""
    prompt = int(length * prompt_share)
    chosen = length - prompt
    return prompt, chosen, max(1, int(chosen * rejected_ratio))


def layout_batch(layout: str, prompt: int, chosen: int, rejected: int, vocab: int, multiple: int) -> dict[str, Any]:
    """The full-sequence batch of one pair: packed (one row, two documents) or padded (two rows), as the data
    pipeline gives it, labels on the responses (and the EOS after each)."""
    import torch

    from ringtrain.data.packing import pack_documents

    g = np.random.default_rng(1)
    p = g.integers(2, vocab, prompt)
    docs = [np.concatenate([p, g.integers(2, vocab, n)]) for n in (chosen, rejected)]
    masks = [np.arange(len(d)) >= prompt for d in docs]
    if layout == "packed":
        seq_len = -(-sum(len(d) + 1 for d in docs) // multiple) * multiple
        packed = pack_documents(docs, seq_len, 1, 0, split_documents=False, loss_masks=masks, pairs=True)
        return packed.batch([0])
    seq_len = -(-(prompt + max(chosen, rejected) + 1) // multiple) * multiple
    rows = [pack_documents([d], seq_len, 1, 0, split_documents=False, loss_masks=[m]).batch([0])
            for d, m in zip(docs, masks, strict=True)]
    batch = {k: torch.cat([r[k] for r in rows]) for k in rows[0]}
    # The pair spans the two rows: row 0 is response 0 (chosen), row 1 response 1 (rejected).
    valid = batch["labels"] != -100
    batch["response_ids"] = torch.where(valid, torch.arange(2)[:, None].expand_as(valid), -1)
    return batch


def rank(mesh: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """A spawned rank: the real Trainer's DPO step on the same pair every step."""
    import torch.distributed as dist

    from ringtrain.train.trainer import build_trainer
    from ringtrain.validate import load_validated_config

    batch = layout_batch(spec["layout"], *spec["pair"], spec["model"]["vocab_size"], 4)
    rows, seq_len = batch["input_ids"].shape
    with tempfile.TemporaryDirectory() as out:
        def build():
            import json

            cfg = load_validated_config(None, [
                "model.arch=llama", f"model.config={json.dumps({**spec['model'], 'max_position_embeddings': seq_len})}",
                "model.dtype=float32", f"parallel.sp_size={mesh.sp_size}", "parallel.layout=zigzag",
                "data.source=files", f"data.path={ROOT}/ringtrain/data/samples/preference.jsonl",
                "data.tokenizer=bytes", f"data.cache_dir={out}/cache", "train.objective=dpo",
                f"train.seq_len={seq_len}", f"train.micro_batch_size={rows}", "train.activation_checkpointing=true",
                "train.threads=1", "train.fsdp=true", f"train.output_dir={out}", "peft.method=lora", "peft.r=16",
                "peft.alpha=32", "peft.trainable_modules=[]", "optim.warmup_steps=0", "logging.progress_bar=false"])
            trainer = build_trainer(cfg, mesh)
            trainer.loader = itertools.repeat(batch)  # the same pair every step, as the loader would give it
            dist.barrier()
            return lambda: trainer.train_step()["loss"]

        return run_steps(build, spec["steps"], barrier=dist.barrier)


def run(layout: str, length: int, args: argparse.Namespace, model: dict[str, Any]) -> dict[str, float]:
    pair = pair_tokens(length, args.prompt_share, args.rejected_ratio)
    spec = {"layout": layout, "pair": pair, "model": model, "steps": args.steps}
    ranks = run_distributed(rank, 2, spec, timeout=3600)
    walls = [max(r["records"][i]["wall_s"] for r in ranks) for i in range(1, args.steps)]
    cpus = [max(r["records"][i]["cpu_s"] for r in ranks) for i in range(1, args.steps)]
    step_mib = max(r["end"]["hwm"] - r["built"]["rss"] for r in ranks) / MIB
    tokens = 2 * pair[0] + pair[1] + pair[2] + 2 if layout == "packed" else 2 * (pair[0] + max(pair[1:]) + 1)
    return {"length": length, "tokens": tokens, "step_mib": step_mib, "step_s": statistics.median(walls),
            "cpu_s": statistics.median(cpus), "loss": ranks[0]["records"][0]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="20m", help="ringtrain.bench.MODEL_SPECS entry (default 20m)")
    parser.add_argument("--vocab", type=int, default=1024,
                        help="vocabulary size (default 1024: the loss's [chunk, vocab] buffer then does not hide the "
                             "activations, which are what the layout changes)")
    parser.add_argument("--budget-mib", type=float, default=1024.0, help="the fixed memory per rank for the step")
    parser.add_argument("--lengths", default="2048,3072,4096,5120,6144,7168,8192",
                        help="pair lengths (prompt + longer response) to try, increasing")
    parser.add_argument("--prompt-share", type=float, default=0.75)
    parser.add_argument("--rejected-ratio", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=3)
    add_common_flags(parser, json_help="also write the figures here", quick_help="tiny model, short")
    args = parser.parse_args()
    if args.quick:
        args.model, args.lengths, args.steps, args.budget_mib = "tiny", "256,512", 2, 64.0
    pin_malloc_mmap_threshold()  # freed large buffers leave the ranks' resident sets
    model = model_spec(args.model, vocab_size=args.vocab)
    lengths = [int(x) for x in args.lengths.split(",")]
    load_before, cpu_start = os.getloadavg(), time.process_time()
    results: dict[str, list[dict[str, float]]] = {"packed": [], "padded": []}
    for length in lengths:
        for layout in results:  # interleaved, so a load change hits both
            if results[layout] and results[layout][-1]["step_mib"] > args.budget_mib:
                continue  # already over the budget at a shorter length
            results[layout].append(run(layout, length, args, model))
            r = results[layout][-1]
            print(f"{layout} T={length}: {r['tokens']} tokens, step {r['step_mib']:.0f} MiB, {r['step_s']:.2f} s",
                  flush=True)
    longest = {k: max((r["length"] for r in v if r["step_mib"] <= args.budget_mib), default=0)
               for k, v in results.items()}
    rows = []
    for layout, runs in results.items():
        rows += [[layout, r["length"], r["tokens"], f"{r['step_mib']:.0f}", f"{r['step_s']:.2f}", f"{r['cpu_s']:.2f}"]
                 for r in runs]
    print(markdown_table(["layout", "pair length T", "tokens per pair", "step peak MiB/rank", "step s",
                          "CPU s/step (rank)"], rows))
    print(f"\nlongest pair within {args.budget_mib:.0f} MiB/rank: packed {longest['packed']}, padded "
          f"{longest['padded']} (prompt {args.prompt_share:.0%} of T, rejected {args.rejected_ratio:g} x chosen)")
    print(f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; this process's CPU "
          f"{time.process_time() - cpu_start:.1f} s")
    if args.json:
        write_json(args.json, {"results": results, "longest": longest, "budget_mib": args.budget_mib,
                               "args": {k: str(v) for k, v in vars(args).items()}, "load_before": load_before, "load_after": os.getloadavg()})


if __name__ == "__main__":
    main()
