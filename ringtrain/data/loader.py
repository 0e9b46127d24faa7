"""Deterministic, resumable batches of packed sequences for one data-parallel rank.

The order of epoch e is a permutation drawn from (seed, e) alone, so every rank computes the same one without
communicating. Each step consumes one global batch of `batch_size * dp_size` consecutive entries of it; DP
rank r takes the r-th slice of `batch_size`. SP ranks pass the same dp_rank and so get the same sequences.
Because slices are consecutive, DP=2 x batch B sees the same sequences per step as DP=1 x batch 2B, and a
resumed run may change dp_size as long as the global batch stays the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ringtrain.data.packing import PackedDataset
from ringtrain.errors import ConfigError
from ringtrain.log import get_logger

logger = get_logger(__name__)


class PackedDataLoader:
    """An endless iterator of batches (dicts of [batch_size, seq_len] tensors) crossing epochs in order.

    An epoch has `steps_per_epoch = len(dataset) // (batch_size * dp_size)` steps; the sequences left over
    (fewer than one global batch) are skipped for that epoch only, so that all DP ranks stay in step; with
    shuffling they differ from epoch to epoch.
    """

    def __init__(
        self, dataset: PackedDataset, batch_size: int, *, dp_rank: int = 0, dp_size: int = 1,
        seed: int = 0, shuffle: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.dataset = dataset
        self.batch_size = batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0  # sequences of this epoch's order already consumed by all DP ranks together
        self._order_cache: tuple[int, np.ndarray] | None = None
        self.last_global_indices = np.zeros(0, dtype=np.int64)
        if self.steps_per_epoch == 0:
            raise ConfigError([
                f"the dataset packs into {len(dataset)} sequences of {dataset.seq_len} tokens, fewer than one "
                f"global batch (batch_size={batch_size} x dp_size={dp_size}): add data (data.num_samples for "
                "passkey), or lower the batch size or seq_len"
            ])

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.dp_size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.global_batch

    def order(self, epoch: int) -> np.ndarray:
        """The sequence order of `epoch`: a permutation seeded by (seed, epoch), or 0..N-1 without shuffle."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            n = len(self.dataset)
            perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order_cache = (epoch, perm)
        return self._order_cache[1]

    def __iter__(self) -> PackedDataLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index + self.global_batch > self.steps_per_epoch * self.global_batch:
            self.epoch += 1
            self.index = 0
            logger.info("data epoch %d begins", self.epoch)
        start = self.index + self.dp_rank * self.batch_size
        indices = self.order(self.epoch)[start: start + self.batch_size]
        # The sequences of every DP rank in this step: what each source contributed can be counted without talking.
        self.last_global_indices = self.order(self.epoch)[self.index: self.index + self.global_batch]
        self.index += self.global_batch
        return self.dataset.batch(indices)

    def last_source_tokens(self) -> dict[str, int]:
        """Each source's tokens in the last step's global batch (every DP rank's sequences); {} without a mixture."""
        return self.dataset.source_tokens(self.last_global_indices)

    def state_dict(self) -> dict[str, Any]:
        """The exact position, identical on every rank: the next batch is the one after these."""
        return {
            "epoch": self.epoch, "index": self.index, "seed": self.seed, "shuffle": self.shuffle,
            "num_sequences": len(self.dataset), "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; refuses a dataset or seed that would make the position mean other sequences."""
        if state.get("streaming"):
            raise ValueError("the checkpoint's data position is a stream's (data.streaming=true): resume with the "
                             "data.streaming it was written with")
        problems = []
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle), ("num_sequences", len(self.dataset))):
            if state[key] != mine:
                problems.append(f"{key}={state[key]!r} in the checkpoint but {mine!r} now")
        index = int(state["index"])
        if index % self.global_batch:
            problems.append(
                f"position index={index} is not a multiple of the global batch {self.global_batch} "
                f"(batch_size x dp_size; the checkpoint used {state['global_batch']}): keep the global batch"
            )
        if problems:
            raise ValueError("cannot resume the data position: " + "; ".join(problems) +
                             " (resume with the data config the checkpoint was written with)")
        self.epoch = int(state["epoch"])
        self.index = index
