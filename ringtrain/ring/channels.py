# The head-parallel exchange of token mixers that are not softmax attention (linear attention, state-space and
# convolution layers): sequence shards of every channel <-> the whole sequence, in natural order, of one channel group.
#
# A recurrence or a causal convolution needs its tokens in sequence order, which no layout gives one rank. So each of
# the P = R x U ranks of the SP group sends channel group g to SP rank g and receives the whole sequence of its own
# group: an all-to-all over the Ulysses group (each rank then holds its ring shard, as Ulysses attention does), an
# all-to-all over the ring group (every ring shard, laid end to end in ring-rank order), and one index copy that puts
# the tokens in natural order (`layout.gathered_positions`, the order `unshard_sequence` restores). The way back is
# the same three steps reversed, and each direction's backward is the other direction. The channels of a group need
# not be adjacent in the caller's tensor: callers lay them out as [B, S_local, P, c] (group-major), so one exchange
# carries every projection a layer sends.

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ringtrain.ring.balance import Spans
from ringtrain.ring.comm import AllToAllComm
from ringtrain.ring.layout import Layout, gathered_positions


def _host_order(seq_len: int, layout: Layout, ring: int) -> torch.Tensor | None:
    pos = gathered_positions(seq_len, layout, ring)  # on the host: no device sync to test it
    return None if torch.equal(pos, torch.arange(seq_len)) else pos


_static_order = functools.lru_cache(maxsize=64)(_host_order)  # a data-independent layout: once per shape


def _natural_order(seq_len: int, layout: Layout, ring: int, device: torch.device) -> torch.Tensor | None:
    """Where each token of the ring shards laid end to end belongs; None when that is already the natural order.
    Computed on the host (cached for a static layout: each mixer layer exchanges four times a step, more under
    recompute), then copied to `device`."""
    pos = (_static_order if layout.static else _host_order)(seq_len, layout, ring)
    return None if pos is None else pos.to(device, non_blocking=True)


def _to_channels(x: torch.Tensor, ring: AllToAllComm, ulysses: AllToAllComm, layout: Layout) -> torch.Tensor:
    """[B, S_local, P, c] (group g = ring index x U + Ulysses index) -> [B, S, c]: this rank's group, natural order."""
    b, s_local, _, c = x.shape
    r, u = ring.world, ulysses.world
    x = x.reshape(b, s_local, r, u, c)
    if u > 1:  # destination j takes the groups (i, j) of every ring index i; the parts of a ring shard arrive in order
        recv = ulysses.exchange(x.permute(3, 0, 1, 2, 4).contiguous())  # [U (source), B, S_local, R, c]
        x = recv.permute(1, 0, 2, 3, 4).reshape(b, u * s_local, r, c)  # this ring shard, local order
    else:
        x = x.reshape(b, s_local, r, c)
    s_ring = x.shape[1]
    if r > 1:
        recv = ring.exchange(x.permute(2, 0, 1, 3).contiguous())  # [R (source ring rank), B, S_ring, c]
        x = recv.permute(1, 0, 2, 3).reshape(b, r * s_ring, c)
    else:
        x = x.reshape(b, s_ring, c)
    order = _natural_order(r * s_ring, layout, r, x.device)
    return x if order is None else torch.empty_like(x).index_copy_(1, order, x)


def _to_sequence(y: torch.Tensor, ring: AllToAllComm, ulysses: AllToAllComm, layout: Layout) -> torch.Tensor:
    """The inverse of `_to_channels`: [B, S, c] of this rank's group -> [B, S_local, P, c]."""
    b, seq_len, c = y.shape
    r, u = ring.world, ulysses.world
    order = _natural_order(seq_len, layout, r, y.device)
    y = y if order is None else y.index_select(1, order)  # ring shards end to end, in ring-rank order
    s_ring = seq_len // r
    if r > 1:
        recv = ring.exchange(y.reshape(b, r, s_ring, c).transpose(0, 1).contiguous())  # [R (group's ring index), ...]
        y = recv.permute(1, 2, 0, 3)  # [B, S_ring, R, c]
    else:
        y = y.reshape(b, s_ring, 1, c)
    s_local = s_ring // u
    if u > 1:
        recv = ulysses.exchange(y.reshape(b, u, s_local, r, c).transpose(0, 1).contiguous())  # [U (group's index), ...]
        y = recv.permute(1, 2, 3, 0, 4)  # [B, S_local, R, U, c]
    return y.reshape(b, s_local, r * u, c)


class _ToChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ring, ulysses, layout):
        ctx.args = (ring, ulysses, layout)
        return _to_channels(x, ring, ulysses, layout)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _to_sequence(grad, *ctx.args), None, None, None


class _ToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, ring, ulysses, layout):
        ctx.args = (ring, ulysses, layout)
        return _to_sequence(y, *ctx.args)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _to_channels(grad, *ctx.args), None, None, None


def sequence_to_channels(x: torch.Tensor, ring: AllToAllComm, ulysses: AllToAllComm, layout: Layout
                         ) -> torch.Tensor:
    """Sequence shards [B, S_local, P, c] of P channel groups -> the whole sequence [B, S, c] of this rank's group
    (SP rank g gets group g), in natural order. Differentiable; collective over the ring and Ulysses groups."""
    if x.dim() != 4 or x.shape[2] != ring.world * ulysses.world:
        raise ValueError(f"sequence_to_channels takes [B, S_local, P={ring.world * ulysses.world}, c], got "
                         f"{tuple(x.shape)}")
    return _ToChannels.apply(x, ring, ulysses, layout)


def channels_to_sequence(y: torch.Tensor, ring: AllToAllComm, ulysses: AllToAllComm, layout: Layout
                         ) -> torch.Tensor:
    """The way back: [B, S, c] of this rank's group -> [B, S_local, P, c], every group of this rank's tokens."""
    return _ToSequence.apply(y, ring, ulysses, layout)


def per_document(fn: Callable[..., torch.Tensor], tensors: tuple[torch.Tensor, ...], spans: list[Spans] | None
                 ) -> torch.Tensor:
    """`fn` over each document of `tensors` ([B, S, ...] each, in natural order) on its own, so that no state or
    convolution window crosses a boundary; the results ([B', S', ...]) joined back into [B, S, ...]. Rows with the
    same boundaries run together; `spans` None runs `fn` once on the whole batch."""
    if spans is None or all(row == [(0, tensors[0].shape[1])] for row in spans):
        return fn(*tensors)
    if all(row == spans[0] for row in spans):
        return torch.cat([fn(*(t[:, a:b] for t in tensors)) for a, b in spans[0]], dim=1)
    rows = [torch.cat([fn(*(t[i:i + 1, a:b] for t in tensors)) for a, b in row], dim=1)
            for i, row in enumerate(spans)]
    return torch.cat(rows, dim=0)


class _AllReduceSum(torch.autograd.Function):
    """SUM over a group; every rank's output depends on every rank's input alike, so the gradient is the same SUM."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The SUM of `t` over `group`, differentiable (a new tensor)."""
    return _AllReduceSum.apply(t, group)
