"""TrainLoopConfig: the shape of a run (a leaf module, so the config loader imports no training code)."""

from __future__ import annotations

from dataclasses import dataclass

from ringtrain.config.rules import at_least, one_of

NONFINITE_ACTIONS = ("skip", "stop")
LOSS_WEIGHTINGS = ("token", "sequence")
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
