"""One evaluation of a model (every configured task), the trainer's evaluation hook and `ringtrain eval`."""

from __future__ import annotations

import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ringtrain.config import RETRIEVAL_EVAL_TASKS
from ringtrain.errors import ConfigError
from ringtrain.eval.forward import evaluation_mode
from ringtrain.eval.perplexity import evaluate_perplexity, perplexity_tokens
from ringtrain.eval.retrieval import evaluate_retrieval, summarize_retrieval
from ringtrain.eval.tasks import eval_documents
from ringtrain.log import get_logger

if TYPE_CHECKING:
    from ringtrain.config import TrainConfig
    from ringtrain.model.causal_lm import CausalLMWithChunkedLoss
    from ringtrain.parallel.dims import ParallelDims

logger = get_logger(__name__)


class Evaluator:
    """The evaluation of one config: documents and text are prepared once, `run` scores a model on them."""

    def __init__(self, cfg: TrainConfig, tokenizer: Any, dims: ParallelDims | None = None):
        e = cfg.eval
        self.cfg, self.tokenizer, self.dims = cfg, tokenizer, dims
        digits = e.digits or cfg.data.passkey_digits
        self.docs = {task: eval_documents(tokenizer, task, e.lengths, e.depths, e.samples_per_cell, e.seed, digits)
                     for task in e.tasks if task in RETRIEVAL_EVAL_TASKS}
        self.ppl_tokens = perplexity_tokens(cfg, tokenizer, dims) if "perplexity" in e.tasks else None
        if self.ppl_tokens is not None:
            for window in e.ppl_lengths or e.lengths:
                if len(self.ppl_tokens) < window + 1:
                    logger.warning("perplexity text has %d tokens, fewer than one %d-token window: that length "
                                   "scores only what there is", len(self.ppl_tokens), window)

    def run(self, lm: nn.Module, step: int | None = None, fsdp_root: nn.Module | None = None) -> dict[str, Any]:
        """Results of every task (a JSON-able dict, the same on every rank)."""
        e = self.cfg.eval
        rope_type = (getattr(lm.config, "rope_parameters", None) or {}).get("rope_type")
        if rope_type == "dynamic" and len({*e.lengths, *e.ppl_lengths}) > 1:
            # transformers keeps dynamic NTK frequencies of the longest sequence seen until one shorter than the
            # original length arrives: after the first task's longest length, every later score uses those.
            logger.warning("rope_type='dynamic' is stateful in transformers: evaluating several lengths in one run "
                           "scores all but the first task's ascending lengths with the longest length's frequencies; "
                           "evaluate one length per run (eval.lengths=[N]) for per-length numbers")
        t0 = time.perf_counter()
        results: dict[str, Any] = {"step": step, "mode": e.mode, "samples_per_cell": e.samples_per_cell,
                                   "retrieval": {}, "perplexity": [], "documents": []}
        with evaluation_mode(lm, fsdp_root):
            for task, docs in self.docs.items():
                records = evaluate_retrieval(lm, self.tokenizer, docs, dims=self.dims,
                                             batch_size=e.batch_size, mode=e.mode)
                results["retrieval"][task] = summarize_retrieval(records, e.lengths, e.depths)
                results["documents"] += records
            if self.ppl_tokens is not None:
                for window in e.ppl_lengths or e.lengths:
                    window = min(window, len(self.ppl_tokens))
                    stride = e.ppl_stride or max(window // 2, 1)
                    results["perplexity"].append(evaluate_perplexity(
                        lm, self.ppl_tokens, window, min(stride, window - 1), dims=self.dims,
                        batch_size=e.batch_size, loss_chunk_tokens=self.cfg.train.loss_chunk_tokens))
        results["time_s"] = time.perf_counter() - t0
        return results


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """Scalars for metrics.jsonl / W&B. W&B puts each prefix before the first '/' in its own panel section, so the
    headline numbers share one section (eval/<task>/acc, eval/ppl@<length>) and each task's per-length numbers
    another (eval_<task>/acc@<length>, eval_<task>/nll@<length>: mean answer NLL over depths), next to its heatmap
    and table (`ringtrain.eval.report.wandb_eval_media`)."""
    out: dict[str, float] = {}
    for task, r in results["retrieval"].items():
        out[f"eval/{task}/acc"] = r["accuracy_mean"]
        for j, (length, acc) in enumerate(zip(r["lengths"], r["accuracy_by_length"], strict=True)):
            out[f"eval_{task}/acc@{length}"] = acc
            out[f"eval_{task}/nll@{length}"] = sum(row[j] for row in r["answer_nll"]) / len(r["answer_nll"])
    for p in results["perplexity"]:
        out[f"eval/ppl@{p['length']}"] = p["ppl"]
    out["eval/time_s"] = results["time_s"]
    return out


def eval_output_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.eval.output_dir or Path(cfg.train.output_dir) / "eval")


# Evaluators of running trainers: built at the first evaluation, then reused (documents are generated once).
_TRAINER_EVALUATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def evaluate_in_training(trainer: Any) -> dict[str, float]:
    """The trainer's hook, called after every optimizer step: {} unless `eval.every_steps` divides the step.

    `trainer` is the running `Trainer` (its cfg, tokenizer, dims, model, lm and step are read; evaluation imports
    nothing of the training loop).
    Collective (every rank calls it at every step). Rank 0 writes the results under
    <eval.output_dir>/step_<N>/ and the returned metrics go into the step's metrics record (and W&B).
    """
    every = trainer.cfg.eval.every_steps
    if not every or trainer.step % every:
        return {}
    from ringtrain.eval.report import format_table, wandb_eval_media, write_results
    from ringtrain.train.metrics import active_wandb_run

    evaluator = _TRAINER_EVALUATORS.get(trainer)
    if evaluator is None:
        evaluator = _TRAINER_EVALUATORS[trainer] = Evaluator(trainer.cfg, trainer.tokenizer, trainer.dims)
    results = evaluator.run(trainer.lm, step=trainer.step, fsdp_root=trainer.model)
    if trainer.dims.rank == 0:
        written = write_results(results, eval_output_dir(trainer.cfg) / f"step_{trainer.step:08d}",
                                heatmap=trainer.cfg.eval.heatmap)
        logger.info("evaluation at step %d (%.1fs):\n%s", trainer.step, results["time_s"], format_table(results))
        # The trainer's MetricsLogger is local to Trainer.fit, so the heatmaps and tables reach its W&B run as the
        # process's active run; logged before the trainer logs this step's scalars, W&B merges them into one row.
        run = active_wandb_run()
        if run is not None:
            run.log(wandb_eval_media(results, written), step=trainer.step)
    return flat_metrics(results)


# --------------------------------------------------------------------------------------------------
# `ringtrain eval`


def load_model_for_eval(cfg: TrainConfig, dims: ParallelDims | None) -> tuple[CausalLMWithChunkedLoss, int | None]:
    """The model of `cfg`, built as training builds it (`build_model(cfg, dims, "eval")`: sequence-parallel
    attention, tiled MLP and FSDP2 as configured), with the weights of model.path or of eval.checkpoint.

    Returns (model, the checkpoint's step or None); score `model.lm` with `fsdp_root=model`. DCP reshards a
    checkpoint's FSDP shards to this world, so any world size can evaluate it. `dims=None`: one process on CPU
    with the model's own (sdpa) attention, the reference the sharded evaluation is tested against.
    With model.adapter, the model is built with that folder's LoRA layout and its tensors loaded over model.path.
    """
    from ringtrain.model.build import build_model

    if cfg.model.adapter is not None:
        from ringtrain.model.adapters import load_adapter_weights, with_adapter

        cfg = with_adapter(cfg)
    model = build_model(cfg, dims, "eval")
    if cfg.model.adapter is not None:
        load_adapter_weights(model.lm, cfg.model.adapter)
    step = None
    if cfg.eval.checkpoint:
        from ringtrain.train.checkpoint import CheckpointManager, is_complete

        manager = CheckpointManager(cfg.checkpoint, cfg.train.output_dir, dims)
        path = manager.latest() if cfg.eval.checkpoint == "latest" else Path(cfg.eval.checkpoint)
        if path is None:
            raise ConfigError([f"eval.checkpoint='latest' but {manager.root} holds no complete checkpoint: "
                               "train first, or pass a step_* folder"])
        if not is_complete(path):
            raise ConfigError([f"eval.checkpoint={cfg.eval.checkpoint!r} is not a complete checkpoint: pass a "
                               f"step_* folder holding a COMPLETE marker, or 'latest'"])
        # The trainer saves the same CausalLMWithChunkedLoss ('lm.'-prefixed names), sharded or not.
        step = manager.load(path, model, restore_rng=False).get("step")
    return model, step


def run_eval(cfg: TrainConfig) -> dict[str, Any]:
    """The `ringtrain eval` entry point: bootstrap, load, evaluate every task, write results (rank 0), tear down.

    Returns the results (on every rank); rank 0 wrote results.json, the heatmaps and metrics.jsonl (and W&B when
    logging.wandb_mode is not disabled) under `eval_output_dir(cfg)`.
    """
    import dataclasses

    from ringtrain.config import config_to_dict
    from ringtrain.data import build_tokenizer
    from ringtrain.eval.report import format_table, wandb_eval_media, write_results
    from ringtrain.log import setup_logging
    from ringtrain.parallel.distributed import init_distributed, teardown_distributed
    from ringtrain.train.metrics import MetricsLogger

    setup_logging()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    dims = init_distributed(cfg.parallel)  # no documents in evaluation: layout auto is zigzag
    try:
        from ringtrain.data.tokenizer import tokenizer_name

        tokenizer = build_tokenizer(tokenizer_name(cfg.data.tokenizer, cfg.model.path))
        model, step = load_model_for_eval(cfg, dims)
        results = Evaluator(cfg, tokenizer, dims).run(model.lm, step=step, fsdp_root=model)
        results["model"] = cfg.model.path or cfg.model.arch
        results["checkpoint"] = cfg.eval.checkpoint
        if dims.rank == 0:
            out = eval_output_dir(cfg)
            written = write_results(results, out, heatmap=cfg.eval.heatmap)
            logger.info("evaluation (%.1fs), results in %s:\n%s", results["time_s"], out, format_table(results))
            # Lines of earlier evaluations in this folder are history to keep, not a run to truncate on resume.
            metrics = MetricsLogger(dataclasses.replace(cfg.logging, progress_bar=False), out, enabled=True,
                                    total_steps=0, truncate=False, run_config=config_to_dict(cfg))
            try:
                if metrics.wandb_run is not None:  # heatmaps, tables, charts: W&B only (not JSON scalars)
                    metrics.wandb_run.log(wandb_eval_media(results, written), step=step or 0)
                metrics.log(step or 0, flat_metrics(results))
            finally:
                metrics.close()
    except ConfigError as e:
        if e.agreed:  # every rank stops at this same point: a clean exit 2
            teardown_distributed()
        raise
    # Not in a `finally`: teardown waits in a barrier, which a rank that failed alone would hold up until the
    # collective timeout (its peers wait in a collective it never joins). It exits instead; torchrun stops the rest.
    teardown_distributed()
    return results
