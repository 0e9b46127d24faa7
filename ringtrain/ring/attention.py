# The one ring driver: forward and backward of sequence-parallel attention over a process group.
#
# K/V rotate P-1 times around the ring (to rank + 1). Each step posts the next transfer into a persistent
# double buffer BEFORE computing on the current K/V and waits after, so communication hides behind the
# kernel. Which blocks a rank computes at a step, and how many steps the ring runs, come from plan.py; this file
# never decides from the layout or the mask itself, it only builds the explicit mask of a block the plan marks
# MASKED. Design notes: docs/ring_attention.md.
#
# Attention sinks (gpt-oss): one learned logit per head joins each query's softmax with a zero value. It is applied
# ONCE, after the ring merge: lse' = logaddexp(lse, sink), out' = out * exp(lse - lse'). Backward hands the kernels
# (out', lse'), the statistics of the softmax that includes the sink, so their block gradients stay exact, and the
# sink's own gradient is -sum_q exp(sink - lse') * rowsum(dout * out').

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ringtrain.log import get_logger
from ringtrain.ring.balance import Spans, document_spans
from ringtrain.ring.comm import RingComm
from ringtrain.ring.kernels import LocalKernel, default_scale, mask_fallback, merge_dtype, select_kernel
from ringtrain.ring.layout import (
    Layout,
    check_seq_len,
    get_layout,
    group_world_rank,
    rank_positions,
    unshard_sequence,
)
from ringtrain.ring.merge import merge_partial
from ringtrain.ring.pieces import Piece, PieceKind, block_pieces, split_causal
from ringtrain.ring.plan import (
    Block,
    RingClassification,
    RingPlan,
    build_plan,
    build_tiles,
    document_bounds,
    step_source,
)
from ringtrain.ring.varlen import Wave, build_waves, wave_backward, wave_forward

logger = get_logger(__name__)


def _covers(sl: slice, length: int) -> bool:
    return sl.start == 0 and sl.stop == length


class _Pair:
    """Two tensors (K and V, or their gradients) in one flat buffer, so that they travel as one message whatever their
    head dims (MLA: V's differs from K's). `pair[0]`, `pair[1]` are contiguous views; `flat` is what is sent."""

    def __init__(self, flat: torch.Tensor, shapes: tuple[torch.Size, torch.Size]) -> None:
        self.flat, self.shapes = flat, shapes
        n = shapes[0].numel()
        self.parts = (flat[:n].view(shapes[0]), flat[n:].view(shapes[1]))

    @classmethod
    def empty(cls, shapes: tuple[torch.Size, torch.Size], dtype: torch.dtype, device: torch.device) -> _Pair:
        return cls(torch.empty(shapes[0].numel() + shapes[1].numel(), dtype=dtype, device=device), shapes)

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor) -> _Pair:
        pair = cls.empty((a.shape, b.shape), a.dtype, a.device)
        pair.parts[0].copy_(a)
        pair.parts[1].copy_(b)
        return pair

    def empty_like(self) -> _Pair:
        return _Pair(torch.empty_like(self.flat), self.shapes)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.parts[i]


class RingDocuments:
    """The document ids of the whole sequence on every rank, and the plans made from them: one per batch.

    Build it with `gather_documents` (one all_gather of [B, S_local] ids over the group: the only collective
    document masking adds), or from the full ids every rank already holds (`shard_batch` does), and pass it as
    `ring_attention(..., document_ids=...)` to every layer of one forward: the tile classification and the plans
    are computed on the first call and kept here (one host sync per batch, none in the ring loop), so they live
    exactly as long as the batch. Passing the local id tensor instead gathers it on each call.
    `layout` is the ring's layout for this batch (a data-dependent layout is chosen per batch from these ids).
    """

    def __init__(self, global_ids: torch.Tensor, world: int, layout: str | Layout) -> None:
        self.global_ids = global_ids  # [B, S]
        self.world, self.layout = world, get_layout(layout)
        self._bounds: dict[int | None, tuple] = {}
        self._classes: dict[tuple, RingClassification] = {}
        self._spans: list[Spans] | None = None

    def classification(self, causal: bool, window: int | None, tile_tokens: int | None) -> RingClassification:
        key = (causal, window, tile_tokens)
        if key not in self._classes:
            tiles = build_tiles(self.global_ids.shape[1], self.world, self.layout, tile_tokens)
            if tile_tokens not in self._bounds:
                self._bounds[tile_tokens] = document_bounds(self.global_ids, tiles)
            self._classes[key] = RingClassification.build(tiles, causal, window, self._bounds[tile_tokens])
        return self._classes[key]

    def plan(self, rank: int, causal: bool, window: int | None, tile_tokens: int | None) -> RingPlan:
        return self.classification(causal, window, tile_tokens).plan(rank)

    def spans(self) -> list[Spans]:
        """Per batch row, the (start, stop) of each document: where recurrent and convolution layers restart (one
        host sync per batch, kept for every layer)."""
        if self._spans is None:
            self._spans = document_spans(self.global_ids)
        return self._spans


def batch_layout(layout: Layout, documents: RingDocuments | None) -> Layout:
    """The layout one batch runs in: for a per-batch layout, the permutation its documents chose; otherwise `layout`
    itself (documents gathered under another layout are then refused by the driver, not silently followed). The one
    place that decides a batch's layout."""
    if documents is not None and layout.per_batch and documents.layout.name == layout.name:
        return documents.layout
    return layout


def check_document_ids(global_ids: torch.Tensor) -> None:
    """Raise unless `global_ids` [B, S] are non-decreasing along every row (one owner for this rule)."""
    if not bool((global_ids[:, 1:] >= global_ids[:, :-1]).all()):
        row = int((global_ids[:, 1:] < global_ids[:, :-1]).any(1).nonzero()[0])
        raise ValueError(
            f"document_ids decrease along row {row} of the full sequence: pass ids that are non-decreasing along "
            "each full sequence (0, 0, 1, 1, 1, 2, ...), sharded like q"
        )


def check_local_document_ids(document_ids: torch.Tensor, q: torch.Tensor) -> None:
    """Raise unless this rank's ids [B, S_local] are shaped like q's first two dims."""
    if tuple(document_ids.shape) != tuple(q.shape[:2]):
        raise ValueError(
            f"document_ids has shape {tuple(document_ids.shape)} but q holds {tuple(q.shape[:2])} [B, S_local] "
            "tokens: shard the ids exactly like q"
        )


def gather_documents(
    document_ids: torch.Tensor, *, group: dist.ProcessGroup | None = None, layout: str | Layout = "zigzag",
    ulysses_group: dist.ProcessGroup | None = None,
) -> RingDocuments:
    """`RingDocuments` from this rank's ids [B, S_local] (sharded like q; non-decreasing along the full sequence)."""
    if document_ids.ndim != 2 or document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool:
        raise ValueError(
            f"document_ids has shape {tuple(document_ids.shape)} and dtype {document_ids.dtype}: pass integer ids "
            "[B, S_local], sharded like q"
        )
    world, _ = group_world_rank(group)
    if get_layout(layout).per_batch:
        raise ValueError(
            f"layout {get_layout(layout).name!r} is chosen per batch from the full document ids, so sharded ids "
            "cannot be gathered back: build the RingDocuments from the full ids (SequenceParallel.documents, or "
            "the 'documents' entry of shard_batch) and shard with its layout"
        )
    global_ids = unshard_sequence(document_ids, group=group, dim=1, layout=layout, ulysses_group=ulysses_group)
    # Every rank checks the same gathered ids, so every rank raises together (nobody is left in the ring).
    check_document_ids(global_ids)
    return RingDocuments(global_ids, world, layout)


class _BlockPieces:
    """The pieces (ringtrain.ring.pieces) of this rank's MASKED blocks, from global positions and document ids.

    Computed on the host once per block in forward and kept for backward (no device sync in the ring loop)."""

    def __init__(self, world: int, rank: int, layout: Layout, seq_len: int, causal: bool, window: int | None,
                 docs: RingDocuments | None, batch: int, device: torch.device) -> None:
        self.world, self.rank, self.layout, self.seq_len = world, rank, layout, seq_len
        self.causal, self.window, self.docs, self.batch, self.device = causal, window, docs, batch, device
        self._pos: dict[int, torch.Tensor] = {}
        self._pieces: dict[tuple, list[Piece]] = {}

    def positions(self, rank: int) -> torch.Tensor:
        if rank not in self._pos:
            self._pos[rank] = rank_positions(self.seq_len, self.layout, self.world, rank)
        return self._pos[rank]

    def __call__(self, step: int, qs: slice, ks: slice, causal_block: int = 0) -> list[Piece]:
        """The block's pieces; with `causal_block`, long CAUSAL pieces split for the kernel (`split_causal`)."""
        key = (step, qs.start, qs.stop, ks.start, ks.stop, causal_block)
        if key not in self._pieces:
            qp = self.positions(self.rank)[qs]
            kp = self.positions(step_source(self.world, self.rank, step))[ks]
            ids = None if self.docs is None else self.docs.global_ids.cpu()
            pieces = block_pieces(
                qp, kp, None if ids is None else ids[:, qp], None if ids is None else ids[:, kp],
                self.causal, self.window, self.batch,
            )
            if causal_block:
                pieces = [p for pc in pieces for p in split_causal(pc, causal_block)]
            self._pieces[key] = pieces
        return self._pieces[key]

    def waves(self, step: int, qs: slice, ks: slice, causal_block: int = 0) -> list[Wave]:
        """The block's FULL and CAUSAL pieces packed into varlen waves (ring.varlen), on the device, kept for
        backward."""
        key = ("waves", step, qs.start, qs.stop, ks.start, ks.stop, causal_block)
        if key not in self._pieces:
            self._pieces[key] = [w.to(self.device) for w in
                                 build_waves(self(step, qs, ks, causal_block), qs.start, ks.start)]
        return self._pieces[key]


_ALL_ROWS = slice(None)


def _varlen(blk: Block, kernel: LocalKernel) -> bool:
    """Whether a block's FULL and CAUSAL pieces run as varlen waves (ring.varlen) rather than one call each."""
    return blk.masked and getattr(kernel, "supports_varlen", False)


def _calls(blk: Block, step: int, kernel: LocalKernel, pieces: _BlockPieces | None):
    """The kernel calls of one block: (kernel, rows, q slice, kv slice, causal, extra kwargs).

    A plain block is one call. A MASKED block is its pieces: FULL and CAUSAL pieces are plain calls of `kernel`
    (or, on a varlen kernel, its waves, run by the caller); a BAND piece (a window edge) takes its window sizes on a
    kernel that takes them (`supports_window`), else its small mask, on `kernel` if it takes masks, else on the
    fallback."""
    qs, ks = blk.slices()
    if not blk.masked:
        yield kernel, _ALL_ROWS, qs, ks, blk.causal, {}
        return
    causal_block = getattr(kernel, "causal_block", 0)
    varlen = _varlen(blk, kernel)
    for pc in pieces(step, qs, ks, causal_block):
        if varlen and pc.kind != PieceKind.BAND:
            continue  # in a wave
        q_sl = slice(qs.start + pc.q_start, qs.start + pc.q_stop)
        k_sl = slice(ks.start + pc.k_start, ks.start + pc.k_stop)
        if pc.kind == PieceKind.BAND and getattr(kernel, "supports_window", False):
            yield kernel, pc.rows, q_sl, k_sl, False, {"window": pc.flash_window()}
        elif pc.kind == PieceKind.BAND:
            yield mask_fallback(kernel), pc.rows, q_sl, k_sl, False, {"mask": pc.band_mask(pieces.device)}
        else:
            yield kernel, pc.rows, q_sl, k_sl, pc.kind == PieceKind.CAUSAL, {}


def _covers_all(rows: slice, sl: slice, shape) -> bool:
    return rows == _ALL_ROWS and _covers(sl, shape[1])


def _accumulate(acc: torch.Tensor | None, value: torch.Tensor, rows: slice, sl: slice, shape,
                dtype: torch.dtype) -> torch.Tensor:
    """acc[rows, sl] += value, where acc=None stands for zeros.

    An empty accumulator adopts a value that covers it whole, in the kernel's dtype, instead of allocating zeros
    and adding: step 0 is usually one block over the whole local sequence. It becomes `dtype` (fp32 below fp32)
    only when a second part arrives, so a ring of one (pure Ulysses) makes no fp32 copy of the gradients at all.
    """
    if acc is None:
        if _covers_all(rows, sl, shape):
            return value
        acc = torch.zeros(shape, dtype=dtype, device=value.device)
    elif acc.dtype != dtype:
        acc = acc.to(dtype)
    acc[rows, sl] += value
    return acc


def _widened(acc: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An accumulator in `dtype` for in-place sums: zeros for None, a copy of an adopted lower-precision part."""
    return torch.zeros_like(like, dtype=dtype) if acc is None else acc.to(dtype)


def _ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    comm: RingComm, plan: RingPlan, scale: float, kernel: LocalKernel, pieces: _BlockPieces | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, S, H, D] in q's dtype, lse [B, H, S] in the merge dtype) for this rank's queries."""
    b, s, h, d = q.shape
    acc = merge_dtype(q.dtype)
    n = plan.n_steps  # every rank runs the same number of steps: K/V nobody needs any more stops travelling
    out_acc = lse_acc = None
    # K and V travel as one message (a ring of one step sends nothing, copies nothing).
    kv = _Pair.of(k, v) if n > 1 else (k, v)
    kv_next = kv.empty_like() if n > 1 else kv
    for step in range(n):
        works = comm.post([kv.flat], [kv_next.flat]) if step < n - 1 else []
        for blk in plan.steps[step]:
            if _varlen(blk, kernel):
                if out_acc is None:
                    out_acc = torch.zeros(b, s, h, v.shape[-1], dtype=acc, device=q.device)
                    lse_acc = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
                out_acc = out_acc.to(acc)
                qs, ks = blk.slices()
                for wave in pieces.waves(step, qs, ks, getattr(kernel, "causal_block", 0)):
                    wave_forward(kernel, wave, q, kv[0], kv[1], out_acc, lse_acc, scale)
            for kern, rows, qs, ks, causal, extra in _calls(blk, step, kernel, pieces):
                o, lse = kern.forward(q[rows, qs], kv[0][rows, ks], kv[1][rows, ks], causal, scale, **extra)
                if out_acc is None and _covers_all(rows, qs, q.shape):
                    # Kept in the kernel's dtype until a second partial arrives: with one call (a ring of one,
                    # pure Ulysses) the output is never copied to fp32 and back.
                    out_acc, lse_acc = o, lse.to(acc).contiguous()
                    continue
                if out_acc is None:
                    out_acc = torch.zeros(b, s, h, v.shape[-1], dtype=acc, device=q.device)
                    lse_acc = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
                out_acc = out_acc.to(acc)
                merge_partial(out_acc[rows, qs], lse_acc[rows, :, qs], o, lse)
        comm.wait(works)
        kv, kv_next = kv_next, kv
    return out_acc.to(q.dtype), lse_acc


def _ring_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    comm: RingComm, plan: RingPlan, scale: float, kernel: LocalKernel, pieces: _BlockPieces | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for this rank's q and its own K/V.

    K/V rotate exactly as in forward. The dK/dV of the K/V held at step t (t >= 1) accumulate in an fp32
    buffer that travels one hop behind it, in the same batched call as the next K/V: sent at step t+1,
    it reaches rank + 1 while that rank computes on the same K/V, which adds its part at step t+1's end.
    A rank keeps the part for its own K/V (step 0) at home and adds the accumulator that finally
    arrives after the last step n-1: from rank - 1 when the ring went all the way round (n = P; P-1 fp32
    hops, the reduce-scatter minimum), else straight from rank + n - 1, whose K/V stopped there (n-1 hops).
    """
    world = comm.world
    acc = merge_dtype(q.dtype)
    n = plan.n_steps
    dq_acc = dk_own = dv_own = None
    kv = _Pair.of(k, v) if n > 1 else (k, v)
    kv_next = kv.empty_like() if n > 1 else kv
    dkv_mine = dkv_send = dkv_recv = None  # _Pair of dK, dV in fp32, allocated when first needed
    for step in range(n):
        send, recv = [], []
        if step < n - 1:
            send.append(kv.flat)
            recv.append(kv_next.flat)
        if step >= 2:
            dkv_recv = dkv_send.empty_like() if dkv_recv is None else dkv_recv
            send.append(dkv_send.flat)
            recv.append(dkv_recv.flat)
        works = comm.post(send, recv)
        if step >= 1:
            # This rank's part for the K/V held now (from rank - step).
            if dkv_mine is None:
                dkv_mine = _Pair.empty((k.shape, v.shape), acc, q.device)
            dkv_mine.flat.zero_()
        for blk in plan.steps[step]:
            if _varlen(blk, kernel):
                dq_acc = _widened(dq_acc, q, acc)
                if step == 0:
                    dk_own, dv_own = _widened(dk_own, k, acc), _widened(dv_own, v, acc)
                dk_acc, dv_acc = (dk_own, dv_own) if step == 0 else (dkv_mine[0], dkv_mine[1])
                qs, ks = blk.slices()
                for wave in pieces.waves(step, qs, ks, getattr(kernel, "causal_block", 0)):
                    wave_backward(kernel, wave, dout, q, kv[0], kv[1], out, lse, scale, dq_acc, dk_acc, dv_acc)
            for kern, rows, qs, ks, causal, extra in _calls(blk, step, kernel, pieces):
                dq, dk, dv = kern.backward(
                    dout[rows, qs], q[rows, qs], kv[0][rows, ks], kv[1][rows, ks], out[rows, qs], lse[rows, :, qs],
                    causal, scale, **extra,
                )
                dq_acc = _accumulate(dq_acc, dq, rows, qs, q.shape, acc)
                if step == 0:
                    dk_own = _accumulate(dk_own, dk, rows, ks, k.shape, acc)
                    dv_own = _accumulate(dv_own, dv, rows, ks, v.shape, acc)
                else:
                    dkv_mine[0][rows, ks] += dk
                    dkv_mine[1][rows, ks] += dv
        comm.wait(works)
        if step == 1:
            # Nobody before this rank has touched this K/V's accumulator: this rank's part is all of it.
            dkv_send, dkv_mine = dkv_mine, dkv_send
        elif step >= 2:
            dkv_recv.flat += dkv_mine.flat
            dkv_send, dkv_recv = dkv_recv, dkv_send
        kv, kv_next = kv_next, kv
    if n > 1:
        dkv_recv = dkv_send.empty_like() if dkv_recv is None else dkv_recv
        # Last hop, home to the owner rank - (n-1): nothing left to overlap with.
        comm.wait(comm.post([dkv_send.flat], [dkv_recv.flat], hops=(1 - n) % world))
        dk_own = _accumulate(dk_own, dkv_recv[0], _ALL_ROWS, slice(0, k.shape[1]), k.shape, acc)
        dv_own = _accumulate(dv_own, dkv_recv[1], _ALL_ROWS, slice(0, k.shape[1]), v.shape, acc)
    # A rank whose queries see nothing (possible under documents at step 0 only with nothing local) still owes
    # zeros of the right shape.
    dq_acc = torch.zeros_like(q, dtype=acc) if dq_acc is None else dq_acc
    dk_own = torch.zeros_like(k, dtype=acc) if dk_own is None else dk_own
    dv_own = torch.zeros_like(v, dtype=acc) if dv_own is None else dv_own
    return dq_acc.to(q.dtype), dk_own.to(k.dtype), dv_own.to(v.dtype)


def _add_sink(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged (out [B, S, H, Dv], lse [B, H, S]) of the softmax that also holds one sink logit per head [H] with
    a zero value: lse' = logaddexp(lse, sink), out' = out * exp(lse - lse'). Rows nothing reached keep out = 0."""
    lse_sink = torch.logaddexp(lse, sink.to(lse.dtype)[None, :, None])
    weight = torch.exp(lse - lse_sink).transpose(1, 2).unsqueeze(-1)  # [B, S, H, 1]
    return (out.to(lse.dtype) * weight).to(out.dtype), lse_sink


class _RingAttentionFunction(torch.autograd.Function):
    """Saves only the local q, k, v, out and lse: O(S/P) activation memory; backward recomputes blocks (pieces are
    kept from forward). With `sink` [H], out and lse are those of the softmax that includes it (see the top)."""

    @staticmethod
    def forward(ctx, q, k, v, sink, comm, plan, scale, kernel, pieces):
        out, lse = _ring_forward(q, k, v, comm, plan, scale, kernel, pieces)
        if sink is not None:
            out, lse = _add_sink(out, lse, sink)
        ctx.save_for_backward(q, k, v, out, lse, sink)
        ctx.args = (comm, plan, scale, kernel, pieces)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, sink = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = _ring_backward(dout, q, k, v, out, lse, *ctx.args)
        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            acc = lse.dtype
            delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # [B, H, S]
            dsink = -(torch.exp(sink.to(acc)[None, :, None] - lse) * delta).sum((0, 2)).to(sink.dtype)
        return dq, dk, dv, dsink, None, None, None, None, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, world: int, layout: Layout) -> None:
    """Every problem with the inputs, in one ValueError."""
    problems = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            problems.append(f"{name} has shape {tuple(t.shape)}: pass [B, S_local, heads, head_dim]")
    if problems:
        raise ValueError("; ".join(problems))
    if k.shape[:3] != v.shape[:3]:
        problems.append(f"k shape {tuple(k.shape)} and v shape {tuple(v.shape)} differ in [B, S_local, H_kv]: only "
                        "their head dims may differ (MLA)")
    for what, dim in (("batch size", 0), ("local sequence length", 1), ("head_dim", 3)):
        if q.shape[dim] != k.shape[dim]:
            problems.append(f"{what} of q ({q.shape[dim]}) != {what} of k ({k.shape[dim]}): they must be equal")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        problems.append(
            f"q heads ({q.shape[2]}) are not a multiple of k/v heads ({k.shape[2]}): "
            "GQA needs H divisible by H_kv"
        )
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        problems.append(
            f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype}: pass one floating-point dtype for all three"
        )
    if not (q.device == k.device == v.device):
        problems.append(f"devices q={q.device}, k={k.device}, v={v.device}: put q, k and v on one device")
    if problems:
        raise ValueError("; ".join(problems))
    check_seq_len(q.shape[1] * world, world, layout, what=f"sequence length {q.shape[1]} x world {world} =")


def check_window(window: int | None, causal: bool) -> None:
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window={window!r}: pass a positive int (1 = each query sees only itself) or None")
        if not causal:
            raise ValueError(f"window={window} with causal=False: sliding windows are causal; pass causal=True")


def pairs_evaluated(docs: RingDocuments | None, world: int, layout: str | Layout, seq_len: int, batch: int = 1, *,
                    causal: bool = True, window: int | None = None, tile_tokens: int | None = None,
                    causal_block: int = 0) -> tuple[list[int], int]:
    """(query, key) pairs each rank's kernel calls evaluate over one forward, from the plan and its pieces alone
    (no attention runs), and the number of ring steps: what the balance benchmark and tests compare."""
    layout = docs.layout if docs is not None else get_layout(layout)
    masked = docs is not None or window is not None
    tiles = (DEFAULT_TILE_TOKENS if tile_tokens is None else tile_tokens) if masked else None
    per_rank = []
    for rank in range(world):
        if docs is not None:
            plan = docs.plan(rank, causal, window, tiles)
        else:
            plan = build_plan(world, rank, layout, seq_len, causal=causal, window=window, tile_tokens=tiles)
        pieces = _BlockPieces(world, rank, layout, seq_len, causal, window, docs, batch, torch.device("cpu"))
        total = 0
        for step, blocks in enumerate(plan.steps):
            for blk in blocks:
                if blk.masked:
                    qs, ks = blk.slices()
                    total += sum(pc.pairs() * (pc.row_stop - pc.row_start) for pc in pieces(step, qs, ks, causal_block))
                else:
                    total += blk.score_entries() * batch
        per_rank.append(total)
    return per_rank, plan.n_steps


def check_sink(sink: torch.Tensor | None, q: torch.Tensor) -> None:
    if sink is not None and (sink.dim() != 1 or sink.shape[0] != q.shape[2] or not sink.dtype.is_floating_point):
        raise ValueError(f"sink has shape {tuple(sink.shape)} and dtype {sink.dtype}; q has {q.shape[2]} heads: pass "
                         "one floating-point sink logit per query head [H]")


@dataclass(frozen=True)
class AttentionOptions:
    """What an attention call takes beside q, k, v and the layout: the mask, the scale and how to compute it.
    The keywords of `ring_attention`, `sequence_parallel_attention` and `SequenceParallel.attention`."""

    causal: bool = True
    scale: float | None = None
    """Softmax scale; None: 1 / sqrt(head_dim)."""
    kernel: str | LocalKernel | None = "auto"
    """The local kernel's name (`kernels.select_kernel`) or a LocalKernel object."""
    document_ids: torch.Tensor | RingDocuments | None = None
    """[B, S_local] ids sharded like q, or a `RingDocuments`: a query attends only to keys of its own document."""
    window: int | None = None
    """Causal sliding window: position i sees keys j with i - window < j <= i."""
    tile_tokens: int | None = None
    """Plan granularity under masks; None: DEFAULT_TILE_TOKENS."""
    sink: torch.Tensor | None = None
    """[H] attention-sink logits (gpt-oss `sinks`), one per query head: each joins its head's softmax with a zero
    value, once, after the ring merge; differentiable."""
    softcap: float | None = None
    """Scores c * tanh(s / c) before the softmax (Gemma 2's attn_logit_softcapping), inside the local kernel."""


DEFAULT_TILE_TOKENS = 256
"""Under a window or documents, chunks are cut into tiles of at least this many tokens (at most 16 per chunk), so
the plan skips at that granularity; smaller tiles skip more but pay more kernel calls."""


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
    layout: str | Layout = "zigzag",
    scale: float | None = None,
    kernel: str | LocalKernel | None = "auto",
    document_ids: torch.Tensor | RingDocuments | None = None,
    window: int | None = None,
    tile_tokens: int | None = None,
    **options: Any,
) -> torch.Tensor:
    """Attention over a sequence sharded across `group`; returns this rank's output, shaped and typed like q.

    q [B, S_local, H, D]; k, v [B, S_local, H_kv, D] with H % H_kv == 0, each sharded with
    `shard_sequence(..., layout=layout)`. `group=None` is the default group, or a world of one when
    torch.distributed is not initialised. `kernel` names the local kernel ("auto", "cpu_flash",
    "cuda_flash", "cuda_efficient", "flash_attn", "reference") or is a LocalKernel object; masked blocks of a
    kernel that takes no mask run on `kernels.mask_fallback(kernel)`.
    `document_ids` [B, S_local] (sharded like q, non-decreasing along the full sequence; or a `RingDocuments`
    from `gather_documents`, to gather once for many layers): a query attends only to keys of its own document.
    `window` (needs causal): a query at global position i sees keys j with i - window < j <= i (transformers'
    `sliding_window`; 1 = itself only). `tile_tokens`: plan granularity under masks (default DEFAULT_TILE_TOKENS).
    `options`: `sink` and `softcap` (see `AttentionOptions`). v's head dim may differ from q's and k's (MLA); the
    output then has v's.
    """
    return ring_attention_with_comm(
        RingComm(group), q, k, v, layout=layout, causal=causal, scale=scale, kernel=kernel,
        document_ids=document_ids, window=window, tile_tokens=tile_tokens, **options,
    )


def ring_attention_with_comm(
    comm: RingComm, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, layout: str | Layout = "zigzag",
    **options: Any,
) -> torch.Tensor:
    """`ring_attention` over any communicator with RingComm's interface (world, rank, post, wait).

    For simulated rings, e.g. the single-GPU "virtual ring" benchmark, which replays one rank's
    compute and merge with a loopback communicator (document ids must then come as a RingDocuments).
    `options`: the keywords of `AttentionOptions` (causal, scale, kernel, document_ids, window, tile_tokens, sink,
    softcap).
    """
    opts = AttentionOptions(**options)
    causal, scale, kernel, window, tile_tokens = opts.causal, opts.scale, opts.kernel, opts.window, opts.tile_tokens
    docs = opts.document_ids
    layout = batch_layout(get_layout(layout), docs if isinstance(docs, RingDocuments) else None)
    _check_inputs(q, k, v, comm.world, layout)
    world, rank = comm.world, comm.rank
    check_window(window, causal)
    check_sink(opts.sink, q)
    if isinstance(docs, torch.Tensor):
        check_local_document_ids(docs, q)
        docs = gather_documents(docs.to(q.device), group=comm.group, layout=layout)
    if docs is not None and (docs.world, docs.layout, tuple(docs.global_ids.shape)) != (
        world, layout, (q.shape[0], q.shape[1] * world)
    ):
        raise ValueError(
            f"document_ids were gathered for world {docs.world}, layout {docs.layout.name!r}, shape "
            f"{tuple(docs.global_ids.shape)}; this call has world {world}, layout {layout.name!r}, "
            f"[B, S] = {(q.shape[0], q.shape[1] * world)}"
        )
    local_kernel = select_kernel(q, kernel, softcap=opts.softcap, value_dim=v.shape[-1])
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    seq_len = q.shape[1] * world
    pieces = None
    if window is None and docs is None:
        plan = build_plan(world, rank, layout, seq_len, causal=causal)
    else:
        tiles = DEFAULT_TILE_TOKENS if tile_tokens is None else tile_tokens
        if docs is None:
            plan = build_plan(world, rank, layout, seq_len, causal=causal, window=window, tile_tokens=tiles)
        else:
            plan = docs.plan(rank, causal, window, tiles)
        pieces = _BlockPieces(world, rank, layout, seq_len, causal, window, docs, q.shape[0], q.device)
    return _RingAttentionFunction.apply(q, k, v, opts.sink, comm, plan, scale, local_kernel, pieces)
