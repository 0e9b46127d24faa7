"""The `model:` section. Whether transformers knows the model is checked by `ringtrain.validate`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# 'auto' is resolved by `ringtrain.model.causal_lm.resolve_dtype` (the one place that knows the device's preference).
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")

@dataclass
class ModelConfig:
    """Which model to train and in what precision."""

    path: str | None = None
    """A local model folder (safetensors: each rank reads only its shards) or a hub name (rank 0 loads it with
    `from_pretrained` and hands out the shards); unset to build from `arch` + `config`."""
    arch: str | None = None
    """A transformers model type (llama, mistral, qwen2, qwen3, ...) to build with random weights."""
    config: dict[str, Any] = field(default_factory=dict)
    """Overrides for the transformers config (hidden_size, num_hidden_layers, vocab_size, ...)."""
    dtype: str = "auto"
    """Parameter dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16 or float16."""
    adapter: str | None = None
    """A peft adapter folder (what a run with peft.method=lora exports to final_model/) applied on top of model.path
    by `ringtrain eval`; it must have been trained on that same base model."""
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
        if self.dtype not in DTYPE_NAMES:
            problems.append(("dtype", f"dtype={self.dtype!r} is not one of {', '.join(DTYPE_NAMES)}"))
        return problems
