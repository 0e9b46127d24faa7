"""Attention sinks (gpt-oss), MLA head dims (DeepSeek V3) and soft-capping (Gemma 2) through the one ring driver,
at SP=2 as a ring and as Ulysses, against a dense float64 reference written out here (scores, cap, masks, the sink
column in the softmax): output and dq, dk, dv, d sink, with windows and packed documents. One spawn per (U, R)."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
from test_ring_documents import _visible, document_patterns

from ringtrain.ring import KERNELS, sequence_parallel_attention
from ringtrain.ring.kernels import PaddedValueDim, select_kernel
from ringtrain.ring.varlen import SegmentLoopVarlen
from ringtrain.testing import run_distributed

SEQ, B, H, H_KV, D, DV = 48, 2, 4, 2, 12, 8
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def dense(q, k, v, sink, docs, window, softcap, scale):
    """out [B, S, H, Dv] of the full sequence in float64: capped scores, causal/window/document mask, the sink's
    logit as one more column of each row's softmax (dropped after it)."""
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~_visible(docs, window, True, q.shape[1])[:, None], float("-inf"))
    if sink is not None:
        s = torch.cat([s, sink[None, :, None, None].expand(*s.shape[:3], 1)], dim=-1)
    p = torch.softmax(s, dim=-1)[..., :k.shape[1]]
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _cases():
    docs = document_patterns(seed=5)["crossing"]
    for sink, dv, softcap, (d, window), dtype in itertools.product(
        (True, False), (D, DV), (None, 2.0), ((None, None), (docs, None), (None, 7), (docs, 13)),
        (torch.float64, torch.float32),
    ):
        if not (sink or dv != D or softcap):
            continue  # plain attention: the other suites
        yield sink, dv, softcap, d, window, dtype, "auto"
        if dv != D and softcap is None and dtype == torch.float32 and d is not None:
            # A varlen kernel that wants one head dim (as the CUDA ops do): waves and window edges through
            # PaddedValueDim.
            yield sink, dv, softcap, d, window, dtype, "varlen"


def _worker(mesh) -> dict:
    g = torch.Generator().manual_seed(11)
    sp = mesh.sp.with_layout("zigzag")
    errors = {}
    for sink, dv, softcap, docs, window, dtype, kernel in _cases():
        q = torch.randn(B, SEQ, H, D, generator=g, dtype=torch.float64)
        k = torch.randn(B, SEQ, H_KV, D, generator=g, dtype=torch.float64)
        v = torch.randn(B, SEQ, H_KV, dv, generator=g, dtype=torch.float64)
        dout = torch.randn(B, SEQ, H, dv, generator=g, dtype=torch.float64)
        s_aux = torch.randn(H, generator=g, dtype=torch.float64) * 2 if sink else None
        scale = 0.3
        leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([s_aux.clone().requires_grad_()] if sink else [])
        ref_out = dense(*leaves[:3], leaves[3] if sink else None, docs, window, softcap, scale)
        ref_grads = torch.autograd.grad(ref_out, leaves, dout)
        ql, kl, vl = (sp.shard(t.to(dtype)).requires_grad_() for t in (q, k, v))
        sl = s_aux.to(dtype).requires_grad_() if sink else None
        out = sequence_parallel_attention(
            ql, kl, vl, ring_group=sp.ring_group, ulysses_group=sp.ulysses_group, layout="zigzag", scale=scale,
            window=window, document_ids=None if docs is None else sp.shard(docs), tile_tokens=4, sink=sl,
            softcap=softcap, kernel=SegmentLoopVarlen(KERNELS["cpu_flash"]) if kernel == "varlen" else "auto",
        )
        out.backward(sp.shard(dout.to(dtype)))
        assert out.shape == (B, SEQ // sp.world, H, dv) and vl.grad.shape == vl.shape
        got = [out, ql.grad, kl.grad, vl.grad] + ([sl.grad] if sink else [])
        refs = [ref_out.detach(), *ref_grads]
        err = {}
        for name, x, r in zip(("out", "dq", "dk", "dv", "dsink"), got, refs, strict=False):
            # dsink: this rank's part (its tokens, under Ulysses its heads); the parts add up over the group.
            local = r if name == "dsink" else sp.shard(r)
            if name == "dsink":
                x = x.double().clone()
                torch.distributed.all_reduce(x, group=mesh.sp_group)
            err[name] = ((x.double() - local).abs().max() / r.abs().max().clamp_min(1.0)).item()
        errors[(sink, dv, softcap, docs is not None, window, kernel, str(dtype))] = err
    return errors


@functools.cache
def _results(ulysses: int) -> list[dict]:
    return run_distributed(_worker, 2, ulysses_size=ulysses, timeout=300)


@pytest.mark.parametrize("ulysses", [1, 2], ids=["ring2", "ulysses2"])
def test_sinks_mla_softcap_match_dense_float64(ulysses: int):
    per_rank = _results(ulysses)
    keys = per_rank[0].keys()
    assert len(keys) == len(list(_cases()))
    for key in keys:
        tol = TOLERANCE[torch.float64 if "float64" in key[-1] else torch.float32]
        worst = {n: max(r[key][n] for r in per_rank) for n in per_rank[0][key]}
        bad = {n: f"{e:.2e}" for n, e in worst.items() if not e <= tol}
        assert not bad, f"U={ulysses} (sink, dv, softcap, docs, window, kernel, dtype)={key}: {bad}"


def test_softcap_refuses_a_kernel_that_cannot_compute_it():
    q = torch.randn(1, 8, 2, 8)
    assert select_kernel(q, "auto", softcap=30.0).softcap == 30.0
    assert select_kernel(q, "reference", softcap=30.0).softcap == 30.0
    with pytest.raises(ValueError, match="kernel='cpu_flash' cannot compute attention soft-capping"):
        select_kernel(q, "cpu_flash", softcap=30.0)
    with pytest.raises(ValueError, match="softcap=-1"):
        select_kernel(q, "auto", softcap=-1)
    assert KERNELS["reference"].softcap is None  # the registry's kernel is never capped in place
    assert isinstance(select_kernel(q, "cpu_flash", value_dim=4), PaddedValueDim)  # MLA on an op that wants one dim
    assert select_kernel(q, "reference", value_dim=4) is KERNELS["reference"]


def test_cap_and_sink_change_the_result():
    """Sensitivity: the reference above must tell a capped / sunk softmax from a plain one."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 16, 2, 8, generator=g, dtype=torch.float64) * 3 for _ in "qkv")
    plain = dense(q, k, v, None, None, None, None, 1.0)
    assert (dense(q, k, v, None, None, None, 2.0, 1.0) - plain).abs().max() > 1e-2
    assert (dense(q, k, v, torch.zeros(2, dtype=torch.float64), None, None, None, 1.0) - plain).abs().max() > 1e-2
