"""What `ringtrain validate` checks beyond the config's own structure: the checks that need the runtime.

The config package is a leaf (it imports nothing of the runtime); here its values meet the runtime's registries
(layouts, kernels), the layout's sequence-length rule, the world size and the model transformers would build. Every
entry point loads its config through `load_validated_config`, so every problem is reported before any rank works.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path

from ringtrain.config import TrainConfig, parse_config, resolve_layout, resolve_parallel_sizes
from ringtrain.errors import ConfigError
from ringtrain.log import get_logger
from ringtrain.model.causal_lm import resolve_dtype
from ringtrain.model.checks import model_problems
from ringtrain.ring.kernels import KERNELS
from ringtrain.ring.layout import LAYOUT_NAMES, padded_length, required_multiple

logger = get_logger(__name__)


def parallel_problems(cfg: TrainConfig, world_size: int | None = None) -> list[str]:
    """Layout and kernel names, the sequence length the layout can shard, and the degrees against `world_size`."""
    problems = []
    par, seq_len = cfg.parallel, cfg.train.seq_len if cfg.train is not None else 0
    if par.layout not in (*LAYOUT_NAMES, "auto"):
        problems.append(f"parallel.layout={par.layout!r} is not one of {', '.join(LAYOUT_NAMES)}, auto")
    if par.attention_kernel not in ("auto", *KERNELS):
        problems.append(f"parallel.attention_kernel={par.attention_kernel!r} is not one of auto, {', '.join(KERNELS)}")
    if par.ulysses_size == 0:
        # auto left unresolved: no exact plan fits, or the model could not be read (the model checks say so). The
        # pure ring's rules name what to change (the sequence length, the sizes against the world).
        par = dataclasses.replace(par, ulysses_size=1)
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


def ranks_per_node(default: int) -> int:
    """Ranks on this node, from torchrun or SLURM; `default` outside a launcher (`ringtrain plan` on a laptop)."""
    for key in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return default


def resolve_sequence_plan(cfg: TrainConfig, device: str | None = None) -> str | None:
    """parallel.ulysses_size=0 (auto): set it, and with parallel.layout=auto the layout too, to the cheapest exact
    plan of the cost model (`ringtrain.ring.cost`) for the model's heads, train.seq_len, the device and the ranks per
    node (`device`: the costs of 'cuda' or 'cpu'; default this machine's); with data.document_mask, for a typical
    log-normal pack (the batches are not known yet). Returns what it
    chose and why, one line (None when there was nothing to choose, or the model cannot be read: its problem is
    reported by the model checks)."""
    par = cfg.parallel
    if (par.ulysses_size != 0 or cfg.train is None or par.sp_size < 1 or cfg.train.seq_len < 1
            or par.layout not in (*LAYOUT_NAMES, "auto")):  # parallel_problems reports a bad value
        return None
    import torch

    from ringtrain.planner import model_shape
    from ringtrain.ring.cost import DEVICE_COSTS, AttentionShape, rank_plans, typical_documents

    try:
        shape = model_shape(cfg.model)
    except Exception:  # noqa: BLE001 - the model checks report it, with the fix
        return None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    per_node = ranks_per_node(min(par.sp_size, 8) if device == "cuda" else par.sp_size)  # 8 GPUs to a node
    mb, seq_len = cfg.train.micro_batch_size, cfg.train.seq_len
    docs = typical_documents(seq_len, mb) if cfg.data.document_mask else None
    dtype_bytes = 4 if resolve_dtype(cfg.model.dtype, device) == torch.float32 else 2
    attn = AttentionShape(mb, seq_len, shape.heads, shape.kv_heads, shape.head_dim, shape.v_head_dim or shape.head_dim,
                          dtype_bytes)
    layouts = None if par.layout == "auto" else (par.layout,)
    plans = rank_plans(attn, par.sp_size, DEVICE_COSTS[device], document_ids=docs, ranks_per_node=per_node,
                       layouts=layouts)
    best = plans[0]
    if best.refused:
        return None  # no plan can run: parallel_problems applies the pure ring's rules, which name the fix
    par.ulysses_size = best.ulysses
    if par.layout == "auto" and best.layout != "-":
        par.layout = best.layout
    others = "; ".join(p.describe() for p in plans[1:3])
    layout = f"layout {par.layout}" if best.layout != "-" else "no ring"
    return (f"parallel.ulysses_size=0 (auto) -> {best.ulysses}, {layout} on {par.sp_size} ranks "
            f"({per_node} per node, {device} costs, {'a typical document pack' if docs is not None else 'one sequence'}"
            f" of {seq_len} tokens): {best.describe()}; next: {others or 'none'}")


def load_validated_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), world_size: int | None = None,
    *, weights: bool = True, device: str | None = None,
) -> TrainConfig:
    """Defaults < YAML at `path` < `overrides`, checked completely (against `world_size` too, when given): the config,
    or one ConfigError listing every problem.

    `weights=False` accepts a model.path folder that holds only config.json (`ringtrain plan` needs the shapes, not
    the weights: a model can be planned before it is downloaded). parallel.ulysses_size=0 is resolved here, for
    `device` ('cuda' or 'cpu'; default this machine's), and the choice is logged (rank 0, INFO)."""
    cfg, problems = parse_config(path, overrides)
    if cfg is not None and cfg.parallel is not None and cfg.model is not None and cfg.data is not None and not problems:
        chosen = resolve_sequence_plan(cfg, device)
        if chosen:
            logger.info("%s", chosen)  # rank 0 says it (setup_logging); the CLI sets logging up before loading
    if cfg is not None and cfg.parallel is not None and cfg.data is not None and cfg.model is not None:
        # Values are checked even when some keys were rejected (those keep their defaults), so one run of
        # `ringtrain validate` lists every problem.
        problems = problems + runtime_problems(cfg, world_size, weights=weights)
    if problems or cfg is None:
        raise ConfigError(problems or ["the config could not be built"])
    return cfg
