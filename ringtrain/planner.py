"""`ringtrain plan`: predicted peak memory per rank, FLOPs and step time of a config, and the cheapest setup that fits.

No GPU and no weights are needed: the model is built on the meta device for its shapes and parameter counts, and
every byte below comes from a formula over them (docs/benchmarks.md, "Planner", has the derivations' validation:
the H200 measurements and CPU runs). The formulas follow what this trainer allocates, tensor by tensor:

- Static: parameters, gradients and AdamW's two states, sharded over the whole world by FSDP2 (in the parameter
  dtype); the optimizer step adds one parameter-sized temporary (torch's foreach AdamW: sqrt of exp_avg_sq).
- FSDP2 buffers: the root unit (embeddings, lm_head, final norm) stays gathered from forward to the end of backward;
  a decoder layer in flight holds its all-gather output and gathered parameters plus the next layer's prefetch, and in
  backward its unsharded gradients and the reduce-scatter input. With grad_accum_steps > 1 gradients of the earlier
  micro-batches stay unsharded (reduce-scatter after the last one).
- Activations per local token (N = micro_batch x seq_len / sp_size per rank), Llama-style decoder layer, element size
  a: RMSNorm saves its fp32 upcast and the normalized tensor (in fp32 models: its input and the normalized tensor),
  the projections their inputs, attention q, k, v (after the Ulysses all-to-all: KV replicas included), its output and
  an fp32 log-sum-exp per head, a gated MLP its gate, up, activation and product ([tokens, intermediate], four of
  them). A checkpointed layer keeps only its input (hidden x a); one layer at a time is recomputed in backward.
- Transients, the largest of three moments in a layer: attention forward (ring K/V double buffer, fp32 output
  accumulator), MLP backward (two [tokens, intermediate] gradients), attention backward (kernel gradients, fp32
  accumulators and the ring's fp32 dK/dV buffers that travel with K/V; all-to-all send/receive buffers).
- Tiled MLP: no MLP activations are saved; one tile's recompute and gradients, the full input gradient, and the
  parameter gradients summed in fp32.
- Loss (fused, chunked): one [chunk, vocab] fp32 logits buffer (plus its bf16 source), the fp32 [vocab, hidden]
  weight gradient and the [tokens, hidden] input gradient it stores for backward.
- Hybrid models (hf/mixers: gated DeltaNet, Mamba-2, short conv): a rough estimate on top of the Llama-style layer,
  counted in a layer's backward: the largest mixer's all-to-all send and receive buffers and its fp32 recurrent
  states at every 64-token chunk boundary for a 1/sp share of the heads (`mixer_buffers`). Their saved tensors are
  taken as the attention layer's.
- Offload: checkpointed inputs leave the device; two stay (the one in use and the one being fetched or copied).
- LoRA (peft.method=lora): the adapters join the parameters; gradients, AdamW's states, the optimizer step's
  temporary, the tiled MLP's gradient sums and FSDP2's gradient buffers count only what trains (frozen base weights
  get none); a frozen output head gets no weight gradient in the loss. The adapters' own activations (r values per
  token and adapted projection) are left out: a few per mille of a layer's.
- Preference objectives (train.objective dpo / simpo / orpo): the loss is the chunked log-probability pass, whose
  buffers are those of the fused loss above; its backward recomputes each chunk's logits (2 x vocab x hidden FLOPs per
  token more). DPO's reference: with adapters, the policy with the adapters disabled (one more forward per step, no
  memory beyond its no-grad transients); otherwise a frozen copy, one more model's parameters sharded like the
  policy's, and one more forward per step.

The peak is the largest of five moments: the end of forward (loss), the loss backward, the backward of the last
layer (all inputs still stored) and of the first (all layer gradients accumulated), and the optimizer step.
FLOPs: the trainer's model FLOPs (6 x parameters + 6 x layers x seq_len x hidden per token), plus recomputation
(a layer forward per checkpointed layer, an MLP forward per tiled MLP) for the time estimate.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from ringtrain.errors import ConfigError
from ringtrain.model.flops import DEFAULT_PEAK_TFLOPS, flops_per_token

GIB = 2**30
# Measured: ringtrain's 1.1B Llama on one H200 ran at 0.275-0.294 of the bf16 peak on hardware FLOPs (recompute
# included) from 8K to 128K tokens (docs/benchmarks.md); the estimate uses 0.28.
HARDWARE_EFFICIENCY = 0.28
HOST_LINK_GBPS = 25.0  # effective host <-> device copy bandwidth per GPU (PCIe Gen5 x16 shared by a node's GPUs)
DEFAULT_HEADROOM = 0.10
RECOMPUTE_CHOICES = ("none", "every:4", "every:2", "full")


@dataclass(frozen=True)
class ModelShape:
    """What the formulas need from a transformers causal LM."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    """q and k's head dim (MLA: nope + rope)."""
    vocab: int
    params: int
    """All parameters (tied embeddings once)."""
    layer_params: int
    """One decoder layer's parameters."""
    mlp_params: int
    gated_mlp: bool = True
    """gate/up/down (Llama family): four [tokens, intermediate] activations; otherwise two."""
    qk_norm: bool = False
    """RMSNorm over q and k per head (Qwen3)."""
    v_head_dim: int | None = None
    """v's (and the attention output's) head dim when it differs from q/k's (MLA); None: head_dim."""
    trainable: int | None = None
    """Parameters that train, with LoRA (adapters, trainable modules); None: all of them."""
    layer_trainable: int | None = None
    """One decoder layer's parameters that train (None: all)."""
    mlp_trainable: int | None = None
    """The MLP's parameters that train (None: all)."""
    head_trainable: bool = True
    """Whether the output head (lm_head) trains: its weight gradient in the loss."""
    mixer_layers: int = 0
    """Layers whose token mixer runs head-parallel outside attention (hf/mixers: gated DeltaNet, Mamba-2, short
    conv)."""
    mixer_channels: int = 0
    """Channels per token the largest of those exchanges by all-to-all, out and back together."""
    mixer_state: int = 0
    """Recurrent state elements per sequence of the largest of those (every head)."""
    mixer_units: tuple[tuple[int, bool], ...] = ()
    """(count, replicable) of the heads / groups / channels ranks take shares of (`hf.mixers.base.Unit`)."""

    # What trains: everything (None), or the counts an adapter run gave.
    trained = property(lambda self: self.params if self.trainable is None else self.trainable)
    layer_trained = property(lambda self: self.layer_params if self.layer_trainable is None else self.layer_trainable)
    mlp_trained = property(lambda self: self.mlp_params if self.mlp_trainable is None else self.mlp_trainable)

    @property
    def value_dim(self) -> int:
        return self.head_dim if self.v_head_dim is None else self.v_head_dim

    @property
    def root_params(self) -> int:
        """Embeddings, lm_head and the final norm: FSDP2's root unit."""
        return self.params - self.layers * self.layer_params


def model_shape(model_cfg: Any, adapters: Any = None) -> ModelShape:
    """The shapes of `model.*` (a ringtrain ModelConfig), from its transformers config, built on the meta device;
    with `adapters` (a `peft:` section that enables LoRA), the adapted model's counts and what of it trains."""
    import torch

    from ringtrain.model.causal_lm import build_meta_model, build_model_config, decoder_layers

    try:
        config = build_model_config(model_cfg)
    except (OSError, ValueError, TypeError) as e:
        where = f"model.path={model_cfg.path!r}" if model_cfg.path else f"model.arch={model_cfg.arch!r}"
        raise ConfigError([f"{where}: cannot read the model config ({str(e).splitlines()[0][:160]}); the planner "
                           "needs its shape: point model.path at a model folder, or set model.arch and model.config"]
                          ) from None
    lm = build_meta_model(model_cfg, config, torch.float32)  # shapes and counts only: the dtype changes neither
    lora = adapters is not None and adapters.enabled
    if lora:
        from ringtrain.model.adapters import apply_adapters

        apply_adapters(lm, adapters)
    layers = decoder_layers(lm)
    layer = layers[0]
    mlp = getattr(layer, "mlp", None)
    attn = getattr(layer, "self_attn", None)
    from ringtrain.hf.mixers import mixers

    found = [kind.buffers(m) for m, kind in mixers(lm)]
    units = tuple(sorted({(n, rep) for m, kind in mixers(lm) for _, n, _, rep in kind.units(m)}))
    heads = config.num_attention_heads
    head_dim = getattr(config, "qk_head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // heads
    v_head_dim = getattr(config, "v_head_dim", None)
    return ModelShape(
        name=model_cfg.path or model_cfg.arch,
        layers=len(layers), hidden=config.hidden_size, intermediate=getattr(config, "intermediate_size", 0) or 0,
        heads=heads, kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim, v_head_dim=None if v_head_dim in (None, head_dim) else v_head_dim, vocab=config.vocab_size,
        params=sum(p.numel() for p in lm.parameters()), layer_params=sum(p.numel() for p in layer.parameters()),
        mlp_params=0 if mlp is None else sum(p.numel() for p in mlp.parameters()),
        gated_mlp=mlp is not None and hasattr(mlp, "gate_proj"), qk_norm=attn is not None and hasattr(attn, "q_norm"),
        mixer_layers=len(found), mixer_channels=max((c for c, _ in found), default=0),
        mixer_state=max((st for _, st in found), default=0), mixer_units=units,
        **(_trainable_counts(lm, layer, mlp) if lora else {}),
    )


def _trainable_counts(lm: Any, layer: Any, mlp: Any) -> dict[str, Any]:
    def trained(module: Any) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters() if p.requires_grad)

    return {"trainable": trained(lm), "layer_trainable": trained(layer), "mlp_trainable": trained(mlp),
            "head_trainable": lm.get_output_embeddings().weight.requires_grad}


@dataclass(frozen=True)
class Setup:
    """How a run is laid out: what the planner varies."""

    world: int
    sp: int
    ulysses: int
    seq_len: int
    micro_batch: int = 1
    grad_accum: int = 1
    recompute: str = "full"
    """'none', 'full' or 'every:K' (as train.activation_checkpointing)."""
    tiled_mlp: bool = False
    mlp_tile_tokens: int = 0
    offload: bool = False
    fsdp: bool = True
    loss_chunk: int = 0
    dtype_bytes: int = 2
    device: str = "cuda"
    layout: str = "zigzag"
    objective: str = "sft"
    """train.objective."""
    reference: str = "none"
    """DPO's reference: 'none', 'adapters' (adapters disabled, no copy) or 'copy' (a frozen sharded copy)."""

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @property
    def local_tokens(self) -> int:
        """N: tokens per rank per micro-batch."""
        return self.micro_batch * self.seq_len // self.sp

    def checkpointed(self, layers: int) -> list[bool]:
        from ringtrain.config.train import recompute_policy

        mode, every = recompute_policy(self.recompute)
        return [mode != "none" and i % every == 0 for i in range(layers)]

    def overrides(self) -> list[str]:
        """The config overrides that select this setup."""
        return [f"parallel.sp_size={self.sp}", f"parallel.ulysses_size={self.ulysses}",
                f"train.activation_checkpointing={self.recompute}", f"train.tiled_mlp={str(self.tiled_mlp).lower()}",
                f"train.offload_activations={str(self.offload).lower()}"]

    def describe(self) -> str:
        split = "ring" if self.ulysses == 1 else f"ulysses {self.ulysses} x ring {self.sp // self.ulysses}"
        extras = [x for x, on in (("tiled MLP", self.tiled_mlp), ("offload", self.offload)) if on]
        return (f"sp_size={self.sp} ({split}), dp={self.dp}, recompute {self.recompute}"
                + "".join(f", {x}" for x in extras))


def setup_from_config(cfg: Any, world: int | None = None, device: str = "cuda") -> Setup:
    """The Setup of a loaded TrainConfig on `world` ranks (default: parallel.sp_size x parallel.dp_size)."""
    from ringtrain.config import resolve_layout
    from ringtrain.config.train import dpo_reference
    from ringtrain.model.causal_lm import resolve_dtype

    par, tr = cfg.parallel, cfg.train
    world = world or par.sp_size * max(par.dp_size, 1)
    dtype_bytes = resolve_dtype(cfg.model.dtype, device).itemsize
    layout = resolve_layout(par, cfg.data.document_mask)
    policy = tr.recompute
    return Setup(world=world, sp=par.sp_size, ulysses=par.ulysses_size, seq_len=tr.seq_len,
                 micro_batch=tr.micro_batch_size, grad_accum=tr.grad_accum_steps,
                 recompute={"none": "none", "full": "full"}.get(policy[0], f"every:{policy[1]}"),
                 tiled_mlp=tr.tiled_mlp, mlp_tile_tokens=tr.mlp_tile_tokens, offload=tr.offload_activations,
                 fsdp=tr.fsdp, loss_chunk=tr.loss_chunk_tokens, dtype_bytes=dtype_bytes, device=device,
                 layout="zigzag" if layout == "balanced" else layout, objective=tr.objective,
                 reference=dpo_reference(tr, cfg.peft.enabled, cfg.peft.trainable_modules))


# ---------------------------------------------------------------------------------------------------------------
# Component formulas. "Per token" = per local token of one rank; a = element size of parameters and activations.


def rmsnorm_saved(dim: int, a: int, fresh_input: bool, rows: int = 1) -> int:
    """Bytes per token an RMSNorm (transformers' LlamaRMSNorm) saves over `rows` vectors of `dim` elements in all, its
    output excluded: below fp32 the fp32 upcast (for pow and the rsqrt product) and the normalized tensor cast back
    (for the weight product); in fp32 the upcast is the input itself, which counts only when nothing else keeps it
    (`fresh_input`); and the fp32 rsqrt per row."""
    if a < 4:
        return 4 * dim + a * dim + 4 * rows
    return a * dim + (a * dim if fresh_input else 0) + 4 * rows


def kv_replicas(shape: ModelShape, ulysses: int) -> int:
    from ringtrain.ring.ulysses import kv_replicas as replicas

    return replicas(shape.kv_heads, ulysses)


def attention_saved(shape: ModelShape, a: int, ulysses: int) -> int:
    """Bytes per token attention keeps for backward: q, k, v (after the all-to-all, KV replicas included), the output
    (twice with Ulysses: the ring's and o_proj's input after the all-to-all back) and the fp32 log-sum-exp per head."""
    hd, vd, kv = shape.head_dim, shape.value_dim, shape.kv_heads * kv_replicas(shape, ulysses)
    qkv = a * (hd * (shape.heads + kv) + vd * kv)
    out = a * vd * shape.heads * (2 if ulysses > 1 else 1)
    return qkv + out + 4 * shape.heads


def mlp_saved(shape: ModelShape, a: int) -> int:
    """Bytes per token an untiled MLP keeps: gate, up, act(gate), act(gate) * up (gated) or fc1 out and act (plain)."""
    return (4 if shape.gated_mlp else 2) * a * shape.intermediate


def layer_saved(shape: ModelShape, a: int, ulysses: int, tiled: bool, checkpointed_input: bool) -> dict[str, int]:
    """Bytes per token one decoder layer keeps for its backward, by part (its input excluded when checkpointed: the
    checkpoint holds it)."""
    d = shape.hidden
    pre = rmsnorm_saved(d, a, fresh_input=not checkpointed_input) + a * d  # norm1 + its output (q/k/v input)
    if shape.qk_norm:
        pre += rmsnorm_saved(shape.head_dim * (shape.heads + shape.kv_heads), a, True, shape.heads + shape.kv_heads)
    post = rmsnorm_saved(d, a, fresh_input=True) + a * d  # norm2 (its input: the mid residual) + its output
    return {"pre_attention": pre, "attention": attention_saved(shape, a, ulysses), "post_attention": post,
            "mlp": 0 if tiled else mlp_saved(shape, a)}


def attention_transients(shape: ModelShape, setup: Setup) -> dict[str, int]:
    """Bytes per token of the ring / all-to-all / kernel buffers alive during one layer's attention forward and
    backward (ringtrain/ring/attention.py, ulysses.py), on top of what attention saves."""
    a, u = setup.dtype_bytes, setup.ulysses
    ring = setup.sp // u
    kv_heads = shape.kv_heads * kv_replicas(shape, u)
    q, o = shape.head_dim * shape.heads, shape.value_dim * shape.heads  # per token: q, and the output (MLA: Dv)
    kv = (shape.head_dim + shape.value_dim) * kv_heads  # K and V together
    if ring == 1:  # one kernel call: its output and gradients are returned as made, no fp32 copies
        fwd = 0
        bwd = a * (q + kv)  # the kernel's gradients
    else:
        # K/V in one buffer and its receive buffer; the fp32 accumulator (step 0's output adopted) and a later block's
        # output. Backward: the same K/V buffers, a block's kernel gradients, the fp32 dq / own dK, dV accumulators,
        # and the fp32 dK/dV buffers that travel (mine and send; recv too from 3 ring steps on).
        fwd = 2 * a * kv + 4 * o + a * o
        bwd = 2 * a * kv + (a + 4) * (q + kv) + 4 * kv * min(3, ring)
    if setup.device == "cuda":
        bwd += 4 * q  # FlashAttention's fp32 dq accumulator
    if u > 1:
        fwd += a * (q + kv) + a * o  # all-to-all send buffers (q/k/v, then the output)
        bwd += 2 * a * (q + kv) + 2 * a * o  # dout and dq/dk/dv send buffers and their unpacked copies
    return {"forward": fwd, "backward": bwd}


def mixer_buffers(shape: ModelShape, setup: Setup) -> int:
    """Bytes per rank of one head-parallel mixer layer beyond the layer's saved tensors (a rough estimate, hf/mixers):
    the all-to-all's send and receive buffers (N x channels each: a rank sends its N tokens of every channel group and
    receives S tokens of one) and the fp32 recurrent states of its share of the heads that the chunked kernels keep
    at every chunk boundary of 64 tokens for backward."""
    if not shape.mixer_layers:
        return 0
    a, n = setup.dtype_bytes, setup.local_tokens
    states = 4 * shape.mixer_state // setup.sp * setup.micro_batch * math.ceil(setup.seq_len / 64)
    return 2 * a * shape.mixer_channels * n + states


def mlp_tile_tokens(shape: ModelShape, setup: Setup) -> int:
    from ringtrain.model.tiled_mlp import tile_count

    n = setup.local_tokens
    return math.ceil(n / tile_count(n, setup.mlp_tile_tokens or shape.hidden))


def mlp_transients(shape: ModelShape, setup: Setup) -> dict[str, int]:
    """Bytes (per rank, not per token) of one MLP's forward and backward beyond what it saves."""
    a, n, i, d = setup.dtype_bytes, setup.local_tokens, shape.intermediate, shape.hidden
    inter = 4 if shape.gated_mlp else 2
    if not setup.tiled_mlp:
        # Backward: d(act * up) replaces act * up, then d(act) and d(up) exist while act and up are still held.
        return {"forward": 0, "backward": 2 * a * i * n}
    t = mlp_tile_tokens(shape, setup)
    acc = max(a, 4) * shape.mlp_trained  # the parameter gradients summed over tiles in fp32
    return {"forward": a * d * n + (inter - 1) * a * i * t,  # the output buffer + one tile's intermediates
            "backward": a * d * n + t * (inter * a * i + 2 * a * i + a * d) + acc + a * shape.mlp_trained}


def layer_peak(shape: ModelShape, setup: Setup, checkpointed: bool) -> dict[str, int]:
    """Bytes per rank one layer adds at its busiest moment in backward (recompute and gradients included), above
    what the stored activations already count (a checkpointed layer's input; a stored layer's saved tensors):
    {'layer': recompute and gradients, 'attention': ring / all-to-all / kernel buffers alive at that moment}."""
    a, n, d = setup.dtype_bytes, setup.local_tokens, shape.hidden
    parts = {k: v * n for k, v in layer_saved(shape, a, setup.ulysses, setup.tiled_mlp, checkpointed).items()}
    att = {k: v * n for k, v in attention_transients(shape, setup).items()}
    mlp = mlp_transients(shape, setup)
    total = sum(parts.values())
    grad_out = a * d * n  # the gradient arriving at the layer's output
    before_mlp = parts["pre_attention"] + parts["attention"] + parts["post_attention"]
    moments = [  # (bytes without attention buffers, attention buffers)
        (parts["pre_attention"], att["forward"]),  # recompute: attention running
        (before_mlp + mlp["forward"], 0),  # recompute: the MLP running
        (total + mlp["backward"] + grad_out, 0),  # MLP backward
        (parts["pre_attention"] + parts["attention"] + grad_out, att["backward"]),  # attention backward
    ]
    layer, attention = max(moments, key=sum)
    return {"layer": layer - (0 if checkpointed else total), "attention": attention}


def loss_bytes(shape: ModelShape, setup: Setup) -> dict[str, int]:
    """Bytes per rank of the fused chunked loss (ringtrain/loss.py) at the end of forward and in its backward."""
    from ringtrain.model.loss import auto_chunk_tokens

    a, n, d, v = setup.dtype_bytes, setup.local_tokens, shape.hidden, shape.vocab
    chunk = min(setup.loss_chunk or auto_chunk_tokens(v), n)
    acc = max(a, 4)
    logits = (acc + (a if a < acc else 0)) * chunk * v  # fp32 logits, and the low-precision matmul output / probs
    grad_weight = acc * v * d if shape.head_trainable else 0  # a frozen head gets no weight gradient
    grad_hidden = a * n * d
    return {"forward": logits + grad_weight + grad_hidden,
            # backward: the stored gradients, the scaled weight gradient (+ its cast) and the scaled input gradient
            "backward": 2 * grad_weight + (a * v * d if a < acc and grad_weight else 0) + 2 * grad_hidden}


def predict(shape: ModelShape, setup: Setup) -> dict[str, Any]:
    """Peak memory per rank by moment and component (bytes), FLOPs and the step-time estimate."""
    a, n, d, L = setup.dtype_bytes, setup.local_tokens, shape.hidden, shape.layers
    w = setup.world if setup.fsdp else 1
    ckpt = setup.checkpointed(L)
    params = shape.params * a / w
    optimizer = 2 * shape.trained * a / w  # AdamW's two states, for what trains only
    grads_accum = shape.trained * a if setup.grad_accum > 1 else 0  # earlier micro-batches' unsharded gradients
    root = shape.root_params * a if setup.fsdp else 0
    # A layer in backward: its all-gather output and gathered parameters, its unsharded gradients and the
    # reduce-scatter input (gradients only of what trains).
    fsdp_bwd = 2 * (shape.layer_params + shape.layer_trained) * a if setup.fsdp else 0
    lm_head_grad = a * shape.vocab * d if shape.head_trainable else 0

    n_ckpt = sum(ckpt)
    ckpt_device = (min(n_ckpt, 2) if setup.offload else n_ckpt) * a * d * n
    stored_layers = sum(sum(layer_saved(shape, a, setup.ulysses, setup.tiled_mlp, False).values()) * n
                        for c in ckpt if not c)
    rope = 2 * a * shape.head_dim * n  # cos, sin: shared by every layer
    final_norm = rmsnorm_saved(d, a, fresh_input=True) * n
    loss = loss_bytes(shape, setup)
    reference_copy = shape.params * a / w if setup.reference == "copy" else 0  # frozen, no gradient or state
    static = {"parameters": params, "optimizer": optimizer, "gradients": grads_accum, "reference_copy": reference_copy}
    acts = {"checkpointed_inputs": ckpt_device, "stored_layers": stored_layers, "other_activations": rope}

    def moment(**parts: float) -> dict[str, float]:
        out = {**static, "fsdp_buffers": root, **acts}
        for key, value in parts.items():
            out[key] = out.get(key, 0) + value
        return out

    last = layer_peak(shape, setup, ckpt[-1])
    # A layer with a mixer beside attention (Falcon-H1) holds both; counted in every layer's backward.
    mixer = {"mixer_buffers": mixer_buffers(shape, setup)} if shape.mixer_layers else {}
    first = layer_peak(shape, setup, ckpt[0])
    # Layer gradients accumulated when the first layer's backward runs: sharded (or replicated without FSDP).
    grads_before_first = (L - 1) * shape.layer_trained * a / w + (lm_head_grad if not setup.fsdp else 0)
    first_acts = {"checkpointed_inputs": (a * d * n if ckpt[0] else 0) - ckpt_device,
                  "stored_layers": (0 if ckpt[0] else sum(layer_saved(shape, a, setup.ulysses, setup.tiled_mlp,
                                                                      False).values()) * n) - stored_layers}
    moments = {
        "loss forward": moment(other_activations=final_norm + a * d * n, loss=loss["forward"]),
        "loss backward": moment(other_activations=final_norm, loss=loss["backward"]),
        "backward, last layer": moment(fsdp_buffers=fsdp_bwd + lm_head_grad, layer_recompute=last["layer"],
                                       attention_buffers=last["attention"], **mixer),
        "backward, first layer": moment(fsdp_buffers=fsdp_bwd + (lm_head_grad if setup.fsdp else 0),
                                        layer_recompute=first["layer"], attention_buffers=first["attention"],
                                        **mixer,
                                        gradients=grads_before_first, **first_acts),
        "optimizer step": {"parameters": params, "gradients": shape.trained * a / w, "optimizer": optimizer,
                           "optimizer_step_temp": shape.trained * a / w, "reference_copy": reference_copy},
    }
    totals = {k: sum(v.values()) for k, v in moments.items()}
    peak_moment = max(totals, key=totals.get)

    tokens_per_step = setup.micro_batch * setup.seq_len * setup.dp * setup.grad_accum
    model_per_token = flops_per_token(shape.params, L, d, setup.seq_len)
    recompute_per_token = n_ckpt * (2 * shape.layer_params + 2 * setup.seq_len * d)
    tiled_per_token = 2 * L * shape.mlp_params if setup.tiled_mlp else 0
    # Frozen decoder weights get no weight-gradient matmul in backward (2 FLOPs per weight and token fewer).
    frozen_per_token = -2 * L * (shape.layer_params - shape.layer_trained)
    # Preference objectives: the log-probability pass recomputes each chunk's logits in backward; DPO's reference
    # runs one more forward (a third of a training step's model FLOPs).
    preference_per_token = 2 * shape.vocab * d if setup.objective != "sft" else 0
    reference_per_token = model_per_token / 3 if setup.reference != "none" else 0
    return {
        "peak_bytes": totals[peak_moment], "peak_moment": peak_moment, "components": moments[peak_moment],
        "moments": totals, "offload_host_bytes": n_ckpt * a * d * n * setup.offload,
        "flops_per_step": model_per_token * tokens_per_step,
        "hardware_flops_per_step": (model_per_token + recompute_per_token + tiled_per_token + frozen_per_token
                                    + preference_per_token + reference_per_token) * tokens_per_step,
        "offload_bytes_per_step": 2 * n_ckpt * a * d * n * setup.grad_accum * setup.offload,
    }


def step_time_s(prediction: dict[str, Any], setup: Setup, peak_tflops: float | None) -> float | None:
    """Seconds per step: hardware FLOPs at HARDWARE_EFFICIENCY of the peak on every rank; offload copies overlap
    compute, so a step takes at least their time at HOST_LINK_GBPS. None without a peak (CPU)."""
    if not peak_tflops:
        return None
    compute = prediction["hardware_flops_per_step"] / setup.world / (peak_tflops * 1e12 * HARDWARE_EFFICIENCY)
    return max(compute, prediction["offload_bytes_per_step"] / (HOST_LINK_GBPS * 1e9))


# ---------------------------------------------------------------------------------------------------------------
# Search: the smallest sp_size that fits, and the cheapest way to fit there.


def candidate_setups(shape: ModelShape, base: Setup, gpus: int) -> list[Setup]:
    """Every (sp, ulysses, recompute, tiling, offload) on `gpus` ranks that the model's heads (the hybrid mixers'
    included) and the sequence length allow, sp ascending."""
    from ringtrain.hf.mixers.base import unit_fits
    from ringtrain.ring.layout import required_multiple
    from ringtrain.ring.ulysses import ulysses_head_problems

    out = []
    sizes = [s for s in range(1, gpus + 1)
             if gpus % s == 0 and all(unit_fits(n, rep, s) for n, rep in shape.mixer_units)]
    for sp in sizes:
        for u in (u for u in range(1, sp + 1) if sp % u == 0):
            if ulysses_head_problems(shape.heads, shape.kv_heads, u):
                continue
            if base.seq_len % required_multiple(sp // u, base.layout, u):
                continue
            for recompute in RECOMPUTE_CHOICES:
                if recompute.startswith("every:") and int(recompute[6:]) >= shape.layers:
                    continue
                for tiled in (False, True):
                    for offload in ((False,) if recompute == "none" else (False, True)):
                        out.append(replace(base, world=gpus, sp=sp, ulysses=u, recompute=recompute,
                                           tiled_mlp=tiled, offload=offload))
    return out


def _cost(shape: ModelShape, setup: Setup, pred: dict[str, Any], gpus_per_node: int) -> tuple:
    """Cheapest first: step time, then fewer features; the Ulysses degree only breaks ties (larger inside a node:
    one kernel call over the ring shard instead of blocks and merges, docs/ring_attention.md)."""
    seconds = step_time_s(pred, setup, DEFAULT_PEAK_TFLOPS)
    inside_node = setup.ulysses <= gpus_per_node
    return (round(seconds, 6), setup.tiled_mlp + setup.offload, not inside_node, -setup.ulysses)


def search(shape: ModelShape, base: Setup, gpus: int, budget_bytes: float,
           host_budget_bytes: float = math.inf) -> dict[str, Any]:
    """The smallest sp_size with a setup whose peak fits `budget_bytes` (and whose offloaded inputs fit
    `host_budget_bytes` of pinned host memory per rank), and its cheapest such setup; else the lowest peak."""
    scored = [(s, predict(shape, s)) for s in candidate_setups(shape, base, gpus)]
    scored = [(s, p) for s, p in scored if p["offload_host_bytes"] <= host_budget_bytes]
    if not scored:
        return {"fits": False, "best": None, "lowest": None}
    fitting = [(s, p) for s, p in scored if p["peak_bytes"] <= budget_bytes]
    if not fitting:
        lowest = min(scored, key=lambda sp: sp[1]["peak_bytes"])
        return {"fits": False, "best": None, "lowest": lowest}
    sp_min = min(s.sp for s, _ in fitting)
    here = [(s, p) for s, p in fitting if s.sp == sp_min]
    best = min(here, key=lambda sp: _cost(shape, sp[0], sp[1], min(gpus, 8)))
    return {"fits": True, "best": best, "lowest": None}


# ---------------------------------------------------------------------------------------------------------------
# The command.


def _positive(value: str | None, name: str, kind: type, problems: list[str]) -> Any:
    if value is None:
        return None
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or number <= 0:
        problems.append(f"{name}={value!r} must be a positive {'integer' if kind is int else 'number'}")
        return None
    return number


def plan(cfg: Any, gpus: str | None = None, gpu_memory_gib: str | None = None, device: str = "cuda",
         as_json: bool = False, headroom: float = DEFAULT_HEADROOM,
         host_memory_gib: str | None = None) -> tuple[str, int]:
    """`ringtrain plan`: (text to print, exit code). Bad arguments raise ConfigError (one line each, exit 2)."""
    problems: list[str] = []
    if device not in ("cuda", "cpu"):
        problems.append(f"--device={device!r} is not one of cuda, cpu")
    n_gpus = _positive(gpus, "--gpus", int, problems)
    memory = _positive(gpu_memory_gib, "--gpu-memory-gib", float, problems)
    host_memory = _positive(host_memory_gib, "--host-memory-gib", float, problems)
    world = n_gpus or cfg.parallel.sp_size * max(cfg.parallel.dp_size, 1)
    if not problems and world % cfg.parallel.sp_size:
        problems.append(f"--gpus={world} is not a multiple of parallel.sp_size={cfg.parallel.sp_size}: choose "
                        f"--gpus among multiples of {cfg.parallel.sp_size}, or set parallel.sp_size")
    if problems:
        raise ConfigError(problems)
    shape = model_shape(cfg.model, cfg.peft)
    setup = setup_from_config(cfg, world, device)
    peak_tflops = (cfg.logging.peak_tflops or DEFAULT_PEAK_TFLOPS) if device == "cuda" else None
    pred = predict(shape, setup)
    result: dict[str, Any] = {
        "model": shape.name, "device": device, "gpus": world, "setup": asdict(setup),
        "peak_memory_gib_per_rank": pred["peak_bytes"] / GIB, "peak_moment": pred["peak_moment"],
        "components_gib": {k: v / GIB for k, v in pred["components"].items()},
        "moments_gib": {k: v / GIB for k, v in pred["moments"].items()},
        "offload_host_gib_per_rank": pred["offload_host_bytes"] / GIB,
        "flops_per_step": pred["flops_per_step"], "hardware_flops_per_step": pred["hardware_flops_per_step"],
        "step_time_s": step_time_s(pred, setup, peak_tflops), "parameters": shape.params,
        "trainable_parameters": shape.trained,
    }
    rc = 0
    if memory is not None:
        budget = memory * (1 - headroom) * GIB
        found = search(shape, setup, world, budget, math.inf if host_memory is None else host_memory * GIB)
        result["gpu_memory_gib"], result["headroom"] = memory, headroom
        result["config_fits"] = pred["peak_bytes"] <= budget
        result["fits"] = found["fits"]
        if found["fits"]:
            best, best_pred = found["best"]
            result["recommended"] = {"setup": asdict(best), "overrides": best.overrides(),
                                     "peak_memory_gib_per_rank": best_pred["peak_bytes"] / GIB,
                                     "offload_host_gib_per_rank": best_pred["offload_host_bytes"] / GIB,
                                     "step_time_s": step_time_s(best_pred, best, peak_tflops)}
        else:
            rc = 1
            if found["lowest"] is not None:
                low, low_pred = found["lowest"]
                result["lowest"] = {"setup": asdict(low), "peak_memory_gib_per_rank": low_pred["peak_bytes"] / GIB}
    if as_json:
        return json.dumps(result, indent=1) + "\n", rc
    return format_plan(result, setup), rc


def format_plan(result: dict[str, Any], setup: Setup) -> str:
    trainable = "" if result["trainable_parameters"] == result["parameters"] else \
        f", {result['trainable_parameters'] / 1e6:.1f}M of them training"
    lines = [f"{result['model']} ({result['parameters'] / 1e9:.2f}B parameters{trainable}) on {result['gpus']} "
             f"{result['device']} rank(s): {setup.describe()}; {setup.seq_len:,} tokens x {setup.micro_batch} per "
             f"micro-batch ({setup.local_tokens:,} per rank), {setup.dtype_bytes}-byte parameters",
             f"predicted peak per rank: {result['peak_memory_gib_per_rank']:.2f} GiB, at the {result['peak_moment']}",
             *([f"objective {setup.objective}" + {"none": "", "adapters": ": reference = the base model with the adapters "
                "disabled (one more forward per step, no copy)", "copy": ": reference = a frozen copy of the model "
                "(sharded like it, one more forward per step)"}[setup.reference]] if setup.objective != "sft" else []),
             "", "| component | GiB/rank |", "|---|---|"]
    lines += [f"| {k.replace('_', ' ')} | {v:.2f} |" for k, v in result["components_gib"].items() if v]
    lines += ["", "| moment | GiB/rank |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["moments_gib"].items()]
    if result["offload_host_gib_per_rank"]:
        lines.append(f"\npinned host memory for offloaded inputs: {result['offload_host_gib_per_rank']:.2f} GiB/rank")
    seconds = result["step_time_s"]
    lines.append(f"\nmodel FLOPs per step: {result['flops_per_step']:.3e} (with recompute: "
                 f"{result['hardware_flops_per_step']:.3e}); estimated step time: "
                 + (f"{seconds:.2f} s (at {HARDWARE_EFFICIENCY:.0%} of {DEFAULT_PEAK_TFLOPS:g} TFLOP/s per GPU)"
                    if seconds is not None else "n/a on CPU"))
    if "fits" in result:
        budget = result["gpu_memory_gib"] * (1 - result["headroom"])
        lines.append(f"\nbudget: {budget:.1f} GiB per rank ({result['gpu_memory_gib']:g} GiB less "
                     f"{result['headroom']:.0%} for the CUDA context, NCCL, fragmentation and the planner's error); "
                     f"this config {'fits' if result['config_fits'] else 'does not fit'}")
        if result["fits"]:
            rec = result["recommended"]
            best = Setup(**rec["setup"])
            lines.append(f"smallest sp_size that fits: {best.describe()}: {rec['peak_memory_gib_per_rank']:.2f} GiB"
                         + (f", ~{rec['step_time_s']:.1f} s/step" if rec["step_time_s"] is not None else "")
                         + (f", {rec['offload_host_gib_per_rank']:.1f} GiB of pinned host memory per rank"
                            if rec["offload_host_gib_per_rank"] else ""))
            lines.append("  overrides: " + " ".join(rec["overrides"]))
        else:
            low = result.get("lowest")
            lines.append("nothing fits on these GPUs" + (
                f": the lowest peak is {low['peak_memory_gib_per_rank']:.2f} GiB ({Setup(**low['setup']).describe()})"
                if low else " (no sp_size allowed by the model's heads and the sequence length)"))
    return "\n".join(lines) + "\n"
