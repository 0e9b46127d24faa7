"""Hugging Face integration: ring attention for transformers causal LMs, sequence sharding of batches, RoPE scaling."""

from ringtrain.hf.attention import apply_ring_attention, remove_ring_attention
from ringtrain.hf.batch import IGNORE_INDEX, check_right_padding, shard_batch, token_loss_sum
from ringtrain.hf.rope import apply_rope_scaling, check_rotary_precision, describe_rope, format_rope_report, rope_report

__all__ = [
    "IGNORE_INDEX",
    "apply_ring_attention",
    "apply_rope_scaling",
    "check_right_padding",
    "check_rotary_precision",
    "describe_rope",
    "format_rope_report",
    "remove_ring_attention",
    "rope_report",
    "shard_batch",
    "token_loss_sum",
]
