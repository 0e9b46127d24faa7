"""Model construction: a transformers causal LM from a local folder, a hub name, or a config (tiny test models)."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import importlib
import inspect
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ringtrain.config import ModelConfig
from ringtrain.log import get_logger
from ringtrain.model.loss import chunked_cross_entropy_sum, chunked_token_logprobs
from ringtrain.model.moe import BalancingLoss, RouterStats, balancing_loss

if TYPE_CHECKING:
    from ringtrain.config import TrainConfig

logger = get_logger(__name__)

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """model.dtype as a torch dtype; the one owner of 'auto': bf16 on accelerators (the usual training precision),
    fp32 on CPU (no fast bf16 matmul)."""
    dtype = DTYPES[name]
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return dtype


def model_config_and_ignored(cfg: ModelConfig) -> tuple[Any, list[str]]:
    """The transformers config with `model.config` overrides applied, and the override keys it does not use.

    transformers accepts any key: from a folder it silently drops the keys its config class lacks, for a model type it
    stores them as attributes nothing reads. Either way such a key is a typo or a misplaced setting."""
    from transformers import AutoConfig

    if cfg.path is not None:
        config, unused = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code,
                                                    return_unused_kwargs=True, **cfg.config)
        return config, sorted(unused)
    config = AutoConfig.for_model(causal_lm_arch(cfg.arch), **cfg.config)
    fields, aliases = config_class_keys(type(config))
    # Legacy keys transformers converts (rope_theta, rope_scaling, torch_dtype) are consumed, not stored as extras.
    # An alias's target (Qwen3-MoE stores num_experts as num_local_experts) and a key the modeling code reads with
    # getattr (head_dim in Qwen3-MoE and DeepSeek V3) are used even though the config class does not declare them.
    ignored = [k for k in cfg.config if fields and k in vars(config) and k not in fields and k not in aliases
               and k not in aliases.values() and not isinstance(getattr(type(config), k, None), property)
               and not _read_by_modeling_code(type(config), k)]
    _drop_special_tokens_outside_vocab(config, cfg.config)
    return config, ignored


def causal_lm_arch(arch: str) -> str:
    """The model type a causal LM of `arch` is built from: a multimodal type whose text model is a causal LM of its own
    (gemma3 -> gemma3_text) trains that text model; anything else is itself."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if arch not in CONFIG_MAPPING:
        return arch
    text = (getattr(CONFIG_MAPPING[arch], "sub_configs", None) or {}).get("text_config")
    text_type = getattr(text, "model_type", None)
    if text_type and text_type != arch and text_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        logger.info("model.arch=%r is multimodal: building its text model %r", arch, text_type)
        return text_type
    return arch


@functools.cache
def _read_by_modeling_code(config_cls: type, key: str) -> bool:
    """Whether the modeling module next to `config_cls` reads `config.<key>` (directly or with getattr)."""
    name = config_cls.__module__.replace(".configuration_", ".modeling_")
    try:
        source = inspect.getsource(importlib.import_module(name))
    except (ImportError, OSError, TypeError):
        return False
    return re.search(rf"config\.{re.escape(key)}\b|getattr\(\s*(?:self\.)?config\s*,\s*[\"']{re.escape(key)}[\"']",
                     source) is not None


def _drop_special_tokens_outside_vocab(config: Any, overrides: dict) -> None:
    """A random init with a small vocabulary keeps its type's default special-token ids (Phi-3: 32000, OLMo 3: 50279),
    which the embedding rejects as padding_idx; ids the user did not set that fall outside the vocabulary are unset."""
    vocab = getattr(config, "vocab_size", None)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, key, None)
        ids = value if isinstance(value, list) else [value]
        if key not in overrides and isinstance(vocab, int) and any(isinstance(i, int) and i >= vocab for i in ids):
            logger.info("model.config.%s=%s is outside the vocabulary (%d): unset", key, value, vocab)
            setattr(config, key, None)


def config_class_keys(cls: type) -> tuple[dict[str, Any], dict[str, str]]:
    """(dataclass fields, attribute_map aliases) of a transformers config class; no fields for an old-style class."""
    fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
    return fields, dict(getattr(cls, "attribute_map", None) or {})


def build_model_config(cfg: ModelConfig) -> Any:
    """The transformers config for `cfg`, with overrides applied (RoPE scaling is applied by the caller)."""
    return model_config_and_ignored(cfg)[0]


def build_meta_model(cfg: ModelConfig, model_config: Any, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `model_config` on the meta device: every name and shape, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)


def build_causal_lm(cfg: TrainConfig, device: torch.device,
                    parallelize: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
    """The run's model, built the one way train and eval share; returns `parallelize(lm)`, or `lm` without it.

    The transformers config gets the `model.config` overrides and RoPE scaling (before the model exists: rotary
    buffers are built from it); the model is built on the meta device and `parallelize` (attention, recompute, FSDP2)
    applied there, so that each rank then allocates only its shards and fills them from model.path, or with a random
    init that is the same whatever the world size (seeded with train.seed). No rank ever holds the whole model,
    except rank 0 when model.path cannot be read shard by shard (see `ringtrain.model.weights`).
    """
    from ringtrain.hf.rope import apply_rope_scaling
    from ringtrain.model.adapters import apply_adapters, init_adapters
    from ringtrain.model.weights import is_adapted, load_weights
    from ringtrain.parallel.distributed import seed_everything

    # Every rank draws the same initial weights: FSDP keeps each rank's shard of what it initialised.
    seed_everything(cfg.train.seed)
    model_config = build_model_config(cfg.model)
    apply_rope_scaling(model_config, cfg.rope)
    dtype = resolve_dtype(cfg.model.dtype, device)
    lm = build_meta_model(cfg.model, model_config, dtype)
    template = copy.deepcopy(lm)  # unparallelised: the random init and non-persistent buffers are computed on it
    model = lm if parallelize is None else parallelize(lm)
    if is_adapted(lm):  # `parallelize` applied cfg.peft: the template gets the same names, and peft's init runs on it
        apply_adapters(template, cfg.peft)
    model.to_empty(device=device)
    # nn.Module.to_empty gives each module its own new tensor, untying lm_head from the embedding; FSDP2 keeps shared
    # parameters shared. transformers' public re-tie makes both cases tied again (a no-op under FSDP2).
    lm.tie_weights()

    def from_pretrained() -> nn.Module:  # the rank-0 fallback for folders that cannot be read shard by shard
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(cfg.model.path, config=template.config, dtype=dtype,
                                                    trust_remote_code=cfg.model.trust_remote_code)

    loader = load_weights(lm, template, cfg.model.path, device, from_pretrained)
    if is_adapted(lm):  # after the base weights, which are then the same as without adapters
        init_adapters(lm, template, device)
    n_params = sum(p.numel() for p in lm.parameters())  # a sharded DTensor counts its full size
    logger.info("model %s: %.2fM parameters, %s, %s", cfg.model.path or cfg.model.arch, n_params / 1e6, dtype, loader)
    return model


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The transformer blocks, found through HF's public `_no_split_modules` (what accelerate wraps too); also after
    FSDP2, which renames a unit's class to FSDP<Name> (the original class stays in its MRO)."""
    names = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not layers:
        raise ValueError(f"{type(lm).__name__} declares no _no_split_modules: cannot find its decoder layers")
    return layers


class CausalLMWithChunkedLoss(nn.Module):
    """The HF model, untouched, plus the chunked loss: forward returns the *sum* of token losses.

    Owning the loss in one module lets FSDP's root unit gather the embedding, final norm and
    lm_head once per step, while the decoder runs with no [tokens, vocab] logits ever built.
    """

    def __init__(self, lm: nn.Module, chunk_tokens: int):
        super().__init__()
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        self.forward_context: contextlib.AbstractContextManager | None = None
        """Entered around each forward when set (the model builder puts the activation offload here)."""
        # The model's own logit transforms, as its ForCausalLM.forward applies them: Cohere's logit_scale (on the
        # hidden states: (s h) W^T = s (h W^T)), then Gemma 2's c * tanh(logits / c) inside the chunked loss.
        self.logit_scale = getattr(lm.config, "logit_scale", None)
        self.logit_softcap = getattr(lm.config, "final_logit_softcapping", None)
        self.balancing: BalancingLoss | None = balancing_loss(lm.config)
        """The router's load-balancing loss of an MoE model (`ringtrain.model.moe`); the trainer adds it."""
        self.router_stats: RouterStats | None = None
        """This rank's router statistics from the last forward (with `balancing`)."""

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                token_weights: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                response_ids: torch.Tensor | None = None, num_responses: int = 0) -> torch.Tensor:
        """The summed (weighted) token loss of these tokens; with `response_ids` ([B, S_local], aligned with the
        labels: the response each label belongs to, -1 for none) instead the [num_responses] sums of the labels'
        log-probabilities per response over these tokens (fp32 at least), for a preference loss."""
        # document_ids reach the ring attention function through transformers' public **kwargs path.
        extra = {} if document_ids is None else {"document_ids": document_ids}
        if self.balancing is not None:
            extra["output_router_logits"] = True  # transformers' public switch: the decoder returns them
        with self.forward_context or contextlib.nullcontext():
            out = self.lm.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra)
        hidden = out[0]
        if self.balancing is not None:
            self.router_stats = self.balancing.stats(out.router_logits)
            if torch.is_grad_enabled() and not self.router_stats.probs.requires_grad:
                raise ValueError(
                    f"{type(self.lm).__name__}: the router logits carry no gradient (train.tiled_mlp recomputes each MoE "
                    "block per tile), so the balancing loss would not train the router: set train.tiled_mlp=false, "
                    "or model.config.router_aux_loss_coef=0.0 to train without the balancing loss")
        if self.logit_scale not in (None, 1.0):
            hidden = hidden * self.logit_scale
        weight = self.lm.get_output_embeddings().weight
        if response_ids is not None:
            logps = chunked_token_logprobs(hidden, weight, labels, chunk_tokens=self.chunk_tokens,
                                           softcap=self.logit_softcap)  # [N], 0 where no label
            sums = logps.new_zeros(num_responses)
            return sums.index_add(0, response_ids.reshape(-1).clamp(min=0), logps)
        return chunked_cross_entropy_sum(hidden, weight, labels, chunk_tokens=self.chunk_tokens,
                                         token_weights=token_weights, softcap=self.logit_softcap)
