"""FLOP accounting, the two sides of MFU: what training a model costs per token, and what a device can do.

The trainer's MFU metric, `ringtrain plan`'s step-time estimate and the benchmarks' TFLOP/s all count with these
functions, so a figure in one is comparable with the others.
"""

from __future__ import annotations

from typing import Any

# Dense bf16 peak (no sparsity) from the vendors' datasheets, matched against torch.cuda.get_device_name.
DEVICE_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}
# What `ringtrain plan` assumes when it is told no peak: the H100 / H200 class it is usually asked about.
DEFAULT_PEAK_TFLOPS = DEVICE_PEAK_TFLOPS["H100"]


def device_peak_tflops(device_name: str | None) -> float | None:
    """A known GPU's dense bf16 peak TFLOP/s from its name; None for other devices and CPU (no MFU then)."""
    for key, value in DEVICE_PEAK_TFLOPS.items():
        if device_name and key in device_name:
            return value
    return None


def attention_flops_per_token(layers: int, hidden: int, seq_len: int) -> float:
    """Causal attention's training FLOPs per token: Q K^T and P V are 4 x seq_len x hidden per layer forward, three
    times that with backward, half of it under the causal mask: 6 x layers x seq_len x hidden."""
    return 6.0 * layers * seq_len * hidden


def flops_per_token(params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Model training FLOPs per token (no recomputation): 6 x parameters (every weight's multiply-add, forward and
    backward) plus causal attention. Embeddings count as parameters: one convention for every MFU figure."""
    return 6.0 * params + attention_flops_per_token(layers, hidden, seq_len)


def model_flops_per_token(lm: Any, seq_len: int) -> float:
    """`flops_per_token` of a transformers causal LM; a sharded (DTensor) or meta-device parameter counts its full
    size, so every rank and the planner agree."""
    cfg = lm.config
    n_params = sum(p.numel() for p in lm.parameters())
    return flops_per_token(n_params, getattr(cfg, "num_hidden_layers", 0), getattr(cfg, "hidden_size", 0), seq_len)
