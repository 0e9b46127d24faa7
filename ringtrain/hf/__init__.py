"""Hugging Face integration: ring attention for transformers causal LMs, sequence sharding of batches, RoPE scaling."""

from ringtrain.hf.rope import (
    RopeConfig,
    apply_rope_scaling,
    check_rotary_precision,
    describe_rope,
    format_rope_report,
    rope_report,
)

__all__ = [
    "RopeConfig",
    "apply_rope_scaling",
    "check_rotary_precision",
    "describe_rope",
    "format_rope_report",
    "rope_report",
]
