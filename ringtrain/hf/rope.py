"""RoPE scaling for context extension: a typed `rope` config section, written into transformers' `rope_parameters`.

Only the public config contract of transformers 5.x is used (`config.rope_parameters`, `max_position_embeddings`,
`validate_rope()`, `ROPE_INIT_FUNCTIONS`), so a model saved after `apply_rope_scaling` reloads with plain
`from_pretrained` and the same frequencies. The rotary forward itself is left to transformers: in 5.24 it already
multiplies positions and inverse frequencies in fp32 and casts cos/sin to the activation dtype only at the end;
`check_rotary_precision` catches the one way to break that (casting the whole model, buffers included, to bf16).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from ringtrain.config.rope import LLAMA3_HIGH_FREQ_FACTOR, LLAMA3_LOW_FREQ_FACTOR, RopeConfig
from ringtrain.log import get_logger

logger = get_logger(__name__)

# ringtrain method -> transformers `rope_type`. "theta" (ABF) is plain RoPE with a larger base.
_HF_ROPE_TYPE = {
    "none": "default", "linear": "linear", "dynamic": "dynamic", "yarn": "yarn",
    "llama3": "llama3", "longrope": "longrope", "theta": "default",
}

def _raise_problems(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise ValueError("invalid rope config:\n" + "\n".join(f"rope.{key}: {msg}" for key, msg in problems))


def _rotary_dim(model_config: Any, params: dict) -> int:
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


def _current_params(model_config: Any) -> dict:
    params = getattr(model_config, "rope_parameters", None)
    if not isinstance(params, dict) or not params:
        raise ValueError(
            f"{type(model_config).__name__} has no rope_parameters: RoPE scaling applies to RoPE models "
            "(Llama, Mistral, Qwen2, Qwen3, ...) only; set rope.method=none for this model"
        )
    if "rope_type" not in params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(
            f"{type(model_config).__name__} has per-layer-type rope_parameters ({', '.join(params)}): "
            "ringtrain's RoPE scaling writes one global setting; set rope.method=none and edit the config by hand"
        )
    return params


def pretraining_length(model_config: Any) -> int:
    """The context length the unscaled frequencies were trained at, read back from a possibly scaled config.

    Needed so that applying the same `RopeConfig` to a saved (already scaled) config is idempotent.
    """
    params = _current_params(model_config)
    rope_type = params.get("rope_type", "default")
    if params.get("original_max_position_embeddings"):
        return int(params["original_max_position_embeddings"])
    if rope_type == "linear" and params.get("factor"):
        # apply_rope_scaling stored max_position_embeddings = original * factor for linear.
        return round(model_config.max_position_embeddings / params["factor"])
    return int(model_config.max_position_embeddings)


def _keeps_model_rope(rope_cfg: RopeConfig) -> bool:
    return rope_cfg.method == "none" and rope_cfg.rope_theta is None


def resolve_rope_parameters(model_config: Any, rope_cfg: RopeConfig) -> tuple[dict, int]:
    """(`rope_parameters`, `max_position_embeddings`) that `apply_rope_scaling` would write; nothing is modified."""
    _raise_problems(rope_cfg._validate())
    if _keeps_model_rope(rope_cfg):
        # Checked before the model's parameters are read: they may be per layer type (Gemma 3, OLMo 3) or absent
        # (Mamba hybrids), which is fine when nothing is rewritten.
        return (dict(getattr(model_config, "rope_parameters", None) or {}),
                int(getattr(model_config, "max_position_embeddings", 0) or 0))
    current = _current_params(model_config)
    keep = {k: current[k] for k in ("partial_rotary_factor",) if k in current}
    theta = float(rope_cfg.rope_theta or current.get("rope_theta") or getattr(model_config, "default_theta", 1e4))
    if rope_cfg.method == "none":
        if rope_cfg.rope_theta is None:
            return dict(current), int(model_config.max_position_embeddings)
        return {**current, "rope_theta": theta}, int(model_config.max_position_embeddings)

    original = int(rope_cfg.original_max_position_embeddings or pretraining_length(model_config))
    factor = rope_cfg.factor if rope_cfg.factor is not None else (
        rope_cfg.target_length / original if rope_cfg.target_length is not None else 1.0
    )
    if factor < 1:
        raise ValueError(
            f"rope.target_length={rope_cfg.target_length} is shorter than the pretraining length {original}, "
            f"so factor={factor:.4g} < 1: RoPE scaling only extends; use rope.method=none for shorter sequences"
        )
    target = rope_cfg.target_length or round(original * factor)
    if current.get("rope_type", "default") != "default":
        logger.info("replacing the model's %s RoPE scaling with %s", current["rope_type"], rope_cfg.method)

    params: dict[str, Any] = {"rope_type": _HF_ROPE_TYPE[rope_cfg.method], "rope_theta": theta, **keep}
    max_positions = target
    if rope_cfg.method == "theta":
        if rope_cfg.rope_theta is None:
            # NTK-aware base (bloc97): keeps the lowest frequency's period covering the longer context.
            dim = _rotary_dim(model_config, current)
            params["rope_theta"] = float(theta * factor ** (dim / (dim - 2)))
    elif rope_cfg.method == "linear":
        params["factor"] = float(factor)
    elif rope_cfg.method == "dynamic":
        params["factor"] = float(factor)
        # transformers' dynamic NTK reads max_position_embeddings as the *original* length (the point where the
        # base starts to grow), so it must not be raised to the target.
        max_positions = original
    elif rope_cfg.method == "yarn":
        params.update(factor=float(factor), original_max_position_embeddings=original)
        for name in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"):
            if getattr(rope_cfg, name) is not None:
                params[name] = getattr(rope_cfg, name)
    elif rope_cfg.method == "llama3":
        params.update(
            factor=float(factor), original_max_position_embeddings=original,
            low_freq_factor=float(LLAMA3_LOW_FREQ_FACTOR if rope_cfg.low_freq_factor is None
                                  else rope_cfg.low_freq_factor),
            high_freq_factor=float(LLAMA3_HIGH_FREQ_FACTOR if rope_cfg.high_freq_factor is None
                                   else rope_cfg.high_freq_factor),
        )
    elif rope_cfg.method == "longrope":
        half = _rotary_dim(model_config, current) // 2
        for name in ("short_factor", "long_factor"):
            if len(getattr(rope_cfg, name)) != half:
                raise ValueError(
                    f"rope.{name} has {len(getattr(rope_cfg, name))} values but this model's rotary dimension "
                    f"needs {half} (head_dim / 2): use the factors searched for this model"
                )
        params.update(factor=float(factor), original_max_position_embeddings=original,
                      short_factor=[float(x) for x in rope_cfg.short_factor],
                      long_factor=[float(x) for x in rope_cfg.long_factor])
        if rope_cfg.attention_factor is not None:
            params["attention_factor"] = float(rope_cfg.attention_factor)
    return params, int(max_positions)


def apply_rope_scaling(model_config: Any, rope_cfg: RopeConfig) -> None:
    """Write `rope_cfg` into a transformers config's `rope_parameters` (and `max_position_embeddings`).

    Call it on the config *before* the model is built (`from_pretrained(path, config=model_config)` or
    `from_config`): the rotary embedding computes its frequencies at construction. The result is plain
    transformers configuration, so `save_pretrained` / `from_pretrained` round-trip it without ringtrain.
    """
    params, max_positions = resolve_rope_parameters(model_config, rope_cfg)
    if _keeps_model_rope(rope_cfg):
        return  # rope.method=none: the model's RoPE (or its absence) exactly as it is
    model_config.rope_parameters = params
    model_config.max_position_embeddings = max_positions
    # transformers' own checks (missing keys raise; odd values warn) on exactly what was written.
    model_config.validate_rope()
    logger.info("rope: %s, max_position_embeddings=%d", params, max_positions)


def check_rotary_precision(model: torch.nn.Module) -> None:
    """Raise if a rotary `inv_freq` buffer is not fp32, which silently ruins positions beyond a few thousand.

    transformers computes angles as fp32 positions x fp32 `inv_freq` and casts cos/sin to the activation dtype
    at the end, so a bf16 model is fine *if* the buffer stayed fp32 (`from_pretrained(..., dtype=torch.bfloat16)`
    and FSDP mixed precision keep it fp32). `model.to(torch.bfloat16)` casts buffers too: a 2**-9 relative error
    in `inv_freq` is an angle error of ~16 rad at position 8192.
    """
    bad = [
        f"{name} ({buf.dtype})" for name, buf in model.named_buffers()
        if name.endswith("inv_freq") and buf.dtype != torch.float32
    ]
    if bad:
        raise ValueError(
            f"rotary frequency buffers are not float32: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}. "
            "Load the model with from_pretrained(..., dtype=torch.bfloat16) (or cast parameters with FSDP mixed "
            "precision) instead of model.to(torch.bfloat16), which also casts the RoPE buffers"
        )


def _inverse_frequencies(model_config: Any, seq_len: int) -> tuple[torch.Tensor, float]:
    """Effective inv_freq (fp64) and attention scaling at `seq_len`, computed by transformers' own functions."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = _current_params(model_config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        dim = _rotary_dim(model_config, params)
        exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim
        return 1.0 / (float(params["rope_theta"]) ** exponent), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type={rope_type!r} is not known to transformers' ROPE_INIT_FUNCTIONS")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](model_config, None, seq_len=seq_len)
    return inv_freq.to(torch.float64), float(scaling)


def _default_target(model_config: Any) -> int:
    params = _current_params(model_config)
    if params.get("rope_type") == "dynamic":
        return round(model_config.max_position_embeddings * params["factor"])
    return int(model_config.max_position_embeddings)


def rope_report(
    model_config: Any,
    target_length: int | None = None,
    *,
    pretrained_theta: float | None = None,
    original_length: int | None = None,
) -> list[dict]:
    """One row per rotary dimension pair: effective vs pretrained wavelength, and how it meets the target length.

    `treatment` says what the scaling does to the pair: "extrapolated" (frequency kept, so positions past the
    original length reach it unchanged), "interpolated" (slowed by the full factor), "blended" (in between), or
    "in range" when the target does not exceed the pretraining length. `unseen_angles` flags pairs that, at the
    target length, turn through angles they never reached in pretraining (less than one full rotation then):
    those are the dimensions that make an unscaled model fail past its trained length.
    `pretrained_theta` and `original_length` describe the pretrained model where the config cannot tell (after
    method=theta the config holds only the raised base and the new length).
    """
    params = _current_params(model_config)
    original = int(original_length or pretraining_length(model_config))
    target = int(target_length or _default_target(model_config))
    inv_freq, _ = _inverse_frequencies(model_config, target)
    dim = _rotary_dim(model_config, params)
    base_theta = float(pretrained_theta or params["rope_theta"])
    base_inv_freq = 1.0 / (base_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor = target / original
    rows = []
    for i, (f, f0) in enumerate(zip(inv_freq.tolist(), base_inv_freq.tolist(), strict=True)):
        wavelength, base_wavelength = 2 * math.pi / f, 2 * math.pi / f0
        scale = wavelength / base_wavelength
        if factor <= 1:
            treatment = "in range"
        elif abs(scale - 1) < 1e-3:
            treatment = "extrapolated"
        elif scale >= factor * (1 - 1e-3):
            treatment = "interpolated"
        else:
            treatment = "blended"
        rotations_pretrained = original / base_wavelength
        rotations_target = target / wavelength
        rows.append({
            "pair": i,
            "inv_freq": f,
            "wavelength": wavelength,
            "pretrained_wavelength": base_wavelength,
            "scale": scale,
            "original_length": original,
            "target_length": target,
            "rotations_pretrained": rotations_pretrained,
            "rotations_target": rotations_target,
            "treatment": treatment,
            "unseen_angles": rotations_pretrained < 1 and rotations_target > rotations_pretrained * (1 + 1e-6),
        })
    return rows


def format_rope_report(
    model_config: Any,
    target_length: int | None = None,
    *,
    pretrained_theta: float | None = None,
    original_length: int | None = None,
) -> str:
    """`rope_report` as a text table with the effective parameters on top (what `ringtrain rope` prints)."""
    rows = rope_report(model_config, target_length, pretrained_theta=pretrained_theta, original_length=original_length)
    params = _current_params(model_config)
    _, attention_scaling = _inverse_frequencies(model_config, rows[0]["target_length"])
    shown = {k: v for k, v in params.items() if k not in ("short_factor", "long_factor")}
    lines = [
        f"rope_parameters: {shown}",
        f"max_position_embeddings={model_config.max_position_embeddings}  "
        f"pretraining length={rows[0]['original_length']}  target length={rows[0]['target_length']}  "
        f"cos/sin scaling={attention_scaling:.4f}",
        "",
        f"{'pair':>4} {'wavelength':>12} {'pretrained':>12} {'scale':>8} {'rot@orig':>10} {'rot@target':>10}  "
        "treatment     unseen angles",
    ]
    for r in rows:
        lines.append(
            f"{r['pair']:>4} {r['wavelength']:>12.1f} {r['pretrained_wavelength']:>12.1f} {r['scale']:>8.3f} "
            f"{r['rotations_pretrained']:>10.3g} {r['rotations_target']:>10.3g}  {r['treatment']:<13} "
            f"{'YES' if r['unseen_angles'] else ''}"
        )
    counts = {t: sum(r["treatment"] == t for r in rows) for t in ("extrapolated", "blended", "interpolated")}
    unseen = sum(r["unseen_angles"] for r in rows)
    lines += [
        "",
        f"{len(rows)} pairs: {counts['extrapolated']} extrapolated, {counts['blended']} blended, "
        f"{counts['interpolated']} interpolated; {unseen} reach angles unseen in pretraining at the target length",
    ]
    return "\n".join(lines)


def describe_rope(model_config: Any, rope_cfg: RopeConfig, target_length: int | None = None) -> str:
    """The `ringtrain rope CONFIG` report: apply `rope_cfg` to a copy of the transformers config `model_config` and
    tabulate it. `target_length` defaults to the scaled context length.
    """
    model_config = copy.deepcopy(model_config)
    params = getattr(model_config, "rope_parameters", None)
    if _keeps_model_rope(rope_cfg) and not params:
        return f"{type(model_config).__name__} has no rotary position embedding: nothing to report"
    if _keeps_model_rope(rope_cfg) and "rope_type" not in params and all(isinstance(v, dict) for v in params.values()):
        # Per-layer-type parameters (Gemma 3, OLMo 3): one report per layer type, each on its own parameters.
        reports = []
        for layer_type, own in params.items():
            one = copy.deepcopy(model_config)
            one.rope_parameters = dict(own)
            reports.append(f"layer type {layer_type}:\n{describe_rope(one, rope_cfg, target_length)}")
        return "\n\n".join(reports)
    pretrained_theta = _current_params(model_config).get("rope_theta")
    original = rope_cfg.original_max_position_embeddings or pretraining_length(model_config)
    apply_rope_scaling(model_config, rope_cfg)
    return format_rope_report(
        model_config, target_length, pretrained_theta=pretrained_theta, original_length=original
    )
