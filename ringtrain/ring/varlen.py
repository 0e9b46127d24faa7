# Pieces packed into varlen calls: a masked block's FULL and CAUSAL pieces as a few calls of a kernel
# that takes cumulative sequence lengths (the CUDA flash varlen op), instead of one launch per piece.
#
# Pieces are grouped into waves: one kind (FULL or CAUSAL) and no two pieces of a wave share a query token (the
# same queries against two runs of keys of their document go to two waves). A wave's queries and keys are gathered
# into packed [tokens, heads, head_dim] tensors, one segment per (piece, batch row), run as one varlen call, and
# its output is merged into the accumulators with one gather-merge-scatter: a wave costs a fixed number of launches
# whatever its number of pieces. Kernels opt in with `supports_varlen = True` and
#   varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale) -> (out [Tq, H, D], lse [H, Tq])
#   varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale) -> (dq, dk, dv)
# (BAND pieces keep their own calls). The grouping and the gather/merge/scatter run on CPU in the tests, through a
# segment loop over the CPU flash op with this interface.

from __future__ import annotations

from dataclasses import dataclass

import torch

from ringtrain.ring.merge import merge_partial
from ringtrain.ring.pieces import Piece, PieceKind


@dataclass
class Wave:
    """One varlen call: packed query tokens (batch row, local position) and key tokens, with cumulative lengths."""

    causal: bool
    q_rows: torch.Tensor
    q_pos: torch.Tensor
    k_rows: torch.Tensor
    k_pos: torch.Tensor
    cu_q: torch.Tensor  # int32 [segments + 1]
    cu_k: torch.Tensor
    max_q: int
    max_k: int

    def to(self, device: torch.device) -> Wave:
        return Wave(self.causal, *(t.to(device) for t in (self.q_rows, self.q_pos, self.k_rows, self.k_pos,
                                                            self.cu_q, self.cu_k)), self.max_q, self.max_k)


def build_waves(pieces: list[Piece], q_offset: int, k_offset: int) -> list[Wave]:
    """The waves of a block's FULL and CAUSAL pieces (BAND pieces are left out: they run on their own).

    `q_offset`, `k_offset`: where the block starts in the local queries and in the step's keys."""
    waves: list[tuple[PieceKind, list[Piece], list[tuple[int, int, int, int]]]] = []
    for pc in pieces:
        if pc.kind == PieceKind.BAND:
            continue
        for kind, members, taken in waves:  # the first wave of this kind with none of these query tokens
            if kind == pc.kind and not any(r0 < pc.row_stop and pc.row_start < r1 and q0 < pc.q_stop and
                                           pc.q_start < q1 for r0, r1, q0, q1 in taken):
                members.append(pc)
                taken.append((pc.row_start, pc.row_stop, pc.q_start, pc.q_stop))
                break
        else:
            waves.append((pc.kind, [pc], [(pc.row_start, pc.row_stop, pc.q_start, pc.q_stop)]))
    out = []
    for kind, members, _ in waves:
        q_rows, q_pos, k_rows, k_pos, lq, lk = [], [], [], [], [], []
        for pc in members:
            nq, nk = pc.q_stop - pc.q_start, pc.k_stop - pc.k_start
            for row in range(pc.row_start, pc.row_stop):
                q_rows.append(torch.full((nq,), row))
                q_pos.append(torch.arange(q_offset + pc.q_start, q_offset + pc.q_stop))
                k_rows.append(torch.full((nk,), row))
                k_pos.append(torch.arange(k_offset + pc.k_start, k_offset + pc.k_stop))
                lq.append(nq)
                lk.append(nk)
        cu = [torch.tensor([0] + lengths).cumsum(0).to(torch.int32) for lengths in (lq, lk)]
        out.append(Wave(kind == PieceKind.CAUSAL, torch.cat(q_rows), torch.cat(q_pos), torch.cat(k_rows),
                        torch.cat(k_pos), cu[0], cu[1], max(lq), max(lk)))
    return out


def wave_forward(kernel, wave: Wave, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_acc: torch.Tensor,
                 lse_acc: torch.Tensor, scale: float) -> None:
    """Run one wave and merge it into out_acc [B, S, H, D] and lse_acc [B, H, S] (merge dtype), in place."""

    o, lse = kernel.varlen_forward(q[wave.q_rows, wave.q_pos], k[wave.k_rows, wave.k_pos],
                                   v[wave.k_rows, wave.k_pos], wave.cu_q, wave.cu_k, wave.max_q, wave.max_k,
                                   wave.causal, scale)
    acc_o = out_acc[wave.q_rows, wave.q_pos][None]  # [1, N, H, D]: gathered, so merged out of place
    acc_l = lse_acc[wave.q_rows, :, wave.q_pos].T[None].contiguous()  # [1, H, N]
    merge_partial(acc_o, acc_l, o[None], lse[None])
    out_acc[wave.q_rows, wave.q_pos] = acc_o[0]
    lse_acc[wave.q_rows, :, wave.q_pos] = acc_l[0].T


def wave_backward(kernel, wave: Wave, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, scale: float, dq_acc: torch.Tensor, dk_acc: torch.Tensor,
                  dv_acc: torch.Tensor) -> None:
    """One wave's gradients, added into dq_acc [B, S_q, H, D] and dk_acc/dv_acc [B, S_k, H_kv, D] (keys may repeat
    across the wave's pieces: accumulate)."""
    qi, ki = (wave.q_rows, wave.q_pos), (wave.k_rows, wave.k_pos)
    dq, dk, dv = kernel.varlen_backward(
        dout[qi], q[qi], k[ki], v[ki], out[qi], lse[wave.q_rows, :, wave.q_pos].T.contiguous(), wave.cu_q,
        wave.cu_k, wave.max_q, wave.max_k, wave.causal, scale,
    )
    dq_acc.index_put_(qi, dq.to(dq_acc.dtype), accumulate=True)
    dk_acc.index_put_(ki, dk.to(dk_acc.dtype), accumulate=True)
    dv_acc.index_put_(ki, dv.to(dv_acc.dtype), accumulate=True)


class SegmentLoopVarlen:
    """The varlen interface over any dense kernel, one call per segment: the reference the CUDA varlen op is
    checked against, and what runs the wave machinery on CPU in the tests."""

    def __init__(self, kernel) -> None:
        self.inner = kernel
        self.name = f"varlen_loop_{kernel.name}"
        self.supports_mask = getattr(kernel, "supports_mask", False)
        self.supports_varlen = True

    def forward(self, *args, **kwargs):
        return self.inner.forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        return self.inner.backward(*args, **kwargs)

    @staticmethod
    def _segments(cu_q: torch.Tensor, cu_k: torch.Tensor):
        q, k = cu_q.tolist(), cu_k.tolist()
        return [(slice(q[i], q[i + 1]), slice(k[i], k[i + 1])) for i in range(len(q) - 1)]

    def varlen_forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        outs, lses = [], []
        for qs, ks in self._segments(cu_q, cu_k):
            o, lse = self.inner.forward(q[None, qs], k[None, ks], v[None, ks], causal, scale)
            outs.append(o[0])
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=1)

    def varlen_backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for qs, ks in self._segments(cu_q, cu_k):
            g = self.inner.backward(dout[None, qs], q[None, qs], k[None, ks], v[None, ks], out[None, qs],
                                    lse[None, :, qs], causal, scale)
            dq[qs] += g[0][0]
            dk[ks] += g[1][0]
            dv[ks] += g[2][0]
        return dq, dk, dv
