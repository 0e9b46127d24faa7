"""Long-context evaluation: passkey / needle-in-a-haystack grids scored by exact match, perplexity by context length.

Everything loads lazily (torch.distributed, transformers), so importing the package stays cheap. Its settings are
`ringtrain.config.EvalConfig`.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "answer_token_hits": "ringtrain.eval.tasks",
    "exact_match": "ringtrain.eval.tasks",
    "eval_documents": "ringtrain.eval.tasks",
    "sliding_windows": "ringtrain.eval.tasks",
    "evaluate_retrieval": "ringtrain.eval.retrieval",
    "evaluate_perplexity": "ringtrain.eval.perplexity",
    "Evaluator": "ringtrain.eval.entry",
    "evaluate_in_training": "ringtrain.eval.entry",
    "run_eval": "ringtrain.eval.entry",
    "format_table": "ringtrain.eval.report",
    "write_heatmap": "ringtrain.eval.report",
    "write_results": "ringtrain.eval.report",
}

__all__ = [*_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ringtrain.eval' has no attribute {name!r}")
