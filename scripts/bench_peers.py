"""ringtrain against its peers on the same attention work, interleaved per iteration in one run.

    python scripts/bench_peers.py                     # P=2 gloo ranks on CPU, S=8192, H=8, D=64, fp32
    python scripts/bench_peers.py --quick             # small sizes, seconds (what the test suite runs)
    python scripts/bench_attention.py --peers ...     # the same

Three cases (--cases): `full` heads (H_kv = H), `gqa` (H_kv = H / 4) and `packed` documents (--doc-lengths, causal
within each document). Each case times, for every implementation, one causal fwd+bwd of the local shard per rank;
every iteration runs every implementation once (the order alternating), the ranks lined up by a barrier before each,
so a loaded machine hits them alike. Implementations:

- ringtrain ring (zigzag; balanced too for packed documents) and ringtrain Ulysses U=P (a ring of one);
- DeepSpeed Ulysses: `deepspeed.sequence.layer.DistributedAttention` around SDPA (`enable_gqa`), one SDPA call per
  document for packed documents: the optional `peers` extra (`DS_BUILD_OPS=0 pip install 'ringtrain[peers]'` on CPU);
- PyTorch's context-parallel ring called directly (the private `_templated_ring_attention` and its backward, the
  round-robin load balancer, i.e. zigzag shards), with each rotate method (`alltoall`, `allgather`), on the CPU flash
  op. It has no document mask (its public path for them, flex attention, has no CPU backward).

A peer that cannot be imported or run is reported as unavailable with the reason, never silently dropped.
Reported per implementation: the median over iterations of the slowest rank's wall time, the median CPU seconds of
the busiest rank, the efficiency T_1 / (P x T_P) with T_1 one process's SDPA on the whole sequence measured in the same
run (packed documents: one SDPA call per document, the cheapest exact one-process plan), and the largest error of
the output against one process's float64 attention.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringtrain.bench import markdown_table, run_stamp, write_json
from ringtrain.ring import SequenceParallel
from ringtrain.ring.cost import DEVICE_COSTS, AttentionShape, plan_cost
from ringtrain.testing import run_distributed

ROTATE_METHODS = ("alltoall", "allgather")


def document_ids(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]


def _bhsd(*ts: torch.Tensor) -> list[torch.Tensor]:
    return [t.transpose(1, 2) for t in ts]


def sdpa_documents(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int] | None) -> torch.Tensor:
    """Causal SDPA on [B, S, H, D] (K/V with their own heads), one call per document when `lengths` is given."""
    gqa = k.shape[2] != q.shape[2]
    if lengths is None:
        return F.scaled_dot_product_attention(*_bhsd(q, k, v), is_causal=True, enable_gqa=gqa).transpose(1, 2)
    outs, start = [], 0
    for n in lengths:
        sl = slice(start, start + n)
        outs.append(F.scaled_dot_product_attention(*_bhsd(q[:, sl], k[:, sl], v[:, sl]), is_causal=True,
                                                   enable_gqa=gqa).transpose(1, 2))
        start += n
    return torch.cat(outs, dim=1)


def reference(q, k, v, lengths) -> torch.Tensor:
    """One process's float64 attention on the whole sequence (the per-document calls are exact)."""
    return sdpa_documents(q.double(), k.double(), v.double(), lengths)


class Impl:
    """One implementation on this rank: `step()` runs fwd+bwd of the local shard, `out()` its local output and
    `expected(full)` the matching part of a full-sequence tensor."""

    def __init__(self, step: Callable[[], torch.Tensor], expected: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.run, self.expected = step, expected

    def step(self) -> torch.Tensor:
        return self.run()


def _fwd_bwd(fn: Callable, leaves: list[torch.Tensor], dout: torch.Tensor) -> Callable[[], torch.Tensor]:
    def step() -> torch.Tensor:
        out = fn(*leaves)
        out.backward(dout)
        for t in leaves:
            t.grad = None
        return out.detach()

    return step


def ringtrain_impl(sp: SequenceParallel, q, k, v, dout, docs: torch.Tensor | None) -> Impl:
    ring_docs = None if docs is None else sp.documents(docs)
    sp_b = sp.for_documents(ring_docs)
    leaves = [sp_b.shard(t).requires_grad_() for t in (q, k, v)]
    return Impl(_fwd_bwd(lambda a, b, c: sp_b.attention(a, b, c, document_ids=ring_docs), leaves, sp_b.shard(dout)),
                sp_b.shard)


def deepspeed_impl(group, q, k, v, dout, lengths: list[int] | None) -> Impl:
    import deepspeed.comm as ds_comm
    from deepspeed.sequence.layer import DistributedAttention

    if not ds_comm.is_initialized():
        ds_comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    p, r = dist.get_world_size(group), dist.get_rank(group)

    def local(qh, kh, vh, *args, **kwargs):  # [B, S, H/P, D]: the whole sequence for this rank's heads
        return sdpa_documents(qh, kh, vh, lengths)

    attn = DistributedAttention(local, group, scatter_idx=2, gather_idx=1)
    s = q.shape[1] // p

    def shard(t: torch.Tensor) -> torch.Tensor:
        return t[:, r * s:(r + 1) * s].contiguous()

    leaves = [shard(t).requires_grad_() for t in (q, k, v)]
    return Impl(_fwd_bwd(lambda a, b, c: attn(a, b, c, 0), leaves, shard(dout)), shard)


def torch_cp_impl(group, q, k, v, dout, rotate: str) -> Impl:
    """PyTorch's CP ring on zigzag (round-robin) shards, [B, H, S, D], fwd and bwd through its templates."""
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    p, r = dist.get_world_size(group), dist.get_rank(group)
    scale = q.shape[-1] ** -0.5

    def fwd_op(query, key, value, is_causal=False, **_):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal,
                                                                         scale=scale)

    def bwd_op(query, key, value, out, logsumexp, is_causal, grad_out, **_):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, query, key, value, out, logsumexp.contiguous(), 0.0, is_causal, scale=scale)

    def shard(t: torch.Tensor) -> torch.Tensor:  # [B, S, H, D]: chunks r and 2P-1-r
        chunks = t.chunk(2 * p, dim=1)
        return torch.cat([chunks[r], chunks[2 * p - 1 - r]], dim=1).contiguous()

    class Ring(torch.autograd.Function):
        @staticmethod
        def forward(ctx, qh, kh, vh):
            out, lse = cp._templated_ring_attention(group, 2, fwd_op, qh, kh, vh, is_causal=True)[:2]
            ctx.save_for_backward(qh, kh, vh, out, lse)
            return out

        @staticmethod
        def backward(ctx, dout_h):
            qh, kh, vh, out, lse = ctx.saved_tensors
            return tuple(cp._templated_ring_attention_backward(
                group, 2, bwd_op, dout_h.contiguous(), "grad_out", qh, kh, vh, out, lse, is_causal=True)[:3])

    def run(a, b, c):
        cp.set_rotate_method(rotate)
        cp._cp_options.enable_load_balance = True
        return Ring.apply(*_bhsd(a, b, c)).transpose(1, 2)

    leaves = [shard(t).requires_grad_() for t in (q, k, v)]
    return Impl(_fwd_bwd(run, leaves, shard(dout)), shard)


def _single_groups(world: int, rank: int):
    """Every rank's ring of one (new_group is collective: every rank builds every group)."""
    groups = [dist.new_group([r]) for r in range(world)]
    return groups[rank]


def build_impls(args, mesh, q, k, v, dout, lengths) -> tuple[dict[str, Impl | str], bool]:
    group, rank = mesh.sp_group, mesh.rank
    docs = None if lengths is None else document_ids(lengths)
    impls: dict[str, Impl | str] = {}
    ring = SequenceParallel.over(group, layout="zigzag")
    impls["ringtrain ring (zigzag)"] = ringtrain_impl(ring, q, k, v, dout, docs)
    if docs is not None:
        impls["ringtrain ring (balanced)"] = ringtrain_impl(SequenceParallel.over(group, layout="balanced"),
                                                            q, k, v, dout, docs)
    p = dist.get_world_size(group)
    if q.shape[2] % p == 0 and (k.shape[2] % p == 0 or p % k.shape[2] == 0):
        uly = SequenceParallel(ring_group=args.single_group, ulysses_group=group, layout="zigzag")
        impls[f"ringtrain Ulysses U={p}"] = ringtrain_impl(uly, q, k, v, dout, docs)
    try:
        impls["DeepSpeed Ulysses + SDPA"] = deepspeed_impl(group, q, k, v, dout, lengths)
    except Exception as e:  # an optional peer: why it is missing is the result
        impls["DeepSpeed Ulysses + SDPA"] = f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
    for rotate in ROTATE_METHODS:
        name = f"PyTorch CP ring ({rotate})"
        if docs is not None:
            impls[name] = "cannot express it (no document mask on its CPU path)"
            continue
        try:
            impls[name] = torch_cp_impl(group, q, k, v, dout, rotate)
        except Exception as e:
            impls[name] = f"unavailable ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
    del rank
    return impls, docs is not None


def _case_inputs(args, case: str):
    kv_heads = args.heads // 4 if case == "gqa" else args.heads
    g = torch.Generator().manual_seed(0)
    shapes = [(1, args.seq, h, args.head_dim) for h in (args.heads, kv_heads, kv_heads, args.heads)]
    q, k, v, dout = (torch.randn(s, generator=g) for s in shapes)
    lengths = args.doc_lengths if case == "packed" else None
    return q, k, v, dout, lengths


def bench_rank(mesh, args) -> dict:
    torch.set_num_threads(1)
    group = mesh.sp_group
    args.single_group = _single_groups(dist.get_world_size(group), mesh.rank)
    results: dict = {}
    for case in args.cases:
        q, k, v, dout, lengths = _case_inputs(args, case)
        impls, _ = build_impls(args, mesh, q, k, v, dout, lengths)
        ref = reference(q, k, v, lengths)
        runnable = {n: i for n, i in impls.items() if isinstance(i, Impl)}
        rec: dict = {n: {"wall": [], "cpu": []} if n in runnable else {"unavailable": i} for n, i in impls.items()}
        rec["SDPA, one process"] = {"wall": [], "cpu": []}
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        sdpa = _fwd_bwd(lambda a, b, c, lengths=lengths: sdpa_documents(a, b, c, lengths), leaves, dout)
        for name, impl in runnable.items():  # warm-up and the error against float64
            out = impl.step()
            rec[name]["max_error"] = float((out.double() - impl.expected(ref)).abs().max())
        for it in range(args.repeats):
            order = list(runnable) if it % 2 == 0 else list(runnable)[::-1]
            for name in order:
                dist.barrier(group=group)
                w, c = time.perf_counter(), time.thread_time()
                runnable[name].step()
                rec[name]["cpu"].append(time.thread_time() - c)
                rec[name]["wall"].append(time.perf_counter() - w)
            dist.barrier(group=group)
            if mesh.rank == 0:  # the one-process baseline, the other ranks waiting at the barrier
                w, c = time.perf_counter(), time.thread_time()
                sdpa()
                rec["SDPA, one process"]["cpu"].append(time.thread_time() - c)
                rec["SDPA, one process"]["wall"].append(time.perf_counter() - w)
        results[case] = rec
    return results


def summarise(per_rank: list[dict], world: int) -> dict:
    """Per case and implementation: median over iterations of the slowest rank's wall time, median CPU time of the
    busiest rank, efficiency against the one-process SDPA."""
    out: dict = {}
    for case, rec0 in per_rank[0].items():
        base = statistics.median(rec0["SDPA, one process"]["wall"])
        base_cpu = statistics.median(rec0["SDPA, one process"]["cpu"])
        rows = {"SDPA, one process": {"wall_s": base, "cpu_s": base_cpu, "efficiency": 1.0, "cpu_efficiency": 1.0}}
        for name, r in rec0.items():
            if name == "SDPA, one process":
                continue
            if "unavailable" in r:
                rows[name] = {"unavailable": r["unavailable"]}
                continue
            walls = [max(pr[case][name]["wall"][i] for pr in per_rank) for i in range(len(r["wall"]))]
            cpus = [max(pr[case][name]["cpu"][i] for pr in per_rank) for i in range(len(r["cpu"]))]
            wall = statistics.median(walls)
            rows[name] = {"wall_s": wall, "cpu_s": statistics.median(cpus), "efficiency": base / (world * wall),
                          "cpu_efficiency": base_cpu / (world * statistics.median(cpus)),
                          "max_error": max(pr[case][name]["max_error"] for pr in per_rank)}
        out[case] = rows
    return out


def modelled_seconds(args, case: str, name: str) -> float | None:
    """The cost model's seconds (`ringtrain.ring.cost`, CPU constants) for a ringtrain plan or the one-process
    baseline, to set beside the measured CPU seconds: the check that `parallel.ulysses_size: 0` chooses by figures
    that hold."""
    _, k, _, _, lengths = _case_inputs(args, case)
    shape = AttentionShape(1, args.seq, args.heads, k.shape[2], args.head_dim, args.head_dim, 4)
    docs = None if lengths is None else document_ids(lengths)
    plans = {"SDPA, one process": (1, 1, "zigzag"), "ringtrain ring (zigzag)": (args.world, 1, "zigzag"),
             "ringtrain ring (balanced)": (args.world, 1, "balanced"),
             f"ringtrain Ulysses U={args.world}": (args.world, args.world, "zigzag")}
    if name not in plans:
        return None
    sp, u, layout = plans[name]
    return plan_cost(shape, sp, u, layout, DEVICE_COSTS["cpu"], docs).seconds


def report(summary: dict, args, load: tuple[str, str]) -> str:
    lines = [f"P={args.world} gloo ranks, 1 thread each, S={args.seq}, H={args.heads}, D={args.head_dim}, fp32, causal "
             f"fwd+bwd, medians of {args.repeats} interleaved iterations; load average before / after: {load[0]} / "
             f"{load[1]}", ""]
    rows = []
    for case, impls in summary.items():
        for name, r in impls.items():
            model = modelled_seconds(args, case, name)
            model = "-" if model is None else f"{model:.3f}"
            if "unavailable" in r:
                rows.append([case, name, "-", "-", model, "-", "-", r["unavailable"]])
            else:
                rows.append([case, name, f"{r['wall_s']:.3f}", f"{r['cpu_s']:.3f}", model, f"{r['efficiency']:.3f}",
                             f"{r.get('cpu_efficiency', 1.0 / args.world):.3f}",
                             f"{r['max_error']:.1e}" if "max_error" in r else "-"])
    lines.append(markdown_table(["case", "implementation", "wall s (slowest rank)", "CPU s (busiest rank)",
                                 "modelled s", "efficiency (wall)", "efficiency (CPU)", "max error vs fp64"], rows))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--world", type=int, default=2, help="gloo ranks (P=4 oversubscribes a 2-core machine)")
    p.add_argument("--repeats", "--iters", type=int, default=5)
    p.add_argument("--cases", default="full,gqa,packed")
    p.add_argument("--doc-lengths", default="", help="packed: comma-separated lengths (default 3000 and the rest)")
    p.add_argument("--quick", action="store_true", help="S=256, H=8, D=16, 1 iteration: a smoke run")
    p.add_argument("--json", default=None, help="also write the records here (stamped with the machine)")
    args = p.parse_args(argv)
    if args.quick:
        args.seq, args.head_dim, args.repeats = 256, 16, 1
    args.cases = args.cases.split(",")
    lengths = [int(n) for n in args.doc_lengths.split(",") if n] or [min(3000, args.seq * 3 // 8)]
    if sum(lengths) < args.seq:
        lengths.append(args.seq - sum(lengths))
    if sum(lengths) != args.seq or args.seq % (2 * args.world):
        p.error(f"--doc-lengths sum to {sum(lengths)} and --seq is {args.seq}: the lengths must sum to at most --seq, "
                f"and --seq must be a multiple of 2 x world = {2 * args.world}")
    args.doc_lengths = lengths
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    per_rank = run_distributed(bench_rank, args.world, args, timeout=3000)
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    summary = summarise(per_rank, args.world)
    print(report(summary, args, (" ".join(load_before), " ".join(load_after))))
    if args.json:
        write_json(args.json, {**run_stamp(), "args": {k: v for k, v in vars(args).items() if k != "single_group"},
                               "load_before": load_before, "load_after": load_after, "summary": summary})


if __name__ == "__main__":
    main(sys.argv[1:])
