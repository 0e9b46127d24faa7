"""Ring attention benchmark: fwd+bwd time per rank, parallel efficiency, work balance, bytes, peak memory.

CPU (default): spawns P=1 and P=2 gloo ranks, one thread each, and compares against single-process SDPA
(`F.scaled_dot_product_attention` fwd+bwd on the full sequence) measured in the same run:

    python scripts/bench_attention.py                 # S=8192, H=8, D=64, fp32
    python scripts/bench_attention.py --quick         # small sizes, seconds
    python scripts/bench_attention.py --masks         # packed documents and sliding windows
    python scripts/bench_attention.py --ulysses 1,2,4 # world 4: ring x Ulysses splits
    python scripts/bench_attention.py --peers [...]   # against DeepSpeed Ulysses and PyTorch's CP ring
                                                      # (scripts/bench_peers.py, its flags)
    python scripts/bench_attention.py --balance --world 8 --seq 131072 --doc-lengths 65536,1000,... [--json F]
                                                      # work balance of each layout, no attention run

CUDA: `torchrun --nproc-per-node N scripts/bench_attention.py --backend nccl` (NCCL, one GPU per rank),
or on one GPU `python scripts/bench_attention.py --virtual-ring 4 [--profile]`: every virtual rank's blockwise
compute + merge, run one after another with a loopback communicator, against one SDPA call.

Measured quantities (with `ringtrain.bench`):
- time: min and median over --iters of one fwd+bwd per rank (ranks start together after a barrier, the device
  synchronised); step time T_P = the slowest rank's. Efficiency = T_1 / (P x T_P), T_1 = single-process SDPA.
- work: (query, key) pairs each rank's block plan evaluates; imbalance = max / min over ranks.
- bytes: everything each rank passes to isend in one fwd+bwd (`SentBytes`, which wraps
  dist.batch_isend_irecv), against the minimum: the other P-1 shards' K/V reach every rank twice
  (forward and backward recompute) and P-1 shards' worth of fp32 dK/dV partials leave it (reduce-scatter).
- memory (CPU): peak resident set size during the timed iterations minus the RSS just before them,
  sampled every 2 ms from /proc/self/statm; glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_)
  so freed large buffers leave the RSS. On CUDA: torch.cuda.max_memory_allocated minus the allocation before.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringtrain.bench import (
    MIB,
    SentBytes,
    add_common_flags,
    device_name,
    markdown_table,
    measure,
    pin_malloc_mmap_threshold,
    sync,
    write_json,
)
from ringtrain.ring import (
    RingDocuments,
    SequenceParallel,
    rank_work,
    ring_attention,
    select_kernel,
    shard_sequence,
)
from ringtrain.ring.attention import DEFAULT_TILE_TOKENS, pairs_evaluated, ring_attention_with_comm
from ringtrain.ring.layout import get_layout, rank_positions
from ringtrain.ring.plan import visible_work

CONFIGS = [  # (name, causal, layout)
    ("causal-zigzag", True, "zigzag"),
    ("causal-contiguous", True, "contiguous"),
    ("non-causal", False, "zigzag"),
]
# Documents and windows, against full causal attention on the same tokens (name, layout, docs, window
# as a fraction of S). "packed" = document lengths drawn from `packed_document_ids`, document-masked.
MASK_CONFIGS = [
    ("causal-zigzag (no mask)", "zigzag", False, None),
    ("packed docs, zigzag", "zigzag", True, None),
    ("packed docs, contiguous", "contiguous", True, None),
    ("packed docs, balanced", "balanced", True, None),
    ("window S/8, zigzag", "zigzag", False, 1 / 8),
    ("window S/8, contiguous", "contiguous", False, 1 / 8),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def packed_document_ids(batch: int, seq: int, mean_tokens: int, seed: int = 0) -> torch.Tensor:
    """[B, S] ids of documents with log-normal lengths (median ~ mean/1.6, long tail, like web/code corpora),
    packed back to back; the last document is cut at S."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths, total = [], 0
        while total < seq:
            n = int(torch.exp(torch.randn((), generator=g) + torch.log(torch.tensor(mean_tokens / 1.65))).item()) + 1
            lengths.append(min(n, seq - total))
            total += lengths[-1]
        rows.append(torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)))
    return torch.stack(rows)


def _inputs(args, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    shape_q = (args.batch, args.seq, args.heads, args.head_dim)
    shape_kv = (args.batch, args.seq, args.kv_heads, args.head_dim)
    dtype = DTYPES[args.dtype]
    return tuple(
        torch.randn(s, generator=g).to(device, dtype) for s in (shape_q, shape_kv, shape_kv, shape_q)
    )


def _time(fn, args, device: torch.device, group=None, barrier: bool = False) -> dict:
    """Wall and CPU seconds of one fn() (min and median over --iters, after --warmup) and its peak memory over the
    level before the timed calls (`ringtrain.bench.measure`); `barrier` lines the ranks of `group` up first."""
    return measure(fn, repeats=args.repeats, warmup=args.warmup, device=device,
                   barrier=(lambda: dist.barrier(group=group)) if barrier else None).summary()


def _sdpa_step(q, k, v, dout, causal: bool) -> None:
    """Single-process baseline: PyTorch SDPA (+ autograd) on the full sequence."""
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=kt.shape[1] != qt.shape[1])
    out.backward(dout.transpose(1, 2))


def bench_rank(group, device: torch.device, args) -> dict:
    """Run every config on this rank; with world 1 also the SDPA baseline."""
    world, rank = (dist.get_world_size(group), dist.get_rank(group)) if dist.is_initialized() else (1, 0)
    q, k, v, dout = _inputs(args, device)
    res: dict = {"world": world, "rank": rank, "configs": {}}
    for name, causal, layout in CONFIGS:
        ql, kl, vl, dl = (shard_sequence(t, group=group, layout=layout) for t in (q, k, v, dout))
        ql, kl, vl = (t.requires_grad_() for t in (ql, kl, vl))

        def step(ql=ql, kl=kl, vl=vl, dl=dl, causal=causal, layout=layout):
            out = ring_attention(ql, kl, vl, group=group, causal=causal, layout=layout)
            out.backward(dl)
            ql.grad = kl.grad = vl.grad = None

        timing = _time(step, args, device, group, barrier=world > 1)
        with SentBytes() as sent:
            step()
        chunk = args.seq // (2 * world if layout == "zigzag" else world)
        res["configs"][name] = {
            **timing, "sent": sent.total,
            "work": [rank_work(world, r, layout, causal, chunk) for r in range(world)],
        }
    if world == 1 or args.sdpa_every_rank:
        for causal in (True, False):
            res[f"sdpa_causal={causal}"] = _time(lambda c=causal: _sdpa_step(q, k, v, dout, c), args, device)
    return res


def bench_masks_rank(group, device: torch.device, args) -> dict:
    """Every MASK_CONFIGS entry on this rank: time, bytes sent, per-rank plan work and visible work."""
    world, rank = (dist.get_world_size(group), dist.get_rank(group)) if dist.is_initialized() else (1, 0)
    q, k, v, dout = _inputs(args, device)
    docs_full = packed_document_ids(args.batch, args.seq, args.doc_tokens)
    res: dict = {"world": world, "rank": rank, "configs": {}}
    for name, layout, use_docs, window_frac in MASK_CONFIGS:
        window = None if window_frac is None else int(args.seq * window_frac)
        docs = docs_full if use_docs else None
        sp = SequenceParallel.over(group, layout)
        ring_docs = None if docs is None else sp.documents(docs)  # the batch's own layout for 'balanced'
        sp = sp.for_documents(ring_docs)
        ql, kl, vl, dl = (sp.shard(t) for t in (q, k, v, dout))
        ql, kl, vl = (t.requires_grad_() for t in (ql, kl, vl))

        def step(ql=ql, kl=kl, vl=vl, dl=dl, sp=sp, window=window, ring_docs=ring_docs):
            out = sp.attention(ql, kl, vl, window=window, document_ids=ring_docs)
            out.backward(dl)
            ql.grad = kl.grad = vl.grad = None

        timing = _time(step, args, device, group, barrier=world > 1)
        with SentBytes() as sent:
            step()
        res["configs"][name] = {
            **timing, "sent": sent.total,
            "work": pairs_evaluated(ring_docs, world, sp.layout, args.seq, args.batch, window=window,
                                    causal_block=getattr(select_kernel(ql), "causal_block", 0))[0],
            "visible": visible_work(docs, world, sp.layout, seq_len=args.seq, window=window),
            "n_docs": None if docs is None else int(docs[0].max()) + 1,
        }
    return res


def report_masks(by_world: dict[int, list[dict]], args, machine: str) -> str:
    """Markdown table of MASK_CONFIGS; speed-up = the unmasked causal-zigzag time at the same P / this time."""
    n_docs = by_world[min(by_world)][0]["configs"]["packed docs, zigzag"]["n_docs"]
    rows = []
    for world, ranks in sorted(by_world.items()):
        base = [r["configs"]["causal-zigzag (no mask)"] for r in ranks]
        t0, c0 = max(c["wall"] for c in base), max(c["cpu"] for c in base)
        for name, *_ in MASK_CONFIGS:
            cfgs = [r["configs"][name] for r in ranks]
            tp, tpm, cp = (max(c[key] for c in cfgs) for key in ("wall", "wall_median", "cpu"))
            work, vis = cfgs[0]["work"], cfgs[0]["visible"]
            rows.append([name, world, f"{tp:.3f} ({tpm:.3f})", f"{cp:.3f}", f"{t0 / tp:.2f}", f"{c0 / cp:.2f}",
                         f"{max(work) / 1e6:.1f}", f"{max(work) / min(work):.2f}",
                         f"{sum(vis) / 1e6:.1f} ({max(vis) / min(vis):.2f})",
                         f"{max(c['sent'] for c in cfgs) / MIB:.1f}"])
    return "\n".join([
        f"documents and windows, fwd+bwd: S={args.seq} B={args.batch} H={args.heads} H_kv={args.kv_heads} "
        f"D={args.head_dim} {args.dtype}; packed: {n_docs} documents (log-normal lengths, mean {args.doc_tokens} "
        f"tokens) in row 0; window = S/8 = {args.seq // 8}; min over {args.repeats} iterations; {machine}",
        "",
        markdown_table(["config", "P", "wall s/rank (median)", "CPU s/rank", "speed-up wall", "speed-up CPU",
                        "work M pairs/rank (max)", "work max/min", "visible M pairs (max/min)", "sent MiB/rank"],
                       rows),
    ])


def bench_hybrid_rank(mesh, args) -> dict:
    """Causal zigzag fwd+bwd on this rank of a ring x Ulysses split (the mesh's): time and bytes sent."""
    sp = mesh.sp  # the zigzag layout (parallel.layout=auto, no documents)
    q, k, v, dout = _inputs(args, torch.device("cpu"))
    ql, kl, vl, dl = (sp.shard(t) for t in (q, k, v, dout))
    ql, kl, vl = (t.requires_grad_() for t in (ql, kl, vl))

    def step():
        out = sp.attention(ql, kl, vl)
        out.backward(dl)
        ql.grad = kl.grad = vl.grad = None

    timing = _time(step, args, torch.device("cpu"), mesh.sp_group, barrier=True)
    with SentBytes() as sent:
        step()
    return {**timing, "sent": sent.total, "ring": sent.ring, "all_to_all": sent.all_to_all,
            "u": sp.ulysses_world, "r": sp.ring_world}


def hybrid_min_bytes(args, world: int, u: int) -> tuple[int, int]:
    """(all-to-all, ring) bytes one rank must send per fwd+bwd under (U, R = world / U), causal, no mask.

    All-to-all: (U-1)/U of the local q, k, v and out in forward, dout and dq, dk, dv in backward (KV heads
    replicated to U when U > H_kv). Ring: the other R-1 ring shards' K/V (S/R tokens, H_kv'/U heads) twice
    (forward, backward recompute) and R-1 shards of fp32 dK/dV partials."""
    from ringtrain.ring.ulysses import kv_replicas

    elem = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    r = world // u
    kv = args.kv_heads * kv_replicas(args.kv_heads, u)
    local = args.batch * (args.seq // world) * args.head_dim
    a2a = (u - 1) * local * (2 * (args.heads + 2 * kv) + 2 * args.heads) * elem // u
    kv_shard = 2 * args.batch * (args.seq // r) * (kv // u) * args.head_dim
    return a2a, (r - 1) * kv_shard * (2 * elem + 4)


def report_hybrid(by_u: dict[int, list[dict]], args, machine: str) -> str:
    world = len(next(iter(by_u.values())))
    base = by_u.get(1)
    rows = []
    for u, ranks in sorted(by_u.items(), reverse=True):
        tp, tpm, cp = (max(r[key] for r in ranks) for key in ("wall", "wall_median", "cpu"))
        a2a, ring = hybrid_min_bytes(args, world, u)
        sent = max(r["sent"] for r in ranks)
        split = f"{max(r['all_to_all'] for r in ranks) / MIB:.1f} + {max(r['ring'] for r in ranks) / MIB:.1f}"
        vs = "-" if base is None else f"{max(r['wall'] for r in base) / tp:.2f}"
        vs_cpu = "-" if base is None else f"{max(r['cpu'] for r in base) / cp:.2f}"
        rows.append([f"{u} x {world // u}", f"{tp:.3f} ({tpm:.3f})", f"{cp:.3f}", vs, vs_cpu,
                     f"{sent / MIB:.1f} ({split})", f"{sent / (a2a + ring):.3f}"])
    return "\n".join([
        f"ring x Ulysses, causal zigzag fwd+bwd at world {world}: S={args.seq} B={args.batch} H={args.heads} "
        f"H_kv={args.kv_heads} D={args.head_dim} {args.dtype}; min over {args.repeats} iterations; {machine}",
        "",
        markdown_table(["U x R", "wall s/rank (median)", "CPU s/rank", "wall vs pure ring", "CPU vs pure ring",
                        "sent MiB/rank (all-to-all + ring)", "sent / analytic minimum"], rows),
        "",
        "wall/CPU vs pure ring: the pure ring's time / this split's (above 1 = faster).",
    ])


def balance_report(args) -> tuple[str, dict]:
    """For zigzag, contiguous and balanced, the pairs each rank's kernel calls evaluate (from the plan and
    its pieces), the visible pairs, max/min over ranks, the K/V bytes each rank sends per fwd+bwd (from the number
    of ring steps), and the time to plan one batch on one rank. Nothing is computed on tensors of activations."""
    from ringtrain.ring.attention import pairs_evaluated

    lengths = [int(x) for x in args.doc_lengths.split(",") if x.strip()]
    if sum(lengths) < args.seq:
        lengths.append(args.seq - sum(lengths))  # the rest of the sequence: one more document
    lengths, total = [n for n in lengths if n > 0], 0
    cut = []
    for n in lengths:
        cut.append(min(n, args.seq - total))
        total += cut[-1]
        if total == args.seq:
            break
    docs = torch.repeat_interleave(torch.arange(len(cut)), torch.tensor(cut))[None]
    world = args.world
    elem = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    kv_shard = 2 * (args.seq // world) * args.kv_heads * args.head_dim  # K and V of one rank, batch 1
    out: dict = {}
    rows = []
    for name in ("zigzag", "contiguous", "balanced"):
        t0 = time.perf_counter()
        ring_docs = RingDocuments(docs, world, get_layout(name).for_documents(docs, world))
        ring_docs.plan(0, True, None, DEFAULT_TILE_TOKENS)
        plan_s = time.perf_counter() - t0
        work, n_steps = pairs_evaluated(ring_docs, world, name, args.seq)
        visible = visible_work(docs, world, ring_docs.layout)
        sent = (n_steps - 1) * kv_shard * (2 * elem + 4)  # K/V forward and backward, fp32 dK/dV partials
        out[name] = {"work": work, "visible": visible, "work_max_min": max(work) / max(min(work), 1),
                     "visible_max_min": max(visible) / max(min(visible), 1), "ring_steps": n_steps,
                     "kv_bytes_per_rank": [sent] * world, "plan_s": plan_s}
        rows.append([name, f"{max(work) / 1e6:.1f}", f"{out[name]['work_max_min']:.3f}",
                     f"{out[name]['visible_max_min']:.3f}", n_steps, f"{sent / MIB:.1f}", f"{plan_s:.4f}"])
    return "\n".join([
        f"layout balance: P={world}, S={args.seq}, {len(cut)} documents (longest {max(cut)}, shortest {min(cut)}); "
        f"H_kv={args.kv_heads} D={args.head_dim} {args.dtype}", "",
        markdown_table(["layout", "pairs evaluated (M, max/rank)", "work max/min", "visible max/min", "ring steps",
                        "K/V MiB sent/rank", "plan s/batch (one rank)"], rows),
    ]), out


def _spawned(mesh, args) -> dict:
    if args.ulysses:
        return bench_hybrid_rank(mesh, args)
    if args.masks:
        return bench_masks_rank(mesh.sp_group, torch.device("cpu"), args)
    return bench_rank(mesh.sp_group, torch.device("cpu"), args)


def _min_bytes(args, world: int) -> int:
    elem = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    kv_shard = 2 * args.batch * (args.seq // world) * args.kv_heads * args.head_dim
    return (world - 1) * kv_shard * (2 * elem + 4)  # K/V fwd + K/V bwd + fp32 dK/dV partials


def report(base: dict, by_world: dict[int, list[dict]], args, machine: str) -> str:
    """Markdown table; `base` is a rank result holding the SDPA baseline, `by_world` the ring runs by world."""
    rows = []
    for name, causal, _ in CONFIGS:
        sdpa = base[f"sdpa_causal={causal}"]
        t1, c1 = sdpa["wall"], sdpa["cpu"]
        rows.append([f"SDPA {'causal' if causal else 'non-causal'}, 1 process", 1,
                     f"{t1:.3f} ({sdpa['wall_median']:.3f})", 1, f"{c1:.3f}", 1, 1, 0, "-",
                     f"{sdpa['mem'] / MIB:.0f}"])
        for world, ranks in sorted(by_world.items()):
            cfgs = [r["configs"][name] for r in ranks]
            tp = max(c["wall"] for c in cfgs)
            tp_median = max(c["wall_median"] for c in cfgs)
            cp = max(c["cpu"] for c in cfgs)
            work = cfgs[0]["work"]
            sent = max(c["sent"] for c in cfgs)
            need = _min_bytes(args, world)
            rows.append([f"ring {name}", world, f"{tp:.3f} ({tp_median:.3f})", f"{t1 / (world * tp):.3f}",
                         f"{cp:.3f}", f"{c1 / (world * cp):.3f}", f"{max(work) / min(work):.3f}",
                         f"{sent / MIB:.1f}", f"{sent / need if need else 1.0:.3f}",
                         f"{max(c['mem'] for c in cfgs) / MIB:.0f}"])
    return "\n".join([
        f"ring attention fwd+bwd: S={args.seq} B={args.batch} H={args.heads} H_kv={args.kv_heads} "
        f"D={args.head_dim} {args.dtype}, min over {args.repeats} iterations (warmup {args.warmup}); {machine}",
        "",
        markdown_table(["config", "P", "wall s/rank (median)", "eff. wall T1/(P*TP)", "CPU s/rank", "eff. CPU",
                        "work max/min", "sent MiB/rank", "sent/min", "peak mem MiB/rank"], rows),
    ])


class LoopbackComm:
    """A ring of `world` virtual ranks on one device: transfers become device copies (timing proxy only)."""

    def __init__(self, world: int, rank: int) -> None:
        self.world, self.rank = world, rank

    def post(self, send, recv, hops: int = 1) -> list:
        for s, r in zip(send, recv, strict=True):
            r.copy_(s)
        return []

    @staticmethod
    def wait(works) -> None:
        pass


def _profile_table(fn, title: str, rows: int = 12) -> str:
    """The ops of one fn() call that took the most device time (torch.profiler), as printed text."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])]
    with profile(activities=activities) as prof:
        fn()
        sync(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return f"\nprofile: {title}\n" + prof.key_averages().table(sort_by=key, row_limit=rows) + "\n"


def _packed_baseline_step(q, k, v, dout, docs: torch.Tensor) -> None:
    """Packed documents over the whole sequence without a ring: the flash varlen op on CUDA (one call over every
    document, cumulative lengths), one SDPA call per document on CPU. Forward and backward."""
    b, s, h, d = q.shape
    ids = docs[0]
    bounds = torch.cat([torch.tensor([0]), torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1, torch.tensor([s])])
    if q.device.type == "cuda":
        from ringtrain.ring.kernels import default_scale, select_kernel

        # The flash varlen op through the kernel the ring itself uses: one call over every document.
        flash = select_kernel(q, "cuda_flash")
        cu = bounds.to(q.device, torch.int32)
        longest = int((bounds[1:] - bounds[:-1]).max())
        flat = [t[0] for t in (q, k, v)]  # [T, H, D], [T, H_kv, D]
        scale = default_scale(d)
        out, lse = flash.varlen_forward(*flat, cu, cu, longest, longest, True, scale)
        flash.varlen_backward(dout[0], *flat, out, lse, cu, cu, longest, longest, True, scale)
        return
    for a, c in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        _sdpa_step(q[:, a:c], k[:, a:c], v[:, a:c], dout[:, a:c], True)


def _window_baseline_step(q, k, v, dout, window: int) -> None:
    """A causal sliding window over the whole sequence without a ring: the flash op's window sizes on CUDA, SDPA
    with a dense band mask on CPU (a smoke figure only). Forward and backward."""
    h = q.shape[2]
    if q.device.type == "cuda":
        from ringtrain.ring.kernels import KERNELS

        kernel = KERNELS["cuda_flash"]
        out, lse = kernel.forward(q, k, v, False, q.shape[-1] ** -0.5, window=(window - 1, 0))
        kernel.backward(dout, q, k, v, out, lse, False, q.shape[-1] ** -0.5, window=(window - 1, 0))
        return
    i = torch.arange(q.shape[1])
    band = (i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < window)
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=band, enable_gqa=kt.shape[1] != h)
    out.backward(dout.transpose(1, 2))


VIRTUAL_CONFIGS = [  # (name, documents: mean length as a fraction of S, window as a fraction of S)
    ("causal", None, None),
    ("packed documents (mean S/16)", 1 / 16, None),
    ("window S/8", None, 1 / 8),
]


def virtual_ring(args) -> tuple[str, list[dict]]:
    """One GPU: sum over P virtual ranks of blockwise compute + merge (zigzag), against the same attention over the
    whole sequence in one process: one SDPA call (causal), flash varlen (packed documents), the flash window op."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: a smoke run of the script
    q, k, v, dout = _inputs(args, device)
    profiles: list[str] = []  # printed after the table
    world, records, rows = args.virtual_ring, [], []
    for name, doc_frac, window_frac in VIRTUAL_CONFIGS:
        docs = None if doc_frac is None else packed_document_ids(1, args.seq, int(args.seq * doc_frac))
        window = None if window_frac is None else int(args.seq * window_frac)
        if docs is not None:
            base_name, base = "flash varlen" if device.type == "cuda" else "SDPA per document", \
                _time(lambda docs=docs: _packed_baseline_step(q, k, v, dout, docs), args, device)
        elif window is not None:
            base_name, base = "flash window" if device.type == "cuda" else "SDPA + band mask", \
                _time(lambda window=window: _window_baseline_step(q, k, v, dout, window), args, device)
        else:
            base_name, base = "SDPA", _time(lambda: _sdpa_step(q, k, v, dout, True), args, device)
        ring_docs = None if docs is None else RingDocuments(docs.to(device), world, "zigzag")
        total, mem = 0.0, 0
        for rank in range(world):
            pos = rank_positions(args.seq, "zigzag", world, rank, device=device)
            ql, kl, vl, dl = (t[:, pos] for t in (q, k, v, dout))
            ql, kl, vl = (t.requires_grad_() for t in (ql, kl, vl))
            comm = LoopbackComm(world, rank)

            def step(ql=ql, kl=kl, vl=vl, dl=dl, comm=comm, window=window, ring_docs=ring_docs):
                out = ring_attention_with_comm(comm, ql, kl, vl, window=window, document_ids=ring_docs)
                out.backward(dl)
                ql.grad = kl.grad = vl.grad = None

            timing = _time(step, args, device)
            total, mem = total + timing["wall"], max(mem, timing["mem"])
            if args.profile and rank == 0 and docs is None and window is None:
                profiles.append(_profile_table(step, f"virtual rank 0 of {world}, causal"))
                profiles.append(_profile_table(lambda: _sdpa_step(q, k, v, dout, True), "SDPA causal"))
        records.append({"config": name, "seq": args.seq, "world": world, "baseline": base_name,
                        "baseline_s": base["wall"], "ring_s": total, "baseline_over_ring": base["wall"] / total,
                        "baseline_mib": base["mem"] / MIB, "ring_mib_per_rank": mem / MIB,
                        "n_docs": None if docs is None else int(docs.max()) + 1})
        rows.append([name, base_name, f"{base['wall']:.4f}", f"{total:.4f}", f"{base['wall'] / total:.3f}",
                     f"{base['mem'] / MIB:.0f}", f"{mem / MIB:.0f}"])
    lines = [f"virtual ring P={args.virtual_ring} on {device_name(device)}, torch {torch.__version__}: "
             f"S={args.seq} H={args.heads} H_kv={args.kv_heads} D={args.head_dim} {args.dtype}, zigzag",
             markdown_table(["config", "baseline", "baseline s", "virtual ring s (sum of ranks)", "baseline / ring",
                             "baseline working MiB", "ring working MiB/rank (max)"], rows)]
    return "\n".join(lines + profiles), records


def ulysses_local(args) -> tuple[str, dict]:
    """What a rank of pure Ulysses (R = 1) computes, one local call over the whole sequence for H/U heads
    through the ring driver (a world of one), against one SDPA call on the same heads: the same kernel, so ~1."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    u = args.ulysses_local
    heads, kv = args.heads // u, max(1, args.kv_heads // u)
    shape = argparse.Namespace(**{**vars(args), "heads": heads, "kv_heads": kv})
    q, k, v, dout = _inputs(shape, device)
    sdpa = _time(lambda: _sdpa_step(q, k, v, dout, True), args, device)

    def step():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        ring_attention(qq, kk, vv).backward(dout)

    ring = _time(step, args, device)
    rec = {"config": f"ulysses local (U={u})", "seq": args.seq, "heads": heads, "kv_heads": kv,
           "sdpa_s": sdpa["wall"], "ringtrain_s": ring["wall"], "sdpa_over_ringtrain": sdpa["wall"] / ring["wall"]}
    text = (f"Ulysses local attention, U={u}: S={args.seq}, {heads} heads ({kv} KV), one call through the driver "
            f"{ring['wall']:.4f} s vs one SDPA call {sdpa['wall']:.4f} s: {rec['sdpa_over_ringtrain']:.3f}")
    return text, rec


def main() -> None:
    if "--peers" in sys.argv[1:]:  # the peer benchmark has its own flags (scripts/bench_peers.py)
        from bench_peers import main as peers_main

        peers_main([a for a in sys.argv[1:] if a != "--peers"])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    add_common_flags(p, repeats=3, repeats_flags=("--repeats", "--iters"), warmup=1, threads=1,
                     json_help="--virtual-ring, --balance: also write the records here (stamped with the machine)",
                     quick_help="S=1024, 2 iterations: a smoke run")
    p.add_argument("--worlds", default="1,2", help="CPU: comma-separated world sizes to spawn (1 is required)")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--virtual-ring", type=int, default=0, metavar="P", help="one GPU: simulate P ranks")
    p.add_argument("--masks", action="store_true",
                   help="documents and windows: packed document-masked batch and a window of S/8, "
                        "against full causal attention on the same tokens")
    p.add_argument("--doc-tokens", type=int, default=1000, help="--masks: mean packed document length")
    p.add_argument("--ulysses", default="", metavar="U,U,...",
                   help="Ulysses degrees to compare at --world (default 4) ranks, e.g. 1,2,4 (1 = pure ring)")
    p.add_argument("--world", type=int, default=4, help="--ulysses, --balance: ranks")
    p.add_argument("--balance", action="store_true",
                   help="work balance, ring steps and bytes of each layout for --doc-lengths (no attention)")
    p.add_argument("--doc-lengths", default="", help="--balance: comma-separated document lengths (the rest of "
                                                     "--seq becomes one more document)")
    p.add_argument("--ulysses-local", type=int, default=0, metavar="U",
                   help="--virtual-ring: also time the local attention of pure Ulysses (H/U heads, the whole "
                        "sequence) against one SDPA call")
    p.add_argument("--profile", action="store_true",
                   help="--virtual-ring: also print the ops taking the most device time (rank 0 and SDPA, causal)")
    p.add_argument("--sdpa-every-rank", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.kv_heads = args.kv_heads or args.heads
    if args.quick:
        args.seq, args.repeats, args.warmup = 1024, 2, 1
    pin_malloc_mmap_threshold()  # for the ranks spawned below

    if args.balance:
        torch.set_num_threads(args.threads)  # the plan's small ops: pool threads only add spin time on a busy host
        text, records = balance_report(args)
        print(text)
        if args.json:
            write_json(args.json, {"layouts": records})
        return
    if args.virtual_ring:
        text, records = virtual_ring(args)
        print(text)
        if args.ulysses_local:
            text, rec = ulysses_local(args)
            print(text)
            records.append(rec)
        if args.json:
            write_json(args.json, {"records": records})
        return
    if args.backend == "nccl":
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        args.sdpa_every_rank = True  # every GPU runs the baseline alone: T1 on the same kind of device
        res = bench_rank(None, torch.device("cuda", local_rank), args)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, res)
        if dist.get_rank() == 0:
            world = dist.get_world_size()
            print(report(gathered[0], {world: gathered}, args, f"NCCL, {world} x {torch.cuda.get_device_name()}"))
        dist.destroy_process_group()
        return

    from ringtrain.testing import run_distributed

    machine = (f"{os.cpu_count()}-core CPU, torch {torch.__version__}, gloo, "
               f"{args.threads} thread(s) per rank")
    if args.ulysses:
        by_u = {int(u): run_distributed(_spawned, args.world, args, ulysses_size=int(u), threads=args.threads,
                                        timeout=3600) for u in args.ulysses.split(",")}
        print(report_hybrid(by_u, args, machine))
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    if 1 not in worlds:
        p.error("--worlds must include 1 (the SDPA baseline runs there)")
    by_world = {}
    for world in worlds:
        by_world[world] = run_distributed(_spawned, world, args, threads=args.threads, timeout=3600)
    if args.masks:
        print(report_masks(by_world, args, machine))
        return
    print(report(by_world[1][0], by_world, args, machine))


if __name__ == "__main__":
    main()
