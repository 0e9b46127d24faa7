"""The router's load-balancing loss of a mixture-of-experts model, exact under sequence and data parallelism.

transformers' MoE causal LMs (Mixtral, Qwen3-MoE, gpt-oss, ...) share one formula (Switch Transformer, eqs. 4-6, their
`load_balancing_loss_func`): over every layer's router logits of the batch's tokens,
`aux = E * sum_e f_e * P_e`, f_e = top-k assignments to expert e / rows, P_e = summed softmax probability of e / rows,
added to the loss as `router_aux_loss_coef * aux`. Both f and P are means over the whole batch, so under SP (and DP)
a mean of per-shard losses is not the loss. Here each rank computes its tokens' counts and probability sums; the
counts and rows (no gradient) are summed over the group, and each rank's part `E * sum_e f_e * (P_e sum of its rows) /
rows` is linear in its own probabilities: the parts add up to the batch's loss exactly, and so do their gradients
(the trainer sums gradients over the mesh, as for the token loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class BalancingLoss:
    """A model's balancing-loss settings, read from its transformers config."""

    coef: float
    """router_aux_loss_coef: the loss's weight in the objective."""
    experts: int
    top_k: int

    def stats(self, router_logits: tuple[torch.Tensor, ...]) -> RouterStats:
        """This rank's counts and probability sums from each MoE layer's router logits [tokens, E]."""
        counts = probs = None
        rows = 0
        for logits in router_logits:
            p = torch.softmax(logits.float(), dim=-1)  # [T, E]
            chosen = torch.topk(p, self.top_k, dim=-1).indices  # [T, k]
            c = torch.zeros(self.experts, device=p.device).index_add_(
                0, chosen.reshape(-1), torch.ones(chosen.numel(), device=p.device))
            counts = c if counts is None else counts + c
            probs = p.sum(0) if probs is None else probs + p.sum(0)
            rows += p.shape[0]
        if counts is None:
            raise ValueError("the model returned no router logits: it has no MoE layer to balance")
        return RouterStats(counts, probs, float(rows))

    def local_part(self, stats: RouterStats, group: dist.ProcessGroup | None = None) -> torch.Tensor:
        """This rank's additive part of the loss over every rank of `group` (None: the default group; collective:
        one all_reduce of E + 1 numbers). Summed over the group it is `aux`; so is its gradient."""
        totals = torch.cat([stats.counts, stats.probs.new_tensor([stats.rows])]).detach()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals, group=group)
        counts, rows = totals[:-1], totals[-1]
        return self.experts * ((counts / rows) * (stats.probs / rows)).sum()


@dataclass
class RouterStats:
    """One forward's router statistics on this rank."""

    counts: torch.Tensor
    """[E] top-k assignments per expert (no gradient)."""
    probs: torch.Tensor
    """[E] summed router probabilities (with their gradient)."""
    rows: float
    """Router rows (tokens x MoE layers)."""


def balancing_loss(model_config: Any) -> BalancingLoss | None:
    """The model's balancing loss, or None when it has none (no `router_aux_loss_coef`, or 0: e.g. DeepSeek V3's
    bias-based balancing; set model.config.router_aux_loss_coef=0.0 to train without it)."""
    coef = getattr(model_config, "router_aux_loss_coef", None)
    experts = getattr(model_config, "num_local_experts", None) or getattr(model_config, "num_experts", None)
    top_k = getattr(model_config, "num_experts_per_tok", None)
    if not coef or not experts or not top_k:
        return None
    return BalancingLoss(float(coef), int(experts), int(top_k))
