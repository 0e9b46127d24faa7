"""Run a transformers causal LM's attention through the ring runtime, via transformers' public AttentionInterface.

One attention function is registered per `apply_ring_attention` call under its own name, closing over that call's
process group and layout, and selected with `model.set_attn_implementation(name)`: no globals steer the ring, and
two models on two groups can coexist. No attention mask is ever built: transformers 5.x returns no mask for an
implementation that the AttentionMaskInterface does not know (`_preprocess_mask_arguments` early exit), and the
causal mask is the ring's job, and so are the masks transformers describes by kwargs: each layer's
`sliding_window` (Mistral; Qwen2/Qwen3 `layer_types` pass it for sliding layers only) becomes the ring's `window`,
gpt-oss's `s_aux` its `sink`, Gemma 2's `softcap` its `softcap`; a value head dim unlike the query's (MLA) passes as is.
Packed documents: pass `document_ids` (from `shard_batch`) to the model's forward; transformers forwards extra
kwargs down to the attention function (public `**kwargs: TransformersKwargs` path), and the input hook gathers
them once per forward into a `RingDocuments` shared by every layer. What the ring cannot compute (attention
dropout, KV caches, left padding, positions that do not match the shard layout, chunked attention) raises
instead of silently computing something else. Token mixers outside the interface (gated DeltaNet, Mamba-2, short
convolutions) get their head-parallel forward from `hf.mixers`; classes it does not know are refused.
"""

from __future__ import annotations

import itertools
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ringtrain.hf.batch import check_right_padding
from ringtrain.hf.mixers import KINDS as MIXER_KINDS
from ringtrain.hf.mixers import install_mixers, mixer_kind, mixer_problems, mixers, uninstall_mixers
from ringtrain.hf.rope import check_rotary_precision
from ringtrain.log import get_logger
from ringtrain.ring import RingDocuments, SequenceParallel, ulysses_head_problems
from ringtrain.ring.balance import document_position_ids

logger = get_logger(__name__)

_names = itertools.count()
# model -> its binding, so `remove_ring_attention` can undo exactly what was done (weak: models are not kept alive).
_applied: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class _RingBinding:
    """The sequence-parallel setup one registered attention function runs with, plus its first-forward check."""

    name: str
    sp: SequenceParallel
    validate_inputs: bool
    calls: int = 0
    hooks: dict = field(default_factory=dict)
    mixers: list = field(default_factory=list)
    """The mixer modules given a head-parallel forward (`hf.mixers`)."""
    documents: bool = False
    """The current forward carries packed documents (every mixer layer must receive them)."""

    def attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,  # [B, H, S_local, D]
        key: torch.Tensor,  # [B, H_kv, S_local, D]
        value: torch.Tensor,  # [B, H_kv, S_local, D]
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """The AttentionInterface signature; returns (output [B, S_local, H, D], no weights)."""
        self.calls += 1
        layer = f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
        if dropout:
            raise ValueError(
                f"{layer}: attention dropout={dropout} in training mode is not supported by ring attention: "
                "set config.attention_dropout=0.0 (the usual value for LLM fine-tuning)"
            )
        if attention_mask is not None:
            # The input hook drops 2-D masks and transformers builds none for us; a mask here is a 4-D or custom
            # mask the caller prepared, which the ring would silently ignore.
            raise ValueError(
                f"{layer}: received an attention mask of shape {tuple(attention_mask.shape)}; ring attention applies "
                "only the causal mask: pass no mask (right padding is handled by shard_batch's ignored labels)"
            )
        if key.shape[2] != query.shape[2]:
            raise ValueError(
                f"{layer}: {key.shape[2]} keys for {query.shape[2]} queries means a KV cache is in use: ring "
                "attention trains on whole sharded sequences; call the model with use_cache=False and no cache"
            )
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        window = kwargs.get("sliding_window")  # transformers' convention: i - window < j <= i, like the ring's
        softcap = kwargs.get("softcap")  # Gemma 2's attn_logit_softcapping
        out = self.sp.attention(  # q [B, S_local, H, D], k/v [B, S_local, H_kv, D or Dv]: GQA heads are not repeated
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            causal=bool(causal), scale=scaling, document_ids=kwargs.get("document_ids"),
            window=None if window is None else int(window),
            sink=kwargs.get("s_aux"),  # gpt-oss: one learned sink logit per query head
            softcap=None if softcap is None else float(softcap),
        )
        return out, None

    def check_inputs(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Forward pre-hook on the base model: refuse caches, check positions and padding, drop the 2-D mask."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None:
            raise ValueError(
                "a KV cache (past_key_values) was passed to a model running ring attention: the cache would hold "
                "only this rank's shard; train without a cache, and generate with the model reloaded without ringtrain"
            )
        if kwargs.get("use_cache"):
            raise ValueError(
                "use_cache=True with ring attention: a cache of sequence shards is useless and costs memory; "
                "pass use_cache=False (or leave it unset)"
            )
        kwargs["use_cache"] = False  # config.use_cache defaults to True, which would build a DynamicCache
        self.documents = kwargs.get("document_ids") is not None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        if tokens is None:
            return args, kwargs
        s_local = tokens.shape[1]
        world = self.sp.world
        docs = kwargs.get("document_ids")
        if isinstance(docs, torch.Tensor):
            if tuple(docs.shape) != tuple(tokens.shape[:2]):
                raise ValueError(
                    f"document_ids has shape {tuple(docs.shape)} but this rank holds {tuple(tokens.shape[:2])} tokens: "
                    "pass the sharded document_ids from shard_batch"
                )
            if not self.sp.layout.static:
                raise ValueError(
                    f"layout {self.sp.layout.name!r} is chosen per batch from the documents: pass the 'documents' "
                    "entry of shard_batch's output as document_ids, not the sharded id tensor"
                )
            # One all_gather per forward; every layer's ring call reuses it (and the plans made from it).
            kwargs["document_ids"] = docs = self.sp.gather_documents(docs.to(tokens.device))
        mask = kwargs.get("attention_mask")
        if mask is not None:  # checked even without validate_inputs: dropping a left-padding mask is silent harm
            if mask.ndim != 2 or mask.shape[1] != s_local:
                raise ValueError(
                    f"attention_mask has shape {tuple(mask.shape)} but this rank holds {s_local} tokens: pass the "
                    "sharded 2-D padding mask, or none (shard_batch turns padding into ignored labels instead)"
                )
            # Every rank sees the same gathered mask, so every rank raises together instead of leaving peers
            # waiting in the ring.
            check_right_padding(self.sp.for_documents(docs).unshard(mask.to(torch.int32)))
            kwargs["attention_mask"] = None
        if self.validate_inputs:
            self._check_positions(module, kwargs.get("position_ids"), s_local, world, tokens.device, docs)
        return args, kwargs

    def _check_positions(
        self, module: torch.nn.Module, position_ids: torch.Tensor | None, s_local: int, world: int,
        device: torch.device, docs: RingDocuments | None = None,
    ) -> None:
        """Positions must be this rank's global positions (or, with documents, positions restarting at each
        document), and position-dependent RoPE must agree across ranks."""
        if position_ids is None:
            if world == 1:
                return
            raise ValueError(
                "position_ids were not passed: transformers would number this rank's tokens 0..S_local-1 and RoPE "
                "would be wrong on every rank but the first; pass the position_ids from shard_batch"
            )
        sp = self.sp.for_documents(docs)
        expected = sp.positions(s_local * world, device=device)
        ok = bool((position_ids == expected).all())
        if not ok and docs is not None:
            per_doc = sp.shard(document_position_ids(docs.global_ids).to(device))
            ok = position_ids.shape[-1] == s_local and bool((position_ids == per_doc).all())
        bad = int(not ok)
        # transformers' dynamic and longrope RoPE pick their frequencies from max(position_ids) + 1, which differs
        # between ranks: compare what each rank would pick.
        params = getattr(module.config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type") if isinstance(params, dict) else None
        pick = 0
        if rope_type == "dynamic":
            pick = max(int(position_ids.max()) + 1, module.config.max_position_embeddings)
        elif rope_type == "longrope":
            pick = int(int(position_ids.max()) + 1 > params["original_max_position_embeddings"])
        # Every rank of the SP group takes part, so every rank raises together instead of leaving peers waiting.
        flags = self.sp.all_reduce_max(torch.tensor([bad, pick, -pick], dtype=torch.int64, device=device))
        if flags[0]:
            raise ValueError(
                f"position_ids do not match the {sp.layout.name} shard of a {s_local * world}-token sequence on at "
                "least one rank: pass the position_ids from shard_batch with the same SequenceParallel (positions "
                "that restart at each document need the document_ids from shard_batch too)"
            )
        if flags[1] != -flags[2]:
            raise ValueError(
                f"rope_type={rope_type!r} chooses its frequencies from each rank's largest position, and the ranks "
                f"disagree for a {s_local * world}-token sequence ({-int(flags[2])} vs {int(flags[1])}): "
                "use rope.method=yarn, llama3 or linear for sequence-parallel training"
            )

    def check_called(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook, first forward only: the model really routed its attention through the ring."""
        if self.calls == 0:
            raise RuntimeError(
                f"{type(module).__name__} ran a forward without calling the ring attention function {self.name!r}: "
                "its attention bypasses transformers' AttentionInterface (or attn_implementation was changed after "
                "apply_ring_attention), so each rank attended only to its own shard"
            )
        self.hooks.pop("check_called").remove()  # verified once; no per-step cost afterwards


# Token mixers that run outside AttentionInterface (their class names in transformers), and what they are: under
# sequence parallelism each rank would mix its own shard only. The kinds `hf.mixers` registers run head-parallel;
# any other class these patterns find is refused, by name.
_FOREIGN_MIXERS = (
    (re.compile(r"Mamba|Mixer$"), "Mamba state-space"),
    (re.compile(r"DeltaNet"), "gated DeltaNet linear-attention"),
    (re.compile(r"LightningAttention|LinearAttention"), "linear-attention"),
    (re.compile(r"ShortConv"), "short-convolution"),
    (re.compile(r"Rwkv"), "RWKV"),
)
_RING_LAYER_TYPES = ("full_attention", "sliding_attention", "attention", "mlp", "moe")


def sequence_parallel_problems(model: torch.nn.Module, sp_size: int | None = None) -> list[str]:
    """Why `model` (a transformers causal LM, on any device, meta included) cannot run under sequence parallelism
    (over `sp_size` ranks, when given: the head-parallel mixers' divisibility), one line each naming the layer kind;
    empty when it can. `ringtrain validate` and `apply_ring_attention` ask."""
    name, config = type(model).__name__, model.config
    found: dict[str, str] = {}
    for module in model.modules():
        cls = type(module).__name__
        if mixer_kind(module) is not None:
            continue
        for pattern, kind in _FOREIGN_MIXERS:
            if pattern.search(cls):
                found.setdefault(kind, cls)
                break
    if found:
        kinds = ", ".join(f"{kind} layers ({cls})" for kind, cls in found.items())
        supported = ", ".join(c for kind in MIXER_KINDS for c in kind.classes)
        return [f"{name} has {kinds}, which run outside transformers' AttentionInterface: each rank would mix only its "
                f"own shard, and sequence parallelism runs only these mixer classes: {supported}"]
    problems = [] if sp_size is None else mixer_problems(model, sp_size)
    layer_types = getattr(config, "layer_types", None) or []
    served = {t for _, kind in mixers(model) for t in kind.layer_types}
    unknown = sorted({t for t in layer_types if t not in _RING_LAYER_TYPES and t not in served})
    if unknown:
        problems.append(f"{name} has {', '.join(unknown)} layers (config.layer_types): ring attention computes "
                        "full_attention and sliding_attention layers only")
    if getattr(config, "attention_chunk_size", None):
        problems.append(f"config.attention_chunk_size={config.attention_chunk_size}: chunked attention is not "
                        "supported by ring attention")
    return problems


def _check_supported(model: torch.nn.Module, sp: SequenceParallel) -> None:
    config = model.config
    problems = sequence_parallel_problems(model, sp.world)
    if problems:
        raise ValueError("; ".join(problems))
    check_rotary_precision(model)
    if sp.ulysses_world > 1:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        problems = ulysses_head_problems(heads, kv_heads, sp.ulysses_world)
        if problems:
            raise ValueError(f"{type(model).__name__}: " + "; ".join(problems))


def apply_ring_attention(
    model: torch.nn.Module,
    sp: SequenceParallel | None = None,
    layout: str | None = None,
    *,
    group: dist.ProcessGroup | None = None,
    validate_inputs: bool = True,
) -> torch.nn.Module:
    """Make a transformers causal LM compute attention with sequence parallelism over `sp`; returns `model`.

    `sp`: a `SequenceParallel` (ring x Ulysses groups and the layout; `ParallelDims.sp` in a run), or none and a pure
    ring over `group` (None: the default group) with `layout` (default zigzag); `group`/`layout` beside an `sp`
    that says otherwise are refused. Feed the model the output of `shard_batch(batch, sp)` (the
    same `sp`): `input_ids`, `position_ids` and, for packed documents, `documents` (as `document_ids`); no `labels`
    (the pre-shifted `shift_labels` go to the loss). Sliding-window layers (config `sliding_window`,
    `layer_types`) run windowed. Call before FSDP wrapping and activation checkpointing; neither touches the
    attention implementation. With `validate_inputs` (default), each forward checks the positions against the
    layout (one tiny all_reduce) and any 2-D padding mask (one all_gather); turn it off under torch.compile once
    the input pipeline is trusted. The saved config does not mention ringtrain: `save_pretrained` output reloads
    with default (sdpa) attention.
    """
    from transformers import AttentionInterface

    sp = SequenceParallel.of(sp, layout, group=group)
    if model in _applied:
        raise ValueError("apply_ring_attention was already applied to this model: call remove_ring_attention first")
    _check_supported(model, sp)
    binding = _RingBinding(f"ringtrain_ring_{sp.layout.name}_{next(_names)}", sp, validate_inputs)
    AttentionInterface.register(binding.name, binding.attention)
    model.set_attn_implementation(binding.name)
    # `config._attn_implementation` is the attribute every modeling file dispatches on; transformers only logs a
    # warning when a model cannot switch, so check that the switch happened.
    if model.config._attn_implementation != binding.name:
        raise ValueError(
            f"{type(model).__name__} cannot switch its attention implementation (its attention does not go through "
            "transformers' AttentionInterface), so ring attention cannot be applied to it"
        )
    # Mixers outside AttentionInterface (DeltaNet, Mamba-2, short conv) get their head-parallel forward.
    binding.mixers = install_mixers(model, sp, lambda: binding.documents)
    base = getattr(model, "base_model", model)  # hook the decoder stack: the trainer may call it directly
    binding.hooks["check_inputs"] = base.register_forward_pre_hook(binding.check_inputs, with_kwargs=True)
    binding.hooks["check_called"] = base.register_forward_hook(binding.check_called, with_kwargs=True)
    _applied[model] = binding
    logger.info("sequence-parallel attention on %s: %s (%s)%s", type(model).__name__, sp.describe(), binding.name,
                f"; {len(binding.mixers)} head-parallel mixer layer(s)" if binding.mixers else "")
    return model


def remove_ring_attention(model: torch.nn.Module, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """Undo `apply_ring_attention`: back to `attn_implementation` on full sequences (evaluation, generation)."""
    binding = _applied.pop(model, None)
    if binding is None:
        raise ValueError("remove_ring_attention: apply_ring_attention was not applied to this model")
    for hook in binding.hooks.values():
        hook.remove()
    uninstall_mixers(binding.mixers)
    model.set_attn_implementation(attn_implementation)
    return model
