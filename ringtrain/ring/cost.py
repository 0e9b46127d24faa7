"""What an exact sequence-parallel attention plan costs: a model of one layer's causal fwd+bwd on the busiest rank,
used to choose the Ulysses / ring split and the layout (`parallel.ulysses_size: 0`, auto) and checked against the
measured plans by `scripts/bench_peers.py`.

A plan is (U, layout): Ulysses over U consecutive ranks (an all-to-all of q, k, v and the output, not overlapped), a
ring of R = P / U ranks over the rest (K/V rotate, overlapped with the step's compute). Its cost on rank r is

    compute_r = entries_r x heads_local x c_entry + calls_r x c_call + bytes moved by merges / dK-dV sums x c_byte
    time = max_r compute_r + max(0, ring traffic / link - min_r compute_r) + Ulysses traffic / link

where entries and calls come from the plans the driver itself runs (`RingClassification`, `block_pieces`), so
documents, the balanced layout and masked-block pieces are counted as executed, not estimated. The device costs are
per-device constants (`DEVICE_COSTS`): the CPU ones measured on the CI machine, the CUDA ones from the cards' specs
(not measured: no GPU has run this model yet; docs/benchmarks.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ringtrain.ring.attention import RingDocuments
from ringtrain.ring.layout import get_layout, rank_positions, required_multiple
from ringtrain.ring.pieces import PieceKind, block_pieces
from ringtrain.ring.plan import build_plan, step_source
from ringtrain.ring.ulysses import kv_replicas, ulysses_head_problems


@dataclass(frozen=True)
class DeviceCosts:
    """Per-device constants of the cost model."""

    name: str
    entry_s: float
    """Seconds per (query, key) score entry per head, fwd+bwd, at head dims Dqk + Dv = 128 (scaled linearly)."""
    causal_waste: int
    """Extra keys per query a causal call evaluates on its diagonal (the kernel's masked block work)."""
    call_s: float
    """Seconds per kernel call, fwd+bwd, beyond its entries (launches, per-call set-up)."""
    byte_s: float
    """Seconds per byte read or written by a merge or a dK/dV accumulation."""
    intra_bytes_s: float
    """Bytes per second per rank between ranks of one node (all-to-all and ring send/recv alike)."""
    inter_bytes_s: float
    """Bytes per second per rank between nodes."""


DEVICE_COSTS = {
    # Measured on the 2-core CI VM (one thread per rank, torch 2.13 CPU flash op, H=8, D=64, fp32, fwd+bwd):
    # 12.0 ns per head-entry for one causal call of 8192 tokens (13.0 at 4096), a causal call of n tokens costs
    # like n * (n/2 + 128) entries (24 ns per visible entry at 256 tokens, 14.5 at 2048), ~0.1 ms per call; gloo
    # over loopback. Against scripts/bench_peers.py (docs/benchmarks.md) it is within 1-6% of every plan.
    "cpu": DeviceCosts("cpu", entry_s=12.0e-9, causal_waste=128, call_s=1.0e-4, byte_s=1.0e-10,
                       intra_bytes_s=2.0e9, inter_bytes_s=1.0e9),
    # H100 SXM from its specs, not measured here: attention fwd+bwd at ~40% of 989 bf16 TFLOP/s, 14 x 128 FLOPs per
    # head-entry; ~30 us of launches per call; 3.35 TB/s HBM; NVLink 450 GB/s and 400 Gb/s InfiniBand per GPU,
    # of which ~70% is reached by NCCL.
    "cuda": DeviceCosts("cuda", entry_s=14 * 128 / (0.4 * 989e12), causal_waste=64, call_s=3.0e-5,
                        byte_s=1 / 3.35e12, intra_bytes_s=0.7 * 450e9, inter_bytes_s=0.7 * 50e9),
}


@dataclass(frozen=True)
class AttentionShape:
    """One layer's attention problem: [batch, seq_len] tokens, H query heads, H_kv key/value heads."""

    batch: int
    seq_len: int
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    dtype_bytes: int


@dataclass(frozen=True)
class PlanCost:
    """The modelled seconds of one plan (one layer, fwd+bwd, the busiest rank), or why it cannot run."""

    ulysses: int
    layout: str
    seconds: float = math.inf
    compute_s: float = 0.0
    ring_exposed_s: float = 0.0
    all_to_all_s: float = 0.0
    calls: int = 0
    refused: str = ""

    def describe(self) -> str:
        if self.ulysses == 1:
            what = f"ring ({self.layout})"
        else:
            what = f"Ulysses {self.ulysses}" + (f" x ring ({self.layout})" if self.layout != "-" else "")
        if self.refused:
            return f"{what}: cannot run ({self.refused})"
        return (f"{what}: {self.seconds * 1e3:.2f} ms (compute {self.compute_s * 1e3:.2f}, ring exposed "
                f"{self.ring_exposed_s * 1e3:.2f}, all-to-all {self.all_to_all_s * 1e3:.2f}; {self.calls} calls)")


def _rank_work(shape: AttentionShape, ring: int, rank: int, layout: str, docs: RingDocuments | None,
               costs: DeviceCosts) -> tuple[float, int, int, int]:
    """(score entries incl. causal waste, kernel calls, merged query tokens, accumulated key tokens) of `rank`."""
    lay = get_layout(layout) if docs is None else docs.layout
    plan = (build_plan(ring, rank, lay, shape.seq_len) if docs is None
            else docs.plan(rank, True, None, None))
    ids = None if docs is None else docs.global_ids
    entries, calls, merged, summed = 0.0, 0, 0, 0
    q_pos = rank_positions(shape.seq_len, lay, ring, rank)
    local = q_pos.numel()
    for step, blocks in enumerate(plan.steps):
        k_pos = rank_positions(shape.seq_len, lay, ring, step_source(ring, rank, step))
        for blk in blocks:
            nq, nk = blk.q_stop - blk.q_start, blk.kv_stop - blk.kv_start
            if not blk.masked:
                calls += 1
                entries += shape.batch * (blk.score_entries() + (costs.causal_waste * nq if blk.causal else 0))
                parts = [(nq, nk)]
            else:
                qp, kp = q_pos[blk.q_start:blk.q_stop], k_pos[blk.kv_start:blk.kv_stop]
                pieces = block_pieces(qp, kp, None if ids is None else ids[:, qp], None if ids is None else ids[:, kp],
                                      True, None, shape.batch)
                calls += len(pieces)
                parts = []
                for pc in pieces:
                    rows, pq = pc.row_stop - pc.row_start, pc.q_stop - pc.q_start
                    waste = costs.causal_waste * pq if pc.kind == PieceKind.CAUSAL else 0
                    entries += rows * (pc.pairs() + waste)
                    parts.append((pq, pc.k_stop - pc.k_start))
            for pq, pk in parts:
                if not (pq == local and step == 0 and calls == 1):  # the first call over everything is adopted
                    merged += pq
                summed += pk
    return entries, calls, merged, summed


def _inside_nodes(group: int, per_node: int) -> bool:
    """Whether every group of `group` consecutive ranks (aligned to multiples of `group`, as the mesh lays out the
    Ulysses and SP groups) stays inside one node of `per_node` ranks: with 6 per node, ranks 4-7 of a group of 4 do
    not."""
    return per_node % group == 0


def plan_cost(shape: AttentionShape, sp: int, ulysses: int, layout: str, costs: DeviceCosts,
              document_ids: torch.Tensor | None = None, ranks_per_node: int | None = None) -> PlanCost:
    """The modelled cost of Ulysses over `ulysses` ranks x a ring of sp / ulysses ranks in `layout` (ignored for a
    ring of one), for `document_ids` [B, S] (None: one causal sequence per row)."""
    ring = sp // ulysses
    shown = layout if ring > 1 else "-"
    problems = ulysses_head_problems(shape.heads, shape.kv_heads, ulysses) if ulysses > 1 else []
    if sp % ulysses:
        problems.append(f"ulysses size {ulysses} does not divide sp size {sp}")
    multiple = required_multiple(ring, layout, ulysses) if ring > 1 else ulysses
    if shape.seq_len % multiple:
        problems.append(f"{shape.seq_len} tokens are not a multiple of {multiple}")
    if problems:
        return PlanCost(ulysses, shown, refused="; ".join(problems))
    per_node = ranks_per_node or sp
    heads = shape.heads // ulysses
    kv = shape.kv_heads * kv_replicas(shape.kv_heads, ulysses) // ulysses
    dims = shape.head_dim + shape.value_dim
    entry_s = costs.entry_s * dims / 128
    docs = None
    if document_ids is not None and ring > 1:
        lay = get_layout(layout)
        docs = RingDocuments(document_ids, ring, lay.for_documents(document_ids, ring) if lay.per_batch else lay)
    elif document_ids is not None:  # a ring of one: the whole sequence, one masked step cut per document
        docs = RingDocuments(document_ids, 1, get_layout("contiguous"))
    if docs is None and ring == 1:
        layout_name = "contiguous"
    else:
        layout_name = layout
    per_rank = []
    for rank in range(ring):
        entries, calls, merged, summed = _rank_work(shape, ring, rank, layout_name, docs, costs)
        # fwd merges out (Dv) + lse, bwd adds dq (Dqk); dK/dV sums read and write fp32 accumulators.
        moved = 3 * 4 * shape.batch * (merged * heads * (shape.value_dim + shape.head_dim + 1)
                                       + summed * kv * dims)
        per_rank.append((entries * heads * entry_s + calls * costs.call_s + moved * costs.byte_s, calls))
    compute = max(c for c, _ in per_rank)
    calls = max(n for _, n in per_rank)
    local_tokens = shape.batch * shape.seq_len // sp
    exposed = 0.0
    n_steps = (docs.classification(True, None, None).n_steps if docs is not None
               else len(build_plan(ring, 0, layout_name, shape.seq_len).steps))
    if n_steps > 1:
        link = costs.intra_bytes_s if _inside_nodes(sp, per_node) else costs.inter_bytes_s
        kv_bytes = local_tokens * ulysses * kv * dims * shape.dtype_bytes  # S / R tokens of this rank's KV heads
        # forward: K, V each step; backward: K, V and the fp32 dK, dV travelling with them.
        traffic = (n_steps - 1) * kv_bytes * (1 + 1 + 4 / shape.dtype_bytes)
        exposed = max(0.0, traffic / link - min(c for c, _ in per_rank))
    a2a = 0.0
    if ulysses > 1:
        link = costs.intra_bytes_s if _inside_nodes(ulysses, per_node) else costs.inter_bytes_s
        kv_sent = shape.kv_heads * kv_replicas(shape.kv_heads, ulysses)
        elems = local_tokens * (shape.heads * (shape.head_dim + shape.value_dim) + kv_sent * dims)
        # q, k, v there and the output back; the same volume again in backward.
        a2a = 2 * elems * shape.dtype_bytes * (ulysses - 1) / ulysses / link
    return PlanCost(ulysses, shown, compute + exposed + a2a, compute, exposed, a2a, calls)


def rank_plans(shape: AttentionShape, sp: int, costs: DeviceCosts, *, document_ids: torch.Tensor | None = None,
               ranks_per_node: int | None = None, layouts: tuple[str, ...] | None = None) -> list[PlanCost]:
    """Every (U, layout) plan for `sp` ranks, cheapest first (plans that cannot run last, with the reason). Layouts
    default to zigzag without documents and balanced with them: balanced is chosen per batch from the real documents,
    so it stays balanced on packs unlike the one priced here, where zigzag can leave a rank with most of the work."""
    layouts = layouts or (("balanced",) if document_ids is not None else ("zigzag",))
    out = []
    for u in (d for d in range(1, sp + 1) if sp % d == 0):
        for layout in (layouts if u < sp else layouts[:1]):
            out.append(plan_cost(shape, sp, u, layout, costs, document_ids, ranks_per_node))
    return sorted(out, key=lambda c: (c.seconds, -(sp // c.ulysses)))


def typical_documents(seq_len: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Document ids [B, S] of a deterministic log-normal pack (median S / 8 tokens, sigma 1): what `auto` plans for
    when data.document_mask is on and the batches are not known yet."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        ids, filled, doc = [], 0, 0
        while filled < seq_len:
            n = int(math.exp(math.log(seq_len / 8) + torch.randn((), generator=gen).item()))
            n = min(max(16, n), seq_len - filled)
            ids += [doc] * n
            filled, doc = filled + n, doc + 1
        rows.append(ids)
    return torch.tensor(rows, dtype=torch.long)
