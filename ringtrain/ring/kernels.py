# Local attention kernels behind one interface: forward -> (out, lse), backward from a given (out, lse).
#
# Layout everywhere: q/out/dout [B, S_q, H, D], k/v [B, S_k, H_kv, D], lse [B, H, S_q] in the merge dtype
# (fp32; fp64 for fp64 inputs). `causal` is top-left aligned; the ring only asks for it on blocks
# whose q and kv lengths are equal (the diagonal), where every convention agrees.
#
# backward() receives the FINAL merged out and lse of the whole ring, not the block's own: with them
# P = exp(s - lse) is the globally normalised probability and D = rowsum(dout * out) the global
# correction term, so each block's dq/dk/dv are exact contributions that simply add up.
# GQA: K/V enter every kernel with their H_kv heads and dK/dV come back per KV head (the CPU flash op and the CUDA
# flash / cuDNN / efficient ops take [B, H_kv, S, D] next to q's H heads; the reference kernel broadcasts views).
# A CUDA op is asked once per device and dtype whether it computes GQA right (`native_gqa`); one that does not
# gets K/V repeated locally and dK/dV folded back. Only H_kv heads ever travel around the ring.
#
# Masks: a block the plan marks MASKED is cut into pieces (pieces.py), plain calls of one document
# each. Only a window edge (a BAND piece) needs more: kernels with `supports_window = True` take
# `window=(left, right)` (flash attention's bottom-right aligned window sizes); kernels with `supports_mask = True`
# take `mask`, bool [B or 1, S_q, S_k], True = may attend; the others' BAND pieces go to `mask_fallback(kernel)`.
# A query row the mask hides entirely must come back with lse = -inf and a finite out (the merge then gives it
# weight 0); backward always gets the final, finite lse.
#
# MLA (DeepSeek V2/V3, Kimi K2): v's head dim Dv may differ from q/k's; out and dout are [B, S_q, H, Dv]. Kernels with
# `supports_value_dim` take that as is; `select_kernel` runs the others through `PaddedValueDim`.
# Soft-capping (Gemma 2): scores become c * tanh(s / c) before the softmax. A kernel that can compute it has
# `capped(c)`, returning the kernel bound to that cap (its `softcap`); `select_kernel(..., softcap=c)` never hands
# out one that cannot.

from __future__ import annotations

import inspect
import math
from functools import cache
from typing import Protocol

import torch
import torch.nn.functional as F

from ringtrain.log import get_logger

logger = get_logger(__name__)


def merge_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for out/lse/dK/dV: fp32, or fp64 when the inputs are fp64 (references, tests)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LocalKernel(Protocol):
    name: str
    supports_mask: bool
    """Takes `mask=` (bool [B or 1, S_q, S_k]); optional attribute, absent = False (masked blocks fall back)."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(out [B, S_q, H, D] in q's dtype, lse [B, H, S_q] in merge_dtype)."""
        ...

    def backward(
        self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float, mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq [B, S_q, H, D], dk, dv [B, S_k, H_kv, D]) in any float dtype; the driver accumulates in fp32."""
        ...


def _expand_kv(k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    group = heads // k.shape[2]
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)


_gqa_probing: set[str] = set()
"""Kernels whose GQA probe is running: their calls take K/V at H_kv heads (what the probe checks)."""


def _kv_for(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_axis: int = 2):
    """K/V as kernel `name`'s op takes them for q's heads: at their own H_kv heads where the op computes GQA itself
    (`native_gqa`), else repeated to q's heads (the backward folds dK/dV back with `_reduce_kv` either way)."""
    heads = q.shape[head_axis]
    if k.shape[head_axis] == heads or name in _gqa_probing or native_gqa(name, q.device, q.dtype, q.shape[-1]):
        return k, v
    if head_axis == 1:  # varlen [T, H, D]
        k, v = _expand_kv(k[None], v[None], heads)
        return k[0], v[0]
    return _expand_kv(k, v, heads)


@cache
def native_gqa(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether CUDA kernel `name` computes GQA (q with H heads, K/V with H_kv) forward and backward as the reference
    does, on this device and dtype: asked once, on 64 tokens, so a torch or cuDNN build whose op refuses or
    miscomputes it falls back to repeated K/V instead of failing mid-step. Off CUDA (meta tensors in CI) the ops'
    schemas decide alone."""
    if device.type != "cuda":
        return True
    _gqa_probing.add(name)
    try:
        worst = _probe_error(name, device, dtype, head_dim, heads=4, kv_heads=2)
        why = None if worst < 5e-2 else f"disagrees with the reference by {worst:.2e}"
    except (RuntimeError, NotImplementedError) as e:
        why = f"fails ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    finally:
        _gqa_probing.discard(name)
    if why is not None:
        logger.warning("kernel %r %s on K/V with fewer heads than q: K/V are repeated to q's heads for it", name, why)
    return why is None


def fold_head_copies(g: torch.Tensor, heads: int) -> torch.Tensor:
    """The gradient [B, S, heads x c, D] of c consecutive copies of each of `heads` heads, summed back onto the heads
    [B, S, heads, D] in the merge dtype (fp32 for bf16 inputs). The one owner of the GQA / replica gradient fold."""
    if g.shape[2] == heads:
        return g
    return g.unflatten(2, (heads, g.shape[2] // heads)).sum(3, dtype=merge_dtype(g.dtype))


def _reduce_kv(dk: torch.Tensor, dv: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum gradients of repeated K/V heads back onto their H_kv heads, in the merge dtype."""
    return fold_head_copies(dk, kv_heads), fold_head_copies(dv, kv_heads)


def _bhsd(*ts: torch.Tensor) -> list[torch.Tensor]:
    """[B, S, H, D] views as the [B, H, S, D] the aten ops take (no copy)."""
    return [t.transpose(1, 2) for t in ts]


class ReferenceKernel:
    """Plain torch math in the merge dtype: any device, any dtype, any head dims (Dv may differ), native GQA, and
    soft-capping (`capped`). Slow, exact."""

    name = "reference"
    supports_mask = True
    supports_value_dim = True  # Dv may differ from Dqk (MLA)

    def __init__(self, softcap: float | None = None) -> None:
        self.softcap = softcap
        """Scores are c * tanh(s / c) (Gemma 2's attn_logit_softcapping); None: no cap."""

    def capped(self, softcap: float | None) -> ReferenceKernel:
        return self if softcap == self.softcap else ReferenceKernel(softcap)

    def _probs_inputs(self, q, k, scale, causal, lse=None, mask=None):
        """(q grouped [B, S_q, H_kv, G, D], probabilities [B, H_kv, G, S_q, S_k], lse, tanh of the capped scores or
        None): with `lse` given, the probabilities it normalises."""
        acc = merge_dtype(q.dtype)
        b, sq, h, d = q.shape
        hkv = k.shape[2]
        qg = q.to(acc).unflatten(2, (hkv, h // hkv))  # [B, S_q, H_kv, G, D]
        s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(acc)) * scale
        tanh = None
        if self.softcap is not None:
            tanh = torch.tanh(s / self.softcap)
            s = tanh * self.softcap
        if causal:
            above = torch.ones(sq, k.shape[1], dtype=torch.bool, device=q.device).triu(1)
            s = s.masked_fill(above, float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None], float("-inf"))
        if lse is None:
            lse = torch.logsumexp(s, dim=-1)  # [B, H_kv, G, S_q]; -inf on rows the mask hides entirely
        else:
            lse = lse.to(acc).unflatten(1, (hkv, h // hkv))
        finite = lse.masked_fill(lse == float("-inf"), 0.0)  # hidden rows: exp(-inf - 0) = 0, not nan
        return qg, torch.exp(s - finite.unsqueeze(-1)), lse, tanh

    def forward(self, q, k, v, causal, scale, mask=None):
        b, sq, h, d = q.shape
        _, p, lse, _ = self._probs_inputs(q, k, scale, causal, mask=mask)
        out = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(p.dtype)).reshape(b, sq, h, v.shape[-1])
        return out.to(q.dtype), lse.flatten(1, 2)

    def backward(self, dout, q, k, v, out, lse, causal, scale, mask=None):
        qg, p, _, tanh = self._probs_inputs(q, k, scale, causal, lse, mask)
        acc = p.dtype
        do = dout.to(acc).unflatten(2, qg.shape[2:4])
        delta = (do * out.to(acc).unflatten(2, qg.shape[2:4])).sum(-1).permute(0, 2, 3, 1)  # [B, H_kv, G, S_q]
        dv = torch.einsum("bhgqk,bqhgd->bkhd", p, do)
        dp = torch.einsum("bqhgd,bkhd->bhgqk", do, v.to(acc))
        ds = p * (dp - delta.unsqueeze(-1)) * scale
        if tanh is not None:
            ds = ds * (1 - tanh * tanh)  # d(c tanh(x / c)) / dx
        dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, k.to(acc)).flatten(2, 3)
        dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, qg)
        return dq, dk, dv


class CpuFlashKernel:
    """PyTorch's CPU flash-attention op (`_scaled_dot_product_flash_attention_for_cpu`), which returns the LSE."""

    name = "cpu_flash"
    supports_mask = True
    causal_block = 128
    """Document pieces split causal squares longer than this, up to pieces.CAUSAL_SPLIT_MAX_BLOCKS of it
    (pieces.split_causal): the op computes a causal call shorter than its 512-key block as the whole square, so a
    680-token document costs 158 ns per visible pair whole and 130 split (one thread, H=8, D=64; 300 tokens: 181 vs
    145); longer pieces stay whole."""

    @staticmethod
    def _bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The op wants an additive mask of q's dtype, [B, 1, S_q, S_k] (broadcast over heads)."""
        if mask is None:
            return None
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))[:, None]

    def forward(self, q, k, v, causal, scale, mask=None):
        # K/V keep their H_kv heads: the op computes GQA itself (and returns dK/dV per KV head).
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *_bhsd(q, k, v), 0.0, causal, attn_mask=self._bias(mask, q.dtype), scale=scale
        )
        if mask is not None:
            # The op returns out = 0 but lse = 0 (not -inf) for a row whose every key is masked (torch 2.13):
            # that row must weigh nothing in the merge.
            lse = lse.masked_fill(~mask.any(-1)[:, None, :], float("-inf"))
        return out.transpose(1, 2), lse

    def backward(self, dout, q, k, v, out, lse, causal, scale, mask=None):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *_bhsd(dout, q, k, v, out), lse.contiguous(), 0.0, causal, attn_mask=self._bias(mask, q.dtype),
            scale=scale,
        )
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _same_head_dim(*ts: torch.Tensor, dim: int) -> list[torch.Tensor]:
    """Tensors zero-padded on their last (head) dim to `dim`."""
    return [t if t.shape[-1] == dim else F.pad(t, (0, dim - t.shape[-1])) for t in ts]


class PaddedValueDim:
    """A kernel whose ops want one head dim for q, k and v, run on MLA inputs (v's head dim Dv != q/k's Dqk): q, k, v
    (and dout, out) zero-padded to max(Dqk, Dv), results sliced back, the way transformers feeds MLA to FlashAttention.
    Exact: zero q/k columns add nothing to the scores, zero v columns give zero output columns and nothing to
    rowsum(dout * out). `select_kernel` wraps a kernel in it when it lacks `supports_value_dim`."""

    supports_value_dim = True

    def __init__(self, inner: LocalKernel) -> None:
        self.inner, self.name = inner, inner.name
        for attr in ("supports_mask", "supports_window", "supports_varlen", "causal_block", "softcap"):
            if hasattr(inner, attr):
                setattr(self, attr, getattr(inner, attr))

    @staticmethod
    def _dims(q: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int]:
        return q.shape[-1], v.shape[-1], max(q.shape[-1], v.shape[-1])

    def forward(self, q, k, v, causal, scale, **kwargs):
        _, dv, d = self._dims(q, v)
        out, lse = self.inner.forward(*_same_head_dim(q, k, v, dim=d), causal, scale, **kwargs)
        return out[..., :dv], lse

    def backward(self, dout, q, k, v, out, lse, causal, scale, **kwargs):
        dqk, dv, d = self._dims(q, v)
        dout, q, k, v, out = _same_head_dim(dout, q, k, v, out, dim=d)
        gq, gk, gv = self.inner.backward(dout, q, k, v, out, lse, causal, scale, **kwargs)
        return gq[..., :dqk], gk[..., :dqk], gv[..., :dv]

    def varlen_forward(self, q, k, v, *args):
        _, dv, d = self._dims(q, v)
        out, lse = self.inner.varlen_forward(*_same_head_dim(q, k, v, dim=d), *args)
        return out[..., :dv], lse

    def varlen_backward(self, dout, q, k, v, out, lse, *args):
        dqk, dv, d = self._dims(q, v)
        dout, q, k, v, out = _same_head_dim(dout, q, k, v, out, dim=d)
        gq, gk, gv = self.inner.varlen_backward(dout, q, k, v, out, lse, *args)
        return gq[..., :dqk], gk[..., :dqk], gv[..., :dv]


@cache
def _rng_placeholders(op_name: str) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
    """Shapes/dtypes of the philox seed/offset a CUDA SDPA forward returns, read from its meta kernel.

    With dropout_p=0 the backward never reads them, but it wants tensors of the kind the forward
    made; asking the meta kernel keeps that right across torch versions.
    """
    t = torch.empty(1, 1, 8, 64, device="meta", dtype=torch.float16)
    if op_name == "flash":
        res = torch.ops.aten._scaled_dot_product_flash_attention(t, t, t, 0.0, False, False)
        seed, offset = res[6], res[7]
    elif op_name == "flash_window":  # _flash_attention_forward: [B, S, H, D]; rng_state and `unused`
        t = t.transpose(1, 2)
        res = torch.ops.aten._flash_attention_forward(t, t, t, None, None, 8, 8, 0.0, False, False,
                                                      window_size_left=1, window_size_right=0)
        seed, offset = res[2], res[3]
    elif op_name == "cudnn":
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(t, t, t, None, True, 0.0, False, False)
        seed, offset = res[6], res[7]
    else:
        res = torch.ops.aten._scaled_dot_product_efficient_attention(t, t, t, None, True, 0.0, False)
        seed, offset = res[2], res[3]
    return (tuple(seed.shape), seed.dtype), (tuple(offset.shape), offset.dtype)


def _placeholders(op_name: str, device: torch.device) -> list[torch.Tensor]:
    return [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in _rng_placeholders(op_name)]


@cache
def cudnn_lse_is_4d() -> bool:
    """Whether the cuDNN op returns its LSE as [B, H, S_q, 1] (torch >= 2.9) rather than [B, H, S_q]: asked of the
    meta kernel, so the wrapper follows the installed torch (PyTorch CP issue #163075 was this shape)."""
    t = torch.empty(1, 1, 8, 64, device="meta", dtype=torch.float16)
    return torch.ops.aten._scaled_dot_product_cudnn_attention(t, t, t, None, True, 0.0, False, False)[1].dim() == 4


def _like_strides(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`x` with `like`'s strides (a copy only when they differ): the cuDNN backward wants grad_out laid out like
    out (PyTorch CP issue #176915)."""
    if x.stride() == like.stride():
        return x
    return torch.empty_strided(like.shape, like.stride(), dtype=x.dtype, device=x.device).copy_(x)


class CudnnKernel:
    """PyTorch's cuDNN attention op (`_scaled_dot_product_cudnn_attention`), the kernel SDPA picks on Hopper:
    fp16/bf16, head_dim % 8 == 0, <= 128. Its causal mask is top-left, which the ring only asks for on square
    diagonal blocks."""

    name = "cuda_cudnn"
    supports_mask = False
    # Window edges and document pieces go to the flash op's window sizes and varlen calls: cuDNN's own varlen
    # path needs nested tensors and its sliding window differs across versions.
    supports_window = True
    supports_varlen = True

    def varlen_forward(self, *args):
        return KERNELS["cuda_flash"].varlen_forward(*args)

    def varlen_backward(self, *args):
        return KERNELS["cuda_flash"].varlen_backward(*args)

    def forward(self, q, k, v, causal, scale, window=None):
        if window is not None:
            return KERNELS["cuda_flash"].forward(q, k, v, False, scale, window=window)
        k, v = _kv_for(self.name, q, k, v)
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(
            *_bhsd(q, k, v), None, True, 0.0, causal, False, scale=scale
        )
        lse = res[1]
        return res[0].transpose(1, 2), lse.squeeze(-1) if lse.dim() == 4 else lse

    def backward(self, dout, q, k, v, out, lse, causal, scale, window=None):
        if window is not None:
            return KERNELS["cuda_flash"].backward(dout, q, k, v, out, lse, False, scale, window=window)
        kv_heads = k.shape[2]
        k, v = _kv_for(self.name, q, k, v)
        seed, offset = _placeholders("cudnn", q.device)
        qb, kb, vb, ob = _bhsd(q, k, v, out)
        lse = (lse.unsqueeze(-1) if cudnn_lse_is_4d() else lse).contiguous()
        # This block's own lengths as max_q/max_k (not the forward's of another block), undefined cum_seq: dense.
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            _like_strides(dout.transpose(1, 2), ob), qb, kb, vb, ob, lse, seed, offset, None, None, None,
            q.shape[1], k.shape[1], 0.0, causal, scale=scale,
        )
        dk, dv = _reduce_kv(dk.transpose(1, 2), dv.transpose(1, 2), kv_heads)
        return dq.transpose(1, 2), dk, dv


class CudaFlashKernel:
    """PyTorch's CUDA flash op (`_scaled_dot_product_flash_attention`): fp16/bf16, head_dim % 8 == 0, <= 256.

    Window edges (BAND pieces) run on `_flash_attention_forward` with its window sizes instead of a mask."""

    name = "cuda_flash"
    supports_mask = False
    supports_window = True
    supports_varlen = True  # document pieces as a few varlen calls (ring.varlen), not one launch each

    def varlen_forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
        """Packed q [Tq, H, D], k/v [Tk, H_kv, D] with cumulative lengths -> (out [Tq, H, D], lse [H, Tq])."""
        k, v = _kv_for(self.name, q, k, v, head_axis=1)
        res = torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                      scale=scale)
        return res[0], res[1]

    def varlen_backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        kv_heads = k.shape[1]
        k, v = _kv_for(self.name, q, k, v, head_axis=1)
        rng, unused = _placeholders("flash_window", q.device)
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), cu_q, cu_k, max_q, max_k, 0.0,
            causal, rng, unused, scale=scale,
        )
        dk, dv = _reduce_kv(dk[None], dv[None], kv_heads)
        return dq, dk[0], dv[0]

    def forward(self, q, k, v, causal, scale, window=None):
        if window is not None:
            return self._forward_window(q, k, v, scale, window)
        k, v = _kv_for(self.name, q, k, v)
        res = torch.ops.aten._scaled_dot_product_flash_attention(*_bhsd(q, k, v), 0.0, causal, False, scale=scale)
        return res[0].transpose(1, 2), res[1]

    def _forward_window(self, q, k, v, scale, window):
        k, v = _kv_for(self.name, q, k, v)
        left, right = window  # bottom-right aligned, see pieces.Piece.flash_window
        res = torch.ops.aten._flash_attention_forward(
            q, k, v, None, None, q.shape[1], k.shape[1], 0.0, False, False, scale=scale,
            window_size_left=left, window_size_right=right,
        )
        return res[0], res[1]

    def _backward_window(self, dout, q, k, v, out, lse, scale, window):
        kv_heads = k.shape[2]
        k, v = _kv_for(self.name, q, k, v)
        rng, unused = _placeholders("flash_window", q.device)
        left, right = window
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q, k, v, out.contiguous(), lse.contiguous(), None, None, q.shape[1], k.shape[1],
            0.0, False, rng, unused, scale=scale, window_size_left=left, window_size_right=right,
        )
        dk, dv = _reduce_kv(dk, dv, kv_heads)
        return dq, dk, dv

    def backward(self, dout, q, k, v, out, lse, causal, scale, window=None):
        if window is not None:
            return self._backward_window(dout, q, k, v, out, lse, scale, window)
        kv_heads = k.shape[2]
        k, v = _kv_for(self.name, q, k, v)
        seed, offset = _placeholders("flash", q.device)
        # cum_seq_q/k = None (undefined) selects the dense, non-varlen path; max_q/max_k are the lengths.
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            *_bhsd(dout, q, k, v, out), lse.contiguous(), None, None, q.shape[1], k.shape[1],
            0.0, causal, seed, offset, scale=scale,
        )
        dk, dv = _reduce_kv(dk.transpose(1, 2), dv.transpose(1, 2), kv_heads)
        return dq.transpose(1, 2), dk, dv


class CudaEfficientKernel:
    """PyTorch's CUDA memory-efficient op: also fp32, any head_dim % 8 == 0."""

    name = "cuda_efficient"
    supports_mask = False  # masked blocks go to mask_fallback()

    def forward(self, q, k, v, causal, scale):
        k, v = _kv_for(self.name, q, k, v)
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            *_bhsd(q, k, v), None, True, 0.0, causal, scale=scale
        )
        # The op pads the LSE's query dimension to a multiple of 32; the ring wants exactly S_q.
        return out.transpose(1, 2), lse[:, :, : q.shape[1]]

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        kv_heads = k.shape[2]
        k, v = _kv_for(self.name, q, k, v)
        seed, offset = _placeholders("efficient", q.device)
        sq = q.shape[1]
        lse = F.pad(lse, (0, (-sq) % 32)).contiguous()  # back to the padded shape the forward produced
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            *_bhsd(dout, q, k, v), None, out.transpose(1, 2), lse, seed, offset,
            0.0, [True, True, True, False], causal, scale=scale,
        )
        dk, dv = _reduce_kv(dk.transpose(1, 2), dv.transpose(1, 2), kv_heads)
        return dq.transpose(1, 2), dk, dv


class FlashAttnPackageKernel:
    """The `flash_attn` package (>= 2.6): native GQA and [B, S, H, D] layout.

    Forward uses the public `flash_attn_func(..., return_attn_probs=True)`, which also returns the LSE.
    The package has no public backward that accepts an external LSE, so backward calls the private
    `_flash_attn_backward`, bound by parameter name because its signature changed across releases
    (window_size tuple before 2.6.x, window_size_left/right and softcap after).
    """

    name = "flash_attn"
    supports_mask = False  # masked blocks go to mask_fallback()

    def forward(self, q, k, v, causal, scale):
        from flash_attn import flash_attn_func

        out, lse, _ = flash_attn_func(
            q, k, v, dropout_p=0.0, softmax_scale=scale, causal=causal, return_attn_probs=True
        )
        return out, lse

    def backward(self, dout, q, k, v, out, lse, causal, scale):
        from flash_attn.flash_attn_interface import _flash_attn_backward

        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        candidates = dict(
            dout=dout.contiguous(), q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), out=out.contiguous(),
            softmax_lse=lse.contiguous(), dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale,
            causal=causal, window_size=(-1, -1), window_size_left=-1, window_size_right=-1, softcap=0.0,
            alibi_slopes=None, deterministic=False, rng_state=None,
        )
        params = inspect.signature(_flash_attn_backward).parameters
        missing = [p for p, spec in params.items() if p not in candidates and spec.default is inspect.Parameter.empty]
        if missing:
            raise RuntimeError(
                f"flash_attn._flash_attn_backward wants {missing}, unknown to this shim: "
                "use kernel='cuda_flash' or a flash-attn release between 2.6 and 2.8"
            )
        _flash_attn_backward(**{p: candidates[p] for p in params if p in candidates})
        return dq, dk, dv


KERNELS: dict[str, LocalKernel] = {
    k.name: k
    for k in (ReferenceKernel(), CpuFlashKernel(), CudnnKernel(), CudaFlashKernel(), CudaEfficientKernel(),
              FlashAttnPackageKernel())
}


@cache
def _flash_attn_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


_HALF = (torch.float16, torch.bfloat16)


def _supports(name: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None if kernel `name` runs these inputs, else why not."""
    if name == "reference":
        return None
    if name == "cpu_flash":
        return None if device.type == "cpu" and dtype.is_floating_point else "needs CPU tensors"
    if device.type != "cuda":
        return "needs CUDA tensors"
    if name == "cuda_efficient":
        return None if head_dim % 8 == 0 and dtype in (torch.float32, *_HALF) else "needs fp32/fp16/bf16, head_dim % 8 == 0"
    if dtype not in _HALF or head_dim % 8 or head_dim > 256:
        return "needs fp16/bf16 and head_dim a multiple of 8 up to 256"
    if name == "flash_attn" and not _flash_attn_available():
        return "needs the flash-attn package (pip install 'ringtrain[flash]')"
    if name == "cuda_cudnn":
        if head_dim > 128:
            return "needs head_dim <= 128"
        if not torch.backends.cuda.cudnn_sdp_enabled():
            return "is disabled (torch.backends.cuda.enable_cudnn_sdp(False))"
    return None


def _probe_error(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, heads: int,
                 kv_heads: int) -> float:
    """The largest difference between kernel `name` and the reference (out, lse, dq, dk, dv) on 64 causal tokens."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q, dout = (torch.randn(1, 64, heads, head_dim, generator=g).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(1, 64, kv_heads, head_dim, generator=g).to(device, dtype) for _ in range(2))
    ref, mine, scale = KERNELS["reference"], KERNELS[name], head_dim ** -0.5
    out, lse = mine.forward(q, k, v, True, scale)
    ref_out, ref_lse = ref.forward(q, k, v, True, scale)
    grads = mine.backward(dout, q, k, v, ref_out, ref_lse, True, scale)
    ref_grads = ref.backward(dout, q, k, v, ref_out, ref_lse, True, scale)
    errors = [(out.float() - ref_out.float()).abs().max(), (lse - ref_lse).abs().max()]
    errors += [(a.float() - b.float()).abs().max() for a, b in zip(grads, ref_grads, strict=True)]
    return float(max(errors))


@cache
def cudnn_probe(device: torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None if the cuDNN kernel runs forward and backward on this device, dtype and head_dim and agrees with the
    reference, else why not. Run once per combination before `auto` picks it (the cuDNN library, its version and
    the GPU decide what it supports, and a failure must not surface mid-step)."""
    try:
        worst = _probe_error("cuda_cudnn", device, dtype, head_dim, heads=2, kv_heads=2)
    except (RuntimeError, NotImplementedError) as e:
        return f"failed its probe ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    return None if worst < 5e-2 else f"disagrees with the reference by {worst:.2e} in its probe"


def select_kernel(q: torch.Tensor, kernel: str | LocalKernel | None = "auto", *,
                  softcap: float | None = None, value_dim: int | None = None) -> LocalKernel:
    """The local kernel for inputs like `q` [B, S, H, D]: by name, as given, or chosen from device/dtype/head_dim.

    With `softcap`, one that computes the cap, bound to it (`capped`): `auto` takes the first such kernel of the
    device; a named kernel (or object) that cannot is refused, never run without the cap. With a `value_dim` other
    than q's head dim (MLA), a kernel without `supports_value_dim` runs through `PaddedValueDim`."""
    chosen = _capped_kernel(q, kernel, softcap) if softcap is not None else _select_kernel(q, kernel)
    if value_dim not in (None, q.shape[-1]) and not getattr(chosen, "supports_value_dim", False):
        return PaddedValueDim(chosen)
    return chosen


def _select_kernel(q: torch.Tensor, kernel: str | LocalKernel | None = "auto") -> LocalKernel:
    if kernel is not None and not isinstance(kernel, str):
        return kernel
    head_dim = q.shape[-1]
    if kernel in (None, "auto"):
        if q.device.type == "cpu":
            # fp64 goes to the reference: the CPU op would work, but references want exact fp64 math.
            order = ["cpu_flash"] if q.dtype != torch.float64 else []
        else:
            # cuDNN first: on Hopper it takes half the time of FlashAttention-2 on the same blocks (benchmarks.md).
            order = ["cuda_cudnn", "flash_attn", "cuda_flash", "cuda_efficient"]
        for name in [*order, "reference"]:
            why = _supports(name, q.device, q.dtype, head_dim)
            if why is None and name == "cuda_cudnn":
                why = cudnn_probe(q.device, q.dtype, head_dim)
                if why is not None and (q.device, q.dtype, head_dim) not in _warned_probe:
                    _warned_probe.add((q.device, q.dtype, head_dim))
                    logger.warning("kernel 'cuda_cudnn' %s: using the next kernel", why)
            if why is None:
                return KERNELS[name]
    if kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is not one of auto, {', '.join(KERNELS)}: pass one of those names")
    why = _supports(kernel, q.device, q.dtype, head_dim)
    if why is not None:
        raise ValueError(
            f"kernel={kernel!r} cannot run {q.dtype} on {q.device.type} with head_dim={head_dim}: it {why}; "
            "pass kernel='auto' or 'reference'"
        )
    return KERNELS[kernel]


def _capped_kernel(q: torch.Tensor, kernel: str | LocalKernel | None, softcap: float) -> LocalKernel:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap > 0:
        raise ValueError(f"softcap={softcap!r}: pass a positive number (scores become c * tanh(s / c)) or None")
    if kernel in (None, "auto"):
        chosen = KERNELS["reference"]  # the one kernel that computes the cap on every device
        if q.device.type not in _warned_softcap:
            _warned_softcap.add(q.device.type)
            # On an accelerator this is the slow path (each block's scores materialised in fp32): say so loudly.
            log = logger.info if q.device.type == "cpu" else logger.warning
            log("attention soft-capping on %s: kernel 'reference' (the only one here that computes it; it holds each "
                "block's [S_q, S_k] scores in fp32)", q.device.type)
    else:
        chosen = _select_kernel(q, kernel)
    if not hasattr(chosen, "capped"):
        raise ValueError(f"kernel={chosen.name!r} cannot compute attention soft-capping (softcap={softcap}): pass "
                         "kernel='auto' or 'reference'")
    return chosen.capped(float(softcap))


def mask_fallback(kernel: LocalKernel) -> LocalKernel:
    """The kernel for a piece that needs a mask (a window edge, pieces.PieceKind.BAND): `kernel` itself if it takes
    masks, else the reference kernel (exact, any device; it materialises the piece's scores, which are at most a
    tile by a tile). Chosen per call, stated in the log once."""
    if getattr(kernel, "supports_mask", False):
        return kernel
    if getattr(kernel, "softcap", None) is not None:
        return KERNELS["reference"].capped(kernel.softcap)
    if kernel.name not in _warned_fallback:
        _warned_fallback.add(kernel.name)
        logger.info("kernel %r takes neither masks nor windows: window edges use 'reference'", kernel.name)
    return KERNELS["reference"]


_warned_fallback: set[str] = set()
_warned_probe: set[tuple] = set()
_warned_softcap: set[str] = set()


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
