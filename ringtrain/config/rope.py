"""The `rope:` section: how to extend a RoPE model's context (applied by `ringtrain.hf.rope`)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

METHODS = ("none", "linear", "dynamic", "yarn", "llama3", "longrope", "theta")


# Fields that only one method reads; setting them for another method is a mistake worth reporting.
METHOD_FIELDS = {
    "attention_factor": ("yarn", "longrope"),
    "beta_fast": ("yarn",),
    "beta_slow": ("yarn",),
    "mscale": ("yarn",),
    "mscale_all_dim": ("yarn",),
    "truncate": ("yarn",),
    "low_freq_factor": ("llama3",),
    "high_freq_factor": ("llama3",),
    "short_factor": ("longrope",),
    "long_factor": ("longrope",),
}


# Defaults of the method-specific fields, as the YaRN paper and the Llama 3.1 release use them.
LLAMA3_LOW_FREQ_FACTOR = 1.0


LLAMA3_HIGH_FREQ_FACTOR = 4.0


@dataclass
class RopeConfig:
    """How to extend the context of a RoPE model; written into the model config by `apply_rope_scaling`."""

    method: str = "none"
    """none (keep the model's RoPE), linear (position interpolation), dynamic (NTK, inference-time), yarn, llama3,
    longrope, or theta (raise rope_theta, "ABF")."""
    factor: float | None = None
    """Context extension factor (new length / original length). Unset: derived from target_length."""
    target_length: int | None = None
    """Context length to extend to; factor = target_length / original_max_position_embeddings. Set this or factor."""
    original_max_position_embeddings: int | None = None
    """Pretraining context length. Unset: taken from the model config (its original length if already scaled)."""
    rope_theta: float | None = None
    """RoPE base. Unset: the model's. For method=theta the new base; unset there, it is derived from the factor with
    the NTK-aware rule theta * factor ** (d / (d - 2))."""
    attention_factor: float | None = None
    """yarn, longrope: scale of cos/sin (attention temperature). Unset: the method's recommended value from factor."""
    beta_fast: float | None = None
    """yarn: rotations above which a dimension is kept unscaled (extrapolated). Unset: 32."""
    beta_slow: float | None = None
    """yarn: rotations below which a dimension is fully interpolated. Unset: 1."""
    mscale: float | None = None
    """yarn (DeepSeek-style): numerator coefficient of the attention factor; needs mscale_all_dim too."""
    mscale_all_dim: float | None = None
    """yarn (DeepSeek-style): denominator coefficient of the attention factor; needs mscale too."""
    truncate: bool | None = None
    """yarn: round the ramp's correction range to whole dimensions. Unset: True (as transformers)."""
    low_freq_factor: float | None = None
    """llama3: wavelengths longer than original / low_freq_factor are interpolated by factor. Unset: 1."""
    high_freq_factor: float | None = None
    """llama3: wavelengths shorter than original / high_freq_factor are kept unscaled. Unset: 4."""
    short_factor: list[float] | None = None
    """longrope: per-dimension-pair rescale factors for sequences up to the original length (head_dim / 2 values)."""
    long_factor: list[float] | None = None
    """longrope: per-dimension-pair rescale factors for longer sequences (head_dim / 2 values)."""

    def _validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        if self.method not in METHODS:
            close = difflib.get_close_matches(str(self.method), METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(("method", f"method={self.method!r} is not one of {', '.join(METHODS)}{hint}"))
            return problems
        if self.factor is not None and self.target_length is not None:
            problems.append(("factor", f"factor={self.factor} and target_length={self.target_length} are both set: "
                                       "set only one (the other follows from original_max_position_embeddings)"))
        if self.factor is not None and self.factor < 1:
            problems.append(("factor", f"factor={self.factor} must be >= 1 (it is new length / original length)"))
        if self.target_length is not None and self.target_length < 1:
            problems.append(("target_length", f"target_length={self.target_length} must be a positive token count"))
        if self.original_max_position_embeddings is not None and self.original_max_position_embeddings < 1:
            problems.append(("original_max_position_embeddings",
                             f"original_max_position_embeddings={self.original_max_position_embeddings} must be a "
                             "positive token count, or unset to read it from the model config"))
        if self.rope_theta is not None and self.rope_theta <= 0:
            problems.append(("rope_theta", f"rope_theta={self.rope_theta} must be > 0 (typically 1e4 to 1e7)"))
        scaled = self.factor is not None or self.target_length is not None
        if self.method == "none" and scaled:
            problems.append(("method", "method='none' ignores factor/target_length: pick a scaling method "
                                       "(e.g. method=yarn) or unset factor and target_length"))
        if self.method in ("linear", "dynamic", "yarn", "llama3", "longrope") and not scaled:
            problems.append(("factor", f"method={self.method!r} needs factor or target_length: "
                                       "set e.g. target_length=131072"))
        if self.method == "theta" and not scaled and self.rope_theta is None:
            problems.append(("rope_theta", "method='theta' needs rope_theta (the new base, e.g. 1e6) "
                                           "or factor/target_length to derive it"))
        for name, methods in METHOD_FIELDS.items():
            if getattr(self, name) is not None and self.method not in methods:
                problems.append((name, f"{name}={getattr(self, name)!r} is only used by method="
                                       f"{' or '.join(methods)}, not method={self.method!r}: unset it"))
        if self.method == "longrope":
            for name in ("short_factor", "long_factor"):
                value = getattr(self, name)
                if value is None or not value:
                    problems.append((name, f"method='longrope' needs {name}: a list of head_dim / 2 numbers "
                                           "(from the LongRoPE search, e.g. a Phi-3 config)"))
                elif any(not isinstance(x, (int, float)) or x <= 0 for x in value):
                    problems.append((name, f"{name} must hold positive numbers, got {value!r}"))
        if self.method == "llama3":
            low = LLAMA3_LOW_FREQ_FACTOR if self.low_freq_factor is None else self.low_freq_factor
            high = LLAMA3_HIGH_FREQ_FACTOR if self.high_freq_factor is None else self.high_freq_factor
            if not 0 < low < high:
                problems.append(("high_freq_factor", f"llama3 needs 0 < low_freq_factor < high_freq_factor, got "
                                                     f"low_freq_factor={low}, high_freq_factor={high}: "
                                                     "Llama 3.1 uses 1 and 4"))
        if self.method == "yarn":
            fast = 32.0 if self.beta_fast is None else self.beta_fast
            slow = 1.0 if self.beta_slow is None else self.beta_slow
            if fast <= slow:
                problems.append(("beta_fast", f"yarn needs beta_fast > beta_slow, got beta_fast={fast}, "
                                              f"beta_slow={slow}: the paper uses 32 and 1"))
            if (self.mscale is None) != (self.mscale_all_dim is None):
                problems.append(("mscale", "yarn mscale and mscale_all_dim go together: set both or neither"))
        if self.attention_factor is not None and self.attention_factor <= 0:
            problems.append(("attention_factor", f"attention_factor={self.attention_factor} must be > 0, "
                                                 "or unset for the method's default"))
        return problems
