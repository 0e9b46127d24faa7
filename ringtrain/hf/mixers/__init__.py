"""Token mixers outside transformers' AttentionInterface (gated DeltaNet, Mamba-2, short convolutions) under sequence
parallelism: a small registry of mixer kinds, each recognised by its transformers class and run head-parallel
(`ring.channels`: an all-to-all to whole sequences of a share of the heads, the module's own kernels, and back).
`apply_ring_attention` installs the kinds' forwards; `sequence_parallel_problems` asks `mixer_problems`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ringtrain.hf.mixers import deltanet, mamba2, short_conv
from ringtrain.hf.mixers.base import MixerBinding, MixerKind
from ringtrain.ring import SequenceParallel

KINDS: tuple[MixerKind, ...] = (deltanet.KIND, mamba2.KIND, short_conv.KIND)
_BY_CLASS = {cls: kind for kind in KINDS for cls in kind.classes}


def mixer_kind(module: nn.Module) -> MixerKind | None:
    """The kind of `module` when its class is one this registry runs under sequence parallelism."""
    return _BY_CLASS.get(type(module).__name__)


def mixers(model: nn.Module) -> list[tuple[nn.Module, MixerKind]]:
    """The recognised mixer modules of `model`, in model order."""
    return [(m, kind) for m in model.modules() if (kind := mixer_kind(m)) is not None]


def mixer_problems(model: nn.Module, sp_size: int) -> list[str]:
    """Why the recognised mixers of `model` cannot run over `sp_size` ranks: one line per kind, naming its first
    layer that cannot (layers of one kind share their config)."""
    found: dict[str, str] = {}
    for module, kind in mixers(model):
        for problem in kind.problems(module, sp_size):
            found.setdefault(kind.name, problem)
    return list(found.values())


def install_mixers(model: nn.Module, sp: SequenceParallel, documents: Callable[[], bool]) -> list[nn.Module]:
    """Give every recognised mixer of `model` its sequence-parallel forward (an instance attribute; the class is
    untouched); `documents()` says whether the current forward carries packed documents. Returns the modules, for
    `uninstall_mixers`."""
    found = mixers(model)
    for module, kind in found:
        module.forward = MixerBinding(kind, module, sp, documents)
    return [m for m, _ in found]


def uninstall_mixers(modules: list[nn.Module]) -> None:
    for module in modules:
        if isinstance(module.__dict__.get("forward"), MixerBinding):
            del module.forward


__all__ = ["KINDS", "MixerKind", "install_mixers", "mixer_kind", "mixer_problems", "mixers", "uninstall_mixers"]
