"""The `peft:` section: low-rank adapters (LoRA through the `peft` library) instead of training every weight.

Whether the model has the named modules, and whether peft can adapt them, is checked against the built model by
`ringtrain.model.checks` (this package imports nothing of the runtime).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ADAPTER_METHODS = ("none", "lora")
# Keywords of `trainable_modules`, resolved on the model by `ringtrain.model.adapters`.
TRAINABLE_KEYWORDS = ("embeddings", "norms")


@dataclass
class AdapterConfig:
    """Parameter-efficient fine-tuning: LoRA adapters on some linear layers, every other weight frozen except
    `trainable_modules`. LongLoRA (Chen et al., 2023) found that LoRA on the attention projections alone does not
    extend the context window, while LoRA plus trainable token embeddings and norms comes close to full
    fine-tuning: hence the defaults."""

    method: str = "none"
    """'none' trains every weight (full fine-tuning); 'lora' trains low-rank adapters (the peft library's LoRA)
    plus `trainable_modules`, and freezes the rest."""
    r: int = 16
    """LoRA rank: each adapted weight W [out, in] gets B [out, r] @ A [r, in]."""
    alpha: float = 32.0
    """LoRA scaling numerator: the update is (alpha / r) * B @ A."""
    dropout: float = 0.0
    """Dropout on the adapters' input (peft's lora_dropout)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Modules that get adapters: names matched against the end of each module's dotted name (peft's rule); the
    default is the attention projections of llama-style models; 'all-linear' adapts every linear layer except the
    output head."""
    trainable_modules: list[str] = field(default_factory=lambda: ["embeddings", "norms"])
    """Modules trained in full next to the adapters: 'embeddings' (the input token embeddings), 'norms' (every
    normalisation layer), or module names matched against the end of each module's dotted name. Default: LongLoRA's
    finding that context extension needs trainable embeddings and norms; [] trains the adapters alone."""

    @property
    def enabled(self) -> bool:
        """Whether adapters are trained (method is not 'none')."""
        return self.method != "none"

    def _validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.method not in ADAPTER_METHODS:
            problems.append(("method", f"method={self.method!r} is not one of {', '.join(ADAPTER_METHODS)}"))
        if self.r <= 0:
            problems.append(("r", f"r={self.r} must be >= 1 (the LoRA rank, e.g. 16)"))
        if self.alpha <= 0:
            problems.append(("alpha", f"alpha={self.alpha} must be > 0 (e.g. 2 x r)"))
        if not 0 <= self.dropout < 1:
            problems.append(("dropout", f"dropout={self.dropout} must be in [0, 1)"))
        if not self.target_modules:
            problems.append(("target_modules", "target_modules=[] names no module: list module names (e.g. "
                                               "[q_proj, k_proj, v_proj, o_proj]) or [all-linear]"))
        if "all-linear" in self.target_modules and len(self.target_modules) > 1:
            problems.append(("target_modules", f"target_modules={self.target_modules}: 'all-linear' stands alone"))
        return problems
