"""The one model builder: `build_model(cfg, dims, mode)`, used by `ringtrain train`, `ringtrain eval` and the
benchmarks.

Each `apply_*` function transforms an untouched transformers model in place and knows nothing of the others;
`parallelize_model` calls them in the only order that works and says why next to each call (torchtitan's
parallelize.py is the model): LoRA adapters -> ring attention -> tiled MLP -> recompute -> the loss wrapper ->
offload -> FSDP2.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from ringtrain.model.causal_lm import CausalLMWithChunkedLoss, build_causal_lm, decoder_layers

if TYPE_CHECKING:
    from ringtrain.config import AdapterConfig, TrainConfig
    from ringtrain.config.train import TrainLoopConfig
    from ringtrain.parallel.dims import ParallelDims

MODES = ("train", "eval")


def apply_activation_checkpointing(lm: nn.Module, cfg: TrainLoopConfig) -> list[int]:
    """Recompute the decoder layers `train.activation_checkpointing` names in backward; returns their indices.

    HF's public switch (non-reentrant, FSDP2-safe) turns it on for every layer; a partial policy ('every:K') then
    turns it off again on the layers it keeps, through the per-layer flag of transformers' GradientCheckpointingLayer
    (parameter names and checkpoints are unchanged, unlike a wrapper module)."""
    mode, every = cfg.recompute
    if mode == "none":
        return []
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # the name since transformers 5.x; the old one warns
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    layers = decoder_layers(lm)
    chosen = [i for i in range(len(layers)) if i % every == 0]
    if mode == "every":
        for i, layer in enumerate(layers):
            if not hasattr(layer, "gradient_checkpointing"):
                raise ValueError(f"{type(layer).__name__} is not a transformers GradientCheckpointingLayer: use "
                                 "train.activation_checkpointing=full or none for this model")
            layer.gradient_checkpointing = i in chosen
    return chosen


def apply_tiled_mlp(lm: nn.Module, cfg: TrainLoopConfig, sp_size: int) -> int:
    """With `train.tiled_mlp`: every decoder layer's `mlp` runs over token tiles, recomputed per tile in backward
    (`ringtrain.model.tiled_mlp`); returns the tile count (0 when off).

    The count comes from the config (tokens per rank = micro_batch_size x seq_len / sp_size over
    `train.mlp_tile_tokens`, default hidden_size tokens: ALST's ceil(S / hidden)), never from a rank's local tensor,
    so every rank runs the same number of tiles even where shards differ in length (the balanced layout)."""
    from ringtrain.model.tiled_mlp import tile_count, tile_mlp

    if not cfg.tiled_mlp:
        return 0
    layers = decoder_layers(lm)
    missing = [type(layer).__name__ for layer in layers if not isinstance(getattr(layer, "mlp", None), nn.Module)]
    if missing:
        raise ValueError(f"train.tiled_mlp: {missing[0]} has no 'mlp' submodule to tile (tiling needs a per-token "
                         f"MLP at layer.mlp): set train.tiled_mlp=false for {type(lm).__name__}")
    tile_tokens = cfg.mlp_tile_tokens or lm.config.hidden_size
    n_tiles = tile_count(cfg.micro_batch_size * cfg.seq_len // sp_size, tile_tokens)
    for layer in layers:
        tile_mlp(layer.mlp, n_tiles)
    return n_tiles


def apply_fsdp(model: CausalLMWithChunkedLoss, dims: ParallelDims) -> None:
    """FSDP2 over every rank of the mesh (dp x sp): each decoder layer is a unit, the rest is the root.

    SP ranks hold different tokens of the same sequences, so their gradients are partial sums just
    like DP ranks': FSDP must SUM over the whole world. The loss is already divided by the global
    token count, hence a divide factor of 1 instead of FSDP's default mean over ranks.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    for layer in decoder_layers(model.lm):
        fully_shard(layer, mesh=dims.fsdp_mesh)
    fully_shard(model, mesh=dims.fsdp_mesh)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # Plain SUM collectives: gloo has no PREMUL_SUM, and a factor of 1 needs no scaling anyway.
            module.set_force_sum_reduction_for_comms(True)


def all_reduce_gradients(model: nn.Module, dims: ParallelDims) -> None:
    """Without FSDP: sum gradients over the world (the same contract apply_fsdp sets up)."""
    if dims.world_size == 1:
        return
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)


def parallelize_model(lm: nn.Module, cfg: TrainLoopConfig, dims: ParallelDims | None, mode: str = "train",
                      adapters: AdapterConfig | None = None) -> CausalLMWithChunkedLoss:
    """`lm` with LoRA adapters (when `adapters` enables them), sequence-parallel attention, tiled MLP, recompute, the
    chunked loss, offload and FSDP2, as `cfg` asks. `mode='eval'` leaves out what only a backward needs (recompute,
    offload) and puts the model in eval mode; `dims=None` is one process without torch.distributed: the model's own
    attention, nothing sharded (the reference that sharded evaluation is tested against)."""
    from ringtrain.hf import apply_ring_attention
    from ringtrain.model.offload import LayerInputOffload

    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    training = mode == "train"
    if adapters is not None and adapters.enabled:
        from ringtrain.model.adapters import apply_adapters

        # 0. Adapters before everything: peft wraps the plain linear layers in place (every later step sees the
        #    wrapped ones inside unchanged layers) and freezes the base weights, so FSDP2 shards frozen weights
        #    like any other but reduces gradients and the optimizer holds state only for what trains.
        apply_adapters(lm, adapters)
    if dims is not None:
        # 1. Sequence-parallel attention first: it only swaps the attention function, so it must see plain HF
        #    modules.
        apply_ring_attention(lm, dims.sp)
    # 2. Tiled MLP before FSDP, on the plain MLP modules: its tiles then run inside the layer's FSDP unit, whose
    #    gathered parameters they read, and the tiles' summed gradients reach FSDP once per layer.
    apply_tiled_mlp(lm, cfg, 1 if dims is None else dims.sp_size)
    if training:
        # 3. Activation checkpointing before FSDP, so FSDP's unit boundaries wrap the checkpointed layers and
        #    recomputation runs while a layer's parameters are gathered for its backward.
        apply_activation_checkpointing(lm, cfg)
    lm.train(training)
    model = CausalLMWithChunkedLoss(lm, cfg.loss_chunk_tokens)
    if training and cfg.offload_activations:
        # 4. Offload finds the checkpointed layers' inputs through module hooks on the decoder layers, so it needs
        #    recompute applied; it only moves tensors saved for backward, so it composes with FSDP either way.
        model.forward_context = LayerInputOffload(lm, dims.device if dims is not None else torch.device("cpu"))
    if cfg.fsdp and dims is not None:
        # 5. FSDP last: it replaces parameters by sharded DTensors, which the optimizer must then see.
        apply_fsdp(model, dims)
    return model


def build_model(cfg: TrainConfig, dims: ParallelDims | None, mode: str = "train") -> CausalLMWithChunkedLoss:
    """The run's model, in the one apply order (`parallelize_model`) on the meta device, then materialised with each
    rank's shards loaded from model.path or initialised identically on every world size (`build_causal_lm`).
    `dims=None`: one process on CPU without torch.distributed."""
    device = dims.device if dims is not None else torch.device("cpu")
    return build_causal_lm(cfg, device, parallelize=lambda lm: parallelize_model(lm, cfg.train, dims, mode, cfg.peft))
