"""Ring attention on CUDA against dense float64 attention: the CUDA kernels under a real multi-rank ring.

NCCL refuses two ranks on one GPU, so on a one-GPU machine the ranks share the device and talk over gloo through
`HostStagedComm`; kernels, merge, masks and autograd are the code NCCL runs in production. Each world is one spawn
running every case (CUDA start-up costs seconds per process). The CUDA tests are skipped without a CUDA device; the
same cases also run between CPU ranks (the CPU kernel), so CI checks the harness.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pytest
import torch
from test_ring_attention import rel_err
from test_ring_documents import dense_reference

from ringtrain.ring import LAYOUTS, RingDocuments, shard_sequence
from ringtrain.ring.attention import ring_attention_with_comm
from ringtrain.testing import HostStagedComm, run_distributed

SEQ = 256  # chunks of 32-128 tokens at worlds 2 and 4; tiles of 16 under masks
TILE = 16


@dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    kernel: str
    batch: int
    heads: int
    kv_heads: int
    head_dim: int
    mask: str = "none"  # "none" | "window" | "documents"


CASES = [
    Case("bf16-flash-gqa8x2-d64-b2", torch.bfloat16, "cuda_flash", 2, 8, 2, 64),
    Case("fp16-flash-mha4-d128", torch.float16, "cuda_flash", 1, 4, 4, 128),
    Case("bf16-efficient-mqa4x1-d32", torch.bfloat16, "cuda_efficient", 1, 4, 1, 32),
    Case("fp32-auto-gqa8x2-d64", torch.float32, "auto", 1, 8, 2, 64),  # auto picks cuda_efficient for fp32
    Case("bf16-flash-window40", torch.bfloat16, "cuda_flash", 1, 4, 2, 64, mask="window"),
    Case("bf16-flash-documents", torch.bfloat16, "cuda_flash", 2, 4, 2, 64, mask="documents"),
    # Issue 14: cuDNN for dense blocks, the flash window op for window edges and flash varlen waves for documents.
    Case("bf16-cudnn-gqa8x2-d128", torch.bfloat16, "cuda_cudnn", 2, 8, 2, 128),
    Case("bf16-cudnn-window40", torch.bfloat16, "cuda_cudnn", 1, 4, 2, 64, mask="window"),
    Case("bf16-cudnn-documents", torch.bfloat16, "cuda_cudnn", 2, 4, 2, 64, mask="documents"),
    Case("bf16-auto-documents", torch.bfloat16, "auto", 1, 8, 2, 64, mask="documents"),
]
# max |ring - reference| / max |reference|; rounding of the input dtype dominates (fp32: the kernels' own sums).
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}
WINDOW = 40


def _documents(batch: int, seed: int) -> torch.Tensor:
    """[B, SEQ] non-decreasing ids of 3-8 documents of random lengths per row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(SEQ - 1, generator=g)[: int(torch.randint(2, 8, (), generator=g))] + 1
        starts = torch.zeros(SEQ, dtype=torch.long)
        starts[cuts] = 1
        rows.append(starts.cumsum(0))
    return torch.stack(rows)


def _run_cases(mesh, device_type: str) -> dict:
    """Every case on this rank; on "cpu" (the harness's own check in CI) kernels are "auto", i.e. the CPU op."""
    if device_type == "cuda":
        torch.cuda.set_device(0)
    dev = torch.device("cuda", 0) if device_type == "cuda" else torch.device("cpu")
    comm = HostStagedComm(mesh.sp_group)
    errors: dict = {}
    for ci, case in enumerate(CASES):
        for layout in LAYOUTS:
            for causal in (True, False) if case.mask == "none" else (True,):
                g = torch.Generator().manual_seed(100 * ci + 10 * LAYOUTS.index(layout) + causal)

                def rnd(heads: int, g=g, case=case) -> torch.Tensor:
                    shape = (case.batch, SEQ, heads, case.head_dim)
                    return torch.randn(shape, generator=g, dtype=torch.float64).to(case.dtype)

                q, k, v, dout = rnd(case.heads), rnd(case.kv_heads), rnd(case.kv_heads), rnd(case.heads)
                window = WINDOW if case.mask == "window" else None
                ids = _documents(case.batch, seed=ci) if case.mask == "documents" else None
                ref = dense_reference(q, k, v, dout, ids, window, causal)
                kwargs: dict = {"window": window}
                if ids is not None:
                    kwargs["document_ids"] = RingDocuments(ids.to(dev), comm.world, layout)

                def shard(t, layout=layout):
                    return shard_sequence(t, group=mesh.sp_group, layout=layout)

                ql, kl, vl = (shard(t).to(dev).requires_grad_() for t in (q, k, v))
                out = ring_attention_with_comm(
                    comm, ql, kl, vl, causal=causal, layout=layout, kernel=case.kernel if dev.type == "cuda" else "auto",
                    tile_tokens=TILE, **kwargs,
                )
                out.backward(shard(dout).to(dev))
                assert out.device == dev and out.dtype == case.dtype and kl.grad.dtype == case.dtype
                got = (out, ql.grad, kl.grad, vl.grad)
                errors[(case.name, layout, causal)] = {
                    name: rel_err(x.cpu(), shard(r), r)
                    for name, x, r in zip(("out", "dq", "dk", "dv"), got, ref, strict=True)
                }
    return {"errors": errors, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}


@functools.cache
def ring_results(world: int, device_type: str) -> list[dict]:
    return run_distributed(_run_cases, world, device_type, timeout=300)


def check_case(results: list[dict], world: int, case: Case) -> None:
    tol = TOLERANCE[case.dtype]
    keys = [key for key in results[0]["errors"] if key[0] == case.name]
    assert keys, case.name
    for key in keys:
        errs = {name: max(r["errors"][key][name] for r in results) for name in results[0]["errors"][key]}
        bad = {name: f"{e:.2e}" for name, e in errs.items() if not e <= tol}
        assert not bad, f"world={world} {key} on {results[0]['device']}: {bad} > {tol:.0e} (all: {errs})"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_ring_matches_dense_reference(world: int, case: Case):
    check_case(ring_results(world, "cuda"), world, case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_host_staged_ring_on_cpu_matches_dense_reference(case: Case):
    """The harness itself, where CI can run it: HostStagedComm between CPU ranks, the CPU kernel, same tolerances."""
    check_case(ring_results(2, "cpu"), 2, case)
