# What a mixer kind is (how to recognise its transformers module, how it splits over an SP group, its SP forward), and
# the one forward every recognised module gets: refuse caches and masks, find the batch's layout and documents, run
# the kind's head-parallel form.
#
# Why an instance forward: these modules have no interface like AttentionInterface. transformers' kernel seams
# (`use_kernelized_func`: the conv, the scan) replace the sequence kernels but not the projections around them, and
# the exchange must sit between the two; the forward installed here calls the module's own submodules and the
# modeling file's own kernels, so no modeling code is copied and the class is left alone.

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ringtrain.ring import RingDocuments, SequenceParallel
from ringtrain.ring.balance import Spans

MixerForward = Callable[[nn.Module, torch.Tensor, SequenceParallel, "list[Spans] | None"], torch.Tensor]


Unit = tuple[str, int, str, bool]
"""(config key, count, what, replicable): a count of heads / groups / channels that ranks take equal shares of. A
replicable unit (Mamba-2's B/C groups) may also be fewer than the ranks, each unit then going to several of them."""


def unit_fits(count: int, replicable: bool, sp_size: int) -> bool:
    """Whether `count` units split over `sp_size` ranks (the planner asks too)."""
    return count % sp_size == 0 or (replicable and sp_size % count == 0)


@dataclass(frozen=True)
class MixerKind:
    """One kind of token mixer outside transformers' AttentionInterface, and its sequence-parallel form."""

    name: str
    """What it is, for messages ("gated DeltaNet")."""
    classes: tuple[str, ...]
    """The transformers module classes of this kind (exact names: a class not listed stays refused)."""
    layer_types: tuple[str, ...]
    """The config.layer_types values of the layers that hold it."""
    units: Callable[[nn.Module], list[Unit]]
    """What ranks take equal shares of (`Unit`): each must split over the SP size."""
    forward: MixerForward
    """(module, hidden_states [B, S_local, hidden], the batch's SequenceParallel, document spans or None) -> output
    [B, S_local, hidden]: projections on the shard, `sp.to_channels`, the module's own conv / kernel / norm per
    document on its share, `sp.to_sequence`, the output projection on the shard."""
    buffers: Callable[[nn.Module], tuple[int, int]]
    """(channels exchanged per token out and back, recurrent state elements per sequence): the planner's estimate."""

    def fits(self, module: nn.Module, sp_size: int) -> bool:
        return all(unit_fits(n, rep, sp_size) for _, n, _, rep in self.units(module))

    def problems(self, module: nn.Module, sp_size: int) -> list[str]:
        """Why `module` cannot be split over `sp_size` ranks (one line), or nothing."""
        bad = [(key, n, what) for key, n, what, rep in self.units(module) if not unit_fits(n, rep, sp_size)]
        if not bad:
            return []
        key, count, what = bad[0]
        top = max(n for _, n, _, _ in self.units(module))
        choices = ", ".join(str(p) for p in range(1, top + 1) if self.fits(module, p))
        return [f"{describe(module)}: {key}={count} is not divisible by the sequence-parallel size {sp_size} (each "
                f"rank runs whole sequences of an equal share of the {what}; state passing across ranks is not "
                f"built): choose parallel.sp_size among {choices}"]


def describe(module: nn.Module) -> str:
    return f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"


def modeling(module: nn.Module) -> ModuleType:
    """The modeling file of `module`'s class: its module-level kernels are the fast package's when installed
    (flash-linear-attention, causal-conv1d, mamba-ssm), else transformers' pure-PyTorch ones."""
    return sys.modules[type(module).__module__]


def share(count: int, sp: SequenceParallel) -> slice:
    """This rank's equal share of `count` units (heads, groups, channels)."""
    n = count // sp.world
    return slice(sp.rank * n, (sp.rank + 1) * n)


def groups(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """[B, S_local, C] -> [B, S_local, P, C / P]: channel group g (the g-th equal slice) for SP rank g."""
    return x.unflatten(-1, (sp.world, -1))


def exchange(parts: list[torch.Tensor], sp: SequenceParallel) -> list[torch.Tensor]:
    """[B, S_local, C_i] projections, each split into P equal channel groups, -> [B, S, C_i / P] of this rank's group,
    whole sequences in natural order: one exchange carries them all."""
    widths = [p.shape[-1] // sp.world for p in parts]
    full = sp.to_channels(torch.cat([groups(p, sp) for p in parts], dim=-1))
    return list(full.split(widths, dim=-1))


def conv_rows(conv: nn.Conv1d, spans: list[slice]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The depthwise conv's weight [C', K] and bias of the channels in `spans` (differentiable slices)."""
    weight = torch.cat([conv.weight[s, 0] for s in spans])
    bias = None if conv.bias is None else torch.cat([conv.bias[s] for s in spans])
    return weight, bias


def call_sliced(module: nn.Module, params: dict[str, torch.Tensor], args: tuple, **attrs: Any) -> Any:
    """`module`'s own forward with some parameters replaced by slices of them (gradients reach the originals) and
    plain attributes (group counts) set for the slice, on a shallow copy: the module itself is untouched."""
    clone = copy.copy(module)
    clone.__dict__["_parameters"] = dict(module._parameters)
    clone.__dict__.update(attrs)
    return torch.func.functional_call(clone, params, args)


class MixerBinding:
    """The forward installed on one recognised module (an instance attribute: the class is untouched)."""

    def __init__(self, kind: MixerKind, module: nn.Module, sp: SequenceParallel, documents: Callable[[], bool]
                 ) -> None:
        self.kind, self.module, self.sp, self.documents = kind, module, sp, documents

    def __call__(self, hidden_states: torch.Tensor, cache: Any = None, attention_mask: torch.Tensor | None = None,
                 **kwargs: Any) -> torch.Tensor:
        where = describe(self.module)
        if cache is not None or kwargs.get("cache_params") is not None:
            raise ValueError(f"{where}: a cache was passed to a sequence-parallel {self.kind.name} layer: it would "
                             "hold a share of the heads only; train without a cache (use_cache=False)")
        if attention_mask is not None:
            raise ValueError(f"{where}: received a padding mask of shape {tuple(attention_mask.shape)}; under "
                             "sequence parallelism pass none (shard_batch turns right padding into ignored labels)")
        docs = kwargs.get("document_ids")
        if docs is not None and not isinstance(docs, RingDocuments):
            raise ValueError(f"{where}: document_ids reached the layer as {type(docs).__name__}: call the model "
                             "prepared by apply_ring_attention with the 'documents' entry of shard_batch")
        if docs is None and self.documents():
            raise ValueError(f"{where}: the model was called with document_ids but they did not reach this layer: each "
                             "rank would run its recurrence across document boundaries; the decoder layer must pass "
                             "its **kwargs to the mixer")
        sp = self.sp.for_documents(docs)
        return self.kind.forward(self.module, hidden_states, sp, None if docs is None else docs.spans())
