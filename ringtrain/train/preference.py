"""Preference objectives (DPO, SimPO, ORPO) on packed pairs under sequence parallelism.

A pair's two documents (prompt + chosen, prompt + rejected) share one packed sequence, so a pair costs one sharded
sequence, and the document masks keep the two apart exactly. Each SP rank holds a shard of the tokens: the model
returns this shard's per-response sums of the labels' log-probabilities (`CausalLMWithChunkedLoss` with
`response_ids`, the chunked pass over the hidden states: never full logits), which are summed over the SP group;
every rank of the group then computes the same per-pair losses. The step's loss is their sum over the pairs of the
whole step (micro-batches, DP ranks) divided by the number of those pairs, so the gradient is the single-process
gradient of the mean pair loss whatever the mesh or accumulation.

DPO: Rafailov et al., 2023 (arXiv:2305.18290), the sigmoid loss; SimPO: Meng et al., 2024 (arXiv:2405.14734);
ORPO: Hong et al., 2024 (arXiv:2403.07691).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ringtrain.log import get_logger
from ringtrain.model.loss import IGNORE_INDEX

if TYPE_CHECKING:
    from ringtrain.config import TrainConfig
    from ringtrain.config.train import TrainLoopConfig
    from ringtrain.model.causal_lm import CausalLMWithChunkedLoss
    from ringtrain.parallel.dims import ParallelDims
    from ringtrain.ring import SequenceParallel

logger = get_logger(__name__)

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


class _SumOverSequenceParallel(torch.autograd.Function):
    """Sum over the SP group in forward; identity in backward.

    Every rank of the group computes the same loss from the summed values, so the gradient with respect to a rank's
    own part is the gradient with respect to the sum; the gradient reduction over the mesh then adds the ranks'
    parameter gradients once each (an all-reduce in backward would count each of them sp_size times)."""

    @staticmethod
    def forward(ctx, part, sp):  # noqa: D401 - autograd signature
        return sp.all_reduce(part.clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_sequence_parallel(part: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """`part` summed over the SP group, differentiable for a loss every rank of the group computes alike."""
    return _SumOverSequenceParallel.apply(part, sp)


def preference_losses(objective: str, policy: torch.Tensor, counts: torch.Tensor, reference: torch.Tensor | None,
                      beta: float, gamma: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [P], rewards [P, 2]) of P pairs from their summed log-probabilities `policy` [P, 2] (column 0 chosen,
    1 rejected), the responses' label counts `counts` [P, 2] and, for DPO, the reference's sums [P, 2].

    dpo: -log sigmoid(beta ((pc - rc) - (pr - rr))), rewards beta (p - r). simpo: -log sigmoid(beta pc / |c| -
    beta pr / |r| - gamma), rewards beta p / |y|. orpo: the chosen response's mean NLL - beta log sigmoid(log
    odds(c) - log odds(r)) with log odds(y) = m - log(1 - e^m), m the mean log-probability; rewards beta m."""
    if objective == "dpo":
        rewards = beta * (policy - reference)
        return -F.logsigmoid(rewards[:, 0] - rewards[:, 1]), rewards
    mean = policy / counts
    if objective == "simpo":
        rewards = beta * mean
        return -F.logsigmoid(rewards[:, 0] - rewards[:, 1] - gamma), rewards
    if objective == "orpo":
        # log(1 - e^m) as log(-expm1(m)): exact near m = 0; m is kept below 0 by the dtype's smallest normal, since a
        # response predicted with certainty rounds its mean to exactly 0 (log 0 = -inf, then inf - inf = nan).
        m = mean.clamp(max=-torch.finfo(mean.dtype).tiny)
        log_odds = m - torch.log(-torch.expm1(m))
        return -mean[:, 0] - beta * F.logsigmoid(log_odds[:, 0] - log_odds[:, 1]), beta * mean
    raise ValueError(f"objective={objective!r} is not one of dpo, simpo, orpo")


def num_responses(response_ids: torch.Tensor) -> int:
    """Responses (2 per pair) in a full-sequence batch's `response_ids`."""
    return 2 * (int(response_ids.max()) // 2 + 1) if response_ids.numel() else 0


@contextlib.contextmanager
def no_reference() -> Any:
    yield


class Reference:
    """The DPO reference model's per-response log-probability sums, through the same forward machinery.

    `model`: the model to run (the policy itself, or a frozen copy); `context`: entered around its forward (the
    policy's adapters disabled). Always without gradient."""

    def __init__(self, model: CausalLMWithChunkedLoss, context: Callable[[], contextlib.AbstractContextManager],
                 what: str) -> None:
        self.model, self.context, self.what = model, context, what

    def __call__(self, *args: Any) -> torch.Tensor:
        with torch.no_grad(), self.context():
            return self.model(*args)


def build_reference(cfg: TrainConfig, dims: ParallelDims, policy: CausalLMWithChunkedLoss) -> Reference | None:
    """train.objective=dpo's reference (None for the other objectives): train.reference's model, frozen; else the
    starting weights: the policy with its adapters disabled (peft without trainable_modules: no copy), or a frozen
    copy built like the policy (sharded by FSDP2 when train.fsdp), which is one more model's weights in memory."""
    from ringtrain.config.train import dpo_reference
    from ringtrain.model.adapters import adapters_disabled
    from ringtrain.model.build import build_model

    tcfg = cfg.train
    kind = dpo_reference(tcfg, cfg.peft.enabled, cfg.peft.trainable_modules)
    if kind == "none":
        return None
    if kind == "adapters":
        logger.info("DPO reference: the base model, with the adapters disabled")
        return Reference(policy, lambda: adapters_disabled(policy.lm), "adapters disabled")
    if tcfg.reference:
        ref_cfg = replace(cfg, model=replace(cfg.model, path=tcfg.reference, arch=None, config={}),
                          peft=replace(cfg.peft, method="none"))
    else:
        ref_cfg = replace(cfg, peft=replace(cfg.peft, method="none"))  # the starting weights, without adapters
    copy = build_model(ref_cfg, dims, "eval")
    copy.requires_grad_(False)
    what = f"frozen copy of {tcfg.reference}" if tcfg.reference else "frozen copy of the starting weights"
    logger.info("DPO reference: a %s", what)
    return Reference(copy, no_reference, what)


def preference_forward_backward(model: CausalLMWithChunkedLoss, reference: Reference | None, dims: ParallelDims,
                                cfg: TrainLoopConfig, local: list[dict[str, Any]], responses: list[int],
                                add_balancing: Callable[[torch.Tensor, int], torch.Tensor]) -> tuple[float, dict]:
    """Accumulate the gradient of the mean pair loss over the sharded micro-batches `local` (`responses`: each one's
    number of responses, from the full batch). Returns (that loss, the step's reward metrics)."""
    sp, device = dims.sp, dims.device
    # Pairs of the whole step: each SP rank holds the same pairs, so the world's sum counts each sp_size times.
    n_pairs = torch.tensor(float(sum(responses) // 2), dtype=torch.float64, device=device)
    dist.all_reduce(n_pairs)
    n_pairs = (n_pairs / dims.sp_size).clamp(min=1.0)
    totals = torch.zeros(1 + len(METRICS), dtype=torch.float64, device=device)  # loss, then METRICS
    for i, batch in enumerate(local):
        if cfg.fsdp:
            model.set_requires_gradient_sync(i == len(local) - 1)
        labels = batch["shift_labels"].to(device)
        ids = batch["response_ids"].to(device)
        args = (batch["input_ids"].to(device), batch["position_ids"].to(device), labels, None,
                batch.get("documents"), ids, responses[i])
        pairs = responses[i] // 2
        counts = torch.zeros(responses[i], dtype=torch.float64, device=device)
        counts.index_add_(0, ids.reshape(-1).clamp(min=0), (labels.reshape(-1) != IGNORE_INDEX).to(torch.float64))
        counts = sp.all_reduce(counts).view(pairs, 2)
        # The reference first: its forward (no gradient) must not run between the policy's forward and backward.
        ref = None if reference is None else sp.all_reduce(reference(*args).detach().to(torch.float64)).view(pairs, 2)
        policy = sum_over_sequence_parallel(model(*args).to(torch.float64), sp).view(pairs, 2)
        losses, rewards = preference_losses(cfg.objective, policy, counts, ref, cfg.beta, cfg.simpo_gamma)
        objective = add_balancing(losses.sum() / n_pairs, len(local))
        objective.backward()
        rewards = rewards.detach()
        totals += torch.stack([losses.detach().sum(), rewards[:, 0].sum(), rewards[:, 1].sum(),
                               (rewards[:, 0] - rewards[:, 1]).sum(), (rewards[:, 0] > rewards[:, 1]).sum()])
    dist.all_reduce(totals)
    means = (totals / dims.sp_size / n_pairs).tolist()
    return means[0], dict(zip(METRICS, means[1:], strict=True))
