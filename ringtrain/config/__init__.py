"""Typed configuration: one dataclass per section, composed into `TrainConfig`, loaded with fixed precedence.

A leaf of the package: it imports nothing of the runtime, so any module can import its section from here. Checks
that need the runtime (layout and kernel names, the model itself, the world size) live in `ringtrain.validate`.
"""

from ringtrain.config.checkpoint import RESUME_MODES, CheckpointConfig
from ringtrain.config.data import DataConfig, check_data_config, split_paths
from ringtrain.config.eval import EVAL_MODES, EVAL_TASKS, RETRIEVAL_EVAL_TASKS, EvalConfig
from ringtrain.config.loader import (
    TrainConfig,
    config_to_dict,
    dump_config,
    load_config,
    parse_config,
    parse_overrides,
    read_yaml,
    render_config_reference,
    save_config,
)
from ringtrain.config.logging import WANDB_MODES, LoggingConfig
from ringtrain.config.model import DTYPE_NAMES, ModelConfig
from ringtrain.config.optim import SCHEDULES, OptimConfig
from ringtrain.config.parallel import ParallelConfig, resolve_layout, resolve_parallel_sizes
from ringtrain.config.peft import ADAPTER_METHODS, AdapterConfig
from ringtrain.config.rope import METHODS as ROPE_METHODS
from ringtrain.config.rope import RopeConfig
from ringtrain.config.train import NONFINITE_ACTIONS, TrainLoopConfig, recompute_policy

__all__ = [
    "ADAPTER_METHODS", "AdapterConfig", "DTYPE_NAMES", "EVAL_MODES", "EVAL_TASKS", "NONFINITE_ACTIONS",
    "RESUME_MODES", "RETRIEVAL_EVAL_TASKS",
    "ROPE_METHODS", "SCHEDULES", "WANDB_MODES", "CheckpointConfig", "DataConfig", "EvalConfig", "LoggingConfig",
    "ModelConfig", "OptimConfig", "ParallelConfig", "RopeConfig", "TrainConfig", "TrainLoopConfig",
    "check_data_config", "config_to_dict", "dump_config", "load_config", "parse_config", "parse_overrides",
    "read_yaml", "recompute_policy", "render_config_reference", "resolve_layout", "resolve_parallel_sizes",
    "save_config", "split_paths",
]
