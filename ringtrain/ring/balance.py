# A document-aware layout that balances causal work without padding: `balanced_runs`.
#
# With packed documents a step takes as long as its busiest rank, and zigzag balances one causal sequence, not a
# pack. Here each batch gets its own permutation, computed from the document ids identically on every rank:
#   - a token's work is the number of keys it sees: its position in its document + 1, summed over batch rows;
#   - long documents are split per document in zigzag fashion over all ranks (chunks c and 2P-1-c on rank c), which
#     gives every rank the same tokens and the same work of that document;
#   - short documents stay whole on one rank (no ring traffic for them), placed largest work first on the rank
#     furthest below its share (LPT scheduling); a document that fits no rank's remaining tokens is cut, in
#     position order, over the ranks with room: every rank ends with exactly S/P tokens, with no padding and no
#     divisibility requirement on document lengths (the zigzag remainders join the short ones).
# Peers pad every document to a multiple of 2P instead (TransformerEngine THD, PyTorch's per-document head-tail
# balancer); WLB-LLM measured 1.44x stragglers without balancing (../shared/FIELD_NOTES.md).

from __future__ import annotations

import math

import torch


def _segments(document_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, stop) runs with no document boundary in any batch row: the units a layout may keep together."""
    b, s = document_ids.shape
    cut = torch.zeros(s, dtype=torch.bool)
    cut[0] = True
    cut[1:] = (document_ids[:, 1:] != document_ids[:, :-1]).any(0)
    starts = cut.nonzero().flatten().tolist()
    return list(zip(starts, [*starts[1:], s], strict=True))


def document_position_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Each token's position within its document: [..., S] document ids -> [..., S] int64, 0 at a document's first
    token. A document is a run of equal ids; a row's first token starts one.

    The one definition of the rule: the work a token costs (`token_work`), the plan's visible work and the positions
    that restart per document (the data pipeline, the HF adapter) all build on it.
    """
    s = document_ids.shape[-1]
    pos = torch.arange(s, device=document_ids.device).expand_as(document_ids)
    new_doc = torch.ones_like(document_ids, dtype=torch.bool)
    new_doc[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    # Position of the most recent document start at or before each token, by a running max.
    start = torch.where(new_doc, pos, torch.zeros_like(pos)).cummax(dim=-1).values
    return pos - start


Spans = list[tuple[int, int]]


def document_spans(document_ids: torch.Tensor) -> list[Spans]:
    """Per batch row of ids [B, S], the (start, stop) of each document (where `document_position_ids` restarts)."""
    starts = document_position_ids(document_ids) == 0
    s = document_ids.shape[-1]
    spans = []
    for row in starts:
        first = row.nonzero().flatten().tolist()
        spans.append(list(zip(first, [*first[1:], s], strict=True)))
    return spans


def token_work(document_ids: torch.Tensor) -> torch.Tensor:
    """Causal keys each position sees, summed over batch rows: [S] int64 (its position in its document + 1)."""
    return (document_position_ids(document_ids) + 1).sum(0)


def _merge(runs: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Sorted, adjacent runs joined."""
    out: list[list[int]] = []
    for a, b in sorted(runs):
        if out and out[-1][1] == a:
            out[-1][1] = b
        else:
            out.append([a, b])
    return tuple((a, b) for a, b in out)


def _assign(segments: list[tuple[int, int]], prefix: list[int], world: int, per_rank: int, long_work: float,
            bundle_work: float) -> tuple[list[list[tuple[int, int]]], list[int]]:
    """(runs per rank, work per rank) with documents of more than `long_work` split over all ranks."""

    def seg_work(a: int, b: int) -> int:
        return prefix[b] - prefix[a]

    runs: list[list[tuple[int, int]]] = [[] for _ in range(world)]
    tokens = [0] * world
    load = [0] * world
    short: list[tuple[int, int]] = []
    for a, b in segments:
        n = b - a
        if n >= 2 * world and (seg_work(a, b) > long_work or n > per_rank):
            chunk = n // (2 * world)
            for c in range(2 * world):  # per-document zigzag: rank r takes chunks r and 2P-1-r
                r = c if c < world else 2 * world - 1 - c
                lo, hi = a + c * chunk, a + (c + 1) * chunk
                runs[r].append((lo, hi))
                tokens[r] += chunk
                load[r] += seg_work(lo, hi)
            if n % (2 * world):
                short.append((a + 2 * world * chunk, b))  # the remainder: placed like a short document
        elif short and short[-1][1] == a and seg_work(short[-1][0], b) <= bundle_work:
            short[-1] = (short[-1][0], b)  # neighbours travel together: fewer runs, fewer kernel calls
        else:
            short.append((a, b))
    # Largest work first onto the rank furthest below its share that has room; cut what fits nowhere whole.
    pending = sorted(short, key=lambda run: (-seg_work(*run), run[0]))
    while pending:
        a, b = pending.pop(0)
        fits = [r for r in range(world) if per_rank - tokens[r] >= b - a]
        if fits:
            r = min(fits, key=lambda r: (load[r], r))
            take = b - a
        else:  # no rank holds it whole: the rank with the most room takes what it can, in position order
            r = max(range(world), key=lambda r: (per_rank - tokens[r], -load[r], -r))
            take = per_rank - tokens[r]
            pending.insert(0, (a + take, b))
        runs[r].append((a, a + take))
        tokens[r] += take
        load[r] += seg_work(a, a + take)
    return runs, load


def balanced_runs(document_ids: torch.Tensor, world: int, tolerance: float = 1.02
                  ) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Every rank's runs of positions (increasing, exactly S/P tokens each) for the documents [B, S] of one batch.

    Documents whose work exceeds a fraction of a rank's share are split over all ranks; the fraction starts at
    infinity (every document that fits a rank whole: least ring traffic), then one half, and halves until the
    ranks' work is within `tolerance` (max/min), down to splitting every document of at least 2P tokens. A single
    document is the zigzag layout.
    """
    ids = document_ids.cpu()
    s = ids.shape[1]
    if s % world:
        raise ValueError(f"sequence length {s} is not a multiple of world size {world}: the balanced layout gives "
                         f"every rank S/P tokens; pad the sequence to {-(-s // world) * world} tokens")
    per_rank = s // world
    prefix = torch.cat([torch.zeros(1, dtype=torch.int64), token_work(ids).cumsum(0)]).tolist()
    share = prefix[-1] / world
    segments = _segments(ids)
    best = None
    for fraction in (math.inf, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0):
        runs, load = _assign(segments, prefix, world, per_rank, fraction * share, share / 16)
        imbalance = max(load) / max(min(load), 1)
        if best is None or imbalance < best[0]:
            best = (imbalance, runs)
        if imbalance <= tolerance:
            break
    return tuple(_merge(r) for r in best[1])
