# The ring communicator: one batched send-to-next / receive-from-previous per step, over one process group.

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ringtrain.ring.layout import group_world_rank


class RingComm:
    """Posts a step's transfers as ONE `batch_isend_irecv` and waits for them later.

    Every rank lists its sends (to rank + 1) before its receives (from rank - 1), in the same order, so
    the grouped call pairs up identically everywhere and cannot deadlock. On NCCL the transfer runs on
    the communicator's stream and `wait()` only orders the compute stream after it (no host sync); on
    gloo the transfer progresses in gloo's threads while this thread computes.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world, self.rank = group_world_rank(group)
        if self.world > 1:
            pg = group if group is not None else dist.group.WORLD
            # P2POp wants global ranks; the group's neighbours need not be global neighbours.
            self.next_rank = dist.get_global_rank(pg, (self.rank + 1) % self.world)
            self.prev_rank = dist.get_global_rank(pg, (self.rank - 1) % self.world)

    def post(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor]) -> list:
        """Start sending `send` to the next rank and receiving `recv` (same shapes, in order) from the previous."""
        if not send and not recv:
            return []
        ops = [dist.P2POp(dist.isend, t, self.next_rank, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, self.prev_rank, self.group) for t in recv]
        return dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(works: list) -> None:
        for work in works:
            work.wait()
