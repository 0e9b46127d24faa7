"""The document-aware balanced layout (issue 17): balance without padding, exactness against dense float64, and the
trainer's losses equal zigzag's.

Balance is checked from the layout and the plan alone (no attention runs), for P = 2, 4, 8 on packs of log-normal
lengths (mean S/12), one long document with many short ones, equal documents, and a single document (which must be
exactly zigzag). Correctness: worlds 2-4 (and ring 2 x Ulysses 2) on random packs with length-1 documents and
documents shorter than P, forward and backward, with and without a window.
"""

from __future__ import annotations

import functools
import math
import random

import pytest
import torch
from test_ring_documents import dense_reference

from ringtrain.ring import RingDocuments, get_layout
from ringtrain.ring.attention import pairs_evaluated
from ringtrain.ring.balance import balanced_runs
from ringtrain.ring.layout import ZIGZAG, rank_positions
from ringtrain.ring.plan import visible_work
from ringtrain.testing import run_distributed

S_BALANCE = 24576


def _ids(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]


def _lognormal(seq: int, mean: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    out: list[int] = []
    while sum(out) < seq:
        n = int(torch.exp(torch.randn((), generator=g) + math.log(mean / 1.65)).item()) + 1
        out.append(min(n, seq - sum(out)))
    return out


PACKS = {
    "lognormal-a": _lognormal(S_BALANCE, S_BALANCE // 12, 0),
    "lognormal-b": _lognormal(S_BALANCE, S_BALANCE // 12, 1),
    "long+short": [S_BALANCE // 2] + [S_BALANCE // 64] * 32,
    "equal": [S_BALANCE // 16] * 16,
    "single": [S_BALANCE],
}


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("pack", list(PACKS))
def test_balanced_layout_balances_work_without_padding(world: int, pack: str):
    ids = _ids(PACKS[pack])
    docs = RingDocuments(ids, world, get_layout("balanced").for_documents(ids, world))
    layout = docs.layout
    positions = [rank_positions(S_BALANCE, layout, world, r) for r in range(world)]
    assert all(len(p) == S_BALANCE // world for p in positions)  # exactly S/P tokens: no padding
    assert all(bool((p[1:] > p[:-1]).all()) for p in positions)  # increasing local order
    assert torch.equal(torch.cat(positions).sort().values, torch.arange(S_BALANCE))  # a permutation
    work, _ = pairs_evaluated(docs, world, layout, S_BALANCE)
    visible = visible_work(ids, world, layout)
    assert max(work) / min(work) <= 1.05, work
    assert max(visible) / min(visible) <= 1.05, visible
    if pack == "single":  # one document: exactly zigzag
        assert all(torch.equal(p, rank_positions(S_BALANCE, ZIGZAG, world, r)) for r, p in enumerate(positions))
    if pack == "equal" and world <= 16:  # equal documents stay whole: no K/V travels at all
        assert docs.classification(True, None, 256).n_steps == 1
    if pack.startswith("lognormal"):  # what the layout is for: zigzag leaves stragglers on these packs
        zigzag = visible_work(ids, world, ZIGZAG)
        assert max(zigzag) / min(zigzag) > 1.1


def test_balanced_runs_reject_lengths_not_divisible_by_world():
    with pytest.raises(ValueError, match=r"sequence length 10 is not a multiple of world size 4: .* pad the "
                                         r"sequence to 12 tokens"):
        balanced_runs(_ids([3, 7]), 4)


def _random_pack(rng: random.Random, seq: int) -> list[int]:
    lengths: list[int] = []
    while sum(lengths) < seq:
        lengths.append(min(rng.choice([1, 1, 2, 3, 5, 9, 17, 30]), seq - sum(lengths)))
    return lengths


def _exact_worker(mesh) -> list[dict]:
    """Random packs (length-1 documents, documents shorter than P), fp64 reference kernel and fp32 CPU flash."""
    sp = mesh.sp.with_layout("balanced")
    rng, g = random.Random(mesh.sp_size), torch.Generator().manual_seed(2)
    seq, out = 48, []
    for trial in range(6):
        rows = [_ids(_random_pack(rng, seq))[0] for _ in range(2)]
        docs = torch.stack(rows if trial % 3 else [rows[0], rows[0]])  # rows alike or not
        dtype = torch.float64 if trial < 4 else torch.float32
        window = None if trial % 2 else 7
        q, dout = (torch.randn(2, seq, 4, 8, generator=g, dtype=torch.float64) for _ in "qd")
        k, v = (torch.randn(2, seq, 2, 8, generator=g, dtype=torch.float64) for _ in "kv")
        q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))
        ref = dense_reference(q, k, v, dout, docs, window)
        ring_docs = sp.documents(docs)
        batch_sp = sp.with_layout(ring_docs.layout)
        ql, kl, vl = (batch_sp.shard(t).requires_grad_() for t in (q, k, v))
        res = sp.attention(ql, kl, vl, document_ids=ring_docs, window=window, tile_tokens=4)
        res.backward(batch_sp.shard(dout))
        errors = [((x.double() - batch_sp.shard(r)).abs().max() / r.abs().max().clamp_min(1.0)).item()
                  for x, r in zip((res, ql.grad, kl.grad, vl.grad), ref, strict=True)]
        out.append({"dtype": str(dtype), "error": max(errors)})
    return out


@functools.cache
def _exact(world: int, ulysses: int) -> list[list[dict]]:
    return run_distributed(_exact_worker, world, ulysses_size=ulysses, timeout=240)


@pytest.mark.parametrize("world,ulysses", [(2, 1), (3, 1), (4, 1), (4, 2)])
def test_balanced_layout_matches_dense_float64(world: int, ulysses: int):
    for rank, cases in enumerate(_exact(world, ulysses)):
        for i, case in enumerate(cases):
            tol = 1e-10 if case["dtype"] == "torch.float64" else 1e-5
            assert case["error"] <= tol, f"world={world} U={ulysses} rank={rank} case={i}: {case}"


def _losses(mesh, cfg):
    from ringtrain.train.trainer import build_trainer

    return [h["loss"] for h in build_trainer(cfg, mesh).fit()]


def test_trainer_balanced_losses_equal_zigzag(tmp_path):
    from test_trainer import _cfg

    common = ["train.max_steps=8", "checkpoint.export_final=false", "parallel.sp_size=2", "train.micro_batch_size=2",
              "train.seq_len=256", "data.passkey_min_tokens=80", "data.passkey_max_tokens=120"]  # 2-3 documents a sequence
    runs = {layout: run_distributed(_losses, 2, _cfg(tmp_path / layout, *common, f"parallel.layout={layout}"),
                                    timeout=240)[0] for layout in ("zigzag", "balanced")}
    assert len(runs["zigzag"]) == 8
    for a, b in zip(runs["zigzag"], runs["balanced"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-5), runs
