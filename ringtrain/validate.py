"""What `ringtrain validate` checks beyond the config's own structure: the checks that need the runtime.

The config package is a leaf (it imports nothing of the runtime); here its values meet the runtime's registries
(layouts, kernels), the layout's sequence-length rule, the world size and the model transformers would build. Every
entry point loads its config through `load_validated_config`, so every problem is reported before any rank works.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from ringtrain.config import TrainConfig, parse_config, resolve_layout, resolve_parallel_sizes
from ringtrain.errors import ConfigError
from ringtrain.model.checks import model_problems
from ringtrain.ring.kernels import KERNELS
from ringtrain.ring.layout import LAYOUT_NAMES, padded_length, required_multiple


def parallel_problems(cfg: TrainConfig, world_size: int | None = None) -> list[str]:
    """Layout and kernel names, the sequence length the layout can shard, and the degrees against `world_size`."""
    problems = []
    par, seq_len = cfg.parallel, cfg.train.seq_len if cfg.train is not None else 0
    if par.layout not in (*LAYOUT_NAMES, "auto"):
        problems.append(f"parallel.layout={par.layout!r} is not one of {', '.join(LAYOUT_NAMES)}, auto")
    if par.attention_kernel not in ("auto", *KERNELS):
        problems.append(f"parallel.attention_kernel={par.attention_kernel!r} is not one of auto, {', '.join(KERNELS)}")
    sp, u = par.sp_size, par.ulysses_size
    layout = resolve_layout(par, cfg.data.document_mask)
    if sp >= 1 and u >= 1 and sp % u == 0 and seq_len >= 1 and layout in LAYOUT_NAMES:
        multiple = required_multiple(sp // u, layout, u)
        if seq_len % multiple:
            ring = f"parallel.sp_size={sp}" if u == 1 else f"ring size {sp // u} x parallel.ulysses_size={u}"
            times = "2 x " if layout != "contiguous" else ""
            problems.append(f"train.seq_len={seq_len} is not a multiple of {multiple} ({times}{ring}, {layout} layout):"
                            f" use train.seq_len={padded_length(seq_len, sp // u, layout, u)}")
    if world_size is not None:
        try:
            resolve_parallel_sizes(par, world_size)
        except ConfigError as e:
            problems.extend(e.problems)
    return problems


def arch_problems(cfg: TrainConfig) -> list[str]:
    """model.arch must be a model type transformers knows."""
    arch = cfg.model.arch
    if arch is None:
        return []
    from transformers import CONFIG_MAPPING

    if arch in CONFIG_MAPPING:
        return []
    close = difflib.get_close_matches(arch, list(CONFIG_MAPPING.keys()), n=1)
    hint = f"did you mean {close[0]!r}?" if close else "use a transformers model type such as 'llama'"
    return [f"model.arch={arch!r} is not a transformers model type: {hint}"]


def runtime_problems(cfg: TrainConfig, world_size: int | None = None, *, weights: bool = True) -> list[str]:
    """Every problem of a structurally sound `cfg` that only the runtime can see, one line each."""
    problems = parallel_problems(cfg, world_size)
    if cfg.train is not None and cfg.train.loss_weighting == "sequence" and not cfg.data.document_mask:
        problems.append("train.loss_weighting='sequence' averages each document's loss, and data.document_mask=false "
                        "keeps no documents: set data.document_mask=true or train.loss_weighting=token")
    arch = arch_problems(cfg)
    # The model checks build the model: only worth it (and only meaningful) when transformers knows the type.
    return problems + (arch or model_problems(cfg, weights=weights))


def load_validated_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), world_size: int | None = None,
    *, weights: bool = True,
) -> TrainConfig:
    """Defaults < YAML at `path` < `overrides`, checked completely (against `world_size` too, when given): the config,
    or one ConfigError listing every problem.

    `weights=False` accepts a model.path folder that holds only config.json (`ringtrain plan` needs the shapes, not
    the weights: a model can be planned before it is downloaded)."""
    cfg, problems = parse_config(path, overrides)
    if cfg is not None and cfg.parallel is not None and cfg.data is not None and cfg.model is not None:
        # Values are checked even when some keys were rejected (those keep their defaults), so one run of
        # `ringtrain validate` lists every problem.
        problems = problems + runtime_problems(cfg, world_size, weights=weights)
    if problems or cfg is None:
        raise ConfigError(problems or ["the config could not be built"])
    return cfg
