# The one ring driver: forward and backward of sequence-parallel attention over a process group.
#
# K/V rotate P-1 times around the ring (to rank + 1). Each step posts the next transfer into a persistent
# double buffer BEFORE computing on the current K/V and waits after, so communication hides behind the
# kernel. Which blocks a rank computes at a step comes from plan.plan_step; this file never looks at
# the layout or the mask itself. Design notes: docs/ring_attention.md.

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ringtrain.log import get_logger
from ringtrain.ring.comm import RingComm
from ringtrain.ring.kernels import LocalKernel, default_scale, merge_dtype, select_kernel
from ringtrain.ring.layout import check_layout, check_seq_len, local_chunk_ids
from ringtrain.ring.plan import plan_step

logger = get_logger(__name__)


def merge_partial(
    out_acc: torch.Tensor, lse_acc: torch.Tensor, out_blk: torch.Tensor, lse_blk: torch.Tensor
) -> None:
    """Fold one block's (out, lse) into the running (out_acc, lse_acc), in place, in the merge dtype.

    out_acc [B, s, H, D] and lse_acc [B, H, s] are (views of) fp32 accumulators; out_blk is the kernel's
    output in the input dtype, lse_blk [B, H, s]. logaddexp is the stable form (no exp of a large lse);
    rows no block has reached yet hold lse = -inf and out = 0, and keep finite weights below.
    """
    new = torch.logaddexp(lse_acc, lse_blk)
    ref = new.masked_fill(new == float("-inf"), 0.0)  # both -inf: weights exp(-inf) = 0, not nan
    w_acc = torch.exp(lse_acc - ref).transpose(1, 2).unsqueeze(-1)  # [B, s, H, 1]
    w_blk = torch.exp(lse_blk - ref).transpose(1, 2).unsqueeze(-1)
    out_acc.mul_(w_acc).add_(out_blk.to(out_acc.dtype).mul_(w_blk))
    lse_acc.copy_(new)


def _covers(sl: slice, length: int) -> bool:
    return sl.start == 0 and sl.stop == length


def _accumulate(acc: torch.Tensor | None, value: torch.Tensor, sl: slice, shape, dtype: torch.dtype) -> torch.Tensor:
    """acc[:, sl] += value, where acc=None stands for zeros.

    An empty accumulator adopts a value that covers it whole instead of allocating zeros and adding:
    step 0 is always one block over the whole local sequence, so this saves a buffer and a pass.
    """
    if acc is None:
        if _covers(sl, shape[1]):
            return value.to(dtype)
        acc = torch.zeros(shape, dtype=dtype, device=value.device)
    acc[:, sl] += value
    return acc


def _ring_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    comm: RingComm, layout: str, causal: bool, scale: float, kernel: LocalKernel,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, S, H, D] in q's dtype, lse [B, H, S] in the merge dtype) for this rank's queries."""
    world, rank = comm.world, comm.rank
    b, s, h, d = q.shape
    acc = merge_dtype(q.dtype)
    chunk = s // len(local_chunk_ids(world, rank, layout))
    out_acc = lse_acc = None
    # [2, B, S, H_kv, D]: K and V travel as one message (a world of one sends nothing, copies nothing).
    kv = torch.stack((k, v)) if world > 1 else (k, v)
    kv_next = torch.empty_like(kv) if world > 1 else kv
    for step in range(world):
        works = comm.post([kv], [kv_next]) if step < world - 1 else []
        for blk in plan_step(world, rank, step, layout, causal):
            qs, ks = blk.slices(chunk)
            o, lse = kernel.forward(q[:, qs], kv[0][:, ks], kv[1][:, ks], blk.causal, scale)
            if out_acc is None and _covers(qs, s):
                out_acc, lse_acc = o.to(acc), lse.to(acc).contiguous()
                continue
            if out_acc is None:
                out_acc = torch.zeros(b, s, h, v.shape[-1], dtype=acc, device=q.device)
                lse_acc = torch.full((b, h, s), float("-inf"), dtype=acc, device=q.device)
            merge_partial(out_acc[:, qs], lse_acc[:, :, qs], o, lse)
        comm.wait(works)
        kv, kv_next = kv_next, kv
    return out_acc.to(q.dtype), lse_acc


def _ring_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    comm: RingComm, layout: str, causal: bool, scale: float, kernel: LocalKernel,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) for this rank's q and its own K/V.

    K/V rotate exactly as in forward. The dK/dV of the K/V held at step t (t >= 1) accumulate in an fp32
    buffer that travels one hop behind it, in the same batched call as the next K/V: sent at step t+1,
    it reaches rank + 1 while that rank computes on the same K/V, which adds its part at step t+1's end.
    A rank keeps the part for its own K/V (step 0) at home and adds the accumulator that finally
    arrives, after step P-1, from rank - 1: P-1 fp32 hops, the reduce-scatter minimum.
    """
    world, rank = comm.world, comm.rank
    acc = merge_dtype(q.dtype)
    chunk = q.shape[1] // len(local_chunk_ids(world, rank, layout))
    dq_acc = dk_own = dv_own = None
    kv = torch.stack((k, v)) if world > 1 else (k, v)
    kv_next = torch.empty_like(kv) if world > 1 else kv
    dkv_shape = (2, *k.shape)
    dkv_mine = dkv_send = dkv_recv = None  # [2, B, S, H_kv, D] fp32, allocated when first needed
    for step in range(world):
        send, recv = [], []
        if step < world - 1:
            send.append(kv)
            recv.append(kv_next)
        if step >= 2:
            dkv_recv = torch.empty_like(dkv_send) if dkv_recv is None else dkv_recv
            send.append(dkv_send)
            recv.append(dkv_recv)
        works = comm.post(send, recv)
        if step >= 1:
            # This rank's part for the K/V held now (from rank - step).
            dkv_mine = torch.zeros(dkv_shape, dtype=acc, device=q.device) if dkv_mine is None else dkv_mine.zero_()
        for blk in plan_step(world, rank, step, layout, causal):
            qs, ks = blk.slices(chunk)
            dq, dk, dv = kernel.backward(
                dout[:, qs], q[:, qs], kv[0][:, ks], kv[1][:, ks], out[:, qs], lse[:, :, qs], blk.causal, scale
            )
            dq_acc = _accumulate(dq_acc, dq, qs, q.shape, acc)
            if step == 0:
                dk_own = _accumulate(dk_own, dk, ks, k.shape, acc)
                dv_own = _accumulate(dv_own, dv, ks, v.shape, acc)
            else:
                dkv_mine[0, :, ks] += dk
                dkv_mine[1, :, ks] += dv
        comm.wait(works)
        if step == 1:
            # Nobody before this rank has touched this K/V's accumulator: this rank's part is all of it.
            dkv_send, dkv_mine = dkv_mine, dkv_send
        elif step >= 2:
            dkv_recv += dkv_mine
            dkv_send, dkv_recv = dkv_recv, dkv_send
        kv, kv_next = kv_next, kv
    if world > 1:
        dkv_recv = torch.empty_like(dkv_send) if dkv_recv is None else dkv_recv
        comm.wait(comm.post([dkv_send], [dkv_recv]))  # last hop: nothing left to overlap with
        dk_own = _accumulate(dk_own, dkv_recv[0], slice(0, k.shape[1]), k.shape, acc)
        dv_own = _accumulate(dv_own, dkv_recv[1], slice(0, k.shape[1]), v.shape, acc)
    return dq_acc.to(q.dtype), dk_own.to(k.dtype), dv_own.to(v.dtype)


class _RingAttentionFunction(torch.autograd.Function):
    """Saves only the local q, k, v, out and lse: O(S/P) activation memory; backward recomputes blocks."""

    @staticmethod
    def forward(ctx, q, k, v, comm, layout, causal, scale, kernel):
        out, lse = _ring_forward(q, k, v, comm, layout, causal, scale, kernel)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (comm, layout, causal, scale, kernel)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None, None, None


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, world: int, layout: str) -> None:
    """Every problem with the inputs, in one ValueError."""
    check_layout(layout)
    problems = []
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            problems.append(f"{name} has shape {tuple(t.shape)}: pass [B, S_local, heads, head_dim]")
    if problems:
        raise ValueError("; ".join(problems))
    if k.shape != v.shape:
        problems.append(f"k shape {tuple(k.shape)} != v shape {tuple(v.shape)}: k and v must match")
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
    check_seq_len(
        q.shape[1] * world, world, layout,
        what=f"sequence length {q.shape[1]} x world {world} =",
    )


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    causal: bool = True,
    layout: str = "zigzag",
    scale: float | None = None,
    kernel: str | LocalKernel | None = "auto",
) -> torch.Tensor:
    """Attention over a sequence sharded across `group`; returns this rank's output, shaped and typed like q.

    q [B, S_local, H, D]; k, v [B, S_local, H_kv, D] with H % H_kv == 0, each sharded with
    `shard_sequence(..., layout=layout)`. `group=None` is the default group, or a world of one when
    torch.distributed is not initialised. `kernel` names the local kernel ("auto", "cpu_flash",
    "cuda_flash", "cuda_efficient", "flash_attn", "reference") or is a LocalKernel object.
    """
    return ring_attention_with_comm(
        RingComm(group), q, k, v, causal=causal, layout=layout, scale=scale, kernel=kernel
    )


def ring_attention_with_comm(
    comm: RingComm,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    layout: str = "zigzag",
    scale: float | None = None,
    kernel: str | LocalKernel | None = "auto",
) -> torch.Tensor:
    """`ring_attention` over any communicator with RingComm's interface (world, rank, post, wait).

    For simulated rings, e.g. the single-GPU "virtual ring" benchmark, which replays one rank's
    compute and merge with a loopback communicator.
    """
    _check_inputs(q, k, v, comm.world, layout)
    local_kernel = select_kernel(q, kernel)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    return _RingAttentionFunction.apply(q, k, v, comm, layout, causal, scale, local_kernel)
