# One object for sequence parallelism: the ring and Ulysses groups, their communicators (built once) and the layout,
# passed explicitly to the HF binding, `shard_batch`, the trainer, evaluation and the benchmarks.

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from ringtrain.ring.attention import RingDocuments, batch_layout, check_document_ids, gather_documents
from ringtrain.ring.channels import all_reduce_sum, channels_to_sequence, sequence_to_channels
from ringtrain.ring.comm import AllToAllComm, RingComm
from ringtrain.ring.kernels import LocalKernel
from ringtrain.ring.layout import (
    Layout,
    get_layout,
    padded_length,
    rank_positions,
    seq_len_problem,
    shard_sequence,
    unshard_sequence,
)
from ringtrain.ring.ulysses import hybrid_attention


def _distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@dataclass(frozen=True, eq=False)
class SequenceParallel:
    """The sequence-parallel setup of one model: P = R x U ranks share every sequence.

    `ring_group`: the R ranks K/V rotate around; None only for a ring of one rank (a single process, or
    torch.distributed with one rank), never "the default group": with several ranks pass the group
    (`ParallelDims` builds it; `SequenceParallel.over(group)` takes the default group explicitly).
    `ulysses_group`: the U consecutive ranks of an all-to-all over heads; None for U = 1 (the pure ring).
    `layout`: how the sequence is split over the ring (a name or a Layout object). SP rank
    r = ring_rank x U + ulysses_rank holds part ulysses_rank of ring shard ring_rank (USP's layout).
    The communicators are built here, once, and shared by every layer and every per-batch layout (`for_documents`).
    """

    ring_group: dist.ProcessGroup | None = None
    ulysses_group: dist.ProcessGroup | None = None
    layout: Layout = field(default="zigzag")  # type: ignore[assignment]  # a name is resolved to its object
    kernel: str | LocalKernel = "auto"
    """The local attention kernel (`ring.kernels.select_kernel`), unless a call names another."""
    tile_tokens: int | None = None
    """Plan granularity under masks (None: ring.attention.DEFAULT_TILE_TOKENS), unless a call names another."""
    _comms: tuple[RingComm, AllToAllComm, AllToAllComm] | None = field(default=None, repr=False)
    """The ring's send/recv, the Ulysses all-to-all, and an all-to-all over the ring group (head-parallel mixers)."""
    ring_world: int = field(init=False)
    ring_rank: int = field(init=False)
    ulysses_world: int = field(init=False)
    ulysses_rank: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", get_layout(self.layout))
        if self.ring_group is None and _distributed_world() > 1:
            raise ValueError(
                f"ring_group=None is a ring of one rank, but torch.distributed runs {_distributed_world()} ranks: "
                "pass the ring's process group (ParallelDims.sp has it; SequenceParallel.over(dist.group.WORLD) "
                "rings over every rank)"
            )
        if self._comms is None:
            object.__setattr__(self, "_comms", (RingComm(self.ring_group), AllToAllComm(self.ulysses_group),
                                                AllToAllComm(self.ring_group)))
        ring, a2a, _ = self._comms
        for name, value in (("ring_world", ring.world), ("ring_rank", ring.rank), ("ulysses_world", a2a.world),
                            ("ulysses_rank", a2a.rank)):
            object.__setattr__(self, name, value)

    @classmethod
    def over(cls, group: dist.ProcessGroup | None = None, layout: str | Layout = "zigzag", **kwargs
             ) -> SequenceParallel:
        """A pure ring over `group`; None takes the default group when torch.distributed runs (or a world of one).
        The thin constructor of the functional API (`ring_attention(group=...)`, `shard_batch(group=...)`)."""
        if group is None and _distributed_world() > 1:
            group = dist.group.WORLD
        return cls(ring_group=group, layout=layout, **kwargs)

    @classmethod
    def of(cls, sp: SequenceParallel | None = None, layout: str | Layout | None = None, *,
           group: dist.ProcessGroup | None = None) -> SequenceParallel:
        """The SequenceParallel of a public call that takes `sp` or the loose `group=` / `layout=` forms: `sp`
        itself (refusing a conflicting `group` or `layout`), or a pure ring over `group` (see `over`)."""
        if sp is None:
            return cls.over(group, layout or "zigzag")
        if not isinstance(sp, SequenceParallel):
            raise TypeError(f"sp must be a SequenceParallel, got {type(sp).__name__}: pass a process group as "
                            "group=... instead")
        if group is not None and group is not sp.ring_group:
            raise ValueError("group= conflicts with the SequenceParallel passed beside it: pass one of them")
        if layout is not None and get_layout(layout) != sp.layout:
            raise ValueError(f"layout={get_layout(layout).name!r} conflicts with the SequenceParallel's layout "
                             f"{sp.layout.name!r}: pass one of them")
        return sp

    # --- sizes -------------------------------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return self.ring_world * self.ulysses_world

    @property
    def rank(self) -> int:
        return self.ring_rank * self.ulysses_world + self.ulysses_rank

    @property
    def multiple(self) -> int:
        """What a sequence length must be a multiple of."""
        return self.layout.multiple(self.ring_world) * self.ulysses_world

    def describe(self) -> str:
        if self.ulysses_world == 1:
            return f"{self.layout.name} ring over {self.ring_world} ranks"
        return (f"ulysses {self.ulysses_world} x {self.layout.name} ring {self.ring_world} "
                f"({self.world} ranks)")

    def with_layout(self, layout: str | Layout) -> SequenceParallel:
        """The same groups and communicators with another layout."""
        return replace(self, layout=layout)

    def for_documents(self, documents: RingDocuments | None) -> SequenceParallel:
        """The setup of one batch: a data-dependent layout is the permutation chosen from its documents
        (`ring.attention.batch_layout`); otherwise this setup itself."""
        layout = batch_layout(self.layout, documents)
        return self if layout is self.layout else self.with_layout(layout)

    # --- agreement ---------------------------------------------------------------------------------------------
    def all_reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        """MAX of `t` over every rank of the SP group, in place (ring and Ulysses groups in turn: their product is
        the SP group). Used for checks that every rank must pass or fail together."""
        return self.all_reduce(t, dist.ReduceOp.MAX)

    def all_reduce(self, t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
        """`op` (default SUM) of `t` over every rank of the SP group, in place: per-sequence quantities whose tokens
        the SP ranks hold in parts (a preference pair's log-probabilities)."""
        for group, size in ((self.ring_group, self.ring_world), (self.ulysses_group, self.ulysses_world)):
            if size > 1:
                dist.all_reduce(t, op=op, group=group)
        return t

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """SUM of `t` over every rank of the SP group, as a new tensor, differentiable (the gradient is the same sum
        of the gradients): for statistics that span ranks, such as a norm over channels split between them."""
        for group, size in ((self.ring_group, self.ring_world), (self.ulysses_group, self.ulysses_world)):
            if size > 1:
                t = all_reduce_sum(t, group)
        return t

    # --- sharding ----------------------------------------------------------------------------------------------
    def check_seq_len(self, seq_len: int, what: str = "sequence length") -> None:
        problem = seq_len_problem(seq_len, self.ring_world, self.layout, self.ulysses_world)
        if problem is not None:
            raise ValueError(f"{what} {seq_len} {problem}")

    def padded_length(self, seq_len: int) -> int:
        """`seq_len` rounded up to a length this setup can shard (the rest is right padding)."""
        return padded_length(seq_len, self.ring_world, self.layout, self.ulysses_world)

    def positions(self, seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Global positions (LongTensor [seq_len // world]) of this rank's tokens, e.g. for RoPE position_ids."""
        return rank_positions(seq_len, self.layout, self.ring_world, self.ring_rank, self.ulysses_world,
                              self.ulysses_rank, device=device)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of the full sequence `x` (split along `dim`), as a new contiguous tensor."""
        return shard_sequence(x, group=self.ring_group, dim=dim, layout=self.layout,
                              ulysses_group=self.ulysses_group)

    def unshard(self, x_local: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The full sequence on every rank from each rank's part (collective)."""
        return unshard_sequence(x_local, group=self.ring_group, dim=dim, layout=self.layout,
                                ulysses_group=self.ulysses_group)

    # --- documents ---------------------------------------------------------------------------------------------
    def documents(self, global_ids: torch.Tensor) -> RingDocuments:
        """`RingDocuments` from the full-sequence ids [B, S] that every rank holds (no communication)."""
        check_document_ids(global_ids)
        return RingDocuments(global_ids, self.ring_world, self.layout.for_documents(global_ids, self.ring_world))

    def gather_documents(self, local_ids: torch.Tensor) -> RingDocuments:
        """`RingDocuments` from this rank's ids [B, S_local] (one all_gather)."""
        return gather_documents(local_ids, group=self.ring_group, layout=self.layout,
                                ulysses_group=self.ulysses_group)

    # --- head-parallel token mixers (ring/channels.py) --------------------------------------------------------------
    def to_channels(self, x: torch.Tensor) -> torch.Tensor:
        """Sequence shards [B, S_local, P, c] of P channel groups -> the whole sequence [B, S, c] of this rank's group
        (SP rank g gets group g), in natural order; differentiable (its backward is `to_sequence`). The layout is
        this object's: call it on `for_documents(...)` of the batch."""
        _, ulysses, ring = self._comms
        return sequence_to_channels(x, ring, ulysses, self.layout)

    def to_sequence(self, y: torch.Tensor) -> torch.Tensor:
        """The way back from `to_channels`: [B, S, c] of this rank's group -> [B, S_local, P, c]."""
        _, ulysses, ring = self._comms
        return channels_to_sequence(y, ring, ulysses, self.layout)

    # --- attention ---------------------------------------------------------------------------------------------
    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options: Any) -> torch.Tensor:
        """Sequence-parallel attention over this object's communicators, in the batch's layout (`for_documents`).
        `options`: the keywords of `AttentionOptions`; kernel and tile_tokens default to this object's. Shapes as
        in `ring_attention`."""
        docs = options.get("document_ids")
        if options.get("kernel") is None:
            options["kernel"] = self.kernel
        if options.get("tile_tokens") is None:
            options["tile_tokens"] = self.tile_tokens
        ring, a2a, _ = self._comms
        layout = self.for_documents(docs if isinstance(docs, RingDocuments) else None).layout
        return hybrid_attention(ring, a2a, q, k, v, layout=layout, **options)


def sequence_parallel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, ring_group: dist.ProcessGroup | None = None,
    ulysses_group: dist.ProcessGroup | None = None, layout: str | Layout = "zigzag", **options: Any,
) -> torch.Tensor:
    """The functional form of `SequenceParallel.attention` (it builds the communicators on each call; models use the
    object). `ring_group=None` is the default group (or a world of one); `ulysses_group=None` is no Ulysses.
    `options`: the keywords of `ring_attention` (`AttentionOptions`)."""
    kernel = options.pop("kernel", "auto")
    if ulysses_group is None:
        sp = SequenceParallel.over(ring_group, layout, kernel=kernel)
    else:
        sp = SequenceParallel(ring_group=ring_group, ulysses_group=ulysses_group, layout=layout, kernel=kernel)
    return sp.attention(q, k, v, **options)
