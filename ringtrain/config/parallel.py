"""The `parallel:` section: how the world splits into data- and sequence-parallel ranks, and its pure-number rules.

Layout and kernel names are checked against the runtime's registries by `ringtrain.validate` (this package imports
nothing of the runtime)."""

from __future__ import annotations

from dataclasses import dataclass

from ringtrain.errors import ConfigError


@dataclass
class ParallelConfig:
    """How the world is split: data parallel x sequence parallel."""

    sp_size: int = 1
    """Sequence-parallel degree P: how many ranks share (and shard) one sequence."""
    ulysses_size: int = 1
    """Ulysses degree U (divides sp_size): consecutive ranks that exchange heads by all-to-all, so attention sees the
    whole ring shard for H/U heads; K/V rotate around a ring of sp_size / U ranks. 1: the pure ring. 0: auto, the
    cheapest exact plan for the model's heads, train.seq_len and the devices by the cost model (ringtrain.ring.cost;
    with parallel.layout=auto it picks the layout too), said once in the log."""
    dp_size: int = 0
    """Data-parallel degree; 0 means world_size // sp_size."""
    layout: str = "auto"
    """How a sequence is split over the ring: 'zigzag' (balances one causal sequence), 'contiguous', 'balanced'
    (per batch, balances the causal work of packed documents without padding; zigzag without documents), or 'auto':
    balanced when data.document_mask is on, else zigzag (the log says which)."""
    timeout_s: float = 600.0
    """Collective timeout in seconds: a dead or stuck rank makes the others fail after this long."""
    attention_kernel: str = "auto"
    """Local attention kernel: auto (cuDNN, then FlashAttention-2, on CUDA; the CPU flash op on CPU), cuda_cudnn,
    cuda_flash, cuda_efficient, flash_attn, cpu_flash or reference (exact, slow: tests)."""
    tile_tokens: int = 0
    """Plan granularity under document masks and windows: blocks nobody sees are skipped in tiles of at least this
    many tokens (at most 16 per chunk); 0 = 256. Smaller skips more and makes more kernel calls."""

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.sp_size < 1:
            problems.append(("sp_size", f"sp_size={self.sp_size} must be >= 1"))
        if self.ulysses_size < 0:
            problems.append(("ulysses_size", f"ulysses_size={self.ulysses_size} must be >= 1 (1 = the pure ring), "
                                             "or 0 for auto"))
        elif self.ulysses_size and self.sp_size >= 1 and self.sp_size % self.ulysses_size:
            choices = [u for u in range(1, self.sp_size + 1) if self.sp_size % u == 0]
            problems.append(("ulysses_size", f"ulysses_size={self.ulysses_size} does not divide parallel.sp_size="
                                             f"{self.sp_size}: choose ulysses_size among "
                                             f"{', '.join(map(str, choices))}"))
        if self.dp_size < 0:
            problems.append(("dp_size", f"dp_size={self.dp_size} must be >= 1, or 0 for world_size // sp_size"))
        if self.timeout_s <= 0:
            problems.append(("timeout_s", f"timeout_s={self.timeout_s} must be > 0 seconds"))
        if self.tile_tokens < 0:
            problems.append(("tile_tokens", f"tile_tokens={self.tile_tokens} must be >= 1, or 0 for 256"))
        return problems


def resolve_parallel_sizes(parallel: ParallelConfig, world_size: int) -> tuple[int, int]:
    """(dp, sp) for `world_size`, or a ConfigError naming the key, the value and the fix."""
    sp = parallel.sp_size
    if sp < 1 or world_size % sp:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        more = f", or start {sp} x N processes (torchrun --nproc_per_node)" if sp > world_size else ""
        raise ConfigError([
            f"parallel.sp_size={sp} does not divide world size {world_size}: "
            f"choose sp_size among {', '.join(map(str, divisors))}{more}"
        ])
    if parallel.ulysses_size < 1:
        raise ConfigError([f"parallel.ulysses_size={parallel.ulysses_size} is not resolved: 0 (auto) is chosen by "
                           "ringtrain.validate.load_validated_config; pass a config loaded by it, or a size >= 1"])
    if sp % parallel.ulysses_size:
        raise ConfigError([f"parallel.ulysses_size={parallel.ulysses_size} does not divide parallel.sp_size={sp}"])
    dp = parallel.dp_size or world_size // sp
    if dp * sp != world_size:
        raise ConfigError([
            f"parallel.dp_size={parallel.dp_size} x parallel.sp_size={sp} = {dp * sp} "
            f"!= world size {world_size}: set dp_size={world_size // sp} or dp_size=0 (auto)"
        ])
    return dp, sp


def resolve_layout(parallel: ParallelConfig, document_mask: bool) -> str:
    """parallel.layout with 'auto' resolved: balanced when attention is masked per document (packed documents are
    where zigzag leaves stragglers), zigzag otherwise. The one place this choice is made; `ParallelDims` logs it."""
    if parallel.layout != "auto":
        return parallel.layout
    return "balanced" if document_mask else "zigzag"
