"""Sampling: DP ranks disjoint and covering, SP ranks identical, deterministic order, exact resume."""

import numpy as np
import pytest

from ringtrain.config import DataConfig
from ringtrain.data import PackedDataLoader, PackedDataset
from ringtrain.data.pipeline import build_dataloader
from ringtrain.testing import run_distributed


def _numbered(n: int, seq_len: int = 4) -> PackedDataset:
    """Sequence i is filled with the value i, so a batch names the sequences it holds."""
    ids = np.repeat(np.arange(n, dtype=np.int32)[:, None], seq_len, axis=1)
    return PackedDataset(ids, np.zeros((n, seq_len), np.int64))


def _take(loader, steps):
    return [next(loader)["input_ids"][:, 0].tolist() for _ in range(steps)]


@pytest.mark.parametrize("n,batch,dp", [(24, 3, 2), (29, 2, 4), (10, 5, 1)])
def test_dp_ranks_disjoint_and_covering(n, batch, dp):
    ds = _numbered(n)
    loaders = [PackedDataLoader(ds, batch, dp_rank=r, dp_size=dp, seed=7) for r in range(dp)]
    steps = loaders[0].steps_per_epoch
    assert steps == n // (batch * dp)
    per_rank = [sum(_take(ld, steps), []) for ld in loaders]
    seen = sum(per_rank, [])
    assert len(seen) == len(set(seen)) == steps * batch * dp  # no sequence twice within an epoch
    # Covering: exactly the first steps * global_batch entries of the epoch's order (the rest waits an epoch).
    assert sorted(seen) == sorted(loaders[0].order(0)[: steps * batch * dp].tolist())
    # DP=dp x batch equals DP=1 x batch*dp, step by step: the sampling does not depend on the split.
    single = PackedDataLoader(ds, batch * dp, seed=7)
    for step, whole in enumerate(_take(single, steps)):
        assert whole == sum((per_rank[r][step * batch:(step + 1) * batch] for r in range(dp)), [])


def test_order_is_deterministic_and_reshuffled_per_epoch():
    ds = _numbered(16)
    a, b = PackedDataLoader(ds, 4, seed=3), PackedDataLoader(ds, 4, seed=3)
    first, second = _take(a, 12), _take(b, 12)
    assert first == second
    epochs = [sorted(sum(first[i:i + 4], [])) for i in (0, 4, 8)]
    assert all(e == list(range(16)) for e in epochs)  # each epoch covers all 16
    assert first[0:4] != first[4:8]  # a different permutation each epoch
    assert _take(PackedDataLoader(ds, 4, seed=4), 4) != first[:4]
    assert sum(_take(PackedDataLoader(ds, 4, shuffle=False), 4), []) == list(range(16))


@pytest.mark.parametrize("k", [0, 3, 4, 5, 9])
def test_resume_matches_uninterrupted_across_epochs(k):
    ds = _numbered(19)  # 19 // (2 * 2) = 4 steps per epoch; 3 sequences wait each epoch
    full = [_take(PackedDataLoader(ds, 2, dp_rank=r, dp_size=2, seed=11), 14) for r in range(2)]
    for r in range(2):
        interrupted = PackedDataLoader(ds, 2, dp_rank=r, dp_size=2, seed=11)
        head = _take(interrupted, k)
        state = interrupted.state_dict()
        # The epoch rolls over lazily, on the first batch of the next epoch.
        epoch, index = ((k - 1) // 4, ((k - 1) % 4 + 1) * 4) if k else (0, 0)
        assert state == {"epoch": epoch, "index": index, "seed": 11, "shuffle": True, "num_sequences": 19,
                         "global_batch": 4}
        resumed = PackedDataLoader(ds, 2, dp_rank=r, dp_size=2, seed=11)
        resumed.load_state_dict(dict(state))
        assert head + _take(resumed, 14 - k) == full[r]


def test_resume_with_other_dp_split_of_the_same_global_batch():
    ds = _numbered(32)
    two = [PackedDataLoader(ds, 4, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    for ld in two:
        _take(ld, 3)
    uninterrupted = PackedDataLoader(ds, 8, seed=5)
    _take(uninterrupted, 3)
    one = PackedDataLoader(ds, 8, seed=5)
    one.load_state_dict(two[0].state_dict())
    assert _take(one, 6) == _take(uninterrupted, 6)


def test_load_state_dict_refuses_a_different_dataset_seed_or_batch():
    ld = PackedDataLoader(_numbered(20), 2, seed=1)
    _take(ld, 3)
    state = ld.state_dict()
    with pytest.raises(ValueError, match="seed=1 in the checkpoint but 2 now"):
        PackedDataLoader(_numbered(20), 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_sequences=20 in the checkpoint but 21 now"):
        PackedDataLoader(_numbered(21), 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="index=6 is not a multiple of the global batch 4"):
        PackedDataLoader(_numbered(20), 4, seed=1).load_state_dict(state)


def test_too_small_dataset_and_bad_ranks_raise():
    with pytest.raises(ValueError, match=r"fewer than one global batch \(batch_size=4 x dp_size=2\)"):
        PackedDataLoader(_numbered(7), 4, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank=2"):
        PackedDataLoader(_numbered(8), 1, dp_rank=2, dp_size=2)


def _first_batches(mesh):
    loader = build_dataloader(DataConfig(seed=3), seq_len=4, batch_size=2, dims=mesh, dataset=_numbered(24))
    return {"dp": mesh.dp_rank, "seqs": _take(loader, 5), "state": loader.state_dict()}


def test_sp_ranks_get_the_same_sequences_dp_groups_different():
    out = run_distributed(_first_batches, 4, sp_size=2, timeout=90)
    assert [o["dp"] for o in out] == [0, 0, 1, 1]
    assert out[0]["seqs"] == out[1]["seqs"] and out[2]["seqs"] == out[3]["seqs"]
    assert not set(sum(out[0]["seqs"], [])) & set(sum(out[2]["seqs"], []))
    assert all(o["state"] == out[0]["state"] for o in out)  # any rank may save the position
