# One object for sequence parallelism (issue 13): the ring and Ulysses groups and the layout, passed explicitly to
# the HF binding, `shard_batch`, the trainer and evaluation instead of loose (group, layout string) pairs.

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist

from ringtrain.ring.attention import RingDocuments, check_document_ids, gather_documents
from ringtrain.ring.kernels import LocalKernel
from ringtrain.ring.layout import (
    Layout,
    get_layout,
    group_world_rank,
    rank_positions,
    seq_len_problem,
    shard_sequence,
    unshard_sequence,
)
from ringtrain.ring.ulysses import sequence_parallel_attention


@dataclass(frozen=True, eq=False)
class SequenceParallel:
    """The sequence-parallel setup of one model: P = R x U ranks share every sequence.

    `ring_group`: the R ranks K/V rotate around (None: the default group, or a world of one without
    torch.distributed). `ulysses_group`: the U consecutive ranks of an all-to-all over heads (None: U = 1, the pure
    ring). `layout`: how the sequence is split over the ring (a name or a Layout object). SP rank
    r = ring_rank x U + ulysses_rank holds part ulysses_rank of ring shard ring_rank (USP's layout).
    """

    ring_group: dist.ProcessGroup | None = None
    ulysses_group: dist.ProcessGroup | None = None
    layout: Layout = field(default="zigzag")  # type: ignore[assignment]  # a name is resolved to its object
    kernel: str | LocalKernel = "auto"
    """The local attention kernel (`ring.kernels.select_kernel`), unless a call names another."""
    tile_tokens: int | None = None
    """Plan granularity under masks (None: ring.attention.DEFAULT_TILE_TOKENS), unless a call names another."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", get_layout(self.layout))
        ring_world, ring_rank = group_world_rank(self.ring_group)
        u_world, u_rank = (1, 0) if self.ulysses_group is None else group_world_rank(self.ulysses_group)
        object.__setattr__(self, "_sizes", (ring_world, ring_rank, u_world, u_rank))

    @classmethod
    def of(cls, sp: SequenceParallel | dist.ProcessGroup | None = None,
           layout: str | Layout | None = None) -> SequenceParallel:
        """`sp` itself, or a pure ring over the process group `sp` (None: the default group) with `layout`."""
        if isinstance(sp, SequenceParallel):
            if layout is not None and get_layout(layout) != sp.layout:
                raise ValueError(f"layout={get_layout(layout).name!r} conflicts with the SequenceParallel's layout "
                                 f"{sp.layout.name!r}: pass one of them")
            return sp
        return cls(ring_group=sp, layout=layout or "zigzag")

    # --- sizes -------------------------------------------------------------------------------------------------
    @property
    def ring_world(self) -> int:
        return self._sizes[0]

    @property
    def ring_rank(self) -> int:
        return self._sizes[1]

    @property
    def ulysses_world(self) -> int:
        return self._sizes[2]

    @property
    def ulysses_rank(self) -> int:
        return self._sizes[3]

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
        """The same groups with another layout (a data-dependent layout is chosen per batch)."""
        return replace(self, layout=layout)

    # --- sharding ----------------------------------------------------------------------------------------------
    def check_seq_len(self, seq_len: int, what: str = "sequence length") -> None:
        problem = seq_len_problem(seq_len, self.ring_world, self.layout, self.ulysses_world)
        if problem is not None:
            raise ValueError(f"{what} {seq_len} {problem}")

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

    # --- attention ---------------------------------------------------------------------------------------------
    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True, scale: float | None = None,
        kernel: str | LocalKernel | None = None, document_ids: torch.Tensor | RingDocuments | None = None,
        window: int | None = None, tile_tokens: int | None = None,
    ) -> torch.Tensor:
        """`sequence_parallel_attention` over this object's groups and layout (or the batch's documents' layout),
        with this object's kernel and tile size unless given."""
        layout = document_ids.layout if isinstance(document_ids, RingDocuments) else self.layout
        return sequence_parallel_attention(
            q, k, v, ring_group=self.ring_group, ulysses_group=self.ulysses_group, causal=causal, layout=layout,
            scale=scale, kernel=self.kernel if kernel is None else kernel, document_ids=document_ids, window=window,
            tile_tokens=self.tile_tokens if tile_tokens is None else tile_tokens,
        )
