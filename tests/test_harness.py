"""The spawn helper itself: results come back by rank, a raising or hanging rank fails loudly."""

import time

import pytest
import torch
import torch.distributed as dist

from ringtrain.testing import RankFailedError, RankTimeoutError, run_distributed


def _all_reduce_rank(mesh):
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return {"rank": mesh.rank, "sum": t.item(), "sp": mesh.sp_size, "dp": mesh.dp_size}


def _raise_on_rank_one(mesh):
    if mesh.rank == 1:
        raise ValueError("boom from the test")
    dist.barrier()  # rank 0 blocks here: the harness must not wait for it


def _hang_on_rank_two(mesh):
    if mesh.rank == 2:
        time.sleep(3600)
    return mesh.rank


def _exit_silently(mesh):
    import os

    if mesh.rank == 0:
        os._exit(3)
    dist.barrier()


def test_results_by_rank_and_mesh_shape():
    out = run_distributed(_all_reduce_rank, 4, sp_size=2, timeout=60)
    assert [o["rank"] for o in out] == [0, 1, 2, 3]
    assert all(o["sum"] == 10.0 for o in out)
    assert all((o["dp"], o["sp"]) == (2, 2) for o in out)


def test_raising_rank_fails_and_is_named():
    start = time.monotonic()
    with pytest.raises(RankFailedError, match=r"rank 1 of 2 raised:(.|\n)*boom from the test"):
        run_distributed(_raise_on_rank_one, 2, timeout=60)
    assert time.monotonic() - start < 45  # did not wait for the blocked peer's timeout


def test_hanging_rank_is_killed_at_timeout():
    # The timeout leaves the healthy ranks time to start and finish even on a loaded CI machine.
    start = time.monotonic()
    with pytest.raises(RankTimeoutError, match=r"ranks \[2\] of 3 did not finish within 40s"):
        run_distributed(_hang_on_rank_two, 3, timeout=40)
    assert time.monotonic() - start < 70


def test_rank_that_exits_without_reporting_is_named():
    with pytest.raises(RankFailedError, match="rank 0 exited with code 3"):
        run_distributed(_exit_silently, 2, timeout=60)
