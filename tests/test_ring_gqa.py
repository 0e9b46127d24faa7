"""GQA without expansion: with H_kv < H, no tensor of K/V repeated to the query heads is allocated anywhere in a ring
or Ulysses step (the kernels' inputs, the ring's buffers, the all-to-all's), forward or backward, and the outputs and
gradients still equal dense float64 attention. One spawn per (U, R) at SP=2.

Every aten op of the step runs under a TorchDispatchMode that flags an "expansion": an op whose output has the shape
of its input (one shape among its tensor inputs: a copy, not a product of two operands such as an attention op or a
matmul) with one dim, the KV heads, multiplied by the group size H / H_kv (index_select, cat), or a copy of a view that
broadcasts a dim of the group's size (expand then clone or reshape: how repeat_interleave runs), and is no view."""

from __future__ import annotations

import functools

import pytest
import torch
from test_ring_documents import document_patterns
from test_ring_sinks_mla_softcap import dense
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ringtrain.ring import sequence_parallel_attention
from ringtrain.testing import run_distributed

SEQ, B, H, H_KV, D, DV = 48, 2, 8, 2, 12, 20  # distinct sizes: no dim is mistaken for another
GROUP = H // H_KV
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
ATTENTION_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")


def _expands(src: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `out` is `src` (a floating-point tensor of 3 dims or more, like K/V) with one dim multiplied by the GQA
    group size."""
    if src.dim() != out.dim() or src.dim() < 3 or not src.dtype.is_floating_point:
        return False
    differ = [d for d in range(src.dim()) if src.shape[d] != out.shape[d]]
    return len(differ) == 1 and out.shape[differ[0]] == GROUP * src.shape[differ[0]]


class ExpansionRecorder(TorchDispatchMode):
    """Records every op that allocates K/V-like tensors expanded to the query heads, and the K/V head counts the
    attention ops were given."""

    def __init__(self) -> None:
        super().__init__()
        self.expansions: list[str] = []
        self.kernel_kv_heads: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func.overloadpacket.__name__ in ATTENTION_OPS:
            self.kernel_kv_heads.append(ins[2 if "backward" in func.overloadpacket.__name__ else 1].shape[1])
        srcs = [i for i in ins if i.dim() >= 3 and i.dtype.is_floating_point]
        if len({i.shape for i in srcs}) != 1:
            return out  # a product of two operands (an attention op, a matmul), not a copy of one
        src, views = srcs[0], {i.untyped_storage().data_ptr() for i in ins}
        # A broadcast view materialised: a dim of the group's size with stride 0 (expand + clone / reshape).
        broadcast = any(n == GROUP and st == 0 for n, st in zip(src.shape, src.stride(), strict=True))
        for o in (t for t in tree_leaves(out) if isinstance(t, torch.Tensor)):
            if o.untyped_storage().data_ptr() in views:
                continue
            if _expands(src, o) or (broadcast and o.shape == src.shape):
                self.expansions.append(f"{func}: {tuple(src.shape)} {src.stride()} -> {tuple(o.shape)}")
        return out


def _worker(mesh) -> dict:
    g = torch.Generator().manual_seed(23)
    sp = mesh.sp.with_layout("zigzag")
    docs_all = document_patterns(seed=3)["crossing"]
    results = {}
    for dtype, kernel in ((torch.float32, "cpu_flash"), (torch.float64, "reference")):
        for dv in (D, DV):
            for docs, window in ((None, None), (docs_all, None), (docs_all, 9)):
                q = torch.randn(B, SEQ, H, D, generator=g, dtype=torch.float64)
                k = torch.randn(B, SEQ, H_KV, D, generator=g, dtype=torch.float64)
                v = torch.randn(B, SEQ, H_KV, dv, generator=g, dtype=torch.float64)
                dout = torch.randn(B, SEQ, H, dv, generator=g, dtype=torch.float64)
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                ref_out = dense(*leaves, None, docs, window, None, 0.3)
                refs = [ref_out.detach(), *torch.autograd.grad(ref_out, leaves, dout)]
                ql, kl, vl = (sp.shard(t.to(dtype)).requires_grad_() for t in (q, k, v))
                dl = None if docs is None else sp.documents(docs)
                douts = sp.shard(dout.to(dtype))
                with ExpansionRecorder() as rec:
                    out = sequence_parallel_attention(
                        ql, kl, vl, ring_group=sp.ring_group, ulysses_group=sp.ulysses_group, layout="zigzag",
                        scale=0.3, kernel=kernel, window=window, document_ids=dl, tile_tokens=4,
                    )
                    out.backward(douts)
                err = {n: ((x.double() - sp.shard(r)).abs().max() / r.abs().max()).item()
                       for n, x, r in zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad), refs,
                                          strict=True)}
                results[(kernel, dv, docs is not None, window)] = {
                    "errors": err, "tol": TOLERANCE[dtype], "expansions": rec.expansions,
                    "kernel_kv_heads": sorted(set(rec.kernel_kv_heads)), "kv_heads_here": kl.shape[2] // sp.ulysses_world,
                }
    return results


@functools.cache
def _results(ulysses: int) -> list[dict]:
    return run_distributed(_worker, 2, ulysses_size=ulysses, timeout=300)


@pytest.mark.parametrize("ulysses", [1, 2], ids=["ring2", "ulysses2"])
def test_no_kv_expanded_to_query_heads_and_gradients_equal_float64(ulysses: int):
    for rank, per_case in enumerate(_results(ulysses)):
        assert len(per_case) == 12
        for case, res in per_case.items():
            assert not res["expansions"], f"rank {rank} {case}: K/V expanded to the query heads: {res['expansions']}"
            if case[0] == "cpu_flash":  # the op ran, and always on the KV heads this rank holds
                assert res["kernel_kv_heads"] == [res["kv_heads_here"]], (rank, case, res["kernel_kv_heads"])
            bad = {n: f"{e:.2e}" for n, e in res["errors"].items() if not e <= res["tol"]}
            assert not bad, f"U={ulysses} rank {rank} (kernel, dv, docs, window)={case}: {bad}"


def test_recorder_sees_an_expansion():
    """The recorder is not blind: the old repeat-and-fold path is flagged."""
    k = torch.randn(1, 6, H_KV, D)
    with ExpansionRecorder() as rec:
        k.repeat_interleave(GROUP, dim=2)
        k[:, :, :, None].expand(1, 6, H_KV, GROUP, D).reshape(1, 6, H, D)
        torch.index_select(k, 2, torch.arange(H) // GROUP)
    assert len(rec.expansions) >= 3, rec.expansions
