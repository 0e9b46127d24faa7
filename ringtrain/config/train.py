"""TrainLoopConfig: the shape of a run (a leaf module, so the config loader imports no training code)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ringtrain.config.rules import at_least, one_of

if TYPE_CHECKING:
    from ringtrain.config.data import DataConfig

NONFINITE_ACTIONS = ("skip", "stop")
LOSS_WEIGHTINGS = ("token", "sequence")
# Preference objectives train on records with prompt, chosen and rejected (data.format='preference'); "sft" is the
# next-token objective. DPO compares with a reference model; SimPO and ORPO need none.
PREFERENCE_OBJECTIVES = ("dpo", "simpo", "orpo")
OBJECTIVES = ("sft", *PREFERENCE_OBJECTIVES)
NONFINITE_FRACTION_FROM_STEP = 20  # max_nonfinite_fraction is judged from this step on: earlier, one step is 5%+


@dataclass
class TrainLoopConfig:
    """The shape of the run: how long, how big a step, where it writes."""

    output_dir: str
    """Run folder: resolved config, metrics.jsonl, checkpoints/, the exported model in final_model/."""
    seq_len: int = 1024
    """Tokens per sequence (the context length trained); sharded over parallel.sp_size ranks."""
    micro_batch_size: int = 1
    """Sequences per data-parallel rank per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_steps: int = 100
    """Optimizer steps to run."""
    seed: int = 0
    """Seed for model init (identical on every rank) and data order."""
    activation_checkpointing: bool | str = "none"
    """Which decoder layers recompute their forward in backward instead of storing their activations: 'none';
    'full' (every layer: activations of one layer at a time plus each layer's input, for one more forward of
    compute, about +33% FLOPs); 'every:K' (layers 0, K, 2K, ...: 1/K of that recompute, and the memory of the
    other layers' activations kept). true/false mean full/none. `ringtrain plan` says which fits."""
    offload_activations: bool = False
    """With activation checkpointing, keep the checkpointed decoder layers' inputs in host memory (pinned, copied on
    a side stream while the next layer computes, fetched back one layer ahead in backward); nothing else is offloaded.
    For long contexts on GPU: it frees layers x tokens x hidden x dtype bytes per rank. On CPU it copies within host
    memory and saves nothing."""
    tiled_mlp: bool = False
    """Run each decoder layer's MLP over tiles of mlp_tile_tokens tokens, recomputing a tile in backward (ALST), so
    the [tokens, intermediate] activations exist for one tile at a time; exact (same losses and gradients up to
    summation order), for one more MLP forward of compute. Needs a per-token `mlp` submodule (Llama, Mistral, Qwen)."""
    mlp_tile_tokens: int = 0
    """Tokens per MLP tile with tiled_mlp; 0 = the model's hidden_size (ALST's ceil(S / hidden) tiles)."""
    loss_chunk_tokens: int = 0
    """Tokens per chunk of the fused cross-entropy (full [tokens, vocab] logits never exist); 0 = about
    128 MiB of fp32 logits per chunk (1K tokens at a 32K vocabulary)."""
    on_nonfinite: str = "skip"
    """A non-finite loss or gradient norm: skip the optimizer step, or stop the run with an error."""
    max_nonfinite_steps: int = 10
    """With on_nonfinite=skip: stop the run (exit 1, one line) after this many consecutive skipped steps, a run that
    has diverged rather than hit one bad batch; 0 = never."""
    max_nonfinite_fraction: float = 0.1
    """With on_nonfinite=skip: stop the run (exit 1, one line) when more than this fraction of its steps (from step 1,
    across resumes) were skipped, checked from step 20 on; 1 = never."""
    loss_weighting: str = "token"
    """How target tokens are averaged into the loss: 'token' (the mean over every target token of the global batch)
    or 'sequence' (each document's / conversation's own mean loss, the documents weighted equally: LongAlign's loss
    weighting, so that long conversations packed with short ones do not dominate). Exact under SP, DP, packing and
    gradient accumulation. A document split over two sequences counts once per sequence. Needs data.document_mask."""
    objective: str = "sft"
    """What the run minimises: 'sft' (next-token cross-entropy on every target token) or a preference objective on
    records with prompt, chosen and rejected (data.format='preference', the default format with these): 'dpo'
    (sigmoid DPO against the reference model, train.reference), 'simpo' (SimPO: length-normalised log-probabilities
    and a margin, no reference) or 'orpo' (ORPO: the chosen response's mean NLL plus beta x the odds-ratio loss, no
    reference). Each pair's chosen and rejected responses are packed as two documents of one sequence."""
    beta: float = 0.1
    """Preference objectives: DPO's beta (the KL strength, 0.1 typical), SimPO's beta (2.0 typical), ORPO's lambda
    (the weight of the odds-ratio term, 0.1 typical). Must be > 0."""
    simpo_gamma: float = 0.5
    """objective='simpo': the target reward margin gamma (SimPO's paper uses 0.5 to 1.6 with beta 2.0 to 2.5)."""
    reference: str = ""
    """objective='dpo': the reference model. '' = the starting weights: with peft adapters (and no
    peft.trainable_modules) the base model with the adapters disabled, in the same forward (no copy); otherwise a
    frozen copy of the starting weights, sharded like the model (one more model's weights in memory, spread over the
    ranks with FSDP, and one more forward per step). A model folder: that model, frozen, which must have the
    trained model's shapes and vocabulary."""
    fsdp: bool = True
    """Shard parameters, gradients and optimizer state over all ranks with FSDP2 (fully_shard)."""
    threads: int = 0
    """torch intra-op threads per rank; 0 keeps torch's default."""

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        for name in ("seq_len", "micro_batch_size", "grad_accum_steps", "max_steps"):
            value = getattr(self, name)
            if value < 1:
                problems.append((name, f"{name}={value} must be >= 1"))
        problems += at_least(self, "loss_chunk_tokens", 0, ">= 1, or 0 for an automatic size")
        problems += at_least(self, "mlp_tile_tokens", 0, ">= 1, or 0 for hidden_size tokens")
        problems += at_least(self, "threads", 0, ">= 0 (0 = torch's default)")
        problems += at_least(self, "max_nonfinite_steps", 0, ">= 1, or 0 to never stop on consecutive skipped steps")
        if not 0 < self.max_nonfinite_fraction <= 1:
            problems.append(("max_nonfinite_fraction", f"max_nonfinite_fraction={self.max_nonfinite_fraction} must be "
                                                       "in (0, 1] (1 = never stop on the fraction of skipped steps)"))
        problems += one_of(self, "loss_weighting", LOSS_WEIGHTINGS)
        problems += one_of(self, "on_nonfinite", NONFINITE_ACTIONS)
        problems += one_of(self, "objective", OBJECTIVES)
        if not self.beta > 0:
            problems.append(("beta", f"beta={self.beta} must be > 0 (DPO's KL strength, e.g. 0.1)"))
        problems += at_least(self, "simpo_gamma", 0, ">= 0 (SimPO's target margin, e.g. 0.5)")
        if self.reference and self.objective != "dpo":
            problems.append(("reference", f"reference={self.reference!r} is used by objective='dpo' only "
                                          f"(objective={self.objective!r}): remove it"))
        policy = recompute_policy(self.activation_checkpointing)
        if policy is None:
            problems.append(("activation_checkpointing", f"activation_checkpointing={self.activation_checkpointing!r} "
                                                         "is not one of none, full, every:K (K >= 1, e.g. every:2)"))
        if self.offload_activations and policy is not None and policy[0] == "none":
            problems.append(("offload_activations", "offload_activations=true needs "
                                                    "train.activation_checkpointing=true (or full, every:K)"))
        return problems

    @property
    def recompute(self) -> tuple[str, int]:
        """The checkpointing policy as (mode, K): ('none', 0), ('full', 1) or ('every', K)."""
        policy = recompute_policy(self.activation_checkpointing)
        if policy is None:
            raise ValueError(f"train.activation_checkpointing={self.activation_checkpointing!r} is not a policy")
        return policy


def recompute_policy(value: bool | str) -> tuple[str, int] | None:
    """('none', 0), ('full', 1) or ('every', K) for a train.activation_checkpointing value; None if invalid."""
    if value is True or value == "full":
        return "full", 1
    if value is False or value == "none":
        return "none", 0
    if isinstance(value, str) and value.startswith("every:"):
        try:
            k = int(value.split(":", 1)[1])
        except ValueError:
            return None
        if k >= 1:
            return ("full", 1) if k == 1 else ("every", k)
    return None


def dpo_reference(train: TrainLoopConfig, adapters_enabled: bool, trainable_modules: list[str]) -> str:
    """Which reference a run computes: 'none' (not DPO), 'adapters' (the policy with its adapters disabled: peft
    without trainable_modules, which would differ from the start), 'copy' (a frozen copy of the starting weights or
    of train.reference's model). The trainer builds it and the planner counts it by this one rule."""
    if train.objective != "dpo":
        return "none"
    return "adapters" if not train.reference and adapters_enabled and not trainable_modules else "copy"


def resolve_objective_format(train: TrainLoopConfig, data: DataConfig) -> None:
    """A preference objective reads preference records: data.format 'auto' becomes 'preference' (in place), so a
    JSON-lines file of prompt / chosen / rejected records needs no other key."""
    if train.objective in PREFERENCE_OBJECTIVES and data.format == "auto" and not data.sources:
        data.format = "preference"


def objective_problems(train: TrainLoopConfig, data: DataConfig) -> list[str]:
    """What train.objective needs of the data section, one line each (full keys)."""
    preference = train.objective in PREFERENCE_OBJECTIVES
    if not preference:
        if data.format == "preference":
            return [f"data.format='preference' trains a preference objective, and train.objective={train.objective!r}:"
                    f" set train.objective to one of {', '.join(PREFERENCE_OBJECTIVES)}"]
        return []
    what = f"train.objective={train.objective!r} trains on prompt / chosen / rejected records"
    problems = []
    if data.sources:
        problems.append(f"{what}, and data.sources mixes sources: give one data.path (mixtures of preference data "
                        "are not built)")
    elif data.format != "preference":
        problems.append(f"{what}: data.format={data.format!r} must be 'preference' (or 'auto')")
    if data.streaming:
        problems.append(f"{what}, which are packed in pairs from a cached dataset: set data.streaming=false")
    if data.long_tokens > 0 and data.long_upsample != 1.0:
        problems.append(f"{what}: data.long_upsample repeats documents one by one and would split pairs: set "
                        "data.long_upsample=1 (or data.long_tokens=0)")
    if not data.document_mask:
        problems.append(f"{what} packed as separate documents: set data.document_mask=true")
    if train.loss_weighting != "token":
        problems.append(f"{what}: train.loss_weighting={train.loss_weighting!r} weighs tokens of a next-token loss; "
                        "a preference loss is a mean over pairs: leave train.loss_weighting=token")
    return problems
