"""Ring building blocks: block plan coverage and balance, sharding, positions, merge, kernels, input errors."""

from __future__ import annotations

import pytest
import torch

from ringtrain.ring import (
    KERNELS,
    LAYOUTS,
    local_chunk_ids,
    merge_partial,
    plan_step,
    rank_work,
    ring_attention,
    select_kernel,
    sequence_positions,
    shard_sequence,
    unshard_sequence,
)
from ringtrain.ring.plan import plan_kernel_calls
from ringtrain.testing import run_distributed


def _global_pairs(world: int, rank: int, layout: str, causal: bool, chunk_len: int) -> list[tuple[int, int]]:
    """Every (query position, key position) pair rank `rank` evaluates over the ring, per its plan."""
    def positions(r: int) -> list[int]:
        return [c * chunk_len + i for c in local_chunk_ids(world, r, layout) for i in range(chunk_len)]

    seq_len = chunk_len * len(local_chunk_ids(world, 0, layout)) * world
    q_pos = positions(rank)
    pairs = []
    for step in range(world):
        kv_pos = positions((rank - step) % world)
        for blk in plan_step(world, rank, step, layout, causal, seq_len):
            qs, ks = blk.slices()
            for a, qp in enumerate(q_pos[qs]):
                for b, kp in enumerate(kv_pos[ks]):
                    if not blk.causal or b <= a:  # what the kernel computes: top-left causal inside the block
                        pairs.append((qp, kp))
    return pairs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [True, False])
def test_plan_covers_each_visible_pair_exactly_once(layout: str, causal: bool):
    chunk_len = 3
    for world in range(1, 6):
        seq = chunk_len * len(local_chunk_ids(world, 0, layout)) * world
        pairs = [p for r in range(world) for p in _global_pairs(world, r, layout, causal, chunk_len)]
        expected = [(i, j) for i in range(seq) for j in range(seq) if not causal or j <= i]
        assert sorted(pairs) == expected, f"world={world}"


def test_zigzag_causal_work_is_balanced_and_coalesced():
    for world in range(1, 9):
        work = [rank_work(world, r, "zigzag", True, chunk_len=64) for r in range(world)]
        # Identical block shapes on every rank: exactly equal work.
        assert max(work) == min(work), (world, work)
        for r in range(world):
            assert plan_kernel_calls(world, r, "zigzag", True) == world  # one kernel call per step
            (step0,) = plan_step(world, r, 0, "zigzag", True)
            assert step0.causal and (step0.q_start, step0.q_stop, step0.kv_start, step0.kv_stop) == (0, 2, 0, 2)
    contiguous = [rank_work(4, r, "contiguous", True, chunk_len=64) for r in range(4)]
    assert max(contiguous) > 3 * min(contiguous)  # why zigzag exists


def test_world_of_one_without_process_group():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 3)
    assert torch.equal(shard_sequence(x), x)
    assert torch.equal(unshard_sequence(x), x)
    assert torch.equal(sequence_positions(8), torch.arange(8))
    q, k, v = torch.randn(2, 8, 4, 16), torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    out = ring_attention(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    assert (out - ref).abs().max() / ref.abs().max() < 1e-5


def test_merge_of_key_halves_equals_attention_over_all_keys():
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 6, 2, 8), torch.randn(1, 10, 2, 8), torch.randn(1, 10, 2, 8)
    kernel = KERNELS["reference"]
    full_out, full_lse = kernel.forward(q, k, v, False, 0.3)
    out = torch.zeros(1, 6, 2, 8)
    lse = torch.full((1, 2, 6), float("-inf"))
    for part in (slice(0, 4), slice(4, 10)):
        o, part_lse = kernel.forward(q, k[:, part], v[:, part], False, 0.3)
        merge_partial(out, lse, o, part_lse)
    torch.testing.assert_close(out, full_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, full_lse, rtol=1e-6, atol=1e-6)


def test_merge_keeps_rows_no_block_reached_finite():
    out = torch.zeros(1, 4, 1, 2)
    lse = torch.full((1, 1, 4), float("-inf"))
    blk_lse = torch.tensor([[[0.5, float("-inf"), 1.0, float("-inf")]]])
    merge_partial(out, lse, torch.ones(1, 4, 1, 2), blk_lse)
    assert torch.isfinite(out).all()
    assert out[0, :, 0, 0].tolist() == [1.0, 0.0, 1.0, 0.0]


def test_kernel_choice():
    assert select_kernel(torch.empty(1, 2, 1, 24)).name == "cpu_flash"
    assert select_kernel(torch.empty(1, 2, 1, 24, dtype=torch.bfloat16)).name == "cpu_flash"
    assert select_kernel(torch.empty(1, 2, 1, 24, dtype=torch.float64)).name == "reference"
    assert select_kernel(torch.empty(1, 2, 1, 24), "reference").name == "reference"
    with pytest.raises(ValueError, match=r"kernel='cuda_flash' cannot run torch.float32 on cpu.*needs CUDA"):
        select_kernel(torch.empty(1, 2, 1, 24), "cuda_flash")
    with pytest.raises(ValueError, match=r"kernel='nope' is not one of auto, reference, cpu_flash"):
        select_kernel(torch.empty(1, 2, 1, 24), "nope")


def _qkv(b=1, s=8, h=4, hkv=2, d=16, **kw):
    return torch.randn(b, s, h, d, **kw), torch.randn(b, s, hkv, d, **kw), torch.randn(b, s, hkv, d, **kw)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: _qkv(s=7), r"sequence length 7 x world 1 = 7 is not a multiple of 2 .*pad the sequence to 8"),
        (lambda: _qkv(h=4, hkv=3), r"q heads \(4\) are not a multiple of k/v heads \(3\)"),
        (lambda: (_qkv()[0], _qkv()[1], _qkv(hkv=1)[2]),
         r"k shape \(1, 8, 2, 16\) and v shape \(1, 8, 1, 16\) differ in \[B, S_local, H_kv\]"),
        (lambda: (_qkv(d=8)[0], *_qkv()[1:]), r"head_dim of q \(8\) != head_dim of k \(16\)"),
        (lambda: (_qkv(b=2)[0], *_qkv()[1:]), r"batch size of q \(2\) != batch size of k \(1\)"),
        (lambda: (_qkv(s=4)[0], *_qkv()[1:]), r"local sequence length of q \(4\) != local sequence length of k \(8\)"),
        (lambda: (_qkv()[0].half(), *_qkv()[1:]), r"dtypes q=torch.float16, k=torch.float32, v=torch.float32"),
        (lambda: (_qkv()[0][0], *_qkv()[1:]), r"q has shape \(8, 4, 16\): pass \[B, S_local, heads, head_dim\]"),
        (lambda: (_qkv()[0], _qkv()[1].to("meta"), _qkv()[2]), r"devices q=cpu, k=meta, v=cpu"),
    ],
)
def test_bad_inputs_raise(make, match):
    with pytest.raises(ValueError, match=match):
        ring_attention(*make())


def test_bad_layout_and_group_raise():
    with pytest.raises(ValueError, match=r"layout='stripe' is not one of zigzag, contiguous"):
        ring_attention(*_qkv(), layout="stripe")
    with pytest.raises(ValueError, match="group was given but torch.distributed is not initialised"):
        ring_attention(*_qkv(), group=object())


def _sharding_checks(mesh) -> dict:
    group, world, rank = mesh.sp_group, mesh.sp_size, mesh.sp_rank
    out = {}
    x = torch.randn(2, 24, 3, generator=torch.Generator().manual_seed(5))
    for layout in LAYOUTS:
        local = shard_sequence(x, group=group, layout=layout)
        positions = sequence_positions(24, group=group, layout=layout)
        y = x.transpose(1, 2).contiguous()  # sequence along dim 2
        out[layout] = {
            "identity": torch.equal(unshard_sequence(local, group=group, layout=layout), x),
            "positions_are_shard_of_arange": torch.equal(
                positions, shard_sequence(torch.arange(24), group=group, dim=0, layout=layout)
            ),
            "positions_index_the_shard": torch.equal(x[:, positions], local),
            "identity_dim2": torch.equal(
                unshard_sequence(shard_sequence(y, group=group, dim=2, layout=layout), group=group, dim=2,
                                 layout=layout), y
            ),
        }
    with pytest.raises(ValueError, match=rf"sequence length 10 is not a multiple of {2 * world} .*pad the sequence to 12"):
        shard_sequence(torch.zeros(1, 10), group=group)
    with pytest.raises(ValueError, match=r"sequence length 3 x world 3 = 9 is not a multiple of 6"):
        ring_attention(*_qkv(s=3), group=group)
    with pytest.raises(ValueError, match=r"sequence length 10 is not a multiple of 3 \(world size 3"):
        sequence_positions(10, group=group, layout="contiguous")
    # Contiguous accepts an odd local length (one chunk per rank).
    ring_attention(*_qkv(s=3), group=group, layout="contiguous")
    out["rank"] = rank
    return out


def test_shard_unshard_positions_and_errors_world3():
    results = run_distributed(_sharding_checks, 3, timeout=120)
    for r, res in enumerate(results):
        assert res["rank"] == r
        for layout in LAYOUTS:
            assert all(res[layout].values()), (r, layout, res[layout])


@pytest.mark.parametrize("name", ["cuda_cudnn", "cuda_flash", "cuda_efficient"])
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_cuda_kernel_arguments_on_meta_tensors(name: str, kv_heads: int):
    """The CUDA wrappers' calls match the installed torch's op schemas, and return the layouts the ring wants: run
    on the ops' meta kernels, so CI checks them without a GPU (S_q != S_k; GQA; a causal square)."""
    kernel = KERNELS[name]
    for sq, sk, causal in ((40, 72, False), (64, 64, True)):
        q = torch.empty(2, sq, 8, 64, device="meta", dtype=torch.bfloat16)
        k, v = (torch.empty(2, sk, kv_heads, 64, device="meta", dtype=torch.bfloat16) for _ in "kv")
        out, lse = kernel.forward(q, k, v, causal, 0.125)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert lse.shape == (2, 8, sq) and lse.dtype == torch.float32
        dout = torch.empty_like(q)
        dq, dk, dv = kernel.backward(dout, q, k, v, out, lse, causal, 0.125)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    if getattr(kernel, "supports_window", False):  # a window edge piece: (left, right) window sizes
        q = torch.empty(1, 16, 8, 64, device="meta", dtype=torch.bfloat16)
        k = v = torch.empty(1, 24, kv_heads, 64, device="meta", dtype=torch.bfloat16)
        out, lse = kernel.forward(q, k, v, False, 0.125, window=(9, 0))
        assert out.shape == q.shape and lse.shape == (1, 8, 16)
        grads = kernel.backward(torch.empty_like(q), q, k, v, out, lse, False, 0.125, window=(9, 0))
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    if getattr(kernel, "supports_varlen", False):  # document pieces packed: [T, H, D] with cumulative lengths
        q = torch.empty(50, 8, 64, device="meta", dtype=torch.bfloat16)
        k = v = torch.empty(70, kv_heads, 64, device="meta", dtype=torch.bfloat16)
        cu_q = torch.empty(4, device="meta", dtype=torch.int32)
        out, lse = kernel.varlen_forward(q, k, v, cu_q, cu_q, 30, 40, True, 0.125)
        assert out.shape == q.shape and lse.shape == (8, 50) and lse.dtype == torch.float32
        grads = kernel.varlen_backward(torch.empty_like(q), q, k, v, out, lse, cu_q, cu_q, 30, 40, True, 0.125)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["cuda_cudnn", "cuda_flash", "cuda_efficient", "flash_attn"])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_kernels_match_reference(name: str, causal: bool):
    if name == "flash_attn":
        pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    # S=80 is not a multiple of 32: exercises the efficient op's padded LSE.
    q, k, v = (t.to(dev, torch.bfloat16) for t in _qkv(b=2, s=80, h=8, hkv=2, d=64))
    dout = torch.randn_like(q)
    ref, mine = KERNELS["reference"], KERNELS[name]
    out_r, lse_r = ref.forward(q, k, v, causal, 0.125)
    out_m, lse_m = mine.forward(q, k, v, causal, 0.125)
    assert out_m.shape == q.shape and lse_m.shape == (2, 8, 80) and lse_m.dtype == torch.float32
    torch.testing.assert_close(out_m.float(), out_r.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse_m, lse_r, atol=1e-3, rtol=1e-3)
    # Block backward from the reference's (out, lse), as the ring passes the merged ones.
    for got, want in zip(mine.backward(dout, q, k, v, out_r, lse_r, causal, 0.125),
                         ref.backward(dout, q, k, v, out_r, lse_r, causal, 0.125), strict=True):
        assert got.shape == want.shape
        assert (got.float() - want.float()).abs().max() / want.abs().max() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_flash_window_piece_matches_reference():
    """A window edge (BAND piece) on the CUDA flash op's window sizes equals the reference with the piece's mask."""
    from ringtrain.ring.pieces import Piece, PieceKind

    torch.manual_seed(0)
    dev = torch.device("cuda")
    q, k, v = (t.to(dev, torch.bfloat16) for t in _qkv(b=2, s=48, h=8, hkv=2, d=64))
    q = q[:, :40]  # 40 queries against 48 keys
    piece = Piece(0, 2, 0, 40, 0, 48, PieceKind.BAND, offset=20, window=16)
    mask = piece.band_mask(dev)
    assert bool(mask.any(-1).all())  # every query sees a key: a trimmed piece
    ref, mine = KERNELS["reference"], KERNELS["cuda_flash"]
    out_r, lse_r = ref.forward(q, k, v, False, 0.125, mask=mask)
    out_m, lse_m = mine.forward(q, k, v, False, 0.125, window=piece.flash_window())
    torch.testing.assert_close(out_m.float(), out_r.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse_m, lse_r, atol=1e-3, rtol=1e-3)
    dout = torch.randn_like(q)
    for got, want in zip(mine.backward(dout, q, k, v, out_r, lse_r, False, 0.125, window=piece.flash_window()),
                         ref.backward(dout, q, k, v, out_r, lse_r, False, 0.125, mask=mask), strict=True):
        assert (got.float() - want.float()).abs().max() / want.abs().max() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_large_document_masked_block_has_bounded_memory_on_cuda():
    """Issue 14: a 32K-token packed batch on one rank is one masked block per step; its pieces (flash varlen waves on
    CUDA) never build [S_q, S_k] scores (dense fp32 scores would take 32 GiB here) and equal per-document SDPA."""
    torch.manual_seed(0)
    dev, s, h, d = torch.device("cuda"), 32768, 8, 64
    lengths = torch.randint(1, 4000, (64,))
    lengths = lengths[lengths.cumsum(0) < s].tolist()
    lengths.append(s - sum(lengths))
    docs = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None].to(dev)
    q, k, v, dout = (torch.randn(1, s, h, d, device=dev, dtype=torch.bfloat16) for _ in range(4))
    ql, kl, vl = (t.clone().requires_grad_() for t in (q, k, v))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = ring_attention(ql, kl, vl, document_ids=docs)
    out.backward(dout)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 2**30
    start = 0
    for n in lengths:
        sl = slice(start, start + n)
        qr, kr, vr = (t[:, sl].transpose(1, 2).float().requires_grad_() for t in (q, k, v))
        ref = torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, is_causal=True)
        ref.backward(dout[:, sl].transpose(1, 2).float())
        for got, want in ((out[:, sl], ref.transpose(1, 2)), (ql.grad[:, sl], qr.grad.transpose(1, 2))):
            assert (got.float() - want).abs().max() / want.abs().max() < 3e-2
        start += n
