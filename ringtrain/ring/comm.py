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
        self._peers: dict[int, tuple[int, int]] = {}

    def _peer_ranks(self, hops: int) -> tuple[int, int]:
        """Global ranks (send to rank + hops, receive from rank - hops) within the group."""
        if hops not in self._peers:
            pg = self.group if self.group is not None else dist.group.WORLD
            # P2POp wants global ranks; the group's neighbours need not be global neighbours.
            self._peers[hops] = (
                dist.get_global_rank(pg, (self.rank + hops) % self.world),
                dist.get_global_rank(pg, (self.rank - hops) % self.world),
            )
        return self._peers[hops]

    def post(self, send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], hops: int = 1) -> list:
        """Start sending `send` to rank + hops and receiving `recv` (same shapes, in order) from rank - hops.

        hops = 1 is the ring; the backward's last dK/dV hop of an early-stopped ring goes straight home.
        """
        if not send and not recv:
            return []
        send_to, recv_from = self._peer_ranks(hops)
        ops = [dist.P2POp(dist.isend, t, send_to, self.group) for t in send]
        ops += [dist.P2POp(dist.irecv, t, recv_from, self.group) for t in recv]
        return dist.batch_isend_irecv(ops)

    @staticmethod
    def wait(works: list) -> None:
        for work in works:
            work.wait()


class AllToAllComm:
    """The Ulysses transport: one `all_to_all_single` over a group, each rank's buffer cut along dim 0.

    `exchange(x)`, x [U, ...] contiguous: part i goes to rank i of the group, and part i of the result came from
    rank i; `exchange_all` does several at once. The same class serves gloo (CPU) and NCCL (GPU); a group of one (or None) copies nothing.
    """

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world, self.rank = (1, 0) if group is None else group_world_rank(group)

    def exchange(self, x: torch.Tensor) -> torch.Tensor:
        return self.exchange_all([x])[0]

    def exchange_all(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`exchange` of each buffer, all posted before any is waited for: separate buffers reach the receiver as
        separate contiguous tensors (what a kernel reads fastest), at about one collective's latency."""
        if self.world == 1:
            return list(xs)
        for x in xs:
            if x.shape[0] != self.world or not x.is_contiguous():
                raise ValueError(f"all-to-all buffer of shape {tuple(x.shape)}: dim 0 must be the group size "
                                 f"{self.world} and the buffer contiguous")
        outs = [torch.empty_like(x) for x in xs]
        works = [dist.all_to_all_single(o, x, group=self.group, async_op=True) for o, x in zip(outs, xs, strict=True)]
        for work in works:
            work.wait()
        return outs
