"""Weighted mixtures: how many documents each source gives, in which seeded order, and length-aware upsampling.

Pure functions of the weights, the source sizes and the seed, shared by the cached mixture (`data/pipeline.py`) and
the streamed one (`data/streaming.py`).
"""

from __future__ import annotations

import numpy as np

from ringtrain.config.data import DataConfig

__all__ = ["long_repeats", "mixture_counts", "mixture_draws"]


def mixture_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """Documents per source out of `total`, proportional to `weights` (largest remainders: the counts sum to
    `total` and each is within one of its exact share)."""
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def long_repeats(lengths: np.ndarray, cfg: DataConfig, key: list[int]) -> np.ndarray:
    """How many times each document enters one pass over its source: data.long_upsample for documents of at least
    data.long_tokens tokens (a fraction is a seeded coin per document and pass), 1 for the others."""
    repeats = np.ones(len(lengths), dtype=np.int64)
    if cfg.long_tokens <= 0 or cfg.long_upsample == 1.0:
        return repeats
    long = lengths >= cfg.long_tokens
    whole, frac = int(cfg.long_upsample), cfg.long_upsample - int(cfg.long_upsample)
    coins = np.random.default_rng([*key, 7]).random(len(lengths)) < frac
    repeats[long] = whole + coins[long]
    return repeats


def mixture_draws(counts: np.ndarray, sizes: np.ndarray, seed: int,
                  lengths: list[np.ndarray] | None = None, cfgs: list[DataConfig] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(source, document index) of each drawn document, in a seeded order that depends only on (seed, counts,
    sizes): the sources interleaved by a permutation, each source's documents taken in passes over seeded
    permutations of it (a small source with a large weight repeats its documents, each once per pass; with
    `lengths` and `cfgs`, long documents enter a pass `long_repeats` times)."""
    rng = np.random.default_rng([seed, 26])
    source = rng.permutation(np.repeat(np.arange(len(counts)), counts))
    index = np.empty(len(source), dtype=np.int64)
    for s, (n, size) in enumerate(zip(counts.tolist(), sizes.tolist(), strict=True)):
        if n == 0:
            continue
        order, p = [], 0
        while sum(len(o) for o in order) < n:
            pass_ = np.arange(size)
            if lengths is not None and cfgs is not None:
                pass_ = np.repeat(pass_, long_repeats(lengths[s], cfgs[s], [seed, 26, s, p]))
            order.append(np.random.default_rng([seed, 26, s, p]).permutation(pass_))
            p += 1
        index[source == s] = np.concatenate(order)[:n]
    return source, index
