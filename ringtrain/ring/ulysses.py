# Hybrid sequence parallelism: an all-to-all over heads inside a Ulysses group around the unchanged ring.
#
# Each rank holds S/(R x U) tokens of every head. One all-to-all over the U ranks of its Ulysses group (consecutive
# ranks: intra-node) gives it the U x S/(R x U) = S/R tokens of its ring shard for H/U heads (USP's layout, see
# layout.py), the ring driver attends over the R ring ranks exactly as it does without Ulysses (R = 1: one plain
# kernel call over the whole sequence), and a second all-to-all returns the output to the sequence shards. Backward
# is the same two all-to-alls in reverse. Q, K and V travel in three all-to-alls posted at once (each then reaches
# the kernel contiguous), dQ, dK, dV in one (their heads packed per destination); the buffers are the only copies
# (with micro-batch 1; B > 1 adds one transpose copy).
#
# K/V heads: with H_kv % U == 0 each rank gets H_kv/U of them, matching its H/U query heads. With U > H_kv (few KV
# heads, the peers' most common complaint) each KV head is replicated only U/H_kv times (not H/H_kv) before the
# all-to-all, and the replicas' gradients are summed back in fp32. The driver never sees the difference.
# Buffers flatten (heads, head dim), so v may have its own head dim (MLA); per-head sink logits are sliced to the
# rank's heads (their gradient, zero elsewhere, adds up over the group like every other parameter's).

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ringtrain.ring.attention import (
    check_local_document_ids,
    check_sink,
    gather_documents,
    ring_attention_with_comm,
)
from ringtrain.ring.comm import AllToAllComm, RingComm
from ringtrain.ring.kernels import fold_head_copies
from ringtrain.ring.layout import Layout


def ulysses_head_problems(heads: int, kv_heads: int, ulysses: int) -> list[str]:
    """Why H query heads and H_kv KV heads cannot be split over `ulysses` ranks (empty: they can)."""
    problems = []
    if ulysses < 1:
        return [f"ulysses size {ulysses} must be >= 1"]
    if heads % ulysses:
        choices = [u for u in range(1, heads + 1) if heads % u == 0]
        problems.append(f"{heads} query heads are not divisible by ulysses size {ulysses}: "
                        f"choose among {', '.join(map(str, choices))}")
    if kv_heads % ulysses and ulysses % kv_heads:
        problems.append(f"{kv_heads} key/value heads with ulysses size {ulysses}: need kv_heads % ulysses == 0 "
                        f"or ulysses % kv_heads == 0 (each KV head is then replicated ulysses / kv_heads times)")
    return problems


def kv_replicas(kv_heads: int, ulysses: int) -> int:
    """How many copies of each KV head travel: 1, or U / H_kv when the group has more ranks than KV heads."""
    return ulysses // kv_heads if ulysses > kv_heads else 1


def _pack(parts: list[torch.Tensor], u: int, copies: list[int] | None = None) -> torch.Tensor:
    """[B, S_l, H_i, D_i] tensors -> the send buffer [U, B, S_l, sum(Hc_i x D_i)], Hc_i = H_i x copies_i / U:
    destination j gets head group j of each part, (heads, head dim) flattened so that parts of different head dims
    (MLA: v's differs from q's and k's) share one buffer. One copy per part, straight into the buffer (replicas
    included)."""
    copies = copies or [1] * len(parts)
    b, s = parts[0].shape[:2]
    widths = [p.shape[2] * c // u for p, c in zip(parts, copies, strict=True)]
    buf = parts[0].new_empty(u, b, s, sum(w * p.shape[3] for p, w in zip(parts, widths, strict=True)))
    start = 0
    for p, c, w in zip(parts, copies, widths, strict=True):
        d = p.shape[3]
        dst = buf[..., start:start + w * d].unflatten(-1, (w, d))  # [U, B, S_l, w, D_i]
        if c == 1:  # destination j takes heads [j w, (j + 1) w)
            dst.copy_(p.view(b, s, u, w, d).permute(2, 0, 1, 3, 4))
        else:  # U > H_kv: destination j takes KV head j // c (w == 1)
            dst.unflatten(0, (p.shape[2], c)).copy_(p.permute(2, 0, 1, 3)[:, None, :, :, None, :])
        start += w * d
    return buf


def _split_heads(x: torch.Tensor, widths: list[int], dims: list[int]) -> list[torch.Tensor]:
    """[..., sum(w_i x D_i)] -> views [..., w_i, D_i], one per part."""
    out, start = [], 0
    for w, d in zip(widths, dims, strict=True):
        out.append(x[..., start:start + w * d].unflatten(-1, (w, d)))
        start += w * d
    return out


def _as_sequence(recv: torch.Tensor) -> torch.Tensor:
    """The receive buffer [U, B, S_l, T] (part i = tokens of Ulysses rank i) as [B, U x S_l, T]: a view when B == 1,
    else one copy."""
    u, b, s, t = recv.shape
    return recv.permute(1, 0, 2, 3).reshape(b, u * s, t)


def _unpack_heads(recv: torch.Tensor, sizes: list[int], dims: list[int]) -> list[torch.Tensor]:
    """The receive buffer [U, B, S_l, T] (part i = head group i) as [B, S_l, H_i, D_i] tensors (H_i = U x its group
    of heads), one per (size, dim)."""
    u, b, s, _ = recv.shape
    parts = _split_heads(recv, [n // u for n in sizes], dims)  # [U, B, S_l, H_i / U, D_i]
    return [p.permute(1, 2, 0, 3, 4).reshape(b, s, n, d) for p, n, d in zip(parts, sizes, dims, strict=True)]


def _seq_parts(parts: list[torch.Tensor], u: int) -> torch.Tensor:
    """[B, U x S_l, H_i, D_i] tensors -> the send buffer [U, B, S_l, sum(H_i x D_i)] (part j = the tokens of Ulysses
    rank j), one copy per part."""
    b, s = parts[0].shape[:2]
    buf = parts[0].new_empty(u, b, s // u, sum(p.shape[2] * p.shape[3] for p in parts))
    dsts = _split_heads(buf, [p.shape[2] for p in parts], [p.shape[3] for p in parts])
    for p, dst in zip(parts, dsts, strict=True):
        dst.copy_(p.unflatten(1, (u, s // u)).transpose(0, 1))
    return buf


def _fold_replicas(g: torch.Tensor, copies: int) -> torch.Tensor:
    """Sum the gradients of a KV head's replicas (summed in the merge dtype, returned in g's)."""
    return g if copies == 1 else fold_head_copies(g, g.shape[2] // copies).to(g.dtype)


class _QKVToHeads(torch.autograd.Function):
    """Sequence shards -> whole ring shard for this rank's heads: q, k and v in three all-to-alls posted together, so
    that each arrives as its own contiguous [B, S_ring, H_i / U, D_i] tensor (with B == 1: the receive buffer itself)
    rather than as a strided view of one packed (q, k, v) row: the CPU flash op read a 1-head K/V 2% slower that
    way (docs/benchmarks.md)."""

    @staticmethod
    def forward(ctx, q, k, v, comm: AllToAllComm):
        u = comm.world
        copies = kv_replicas(k.shape[2], u)
        sizes = [q.shape[2], k.shape[2] * copies, v.shape[2] * copies]
        dims = [q.shape[3], k.shape[3], v.shape[3]]
        recv = comm.exchange_all([_pack([t], u, [c]) for t, c in zip((q, k, v), (1, copies, copies), strict=True)])
        ctx.comm, ctx.sizes, ctx.dims, ctx.copies = comm, sizes, dims, copies
        return tuple(_as_sequence(x).unflatten(-1, (n // u, d)) for x, n, d in zip(recv, sizes, dims, strict=True))

    @staticmethod
    @once_differentiable
    def backward(ctx, dq, dk, dv):
        comm, u = ctx.comm, ctx.comm.world
        dq, dk, dv = _unpack_heads(comm.exchange(_seq_parts([dq, dk, dv], u)), ctx.sizes, ctx.dims)
        return dq, _fold_replicas(dk, ctx.copies), _fold_replicas(dv, ctx.copies), None


class _HeadsToSequence(torch.autograd.Function):
    """The ring's output for this rank's heads over the ring shard -> every head of this rank's sequence shard."""

    @staticmethod
    def forward(ctx, out, comm: AllToAllComm):
        ctx.comm, ctx.heads = comm, out.shape[2:]
        (full,) = _unpack_heads(comm.exchange(_seq_parts([out], comm.world)), [out.shape[2] * comm.world],
                                [out.shape[3]])
        return full

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        comm = ctx.comm
        return _as_sequence(comm.exchange(_pack([dout.contiguous()], comm.world))).unflatten(-1, ctx.heads), None


def hybrid_attention(
    ring_comm: RingComm, a2a_comm: AllToAllComm, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
    layout: Layout, **options: Any,
) -> torch.Tensor:
    """Attention over a sequence sharded across ring x Ulysses ranks, over communicators built once by the caller
    (`SequenceParallel` owns them); returns this rank's output, like q.

    q [B, S_local, H, D], k/v [B, S_local, H_kv, D] and document_ids [B, S_local] sharded alike by the same
    `SequenceParallel`. A Ulysses group of one is exactly the ring. With U > 1, H must be divisible by U and
    H_kv % U == 0 or U % H_kv == 0. `options` as in `ring_attention_with_comm`; masks (documents, windows) work for
    any (U, R).
    """
    u = a2a_comm.world
    if u == 1:
        return ring_attention_with_comm(ring_comm, q, k, v, layout=layout, **options)
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}: pass [B, S_local, heads, head_dim] tensors")
    problems = ulysses_head_problems(q.shape[2], k.shape[2], u)
    if problems:
        raise ValueError("; ".join(problems))
    sink = options.get("sink")
    if sink is not None:
        check_sink(sink, q)
        h = q.shape[2] // u  # this rank's heads are [rank x h, (rank + 1) x h): the order _pack sends them in
        options = {**options, "sink": sink[a2a_comm.rank * h:(a2a_comm.rank + 1) * h]}
    docs = options.get("document_ids")
    if isinstance(docs, torch.Tensor):
        check_local_document_ids(docs, q)
        options = {**options, "document_ids": gather_documents(
            docs.to(q.device), group=ring_comm.group, layout=layout, ulysses_group=a2a_comm.group)}
    qh, kh, vh = _QKVToHeads.apply(q, k, v, a2a_comm)  # [B, S_ring_local, H/U, D], [..., H_kv'/U, D]
    out = ring_attention_with_comm(ring_comm, qh, kh, vh, layout=layout, **options)
    return _HeadsToSequence.apply(out, a2a_comm)
