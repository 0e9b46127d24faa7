"""Hybrid sequence parallelism (issue 13): Ulysses all-to-all x ring against dense float64 attention.

Worlds 2 and 4 with (U, R) in {(2, 1), (4, 1), (1, 4), (2, 2)}; H_kv in {H, H/2, 1} (U > H_kv replicates KV heads);
causal and not; zigzag and contiguous; documents and windows; outputs and dq/dk/dv, fp32 and bf16. One spawn per
(world, U) runs every case. Error metric as in test_ring_documents: max |x - ref| / max(max |ref|, 1), worst rank.
"""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.distributed as dist
from test_ring_documents import dense_reference, document_patterns

from ringtrain.ring import KERNELS, SequenceParallel, sequence_parallel_attention, ulysses_head_problems
from ringtrain.testing import run_distributed

SEQ, B, H, D = 48, 2, 4, 8
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
CONFIGS = [(2, 2), (4, 4), (4, 1), (4, 2)]  # (world, U): (U, R) = (2, 1), (4, 1), (1, 4), (2, 2)


class CountingKernel:
    def __init__(self, inner) -> None:
        self.inner, self.name, self.supports_mask = inner, f"counting_{inner.name}", inner.supports_mask
        self.forward_calls = 0

    def forward(self, *args, **kwargs):
        self.forward_calls += 1
        return self.inner.forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        return self.inner.backward(*args, **kwargs)


def _rel(x: torch.Tensor, ref_local: torch.Tensor, ref_full: torch.Tensor) -> float:
    return ((x.double() - ref_local).abs().max() / ref_full.abs().max().clamp_min(1.0)).item()


def _cases():
    docs = document_patterns(seed=7)["crossing"]
    for kv_heads, causal, layout in itertools.product((H, H // 2, 1), (True, False), ("zigzag", "contiguous")):
        masks = [(None, None), (docs, None)] + ([(None, 5), (docs, 13)] if causal else [])
        for (d, window), dtype in itertools.product(masks, (torch.float32, torch.bfloat16)):
            if dtype == torch.bfloat16 and (d is not None or layout == "contiguous"):
                continue  # bf16: the plain paths at both masks' absence; the masked ones are dtype-independent
            yield kv_heads, causal, layout, d, window, dtype


def _worker(mesh) -> dict:
    g = torch.Generator().manual_seed(3)
    errors = {}
    for kv_heads, causal, layout, docs, window, dtype in _cases():
        sp = mesh.sp.with_layout(layout)
        q, dout = (torch.randn(B, SEQ, H, D, generator=g, dtype=torch.float64) for _ in "qd")
        k, v = (torch.randn(B, SEQ, kv_heads, D, generator=g, dtype=torch.float64) for _ in "kv")
        q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
        ref = dense_reference(q, k, v, dout, docs, window, causal=causal)
        ql, kl, vl = (sp.shard(t).requires_grad_() for t in (q, k, v))
        out = sequence_parallel_attention(
            ql, kl, vl, ring_group=sp.ring_group, ulysses_group=sp.ulysses_group, causal=causal, layout=layout,
            window=window, document_ids=None if docs is None else sp.shard(docs), tile_tokens=4,
        )
        out.backward(sp.shard(dout))
        assert out.dtype == ql.grad.dtype == kl.grad.dtype == dtype and kl.grad.shape == kl.shape
        key = (kv_heads, causal, layout, docs is not None, window, str(dtype))
        errors[key] = {n: _rel(x, sp.shard(r), r)
                       for n, x, r in zip(("out", "dq", "dk", "dv"), (out, ql.grad, kl.grad, vl.grad), ref, strict=True)}
    # R = 1: one kernel call over the whole sequence (no merge); the same through SequenceParallel.attention.
    calls = None
    if mesh.sp_size == mesh.ulysses_size:
        sp = mesh.sp.with_layout("zigzag")
        kernel = CountingKernel(KERNELS["cpu_flash"])
        q, k, v = (torch.randn(B, SEQ // mesh.sp_size, H, D, generator=g) for _ in "qkv")
        sp.attention(q, k, v, kernel=kernel)
        calls = kernel.forward_calls
    return {"errors": errors, "calls": calls, "sp": (mesh.sp.ring_world, mesh.ulysses_size)}


@functools.cache
def _results(world: int, ulysses: int) -> list[dict]:
    return run_distributed(_worker, world, ulysses_size=ulysses, timeout=300)


@pytest.mark.parametrize("world,ulysses", CONFIGS, ids=[f"U{u}xR{w // u}" for w, u in CONFIGS])
def test_hybrid_matches_dense_float64(world: int, ulysses: int):
    per_rank = _results(world, ulysses)
    assert per_rank[0]["sp"] == (world // ulysses, ulysses)
    keys = per_rank[0]["errors"].keys()
    assert len(keys) == len(list(_cases()))
    for key in keys:
        tol = TOLERANCE[torch.bfloat16 if "bfloat16" in key[-1] else torch.float32]
        worst = {n: max(r["errors"][key][n] for r in per_rank) for n in ("out", "dq", "dk", "dv")}
        bad = {n: f"{e:.2e}" for n, e in worst.items() if not e <= tol}
        assert not bad, f"world={world} U={ulysses} (kv_heads, causal, layout, docs, window, dtype)={key}: {bad}"
    if world == ulysses:
        assert all(r["calls"] == 1 for r in per_rank), [r["calls"] for r in per_rank]


def _sensitivity_worker(mesh) -> float:
    """Shards cut for (U=2, R=2) but declared as a pure ring must give a wrong answer: the test can fail."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, SEQ, H, D, generator=g) for _ in "qkv")
    hybrid = mesh.sp.with_layout("zigzag")
    ring = SequenceParallel(ring_group=mesh.sp_group, layout="zigzag")
    out = ring.attention(hybrid.shard(q), hybrid.shard(k), hybrid.shard(v))
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=True).transpose(1, 2)
    return float((out - hybrid.shard(ref)).abs().max())


def test_layout_mismatch_is_detected():
    assert min(run_distributed(_sensitivity_worker, 4, ulysses_size=2)) > 1e-2


def test_head_rules():
    assert ulysses_head_problems(8, 8, 4) == []
    assert ulysses_head_problems(8, 2, 4) == []  # replicated twice
    assert ulysses_head_problems(32, 8, 8) == []
    (msg,) = ulysses_head_problems(6, 6, 4)[:1]
    assert "6 query heads are not divisible by ulysses size 4: choose among 1, 2, 3, 6" in msg
    (msg,) = ulysses_head_problems(12, 3, 4)
    assert "3 key/value heads with ulysses size 4: need kv_heads % ulysses == 0 or ulysses % kv_heads == 0" in msg


def _errors_worker(mesh) -> list[str]:
    sp = mesh.sp
    msgs = []
    for heads, kv in ((3, 3), (4, 3)):
        q, k = torch.randn(1, 4, heads, 8), torch.randn(1, 4, kv, 8)
        try:
            sp.attention(q, k, k.clone())
        except ValueError as e:
            msgs.append(str(e))
    dist.barrier()
    return msgs


def test_bad_heads_raise_on_every_rank():
    for msgs in run_distributed(_errors_worker, 2, ulysses_size=2):
        assert len(msgs) == 2
        assert "3 query heads are not divisible by ulysses size 2" in msgs[0]
        assert "3 key/value heads with ulysses size 2" in msgs[1]


def test_evaluation_with_ulysses_equals_single_process(tmp_path):
    """`ringtrain eval`'s sharded forward at U=2 (pure Ulysses, 2 ranks): the same predictions, NLL and perplexity
    as one process with sdpa (the ring's guarantee, test_eval.py, now through the all-to-all)."""
    from test_eval import TINY, _assert_same_results, _evaluate

    from ringtrain.validate import load_validated_config

    common = [*TINY, f"train.output_dir={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"]
    ref = _evaluate(None, load_validated_config(None, common))
    cfg = load_validated_config(None, [*common, "parallel.sp_size=2", "parallel.ulysses_size=2"])
    for rank_result in run_distributed(_evaluate, 2, cfg, ulysses_size=2, timeout=240):
        _assert_same_results(ref, rank_result)


def test_a_ring_of_one_makes_no_fp32_copy():
    """Pure Ulysses runs the ring driver over a ring of one: one kernel call, whose bf16 output and gradients come back
    as the kernel made them (bitwise), with no fp32 copy of any [B, S, H, D] tensor (at 8B and 1M tokens those copies
    were ~4.5 GiB per rank)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ringtrain.ring import ring_attention

    g = torch.Generator().manual_seed(5)
    q, k, v, dout = (torch.randn(B, SEQ, H, D, generator=g).to(torch.bfloat16) for _ in range(4))

    class Fp32Tensors(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.made: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= q.numel():
                    self.made.append(str(func))
            return out

    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    with Fp32Tensors() as mode:
        out = ring_attention(qg, kg, vg, causal=True, kernel="cpu_flash")
        out.backward(dout)
    assert mode.made == []
    kernel = KERNELS["cpu_flash"]
    ref, lse = kernel.forward(q, k, v, True, D ** -0.5)
    assert torch.equal(out, ref)
    grads = kernel.backward(dout, q, k, v, ref, lse, True, D ** -0.5)
    assert all(torch.equal(a, b) for a, b in zip((qg.grad, kg.grad, vg.grad), grads, strict=True))
