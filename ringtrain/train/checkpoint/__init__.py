"""Training checkpoints, in three rooms: the manager (save, find, prune, load, resume with DCP; collective), the
files (names, completeness, meta.json; one rank, no communication) and the resume rules (what a resumed run may
change). Signals that ask for a save and exit live in ringtrain.parallel.signals."""

from ringtrain.train.checkpoint.files import (
    COMPLETE_MARKER,
    META_FILE,
    checkpoint_problem,
    is_complete,
    model_mismatches,
    read_meta,
)
from ringtrain.train.checkpoint.manager import CheckpointManager, CheckpointUnreadable
from ringtrain.train.checkpoint.resume import (
    apply_resumed_settings,
    changed_settings,
    flat_config,
    model_shapes,
    resume_problems,
)

__all__ = [
    "COMPLETE_MARKER",
    "META_FILE",
    "CheckpointManager",
    "CheckpointUnreadable",
    "apply_resumed_settings",
    "changed_settings",
    "checkpoint_problem",
    "flat_config",
    "is_complete",
    "model_mismatches",
    "model_shapes",
    "read_meta",
    "resume_problems",
]
