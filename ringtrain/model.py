"""Model construction: a transformers causal LM from a local folder, a hub name, or a config (tiny test models)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

import torch

from ringtrain.log import get_logger

logger = get_logger(__name__)

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Which model to train and in what precision."""

    path: str | None = None
    """A local model folder or a hub name for `from_pretrained`; unset to build from `arch` + `config`."""
    arch: str | None = None
    """A transformers model type (llama, mistral, qwen2, qwen3, ...) to build with random weights."""
    config: dict[str, Any] = field(default_factory=dict)
    """Overrides for the transformers config (hidden_size, num_hidden_layers, vocab_size, ...)."""
    dtype: str = "auto"
    """Parameter dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Allow model code from the hub. Such models must still route attention through AttentionInterface."""

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.path is None and self.arch is None:
            problems.append(("path", "path is missing: set model.path (a model folder or hub name) "
                                     "or model.arch (e.g. llama) to build from model.config"))
        if self.path is not None and self.arch is not None:
            problems.append(("arch", f"arch={self.arch!r} conflicts with model.path={self.path!r}: "
                                     "set only one (path loads weights, arch builds a random model)"))
        if self.arch is not None:
            from transformers import CONFIG_MAPPING

            if self.arch not in CONFIG_MAPPING:
                close = difflib.get_close_matches(self.arch, list(CONFIG_MAPPING.keys()), n=1)
                hint = f"did you mean {close[0]!r}?" if close else "use a transformers model type such as 'llama'"
                problems.append(("arch", f"arch={self.arch!r} is not a transformers model type: {hint}"))
        if self.dtype not in DTYPES:
            problems.append(("dtype", f"dtype={self.dtype!r} is not one of {', '.join(DTYPES)}"))
        return problems


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on accelerators (the usual training precision) and fp32 on CPU (no fast bf16 matmul)."""
    dtype = DTYPES[name]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return dtype


def build_model_config(cfg: ModelConfig) -> Any:
    """The transformers config for `cfg`, with overrides applied (RoPE scaling is applied by the caller)."""
    from transformers import AutoConfig

    if cfg.path is not None:
        return AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code, **cfg.config)
    return AutoConfig.for_model(cfg.arch, **cfg.config)


def build_model(cfg: ModelConfig, model_config: Any, device: torch.device) -> torch.nn.Module:
    """Instantiate the causal LM on `device` in the resolved dtype; identical weights on every rank."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.path is not None:
        model = AutoModelForCausalLM.from_pretrained(
            cfg.path, config=model_config, dtype=dtype, trust_remote_code=cfg.trust_remote_code
        )
    else:
        # Random init draws from the torch RNG of `device`, which every rank seeded identically. Initialising
        # there, not on the host, matters on GPUs: a 1.1B model took 35-60 s on the host of an H200 (benchmarks.md).
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model %s: %.2fM parameters, %s", cfg.path or cfg.arch, n_params / 1e6, dtype)
    return model.to(device)
